//! `queue`: durable. Producers publish with confirms (a bounded window in flight),
//! competing consumers consume with explicit acks.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Map, json};

use super::{Common, Sent, check_size, joined, send_rate, split};
use crate::control::{OnComplete, Progress, RunControl, receive};
use crate::driver::{Driver, Producer, Workload};
use crate::latency::Latencies;
use crate::payload;
use crate::report::RunReport;
use crate::tracker::SeqTracker;

/// Parameters, defaults as in the issue.
#[derive(Debug, Clone, clap::Args)]
pub struct QueueParams {
    /// Producers, each on its own connection.
    #[arg(short = 'p', long, default_value_t = 1)]
    pub producers: usize,
    /// Consumers, each on its own connection, competing for the queue.
    #[arg(short = 'c', long, default_value_t = 1)]
    pub consumers: usize,
    /// Unconfirmed publishes each producer keeps in flight.
    #[arg(short = 'w', long, default_value_t = 256)]
    pub window: usize,
    /// Deliveries each consumer may hold unacked.
    #[arg(long, default_value_t = 256)]
    pub prefetch: u16,
    /// Message size in bytes (at least 16).
    #[arg(short = 's', long, default_value_t = 1024)]
    pub size: usize,
    /// Messages in total.
    #[arg(short = 'n', long, default_value_t = 200_000)]
    pub messages: u64,
    /// Publish at this many messages per second in all (shared by the producers),
    /// for a latency figure at a fixed load; 0: as fast as the window allows.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
}

impl QueueParams {
    /// Rejects parameters that cannot make a run.
    pub fn validate(&self) -> Result<()> {
        if self.producers == 0 || self.consumers == 0 {
            bail!("--producers and --consumers must be at least 1");
        }
        if self.window == 0 || self.prefetch == 0 {
            bail!("--window and --prefetch must be at least 1");
        }
        check_size(self.size)
    }

    /// `queue`, or `queue-latency` when paced: a run at a fixed rate measures
    /// latency, not how fast the queue can go.
    pub fn workload(&self) -> Workload {
        if self.rate > 0 {
            Workload::QueueLatency
        } else {
            Workload::Queue
        }
    }

    fn to_json(&self) -> Map<String, serde_json::Value> {
        let v = json!({
            "producers": self.producers, "consumers": self.consumers, "window": self.window,
            "prefetch": self.prefetch, "size": self.size, "messages": self.messages,
            "rate": self.rate,
        });
        v.as_object().cloned().unwrap_or_default()
    }
}

async fn produce<P: Producer>(
    mut producer: P,
    seqs: Range<u64>,
    size: usize,
    rate: f64,
    ctl: Arc<RunControl>,
) -> Sent {
    let started = Instant::now();
    let (mut count, mut error) = (0, None);
    for seq in seqs {
        if rate > 0.0 {
            // Paced: message `count` is due `count / rate` seconds after the start.
            let due = started + std::time::Duration::from_secs_f64(count as f64 / rate);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        if seq % 256 == 0 && (ctl.expired() || ctl.stop.is_cancelled()) {
            error = Some(format!("stopped by the deadline after {count} messages"));
            break;
        }
        if let Err(e) = producer.send(payload::encode(seq, size)).await {
            error = Some(format!("publish failed after {count} messages: {e:#}"));
            break;
        }
        count += 1;
    }
    // Waiting for the last confirms is bounded by the run's deadline too.
    match tokio::time::timeout_at(ctl.deadline.into(), producer.finish()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => _ = error.get_or_insert(format!("confirm failed: {e:#}")),
        Err(_) => _ = error.get_or_insert("confirms still outstanding at the deadline".into()),
    }
    Sent {
        count,
        started,
        finished: Instant::now(),
        error,
    }
}

/// Runs `queue`; msgs/s is end to end: from the first publish to the last delivery.
pub async fn run<D: Driver>(driver: &D, p: &QueueParams, common: &Common) -> Result<RunReport> {
    p.validate()?;
    let topic = common.topic("queue");
    let queue = format!("bench-queue-{}", common.run_id);
    driver
        .declare_queue(&queue, &topic)
        .await
        .context("declaring the queue")?;
    let result = measure(driver, p, common, &queue, &topic).await;
    if let Err(e) = driver.delete_queue(&queue).await {
        eprintln!("note: could not delete bench queue {queue}: {e:#}");
    }
    result
}

async fn measure<D: Driver>(
    driver: &D,
    p: &QueueParams,
    common: &Common,
    queue: &str,
    topic: &str,
) -> Result<RunReport> {
    let mut consumers = Vec::with_capacity(p.consumers);
    for _ in 0..p.consumers {
        consumers.push(
            driver
                .consumer(queue, p.prefetch)
                .await
                .context("attaching a consumer")?,
        );
    }
    let mut producers = Vec::with_capacity(p.producers);
    for _ in 0..p.producers {
        producers.push(
            driver
                .producer(queue, topic, p.window)
                .await
                .context("connecting a producer")?,
        );
    }

    let ctl = RunControl::new(common.deadline, common.drain);
    let tracker = Arc::new(SeqTracker::new(p.messages));
    let _progress = Progress::start(ctl.clone(), p.messages, "queue".into());
    let receivers: Vec<_> = consumers
        .into_iter()
        .map(|mut consumer| {
            let (ctl, tracker) = (ctl.clone(), tracker.clone());
            tokio::spawn(async move {
                receive(&mut consumer, &tracker, &ctl, OnComplete::StopAll).await
            })
        })
        .collect();
    let senders: Vec<_> = producers
        .into_iter()
        .zip(split(p.messages, p.producers))
        .map(|(producer, seqs)| {
            let rate = p.rate as f64 / p.producers as f64;
            tokio::spawn(produce(producer, seqs, p.size, rate, ctl.clone()))
        })
        .collect();

    let mut errors = Vec::new();
    let mut sent = Vec::new();
    for (i, task) in senders.into_iter().enumerate() {
        match joined(task.await) {
            Ok(s) => {
                if let Some(e) = &s.error {
                    errors.push(format!("producer {i}: {e}"));
                }
                sent.push(s);
            }
            Err(e) => errors.push(format!("producer {i}: {e}")),
        }
    }
    ctl.senders_done.cancel();
    let mut latencies = Latencies::default();
    let mut last = None;
    for (i, task) in receivers.into_iter().enumerate() {
        let got = joined(task.await).map_err(anyhow::Error::msg)?;
        latencies.merge(&got.latencies);
        last = last.max(got.last);
        if let Some(e) = got.error {
            errors.push(format!("consumer {i}: {e}"));
        }
    }
    ctl.stop.cancel();

    let tally = tracker.tally();
    let mut report = RunReport::new(
        driver.system().name(),
        p.workload().name(),
        p.to_json(),
        tally,
        latencies.percentiles(),
    );
    let first_send = sent.iter().map(|s| s.started).min();
    report.duration_s = match (first_send, last) {
        (Some(f), Some(l)) if l > f => (l - f).as_secs_f64(),
        _ => 0.0,
    };
    if report.duration_s > 0.0 {
        report.msgs_per_sec = tally.unique as f64 / report.duration_s;
    }
    report.mb_per_sec = report.msgs_per_sec * p.size as f64 / 1e6;
    report
        .details
        .insert("confirmed_msgs_per_sec".into(), send_rate(&sent).into());
    errors.into_iter().for_each(|e| report.add_error(e));
    Ok(report)
}
