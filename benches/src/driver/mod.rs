//! The seam between workloads and systems: roles a workload needs, one driver per system.
//!
//! A workload asks a [`Driver`] for connected roles (a publisher, a subscriber, a
//! requester, a producer with confirms, a consumer with acks); each role owns its own
//! connection, as separate services would. Drivers refuse workloads their system has
//! no sensible mapping for, with the reason.

use std::fmt;
use std::future::Future;

use anyhow::Result;
use bytes::Bytes;
use clap::ValueEnum;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;

pub mod tidings;

#[cfg(feature = "peers")]
pub mod jetstream;
#[cfg(feature = "peers")]
pub mod mqtt;
#[cfg(feature = "peers")]
pub mod nats;
#[cfg(feature = "peers")]
pub mod rabbitmq;
#[cfg(feature = "peers")]
pub mod redis;

/// The workloads, named as in the issue and in the JSON output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum Workload {
    /// P publishers -> 1 subscriber.
    Fanin,
    /// 1 publisher -> K subscribers.
    Fanout,
    /// Durable: producers with confirms -> consumers with acks.
    Queue,
    /// The durable queue at a fixed rate: latency percentiles, read against the
    /// machine's `fdatasync` floor measured in the same run.
    QueueLatency,
    /// Fixed-rate publisher -> 1 subscriber, latency percentiles.
    Latency,
    /// Requesters -> a group of responders.
    Reqrep,
    /// Fixed-rate publisher -> a subscriber that pauses now and then, and a fast one
    /// (not part of `compare`).
    Bursty,
}

impl Workload {
    /// Every workload, in the order `compare` runs them.
    pub const ALL: [Workload; 6] = [
        Workload::Fanin,
        Workload::Fanout,
        Workload::Queue,
        Workload::QueueLatency,
        Workload::Latency,
        Workload::Reqrep,
    ];

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Fanin => "fanin",
            Workload::Fanout => "fanout",
            Workload::Queue => "queue",
            Workload::QueueLatency => "queue-latency",
            Workload::Latency => "latency",
            Workload::Reqrep => "reqrep",
            Workload::Bursty => "bursty",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The systems the bench can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum System {
    /// tidings, through the tidings client crate.
    Tidings,
    /// NATS core (async-nats): subjects, queue groups, request/reply.
    Nats,
    /// NATS JetStream (async-nats): file storage, acked publishes, pull consumers.
    Jetstream,
    /// RabbitMQ (lapin): fanout exchange, direct reply-to, durable queues with confirms.
    Rabbitmq,
    /// Redis (redis crate): pub/sub, streams with consumer groups.
    Redis,
    /// MQTT 3.1.1, e.g. Mosquitto (rumqttc): QoS 0 pub/sub, QoS 1 queue.
    Mqtt,
}

impl System {
    /// Every system, tidings first, in the order `compare` prints them.
    pub const ALL: [System; 6] = [
        System::Tidings,
        System::Nats,
        System::Jetstream,
        System::Rabbitmq,
        System::Redis,
        System::Mqtt,
    ];

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            System::Tidings => "tidings",
            System::Nats => "nats",
            System::Jetstream => "jetstream",
            System::Rabbitmq => "rabbitmq",
            System::Redis => "redis",
            System::Mqtt => "mqtt",
        }
    }

    /// Where the peer listens when `--server` is not given (the packages' defaults).
    #[cfg_attr(not(feature = "peers"), allow(dead_code))]
    pub fn default_server(self) -> Option<&'static str> {
        match self {
            System::Tidings => None,
            System::Nats | System::Jetstream => Some("127.0.0.1:4222"),
            System::Rabbitmq => Some("amqp://guest:guest@127.0.0.1:5672/%2f"),
            System::Redis => Some("redis://127.0.0.1:6379/"),
            System::Mqtt => Some("127.0.0.1:1883"),
        }
    }

    /// Why this system cannot run `workload`, or `Ok` when it can.
    pub fn supports(self, workload: Workload) -> Result<(), &'static str> {
        use System::*;
        use Workload::*;
        match (self, workload) {
            (Tidings, _) => Ok(()),
            (Nats, Queue | QueueLatency) => {
                Err("core NATS keeps nothing: a durable queue needs JetStream (--system jetstream)")
            }
            (Jetstream, Fanin | Fanout | Latency | Reqrep | Bursty) => Err(
                "JetStream is NATS's durable layer; ephemeral pub/sub and request/reply \
                 are core NATS (--system nats)",
            ),
            (Redis, Reqrep) => Err(
                "Redis pub/sub has neither load-balanced groups nor reply inboxes, \
                 so request/reply would be a different protocol built by the bench",
            ),
            (Mqtt, Reqrep) => Err(
                "MQTT 3.1.1 has no reply-to; request/reply would be a convention built by the bench",
            ),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Sends ephemeral (at-most-once) messages to one topic.
pub trait Publisher: Send + 'static {
    /// Publishes one message; may buffer.
    fn publish(&mut self, payload: Bytes) -> impl Future<Output = Result<()>> + Send;
    /// Returns once everything published so far has been handed to the system.
    fn flush(&mut self) -> impl Future<Output = Result<()>> + Send;
}

