//! The orders service: asks the pricing service for a quote on `pricing.quote`,
//! then publishes `orders.created` events. It knows neither pricing nor billing;
//! it only knows the bus.
//!
//! Run a broker, the pricing service and the billing worker, then this:
//!
//! ```text
//! cargo run -p tidings-broker
//! cargo run -p tidings-client --example pricing
//! cargo run -p tidings-client --example billing
//! cargo run -p tidings-client --example orders
//! ```
//!
//! `TIDINGS_SERVER` overrides the broker address (default 127.0.0.1:7878).

use std::time::Duration;

use tidings_client::{Client, Message, RequestError};

#[tokio::main]
async fn main() -> Result<(), tidings_client::Error> {
    let addr = std::env::var("TIDINGS_SERVER").unwrap_or_else(|_| "127.0.0.1:7878".into());
    let client = Client::builder(addr).name("orders").connect().await?;

    for order in 1..=5 {
        let sku = format!("sku-{order}");
        let price = match client
            .request_timeout("pricing.quote", sku.clone(), Duration::from_secs(2))
            .await
        {
            Ok(reply) => String::from_utf8_lossy(reply.payload()).into_owned(),
            Err(RequestError::NoResponders { .. }) => {
                eprintln!("pricing is not running; using list price");
                "9.99".to_owned()
            }
            Err(e) => return Err(e.into()),
        };
        let event = format!(r#"{{"order":{order},"sku":"{sku}","price":{price}}}"#);
        let confirm = client
            .publish_confirmed(
                Message::new("orders.created", event.clone())
                    .header("content-type", "application/json")
                    .id(format!("order-{order}")),
            )
            .await?;
        println!(
            "order {order}: {event} (stored in {} queue(s))",
            confirm.queues
        );
    }
    Ok(())
}
