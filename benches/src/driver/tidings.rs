//! The tidings driver: the real tidings client over TCP, to a given broker, to a
//! `tidings-broker` process started for the run, or to a broker started in this
//! process; the last two on 127.0.0.1 with a free port and a temporary data dir.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use tidings_broker::{BrokerHandle, Config};
use tidings_client::{Client, Consumer, Event, Events, Message, QueueConfig, Subscription};
use tokio_util::sync::CancellationToken;

use crate::broker_process::BrokerProcess;

use super::{ConfirmWindow, Driver, Producer, Publisher, Requester, Responder, Source, System};

/// How long one request may wait for its reply before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the tidings broker of a run comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// A broker already running at this address.
    External(String),
    /// A `tidings-broker` process started from this binary for the run, like the peers
    /// run in processes of their own.
    Process(PathBuf),
    /// A broker started inside the bench's process, sharing its tokio runtime (and
    /// its cores) with the clients: the fallback when no broker binary is at hand.
    InProcess,
}

impl Launch {
    /// The name used in the JSON `details.broker_mode`.
    pub fn mode(&self) -> &'static str {
        match self {
            Launch::External(_) => "external",
            Launch::Process(_) => "process",
            Launch::InProcess => "in-process",
        }
    }
}

/// The broker a driver talks to, and what it must stop at the end.
enum Broker {
    External,
    // Field order matters: the broker stops before its data dir is removed.
    Embedded(BrokerHandle, tempfile::TempDir),
    Process(BrokerProcess),
}

/// Connects to a broker, owning it when it started one for the run.
pub struct TidingsDriver {
    addr: String,
    broker: Broker,
}

impl TidingsDriver {
    /// Targets, starts or spawns the broker as `launch` says.
    pub async fn new(launch: &Launch) -> Result<TidingsDriver> {
        match launch {
            Launch::External(addr) => Ok(TidingsDriver {
                addr: addr.clone(),
                broker: Broker::External,
            }),
            Launch::Process(bin) => {
                let process = BrokerProcess::start(bin).await?;
                Ok(TidingsDriver {
                    addr: process.addr().to_string(),
                    broker: Broker::Process(process),
                })
            }
            Launch::InProcess => {
                let data = tempfile::tempdir().context("creating a temporary data dir")?;
                let broker = tidings_broker::Broker::start(Config::for_test(data.path()))
                    .await
                    .context("starting the in-process broker")?;
                Ok(TidingsDriver {
                    addr: broker.local_addr().to_string(),
                    broker: Broker::Embedded(broker, data),
                })
            }
        }
    }

    /// A driver owning `process`, a broker started by the caller.
    pub fn from_process(process: BrokerProcess) -> TidingsDriver {
        TidingsDriver {
            addr: process.addr().to_string(),
            broker: Broker::Process(process),
        }
    }

    /// The broker process's id, when this driver spawned one.
    pub fn broker_pid(&self) -> Option<u32> {
        match &self.broker {
            Broker::Process(process) => Some(process.pid()),
            _ => None,
        }
    }

    /// Stops the broker this driver started, if any; an unclean exit is an error.
    pub async fn shutdown(self) -> Result<()> {
        match self.broker {
            Broker::External => Ok(()),
            Broker::Embedded(broker, _data) => {
                broker.shutdown().await;
                Ok(())
            }
            Broker::Process(process) => process.stop().await,
        }
    }

    /// A new client connection to the broker.
    pub async fn connect(&self) -> Result<Client> {
        Client::builder(self.addr.as_str())
            .name("tidings-bench")
            .connect()
            .await
            .with_context(|| format!("connecting to tidings at {}", self.addr))
    }
}

/// Publishes through its own client; the client pipelines and coalesces writes.
pub struct TidingsPublisher {
    client: Client,
    topic: String,
}

impl Publisher for TidingsPublisher {
    async fn publish(&mut self, payload: Bytes) -> Result<()> {
        Ok(self.client.publish(self.topic.as_str(), payload).await?)
    }
    async fn flush(&mut self) -> Result<()> {
        Ok(self.client.flush().await?)
    }
}

/// A subscription; keeps its client alive and notes what its connection went through.
pub struct TidingsSubscriber {
    sub: Subscription,
    events: Option<Events>,
    /// Connection drops seen, with the first reason.
    disconnects: (u32, Option<String>),
    _client: Client,
}

impl Source for TidingsSubscriber {
    async fn next(&mut self) -> Result<Option<Bytes>> {
        loop {
            let Some(events) = self.events.as_mut() else {
                return Ok(self.sub.next().await.map(Message::into_payload));
            };
            // Biased: messages first, so the events stream costs nothing while
            // messages keep coming.
            tokio::select! {
                biased;
                message = self.sub.next() => return Ok(message.map(Message::into_payload)),
                event = events.next() => match event {
                    Some(Event::Disconnected { reason }) => {
                        self.disconnects.0 += 1;
                        self.disconnects.1.get_or_insert(reason);
                    }
                    Some(_) => {}
                    None => self.events = None,
                },
            }
        }
    }

