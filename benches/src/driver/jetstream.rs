//! The NATS JetStream driver (async-nats): a file-backed stream, publishes acked by
//! the server, a durable pull consumer with explicit acks.

use anyhow::{Context, Result, anyhow};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;

use super::{ConfirmWindow, Driver, Producer, Source, System, Unsupported, Workload, refuse};

/// Connects every role to one nats-server started with `-js`.
pub struct JetstreamDriver {
    addr: String,
}

impl JetstreamDriver {
    /// Checks that `addr` answers; whether JetStream is on shows when the stream is
    /// created (start nats-server with `-js`).
    pub async fn new(addr: &str) -> Result<JetstreamDriver> {
        let driver = JetstreamDriver {
            addr: addr.to_owned(),
        };
        driver.context().await?;
        Ok(driver)
    }

    async fn context(&self) -> Result<jetstream::Context> {
        let client = async_nats::ConnectOptions::new()
            .name("tidings-bench")
            .connect(self.addr.as_str())
            .await
            .with_context(|| format!("connecting to nats at {}", self.addr))?;
        Ok(jetstream::new(client))
    }
}

/// Publishes and keeps a window of publish acks in flight.
pub struct JetstreamProducer {
    js: jetstream::Context,
    subject: String,
    window: ConfirmWindow,
}

impl Producer for JetstreamProducer {
    async fn send(&mut self, payload: Bytes) -> Result<()> {
        let ack = self
            .js
            .publish(self.subject.clone(), payload)
            .await
            .context("publishing")?;
        self.window
            .push(Box::pin(async move {
                ack.await.map_err(|e| anyhow!("publish ack: {e}"))?;
                Ok(())
            }))
            .await
    }
    async fn finish(&mut self) -> Result<()> {
        self.window.drain().await
    }
}

/// Pulls from the durable consumer and acks each message before yielding it.
pub struct JetstreamConsumer {
    messages: BoxStream<'static, Result<jetstream::Message>>,
}

impl Source for JetstreamConsumer {
    async fn next(&mut self) -> Result<Option<Bytes>> {
        let Some(message) = self.messages.next().await else {
            return Ok(None);
        };
        let message = message?;
        message
            .ack()
            .await
            .map_err(|e| anyhow!("ack failed: {e}"))?;
        Ok(Some(message.payload.clone()))
    }
}

/// Stream and consumer share the queue's name.
fn durable(queue: &str) -> String {
    // Stream and consumer names may not contain dots.
    queue.replace('.', "-")
}

impl Driver for JetstreamDriver {
    type Publisher = Unsupported;
    type Subscriber = Unsupported;
    type Requester = Unsupported;
    type Responder = Unsupported;
    type Producer = JetstreamProducer;
    type Consumer = JetstreamConsumer;

    fn system(&self) -> System {
        System::Jetstream
    }

    async fn publisher(&self, _: &str) -> Result<Unsupported> {
        refuse(System::Jetstream, Workload::Fanin)
    }

    async fn subscriber(&self, _: &str) -> Result<Unsupported> {
        refuse(System::Jetstream, Workload::Fanin)
    }

    async fn requester(&self, _: &str) -> Result<Unsupported> {
        refuse(System::Jetstream, Workload::Reqrep)
    }

    async fn responder(&self, _: &str, _: &str) -> Result<Unsupported> {
        refuse(System::Jetstream, Workload::Reqrep)
    }

    async fn declare_queue(&self, queue: &str, topic: &str) -> Result<()> {
        let js = self.context().await?;
        let name = durable(queue);
        // A leftover from an interrupted run would hold old messages.
        let _ = js.delete_stream(&name).await;
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![topic.to_owned()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("creating stream {name} (is nats-server running with -js?): {e}"))?;
        Ok(())
    }

    async fn producer(
        &self,
        _queue: &str,
        topic: &str,
        window: usize,
    ) -> Result<JetstreamProducer> {
        Ok(JetstreamProducer {
            js: self.context().await?,
            subject: topic.to_owned(),
            window: ConfirmWindow::new(window),
        })
    }

    async fn consumer(&self, queue: &str, prefetch: u16) -> Result<JetstreamConsumer> {
        let js = self.context().await?;
        let name = durable(queue);
        let stream = js
            .get_stream(&name)
            .await
            .map_err(|e| anyhow!("stream {name}: {e}"))?;
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    max_ack_pending: i64::from(prefetch),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| anyhow!("consumer {name}: {e}"))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(usize::from(prefetch))
            .messages()
            .await
            .map_err(|e| anyhow!("pulling from {name}: {e}"))?;
        Ok(JetstreamConsumer {
            messages: messages.map(|m| m.map_err(|e| anyhow!("{e}"))).boxed(),
        })
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        let js = self.context().await?;
        js.delete_stream(durable(queue))
            .await
            .map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }
}
