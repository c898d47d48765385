//! The Redis driver (redis crate): PUBLISH/SUBSCRIBE for pub/sub, and for `queue` a
//! stream with a consumer group (XADD, XREADGROUP, XACK). Redis answers XADD once
//! the entry is in memory: with the peers script's settings nothing is persisted.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;

use super::{
    ConfirmWindow, Driver, Producer, Publisher, Source, System, Unsupported, Workload, refuse,
};

/// Commands per pipeline: Redis answers a pipeline in one write, so batching is how
/// any Redis client reaches its throughput.
const BATCH: usize = 64;

/// The consumer group every `queue` consumer joins.
const GROUP: &str = "tidings-bench";

/// Connects every role to one Redis server.
pub struct RedisDriver {
    client: redis::Client,
    consumers: AtomicU32,
}

impl RedisDriver {
    /// Checks that `url` (`redis://host:port/`) answers.
    pub async fn new(url: &str) -> Result<RedisDriver> {
        let client = redis::Client::open(url).with_context(|| format!("redis url {url}"))?;
        let driver = RedisDriver {
            client,
            consumers: AtomicU32::new(0),
        };
        driver.connect().await?;
        Ok(driver)
    }

    async fn connect(&self) -> Result<MultiplexedConnection> {
        self.client
            .get_multiplexed_async_connection()
            .await
            .context("connecting to redis")
    }
}

/// Sends pipelines of commands, a few pipelines in flight.
struct Pipelined {
    conn: MultiplexedConnection,
    pipe: redis::Pipeline,
    queued: usize,
    window: ConfirmWindow,
}

impl Pipelined {
    fn new(conn: MultiplexedConnection, in_flight: usize) -> Pipelined {
        Pipelined {
            conn,
            pipe: redis::pipe(),
            queued: 0,
            window: ConfirmWindow::new((in_flight / BATCH).max(1)),
        }
    }

    async fn push(&mut self, cmd: redis::Cmd) -> Result<()> {
        self.pipe.add_command(cmd).ignore();
        self.queued += 1;
        if self.queued >= BATCH {
            self.send().await?;
        }
        Ok(())
    }

    async fn send(&mut self) -> Result<()> {
        if self.queued == 0 {
            return Ok(());
        }
        let pipe = std::mem::replace(&mut self.pipe, redis::pipe());
        self.queued = 0;
        let mut conn = self.conn.clone();
        self.window
            .push(Box::pin(async move {
                pipe.query_async::<()>(&mut conn).await?;
                Ok(())
            }))
            .await
    }

    async fn finish(&mut self) -> Result<()> {
        self.send().await?;
        self.window.drain().await
    }
}

/// PUBLISH in pipelines.
pub struct RedisPublisher {
    out: Pipelined,
    channel: String,
}

impl Publisher for RedisPublisher {
    async fn publish(&mut self, payload: Bytes) -> Result<()> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&self.channel).arg(payload.as_ref());
        self.out.push(cmd).await
    }
    async fn flush(&mut self) -> Result<()> {
        self.out.finish().await
    }
}

/// A SUBSCRIBE connection.
pub struct RedisSubscriber {
    messages: Pin<Box<dyn Stream<Item = redis::Msg> + Send>>,
}

impl Source for RedisSubscriber {
    async fn next(&mut self) -> Result<Option<Bytes>> {
        Ok(self
            .messages
            .next()
            .await
            .map(|m| Bytes::copy_from_slice(m.get_payload_bytes())))
    }
}

/// XADD in pipelines; the reply to each XADD is the confirm.
pub struct RedisProducer {
    out: Pipelined,
    key: String,
}

impl Producer for RedisProducer {
    async fn send(&mut self, payload: Bytes) -> Result<()> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.key).arg("*").arg("d").arg(payload.as_ref());
        self.out.push(cmd).await
    }
    async fn finish(&mut self) -> Result<()> {
        self.out.finish().await
    }
}