/// Yields payloads: a subscription, or a durable consumer that acks what it yields.
pub trait Source: Send + 'static {
    /// The next payload; `None` when the system ended the stream. Dropped unfinished
    /// only when the run ends.
    fn next(&mut self) -> impl Future<Output = Result<Option<Bytes>>> + Send;

    /// What went wrong on the way without ending the stream (messages the client
    /// dropped, reconnects), asked once receiving is over.
    fn incidents(&mut self) -> Option<String> {
        None
    }
}

/// Makes one request at a time and waits for its reply.
pub trait Requester: Send + 'static {
    /// Sends `payload` as a request and returns the reply's payload.
    fn request(&mut self, payload: Bytes) -> impl Future<Output = Result<Bytes>> + Send;
}

/// Answers requests with their own payload until stopped.
pub trait Responder: Send + 'static {
    /// Serves until `stop`; returns how many requests it answered.
    fn serve(self, stop: CancellationToken) -> impl Future<Output = Result<u64>> + Send;
}

/// Publishes durable messages with the system's confirm, a bounded number in flight.
pub trait Producer: Send + 'static {
    /// Sends one message; waits only while the in-flight window is full.
    fn send(&mut self, payload: Bytes) -> impl Future<Output = Result<()>> + Send;
    /// Returns once every message sent has been confirmed.
    fn finish(&mut self) -> impl Future<Output = Result<()>> + Send;
}

/// One system: hands out connected roles.
pub trait Driver: Send + Sync + 'static {
    /// See [`Publisher`].
    type Publisher: Publisher;
    /// An ephemeral subscription.
    type Subscriber: Source;
    /// See [`Requester`].
    type Requester: Requester;
    /// See [`Responder`].
    type Responder: Responder;
    /// See [`Producer`].
    type Producer: Producer;
    /// A durable consumer: yields payloads after acking them.
    type Consumer: Source;

    /// Which system this is.
    fn system(&self) -> System;
    /// A publisher on its own connection.
    fn publisher(&self, topic: &str) -> impl Future<Output = Result<Self::Publisher>> + Send;
    /// A subscription on its own connection, active when returned.
    fn subscriber(&self, topic: &str) -> impl Future<Output = Result<Self::Subscriber>> + Send;
    /// A requester on its own connection.
    fn requester(&self, topic: &str) -> impl Future<Output = Result<Self::Requester>> + Send;
    /// A responder in `group` on its own connection, subscribed when returned.
    fn responder(
        &self,
        topic: &str,
        group: &str,
    ) -> impl Future<Output = Result<Self::Responder>> + Send;
    /// Creates the durable queue `queue` fed by `topic`, empty.
    fn declare_queue(&self, queue: &str, topic: &str) -> impl Future<Output = Result<()>> + Send;
    /// A producer with confirms, at most `window` unconfirmed.
    fn producer(
        &self,
        queue: &str,
        topic: &str,
        window: usize,
    ) -> impl Future<Output = Result<Self::Producer>> + Send;
    /// A consumer with explicit acks and `prefetch` credit.
    fn consumer(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> impl Future<Output = Result<Self::Consumer>> + Send;
    /// Removes what `declare_queue` created (best effort).
    fn delete_queue(&self, queue: &str) -> impl Future<Output = Result<()>> + Send;
}

