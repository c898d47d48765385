//! The billing worker: declares the durable `billing` queue bound to
//! `orders.created` and consumes it with acks, so no order is missed even when
//! billing was down while orders were placed. Run several copies: they compete
//! for the queue's messages.
//!
//! ```text
//! cargo run -p tidings-broker
//! cargo run -p tidings-client --example billing
//! ```
//!
//! `TIDINGS_SERVER` overrides the broker address (default 127.0.0.1:7878).

use std::time::Duration;

use futures::StreamExt;
use tidings_client::{Client, QueueConfig};

#[tokio::main]
async fn main() -> Result<(), tidings_client::Error> {
    let addr = std::env::var("TIDINGS_SERVER").unwrap_or_else(|_| "127.0.0.1:7878".into());
    let client = Client::builder(addr).name("billing").connect().await?;
    client
        .declare_queue(
            QueueConfig::new("billing")
                .bind("orders.created")
                .max_deliveries(5)
                .backoff([Duration::from_secs(1), Duration::from_secs(5)]),
        )
        .await?;
    let mut deliveries = client.consume("billing", 32).await?;
    println!("billing: consuming queue `billing`");
    while let Some(delivery) = deliveries.next().await {
        let order = String::from_utf8_lossy(delivery.payload()).into_owned();
        if order.trim().is_empty() {
            // Nothing to bill: hand it back for a later look (it dead-letters after
            // five attempts).
            delivery.nack().await?;
            continue;
        }
        println!("billing order (attempt {}): {order}", delivery.attempt());
        delivery.ack().await?;
    }
    Ok(())
}