/// XREADGROUP up to `prefetch` entries, XACK them in one command, yield them.
pub struct RedisConsumer {
    conn: MultiplexedConnection,
    key: String,
    name: String,
    prefetch: u16,
    ready: VecDeque<Bytes>,
}

impl Source for RedisConsumer {
    async fn next(&mut self) -> Result<Option<Bytes>> {
        while self.ready.is_empty() {
            // BLOCK stays short so that a stopped run never waits on Redis for long.
            let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(&self.name)
                .arg("COUNT")
                .arg(self.prefetch)
                .arg("BLOCK")
                .arg(100)
                .arg("STREAMS")
                .arg(&self.key)
                .arg(">")
                .query_async(&mut self.conn)
                .await?;
            let Some(reply) = reply else { continue };
            let mut ack = redis::cmd("XACK");
            ack.arg(&self.key).arg(GROUP);
            let mut any = false;
            for entry in reply.keys.into_iter().flat_map(|k| k.ids) {
                ack.arg(&entry.id);
                any = true;
                match entry.map.get("d") {
                    Some(redis::Value::BulkString(body)) => {
                        self.ready.push_back(Bytes::copy_from_slice(body))
                    }
                    // Not ours: yield an empty body so it is counted as foreign.
                    _ => self.ready.push_back(Bytes::new()),
                }
            }
            if any {
                ack.query_async::<()>(&mut self.conn).await?;
            }
        }
        Ok(self.ready.pop_front())
    }
}

impl Driver for RedisDriver {
    type Publisher = RedisPublisher;
    type Subscriber = RedisSubscriber;
    type Requester = Unsupported;
    type Responder = Unsupported;
    type Producer = RedisProducer;
    type Consumer = RedisConsumer;

    fn system(&self) -> System {
        System::Redis
    }

    async fn publisher(&self, topic: &str) -> Result<RedisPublisher> {
        Ok(RedisPublisher {
            out: Pipelined::new(self.connect().await?, 4 * BATCH),
            channel: topic.to_owned(),
        })
    }

    async fn subscriber(&self, topic: &str) -> Result<RedisSubscriber> {
        let mut pubsub = self
            .client
            .get_async_pubsub()
            .await
            .context("connecting to redis")?;
        // Returns once Redis has confirmed the subscription.
        pubsub.subscribe(topic).await?;
        Ok(RedisSubscriber {
            messages: Box::pin(pubsub.into_on_message()),
        })
    }

    async fn requester(&self, _: &str) -> Result<Unsupported> {
        refuse(System::Redis, Workload::Reqrep)
    }

    async fn responder(&self, _: &str, _: &str) -> Result<Unsupported> {
        refuse(System::Redis, Workload::Reqrep)
    }

    async fn declare_queue(&self, queue: &str, _topic: &str) -> Result<()> {
        let mut conn = self.connect().await?;
        redis::cmd("DEL")
            .arg(queue)
            .query_async::<()>(&mut conn)
            .await?;
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(queue)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async::<()>(&mut conn)
            .await
            .with_context(|| format!("creating stream {queue} and its group"))?;
        Ok(())
    }

    async fn producer(&self, queue: &str, _topic: &str, window: usize) -> Result<RedisProducer> {
        Ok(RedisProducer {
            out: Pipelined::new(self.connect().await?, window),
            key: queue.to_owned(),
        })
    }

    async fn consumer(&self, queue: &str, prefetch: u16) -> Result<RedisConsumer> {
        let n = self.consumers.fetch_add(1, Ordering::Relaxed);
        Ok(RedisConsumer {
            conn: self.connect().await?,
            key: queue.to_owned(),
            name: format!("consumer-{n}"),
            prefetch,
            ready: VecDeque::new(),
        })
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        let mut conn = self.connect().await?;
        redis::cmd("DEL")
            .arg(queue)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }
}
