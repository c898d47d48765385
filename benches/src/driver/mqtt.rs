//! The MQTT 3.1.1 driver (rumqttc), e.g. against Mosquitto: QoS 0 for pub/sub; for
//! `queue`, QoS 1 publishes (the PUBACK is the confirm) to QoS 1 subscribers, shared
//! (`$share/…`) when there are several consumers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Driver, Producer, Publisher, Source, System, Unsupported, Workload, refuse};

/// Where a publisher's flush marker goes; nothing subscribes to it.
const FLUSH_TOPIC: &str = "tidings-bench/flush";

/// Connects every role to one MQTT broker.
pub struct MqttDriver {
    host: String,
    port: u16,
    clients: AtomicU32,
    /// Queue name -> topic, since an MQTT "queue" is just a QoS 1 subscription.
    queues: Mutex<HashMap<String, String>>,
}

/// A connection: the client handle and the task that polls its event loop.
struct Conn {
    client: AsyncClient,
    /// Payloads of incoming PUBLISH packets (or the error that ended the connection).
    incoming: mpsc::Receiver<Result<Bytes>>,
    /// Released once per PUBACK.
    acked: Arc<Semaphore>,
    /// Fired on the first SUBACK.
    subscribed: Option<oneshot::Receiver<()>>,
    poller: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

/// MQTT topics use `/` where tidings and NATS use `.`.
fn mqtt_topic(topic: &str) -> String {
    topic.replace('.', "/")
}

impl MqttDriver {
    /// Targets `addr` (`host:port`); connections are made per role.
    pub fn new(addr: &str) -> Result<MqttDriver> {
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("mqtt address must be host:port, got {addr}"))?;
        Ok(MqttDriver {
            host: host.to_owned(),
            port: port
                .parse()
                .with_context(|| format!("port in mqtt address {addr}"))?,
            clients: AtomicU32::new(0),
            queues: Mutex::new(HashMap::new()),
        })
    }

    fn connect(&self, inflight: u16) -> Conn {
        let n = self.clients.fetch_add(1, Ordering::Relaxed);
        let id = format!("tidings-bench-{}-{n}", std::process::id());
        let mut opts = MqttOptions::new(id, self.host.clone(), self.port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_inflight(inflight.max(1))
            .set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024)
            .set_clean_session(true);
        let (client, mut events) = AsyncClient::new(opts, 1024);
        let (incoming_tx, incoming) = mpsc::channel(4096);
        let acked = Arc::new(Semaphore::new(0));
        let (sub_tx, subscribed) = oneshot::channel();
        let poller = tokio::spawn({
            let acked = acked.clone();
            async move {
                let mut sub_tx = Some(sub_tx);
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            // Waiting here pushes back on the socket, never drops.
                            if incoming_tx.send(Ok(p.payload)).await.is_err() {
                                return;
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => acked.add_permits(1),
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(tx) = sub_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let _ = incoming_tx
                                .send(Err(anyhow!("mqtt connection failed: {e}")))
                                .await;
                            // Wake a producer waiting for acks that will never come.
                            acked.close();
                            return;
                        }
                    }
                }
            }
        });
        Conn {
            client,
            incoming,
            acked,
            subscribed: Some(subscribed),
            poller,
        }
    }

    /// A connection subscribed to `filter` at `qos`, returned once the SUBACK is in.
    async fn subscribed(&self, filter: &str, qos: QoS) -> Result<Conn> {
        let mut conn = self.connect(100);
        conn.client.subscribe(filter, qos).await?;
        let subscribed = conn.subscribed.take().context("fresh connection")?;
        match tokio::time::timeout(Duration::from_secs(10), subscribed).await {
            Ok(Ok(())) => Ok(conn),
            _ => {
                let why = match conn.incoming.try_recv() {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => "no SUBACK within 10 s".into(),
                };
                Err(anyhow!("subscribing to {filter}: {why}"))
            }
        }
    }
}

/// QoS 0 publishes.
pub struct MqttPublisher {
    conn: Conn,
    topic: String,
}

