//! The NATS core driver (async-nats): subjects, queue groups and request/reply.

use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::{Client, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{
    Driver, Publisher, Requester, Responder, Source, System, Unsupported, Workload, refuse,
};

/// How long one request may wait for its reply, as for tidings.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects every role to one nats-server.
pub struct NatsDriver {
    addr: String,
}

impl NatsDriver {
    /// Checks that `addr` answers, so that a wrong address fails before the run.
    pub async fn new(addr: &str) -> Result<NatsDriver> {
        let driver = NatsDriver {
            addr: addr.to_owned(),
        };
        driver.connect().await?;
        Ok(driver)
    }

    /// A new client connection to the server.
    pub async fn connect(&self) -> Result<Client> {
        async_nats::ConnectOptions::new()
            .name("tidings-bench")
            .request_timeout(Some(REQUEST_TIMEOUT))
            .connect(self.addr.as_str())
            .await
            .with_context(|| format!("connecting to nats at {}", self.addr))
    }
}

/// Publishes on its own connection; async-nats batches writes itself.
pub struct NatsPublisher {
    client: Client,
    subject: String,
}

impl Publisher for NatsPublisher {
    async fn publish(&mut self, payload: Bytes) -> Result<()> {
        Ok(self.client.publish(self.subject.clone(), payload).await?)
    }
    async fn flush(&mut self) -> Result<()> {
        Ok(self.client.flush().await?)
    }
}

/// A subscription with its connection.
pub struct NatsSubscriber {
    sub: Subscriber,
    _client: Client,
}

impl Source for NatsSubscriber {
    async fn next(&mut self) -> Result<Option<Bytes>> {
        Ok(self.sub.next().await.map(|m| m.payload))
    }
}

/// Requests through the client's inbox.
pub struct NatsRequester {
    client: Client,
    subject: String,
}

impl Requester for NatsRequester {
    async fn request(&mut self, payload: Bytes) -> Result<Bytes> {
        Ok(self
            .client
            .request(self.subject.clone(), payload)
            .await?
            .payload)
    }
}

/// A queue-group member echoing each request.
pub struct NatsResponder {
    sub: Subscriber,
    client: Client,
}

impl Responder for NatsResponder {
    async fn serve(mut self, stop: CancellationToken) -> Result<u64> {
        let mut answered = 0;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                request = self.sub.next() => {
                    let Some(request) = request else { break };
                    if let Some(reply) = request.reply {
                        self.client.publish(reply, request.payload).await?;
                        answered += 1;
                    }
                }
            }
        }
        self.client.flush().await?;
        Ok(answered)
    }
}

impl Driver for NatsDriver {
    type Publisher = NatsPublisher;
    type Subscriber = NatsSubscriber;
    type Requester = NatsRequester;
    type Responder = NatsResponder;
    type Producer = Unsupported;
    type Consumer = Unsupported;

    fn system(&self) -> System {
        System::Nats
    }

    async fn publisher(&self, topic: &str) -> Result<NatsPublisher> {
        Ok(NatsPublisher {
            client: self.connect().await?,
            subject: topic.to_owned(),
        })
    }

    async fn subscriber(&self, topic: &str) -> Result<NatsSubscriber> {
        let client = self.connect().await?;
        let sub = client.subscribe(topic.to_owned()).await?;
        // A PING/PONG round trip: the server has processed the SUB when it answers.
        client.flush().await?;
        Ok(NatsSubscriber {
            sub,
            _client: client,
        })
    }

    async fn requester(&self, topic: &str) -> Result<NatsRequester> {
        Ok(NatsRequester {
            client: self.connect().await?,
            subject: topic.to_owned(),
        })
    }

    async fn responder(&self, topic: &str, group: &str) -> Result<NatsResponder> {
        let client = self.connect().await?;
        let sub = client
            .queue_subscribe(topic.to_owned(), group.to_owned())
            .await?;
        client.flush().await?;
        Ok(NatsResponder { sub, client })
    }

    async fn declare_queue(&self, _: &str, _: &str) -> Result<()> {
        refuse(System::Nats, Workload::Queue)
    }

    async fn producer(&self, _: &str, _: &str, _: usize) -> Result<Unsupported> {
        refuse(System::Nats, Workload::Queue)
    }

    async fn consumer(&self, _: &str, _: u16) -> Result<Unsupported> {
        refuse(System::Nats, Workload::Queue)
    }

    async fn delete_queue(&self, _: &str) -> Result<()> {
        Ok(())
    }
}