    fn incidents(&mut self) -> Option<String> {
        let dropped = self.sub.dropped();
        let mut said = Vec::new();
        if dropped > 0 {
            said.push(format!(
                "the client dropped {dropped} messages: the subscription's buffer was full \
                 (slow subscription)"
            ));
        }
        if let (n @ 1.., reason) = &self.disconnects {
            said.push(format!(
                "the connection dropped {n} time(s), first: {}",
                reason.as_deref().unwrap_or("?")
            ));
        }
        (!said.is_empty()).then(|| said.join("; "))
    }
}

/// Requests through its own client (and its private inbox).
pub struct TidingsRequester {
    client: Client,
    topic: String,
}

impl Requester for TidingsRequester {
    async fn request(&mut self, payload: Bytes) -> Result<Bytes> {
        let reply = self
            .client
            .request_timeout(self.topic.as_str(), payload, REQUEST_TIMEOUT)
            .await?;
        Ok(reply.into_payload())
    }
}

/// A member of a subscription group that echoes each request.
pub struct TidingsResponder {
    sub: Subscription,
    client: Client,
}

impl Responder for TidingsResponder {
    async fn serve(mut self, stop: CancellationToken) -> Result<u64> {
        let mut answered = 0;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                request = self.sub.next() => {
                    let Some(request) = request else { break };
                    let body = request.payload().clone();
                    request.respond(body).await?;
                    answered += 1;
                }
            }
        }
        self.client.flush().await?;
        Ok(answered)
    }
}

/// Publishes with the broker's confirm, a window of them in flight.
pub struct TidingsProducer {
    client: Client,
    topic: String,
    window: ConfirmWindow,
}

impl Producer for TidingsProducer {
    async fn send(&mut self, payload: Bytes) -> Result<()> {
        let client = self.client.clone();
        let message = Message::new(self.topic.as_str(), payload);
        self.window
            .push(Box::pin(async move {
                let confirm = client.publish_confirmed(message).await?;
                anyhow::ensure!(
                    confirm.queues >= 1,
                    "the broker confirmed but stored the message in no queue ({confirm:?})"
                );
                Ok(())
            }))
            .await
    }
    async fn finish(&mut self) -> Result<()> {
        self.window.drain().await
    }
}

/// A queue consumer that acks each delivery before yielding it.
pub struct TidingsConsumer {
    consumer: Consumer,
    _client: Client,
}

impl Source for TidingsConsumer {
    async fn next(&mut self) -> Result<Option<Bytes>> {
        let Some(delivery) = self.consumer.next().await else {
            return Ok(None);
        };
        let body = delivery.payload().clone();
        delivery.ack().await?;
        Ok(Some(body))
    }
}

impl Driver for TidingsDriver {
    type Publisher = TidingsPublisher;
    type Subscriber = TidingsSubscriber;
    type Requester = TidingsRequester;
    type Responder = TidingsResponder;
    type Producer = TidingsProducer;
    type Consumer = TidingsConsumer;

    fn system(&self) -> System {
        System::Tidings
    }

    async fn publisher(&self, topic: &str) -> Result<TidingsPublisher> {
        Ok(TidingsPublisher {
            client: self.connect().await?,
            topic: topic.to_owned(),
        })
    }

    async fn subscriber(&self, topic: &str) -> Result<TidingsSubscriber> {
        let client = self.connect().await?;
        let events = client.events();
        let sub = client.subscribe(topic).await?;
        Ok(TidingsSubscriber {
            sub,
            events: Some(events),
            disconnects: (0, None),
            _client: client,
        })
    }

    async fn requester(&self, topic: &str) -> Result<TidingsRequester> {
        Ok(TidingsRequester {
            client: self.connect().await?,
            topic: topic.to_owned(),
        })
    }

    async fn responder(&self, topic: &str, group: &str) -> Result<TidingsResponder> {
        let client = self.connect().await?;
        let sub = client.subscribe_group(topic, group).await?;
        Ok(TidingsResponder { sub, client })
    }

    async fn declare_queue(&self, queue: &str, topic: &str) -> Result<()> {
        let client = self.connect().await?;
        client
            .declare_queue(QueueConfig::new(queue).bind(topic))
            .await?;
        Ok(())
    }

    async fn producer(&self, _queue: &str, topic: &str, window: usize) -> Result<TidingsProducer> {
        Ok(TidingsProducer {
            client: self.connect().await?,
            topic: topic.to_owned(),
            window: ConfirmWindow::new(window),
        })
    }

    async fn consumer(&self, queue: &str, prefetch: u16) -> Result<TidingsConsumer> {
        let client = self.connect().await?;
        let consumer = client.consume(queue, u32::from(prefetch)).await?;
        Ok(TidingsConsumer {
            consumer,
            _client: client,
        })
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        let client = self.connect().await?;
        client.delete_queue(queue).await?;
        Ok(())
    }
}