impl Publisher for MqttPublisher {
    async fn publish(&mut self, payload: Bytes) -> Result<()> {
        self.conn
            .client
            .publish_bytes(self.topic.as_str(), QoS::AtMostOnce, false, payload)
            .await?;
        Ok(())
    }
    async fn flush(&mut self) -> Result<()> {
        // rumqttc queues requests for its event loop and handles them in order, and
        // QoS 0 has no answer of its own: the PUBACK of a QoS 1 marker proves that
        // everything queued before it has been written.
        self.conn
            .client
            .publish(FLUSH_TOPIC, QoS::AtLeastOnce, false, Vec::new())
            .await?;
        let acked = tokio::time::timeout(Duration::from_secs(30), self.conn.acked.acquire());
        match acked.await {
            Ok(Ok(permit)) => {
                permit.forget();
                Ok(())
            }
            Ok(Err(_)) => Err(anyhow!("connection lost while flushing")),
            Err(_) => Err(anyhow!("no PUBACK for the flush marker within 30 s")),
        }
    }
}

/// Incoming publishes of one connection (QoS 0 subscriber or QoS 1 consumer; rumqttc
/// sends the PUBACK of a QoS 1 delivery itself once it has read it).
pub struct MqttSubscriber {
    conn: Conn,
}

impl Source for MqttSubscriber {
    async fn next(&mut self) -> Result<Option<Bytes>> {
        self.conn.incoming.recv().await.transpose()
    }
}

/// QoS 1 publishes, at most `window` without their PUBACK.
pub struct MqttProducer {
    conn: Conn,
    topic: String,
    window: u32,
    unacked: u32,
}

impl Producer for MqttProducer {
    async fn send(&mut self, payload: Bytes) -> Result<()> {
        if self.unacked >= self.window {
            self.conn
                .acked
                .acquire()
                .await
                .map_err(|_| anyhow!("connection lost while waiting for PUBACKs"))?
                .forget();
            self.unacked -= 1;
        }
        self.conn
            .client
            .publish_bytes(self.topic.as_str(), QoS::AtLeastOnce, false, payload)
            .await?;
        self.unacked += 1;
        Ok(())
    }
    async fn finish(&mut self) -> Result<()> {
        if self.unacked > 0 {
            self.conn
                .acked
                .acquire_many(self.unacked)
                .await
                .map_err(|_| anyhow!("connection lost with {} unacked", self.unacked))?
                .forget();
            self.unacked = 0;
        }
        Ok(())
    }
}

impl Driver for MqttDriver {
    type Publisher = MqttPublisher;
    type Subscriber = MqttSubscriber;
    type Requester = Unsupported;
    type Responder = Unsupported;
    type Producer = MqttProducer;
    type Consumer = MqttSubscriber;

    fn system(&self) -> System {
        System::Mqtt
    }

    async fn publisher(&self, topic: &str) -> Result<MqttPublisher> {
        Ok(MqttPublisher {
            conn: self.connect(100),
            topic: mqtt_topic(topic),
        })
    }

    async fn subscriber(&self, topic: &str) -> Result<MqttSubscriber> {
        let conn = self.subscribed(&mqtt_topic(topic), QoS::AtMostOnce).await?;
        Ok(MqttSubscriber { conn })
    }

    async fn requester(&self, _: &str) -> Result<Unsupported> {
        refuse(System::Mqtt, Workload::Reqrep)
    }

    async fn responder(&self, _: &str, _: &str) -> Result<Unsupported> {
        refuse(System::Mqtt, Workload::Reqrep)
    }

    async fn declare_queue(&self, queue: &str, topic: &str) -> Result<()> {
        self.queues
            .lock()
            .map_err(|_| anyhow!("queue table poisoned"))?
            .insert(queue.to_owned(), mqtt_topic(topic));
        Ok(())
    }

    async fn producer(&self, _queue: &str, topic: &str, window: usize) -> Result<MqttProducer> {
        let window = u16::try_from(window).unwrap_or(u16::MAX);
        Ok(MqttProducer {
            conn: self.connect(window),
            topic: mqtt_topic(topic),
            window: u32::from(window),
            unacked: 0,
        })
    }

    async fn consumer(&self, queue: &str, _prefetch: u16) -> Result<MqttSubscriber> {
        let topic = self
            .queues
            .lock()
            .map_err(|_| anyhow!("queue table poisoned"))?
            .get(queue)
            .cloned()
            .ok_or_else(|| anyhow!("queue {queue} was not declared"))?;
        // A shared subscription makes consumers compete, as on a queue; with one
        // consumer the plain subscription is the same thing.
        let filter = format!("$share/tidings-bench/{topic}");
        let conn = self.subscribed(&filter, QoS::AtLeastOnce).await?;
        Ok(MqttSubscriber { conn })
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        self.queues
            .lock()
            .map_err(|_| anyhow!("queue table poisoned"))?
            .remove(queue);
        Ok(())
    }
}