/// The role type of a workload a driver refuses: it has no values, so it is never used.
#[cfg_attr(not(feature = "peers"), allow(dead_code))]
pub enum Unsupported {}

impl Publisher for Unsupported {
    async fn publish(&mut self, _: Bytes) -> Result<()> {
        match *self {}
    }
    async fn flush(&mut self) -> Result<()> {
        match *self {}
    }
}

impl Source for Unsupported {
    async fn next(&mut self) -> Result<Option<Bytes>> {
        match *self {}
    }
}

impl Requester for Unsupported {
    async fn request(&mut self, _: Bytes) -> Result<Bytes> {
        match *self {}
    }
}

impl Responder for Unsupported {
    async fn serve(self, _: CancellationToken) -> Result<u64> {
        match self {}
    }
}

impl Producer for Unsupported {
    async fn send(&mut self, _: Bytes) -> Result<()> {
        match *self {}
    }
    async fn finish(&mut self) -> Result<()> {
        match *self {}
    }
}

/// The error a driver returns for a workload its system cannot run.
#[cfg_attr(not(feature = "peers"), allow(dead_code))]
pub fn refuse<T>(system: System, workload: Workload) -> Result<T> {
    let reason = system.supports(workload).err().unwrap_or("not supported");
    Err(anyhow::anyhow!("{system} cannot run {workload}: {reason}"))
}

/// A bounded set of confirms in flight, used by drivers whose confirm is a future.
pub struct ConfirmWindow {
    in_flight: FuturesUnordered<BoxFuture<'static, Result<()>>>,
    capacity: usize,
}

impl ConfirmWindow {
    /// At most `capacity` (at least one) unconfirmed at a time.
    pub fn new(capacity: usize) -> ConfirmWindow {
        ConfirmWindow {
            in_flight: FuturesUnordered::new(),
            capacity: capacity.max(1),
        }
    }

    /// Adds one confirm, first waiting for room; an earlier failed confirm fails here.
    pub async fn push(&mut self, confirm: BoxFuture<'static, Result<()>>) -> Result<()> {
        while self.in_flight.len() >= self.capacity {
            if let Some(done) = self.in_flight.next().await {
                done?;
            }
        }
        self.in_flight.push(confirm);
        // Poll once now so that the new message goes out at once rather than when
        // the window next fills up; collect whatever confirms are already in.
        while let Some(Some(done)) = futures::FutureExt::now_or_never(self.in_flight.next()) {
            done?;
        }
        Ok(())
    }

    /// Waits for every confirm in flight.
    pub async fn drain(&mut self) -> Result<()> {
        while let Some(done) = self.in_flight.next().await {
            done?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tidings_runs_everything() {
        for w in Workload::ALL {
            assert!(System::Tidings.supports(w).is_ok());
        }
    }

    #[test]
    fn senseless_combinations_are_refused_with_a_reason() {
        let reason = System::Nats.supports(Workload::Queue).unwrap_err();
        assert!(reason.contains("jetstream"));
        assert!(System::Jetstream.supports(Workload::Fanin).is_err());
        assert!(System::Redis.supports(Workload::Reqrep).is_err());
        assert!(System::Mqtt.supports(Workload::Reqrep).is_err());
        assert!(System::Redis.supports(Workload::Queue).is_ok());
        assert!(System::Rabbitmq.supports(Workload::Reqrep).is_ok());
        let err = refuse::<()>(System::Mqtt, Workload::Reqrep).unwrap_err();
        assert!(err.to_string().starts_with("mqtt cannot run reqrep"));
    }

    #[tokio::test]
    async fn confirm_window_bounds_and_reports_failures() {
        let mut window = ConfirmWindow::new(2);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        window
            .push(Box::pin(async move {
                rx.await.map_err(|_| anyhow::anyhow!("never confirmed"))
            }))
            .await
            .expect("room for one");
        window
            .push(Box::pin(async { Ok(()) }))
            .await
            .expect("room for two");
        tx.send(()).expect("receiver alive");
        // A confirm that is already failed surfaces at once, not at the end.
        let err = window
            .push(Box::pin(async { anyhow::bail!("nacked") }))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("nacked"));
        window.drain().await.expect("nothing else failed");
    }
}
