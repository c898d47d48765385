//! The queues dimension (tidings only): N durable queues, each with a consumer,
//! producers spread over them; aggregate delivered msgs/s, and the broker's CPU
//! while the queues and consumers then sit idle.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use tidings_client::{Client, Message, QueueConfig};
use tokio_util::sync::CancellationToken;

use super::{Point, ScaleArgs, Sweep, spawn_tidings};
use crate::cpu::{self, CpuMeter};
use crate::driver::{ConfirmWindow, System};
use crate::payload;
use crate::rss::Sampler;
use crate::tracker::SeqTracker;
use crate::workload::{Common, split};

/// Most consumer connections; queues share them beyond that.
const CONSUMER_CONNECTIONS: usize = 64;
/// Confirms in flight per producer.
const WINDOW: usize = 256;

/// Runs every step.
pub async fn sweep(args: &ScaleArgs, bin: &Path) -> Result<Sweep> {
    let mut sweep = Sweep::default();
    for &n in &args.steps() {
        eprintln!("scale queues = {n} on tidings");
        let driver = spawn_tidings(bin, &[]).await?;
        let pid = driver.broker_pid();
        let mut point = Point::new(System::Tidings, n);
        if let Err(e) = step(&driver, pid, args, n.max(1), &mut point).await {
            point.errors.push(format!("{e:#}"));
        }
        if let Err(e) = driver.shutdown().await {
            point.errors.push(format!("{e:#}"));
        }
        eprintln!("  {:?}", point.values);
        sweep.points.push(point);
    }
    Ok(sweep)
}

/// First and last arrival over every consumer.
#[derive(Default)]
struct Arrivals {
    first: Option<Instant>,
    last: Option<Instant>,
}

async fn step(
    driver: &crate::driver::tidings::TidingsDriver,
    pid: Option<u32>,
    args: &ScaleArgs,
    n: u64,
    point: &mut Point,
) -> Result<()> {
    let common = Common::new(args.deadline(), args.drain());
    let topic = |i: u64| format!("bench.queues.{}.q{i}", common.run_id);
    let queue = |i: u64| format!("scale-{}-q{i}", common.run_id);
    let admin = driver.connect().await?;
    let declared: Vec<_> = futures::stream::iter(0..n)
        .map(|i| {
            let admin = admin.clone();
            let (q, t) = (queue(i), topic(i));
            async move { admin.declare_queue(QueueConfig::new(q).bind(t)).await }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for d in declared {
        d.context("declaring a queue")?;
    }
    let connections = usize::try_from(n)
        .unwrap_or(usize::MAX)
        .min(CONSUMER_CONNECTIONS);
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(driver.connect().await?);
    }
    let total = args.messages();
    let tracker = Arc::new(SeqTracker::new(total));
    let arrivals = Arc::new(Mutex::new(Arrivals::default()));
    let stop = CancellationToken::new();
    let mut consumers = Vec::new();
    for i in 0..n {
        let client = &clients[usize::try_from(i).unwrap_or(0) % connections];
        let mut consumer = client
            .consume(queue(i), u32::from(args.prefetch))
            .await
            .context("attaching a consumer")?;
        let (tracker, arrivals, stop) = (tracker.clone(), arrivals.clone(), stop.clone());
        consumers.push(tokio::spawn(async move {
            loop {
                let delivery = tokio::select! {
                    () = stop.cancelled() => break,
                    d = consumer.next() => d,
                };
                let Some(delivery) = delivery else { break };
                match payload::decode(delivery.payload()) {
                    Some(stamp) => {
                        tracker.record(stamp.seq);
                    }
                    None => tracker.record_foreign(),
                }
                {
                    let now = Instant::now();
                    let mut a = arrivals.lock().unwrap_or_else(|e| e.into_inner());
                    a.first.get_or_insert(now);
                    a.last = Some(now);
                }
                if delivery.ack().await.is_err() {
                    break;
                }
            }
        }));
    }

    let sampler = pid.map(Sampler::start);
    let meter = pid.map(CpuMeter::start);
    let size = args.size(true);
    let producers = args.producers.max(1);
    let mut sending = Vec::new();
    for (j, seqs) in split(total, producers).into_iter().enumerate() {
        let client: Client = driver.connect().await?;
        // Producer j feeds the queues i with i % producers == j, in turn.
        let mine: Vec<String> = (0..n)
            .filter(|i| usize::try_from(*i).unwrap_or(0) % producers == j)
            .map(topic)
            .collect();
        let mine = if mine.is_empty() {
            vec![topic(0)]
        } else {
            mine
        };
        sending.push(tokio::spawn(async move {
            let mut window = ConfirmWindow::new(WINDOW);
            for (k, seq) in seqs.enumerate() {
                let message =
                    Message::new(mine[k % mine.len()].as_str(), payload::encode(seq, size));
                let client = client.clone();
                window
                    .push(Box::pin(async move {
                        let confirm = client.publish_confirmed(message).await?;
                        ensure!(confirm.queues >= 1, "confirmed into no queue");
                        Ok(())
                    }))
                    .await?;
            }
            window.drain().await
        }));
    }
    for task in sending {
        task.await
            .context("a producer task")?
            .context("publishing")?;
    }
    let deadline = Instant::now() + args.deadline();
    while !tracker.complete() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = meter.and_then(CpuMeter::finish);
    let rate = {
        let a = arrivals.lock().unwrap_or_else(|e| e.into_inner());
        crate::control::rate(tracker.tally().unique, a.first, a.last)
    };
    point.set("msgs/s", rate);
    if let Some(us) = cpu.and_then(|c| cpu::us_per_message(c, total)) {
        point.set("CPU µs/msg", us);
    }
    // Idle: queues and consumers stay, nothing is published.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = args.idle();
    if let Some(meter) = pid.map(CpuMeter::start) {
        tokio::time::sleep(idle).await;
        if let Some(cpu) = meter.finish() {
            point.set(
                "idle CPU % of a core",
                cpu.as_secs_f64() / idle.as_secs_f64() * 100.0,
            );
        }
    }
    if let Some(peak) = match sampler {
        Some(s) => s.finish(true).await,
        None => None,
    } {
        point.set("RSS MiB", peak.kb as f64 / 1024.0);
    }
    stop.cancel();
    for c in consumers {
        let _ = c.await;
    }
    let tally = tracker.tally();
    if tally.missing > 0 || tally.foreign > 0 {
        point.errors.push(format!(
            "{} missing, {} foreign",
            tally.missing, tally.foreign
        ));
    }
    Ok(())
}
