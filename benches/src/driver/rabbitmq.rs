//! The RabbitMQ driver (lapin): a fanout exchange per topic for pub/sub, direct
//! reply-to for request/reply, and for `queue` a durable queue fed with persistent
//! messages under publisher confirms, consumed with manual acks and a prefetch.

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use futures::StreamExt;
use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio_util::sync::CancellationToken;

use super::{ConfirmWindow, Driver, Producer, Publisher, Requester, Responder, Source, System};

/// The pseudo-queue RabbitMQ offers for replies without declaring a queue.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Connects every role to one RabbitMQ node.
pub struct RabbitDriver {
    uri: String,
}

/// A channel and the connection that must outlive it.
struct Link {
    channel: Channel,
    _conn: Connection,
}

impl RabbitDriver {
    /// Checks that `uri` (an `amqp://` URL) answers.
    pub async fn new(uri: &str) -> Result<RabbitDriver> {
        let driver = RabbitDriver {
            uri: uri.to_owned(),
        };
        driver.link().await?;
        Ok(driver)
    }

    async fn link(&self) -> Result<Link> {
        let conn = Connection::connect(&self.uri, ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to rabbitmq at {}", self.uri))?;
        let channel = conn.create_channel().await.context("opening a channel")?;
        Ok(Link {
            channel,
            _conn: conn,
        })
    }

    /// The fanout exchange standing for `topic`; deleted with its last binding.
    async fn exchange(channel: &Channel, topic: &str) -> Result<()> {
        channel
            .exchange_declare(
                topic.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("declaring exchange {topic}"))
    }
}

/// Publishes to the topic's fanout exchange, no confirms (at-most-once, like the rest).
pub struct RabbitPublisher {
    link: Link,
    exchange: String,
}

impl Publisher for RabbitPublisher {
    async fn publish(&mut self, payload: Bytes) -> Result<()> {
        self.link
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default(),
            )
            .await?;
        Ok(())
    }
    async fn flush(&mut self) -> Result<()> {
        // Publishes have no answer; a passive declare on the same channel does, and
        // RabbitMQ handles a channel's frames in order, so its answer means every
        // publish before it has reached the broker.
        self.link
            .channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .context("flushing")?;
        Ok(())
    }
}

/// An exclusive, server-named queue bound to the exchange, consumed without acks.
pub struct RabbitSubscriber {
    consumer: lapin::Consumer,
    _link: Link,
}

impl Source for RabbitSubscriber {
    async fn next(&mut self) -> Result<Option<Bytes>> {
        match self.consumer.next().await {
            None => Ok(None),
            Some(delivery) => Ok(Some(Bytes::from(delivery?.data))),
        }
    }
}

/// Publishes requests with `reply-to: amq.rabbitmq.reply-to` and reads replies there.
pub struct RabbitRequester {
    link: Link,
    replies: lapin::Consumer,
    queue: String,
}

impl Requester for RabbitRequester {
    async fn request(&mut self, payload: Bytes) -> Result<Bytes> {
        self.link
            .channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default().with_reply_to(DIRECT_REPLY_TO.into()),
            )
            .await?;
        let reply = tokio::time::timeout(std::time::Duration::from_secs(5), self.replies.next())
            .await
            .map_err(|_| anyhow!("no reply within 5 s"))?
            .ok_or_else(|| anyhow!("the reply consumer was cancelled"))??;
        Ok(Bytes::from(reply.data))
    }
}

/// A consumer on the shared request queue; RabbitMQ spreads requests over them.
pub struct RabbitResponder {
    link: Link,
    requests: lapin::Consumer,
}

impl Responder for RabbitResponder {
    async fn serve(mut self, stop: CancellationToken) -> Result<u64> {
        let mut answered = 0;
        loop {
            let request = tokio::select! {
                () = stop.cancelled() => break,
                request = self.requests.next() => request,
            };
            let Some(request) = request else { break };
            let request = request?;
            let Some(reply_to) = request.properties.reply_to().clone() else {
                continue;
            };
            self.link
                .channel
                .basic_publish(
                    "".into(),
                    reply_to,
                    BasicPublishOptions::default(),
                    &request.data,
                    BasicProperties::default(),
                )
                .await?;
            answered += 1;
        }
        Ok(answered)
    }
}

