//! The pricing service: answers requests on `pricing.quote` with a price. Run
//! several copies: they share requests through the `pricing` group.
//!
//! ```text
//! cargo run -p tidings-broker
//! cargo run -p tidings-client --example pricing
//! ```
//!
//! `TIDINGS_SERVER` overrides the broker address (default 127.0.0.1:7878).

use futures::StreamExt;
use tidings_client::Client;

#[tokio::main]
async fn main() -> Result<(), tidings_client::Error> {
    let addr = std::env::var("TIDINGS_SERVER").unwrap_or_else(|_| "127.0.0.1:7878".into());
    let client = Client::builder(addr).name("pricing").connect().await?;
    let mut requests = client.subscribe_group("pricing.quote", "pricing").await?;
    println!("pricing: answering on pricing.quote");
    while let Some(request) = requests.next().await {
        let sku = String::from_utf8_lossy(request.payload());
        // A toy price: the length of the SKU, in euros.
        let price = format!("{}.00", sku.len());
        println!("quote {sku} -> {price}");
        request.respond(price).await?;
    }
    Ok(())
}