/// Persistent messages to the durable queue under publisher confirms.
pub struct RabbitProducer {
    link: Link,
    queue: String,
    window: ConfirmWindow,
}

impl Producer for RabbitProducer {
    async fn send(&mut self, payload: Bytes) -> Result<()> {
        let confirm = self
            .link
            .channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        self.window
            .push(Box::pin(async move {
                match confirm.await? {
                    Confirmation::Ack(None) => Ok(()),
                    Confirmation::Ack(Some(returned)) => {
                        Err(anyhow!("returned unroutable: {:?}", returned.reply_text))
                    }
                    other => Err(anyhow!("not confirmed: {other:?}")),
                }
            }))
            .await
    }
    async fn finish(&mut self) -> Result<()> {
        self.window.drain().await
    }
}

/// A manual-ack consumer with a prefetch; acks each delivery before yielding it.
pub struct RabbitConsumer {
    consumer: lapin::Consumer,
    _link: Link,
}

impl Source for RabbitConsumer {
    async fn next(&mut self) -> Result<Option<Bytes>> {
        let Some(delivery) = self.consumer.next().await else {
            return Ok(None);
        };
        let delivery = delivery?;
        delivery.ack(BasicAckOptions::default()).await?;
        Ok(Some(Bytes::from(delivery.data)))
    }
}

impl Driver for RabbitDriver {
    type Publisher = RabbitPublisher;
    type Subscriber = RabbitSubscriber;
    type Requester = RabbitRequester;
    type Responder = RabbitResponder;
    type Producer = RabbitProducer;
    type Consumer = RabbitConsumer;

    fn system(&self) -> System {
        System::Rabbitmq
    }

    async fn publisher(&self, topic: &str) -> Result<RabbitPublisher> {
        let link = self.link().await?;
        Self::exchange(&link.channel, topic).await?;
        Ok(RabbitPublisher {
            link,
            exchange: topic.to_owned(),
        })
    }

    async fn subscriber(&self, topic: &str) -> Result<RabbitSubscriber> {
        let link = self.link().await?;
        Self::exchange(&link.channel, topic).await?;
        let queue = link
            .channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        link.channel
            .queue_bind(
                queue.name().clone(),
                topic.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = link
            .channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(RabbitSubscriber {
            consumer,
            _link: link,
        })
    }

    async fn requester(&self, topic: &str) -> Result<RabbitRequester> {
        let link = self.link().await?;
        // Direct reply-to: consume the pseudo-queue (no acks) before publishing.
        let replies = link
            .channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(RabbitRequester {
            link,
            replies,
            queue: topic.to_owned(),
        })
    }

    async fn responder(&self, topic: &str, _group: &str) -> Result<RabbitResponder> {
        let link = self.link().await?;
        // One queue per topic is RabbitMQ's way of load-balancing: every responder
        // consumes from it and each request goes to one of them.
        link.channel
            .queue_declare(
                topic.into(),
                QueueDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let requests = link
            .channel
            .basic_consume(
                topic.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(RabbitResponder { link, requests })
    }

    async fn declare_queue(&self, queue: &str, _topic: &str) -> Result<()> {
        let link = self.link().await?;
        link.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("declaring durable queue {queue}"))?;
        Ok(())
    }

    async fn producer(&self, queue: &str, _topic: &str, window: usize) -> Result<RabbitProducer> {
        let link = self.link().await?;
        link.channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(RabbitProducer {
            link,
            queue: queue.to_owned(),
            window: ConfirmWindow::new(window),
        })
    }

    async fn consumer(&self, queue: &str, prefetch: u16) -> Result<RabbitConsumer> {
        let link = self.link().await?;
        link.channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = link
            .channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(RabbitConsumer {
            consumer,
            _link: link,
        })
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        let link = self.link().await?;
        link.channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
        Ok(())
    }
}
