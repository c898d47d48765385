//! The pub/sub dimensions: subscriptions, topics and connections, for tidings and
//! nats-server.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::{Dimension, Point, ScaleArgs, Sweep, spawn_tidings};
use crate::control::{OnComplete, RunControl, receive};
use crate::cpu::{self, CpuMeter};
use crate::driver::tidings::TidingsDriver;
use crate::driver::{Driver, Publisher, Source, System};
use crate::payload;
use crate::rss::{self, Sampler};
use crate::tracker::SeqTracker;
use crate::workload::Common;
use crate::workload::fanin::{self, FaninParams};

/// Subscriptions a single connection holds in the subscriptions sweep.
const SUBSCRIPTIONS_PER_CONNECTION: usize = 10_000;
/// Subscribe requests (or connections) in flight at once while setting up.
const SETUP_CONCURRENCY: usize = 64;

/// Publishes to any topic, one connection.
pub trait TopicPublisher: Send + 'static {
    /// Publishes `payload` to `topic`; may buffer.
    fn publish_to(
        &mut self,
        topic: &str,
        payload: Bytes,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Returns once everything published has been handed to the system.
    fn flush(&mut self) -> impl Future<Output = Result<()>> + Send;
}

/// What the sweeps need beyond [`Driver`].
pub trait ScaleDriver: Driver {
    /// Idle subscriptions kept alive while held.
    type Held: Send + 'static;
    /// See [`TopicPublisher`].
    type Multi: TopicPublisher;
    /// Subscribes to every pattern, spread over a few connections.
    fn hold(&self, patterns: Vec<String>) -> impl Future<Output = Result<Self::Held>> + Send;
    /// A publisher to any topic, on its own connection.
    fn multi_publisher(&self) -> impl Future<Output = Result<Self::Multi>> + Send;
}

/// A tidings client publishing to any topic.
pub struct TidingsMulti(tidings_client::Client);

impl TopicPublisher for TidingsMulti {
    async fn publish_to(&mut self, topic: &str, payload: Bytes) -> Result<()> {
        Ok(self.0.publish(topic, payload).await?)
    }
    async fn flush(&mut self) -> Result<()> {
        Ok(self.0.flush().await?)
    }
}

impl ScaleDriver for TidingsDriver {
    type Held = Vec<(tidings_client::Client, Vec<tidings_client::Subscription>)>;
    type Multi = TidingsMulti;

    async fn hold(&self, patterns: Vec<String>) -> Result<Self::Held> {
        let mut held = Vec::new();
        for chunk in patterns.chunks(SUBSCRIPTIONS_PER_CONNECTION) {
            let client = self.connect().await?;
            let subs: Vec<_> = futures::stream::iter(chunk.iter().cloned())
                .map(|p| {
                    let client = client.clone();
                    async move { client.subscribe(p.as_str()).await }
                })
                .buffer_unordered(SETUP_CONCURRENCY)
                .collect()
                .await;
            let subs = subs.into_iter().collect::<Result<Vec<_>, _>>()?;
            held.push((client, subs));
        }
        Ok(held)
    }

    async fn multi_publisher(&self) -> Result<TidingsMulti> {
        Ok(TidingsMulti(self.connect().await?))
    }
}

#[cfg(feature = "peers")]
mod nats_ops {
    use super::*;
    use crate::driver::nats::NatsDriver;

    /// An async-nats client publishing to any subject.
    pub struct NatsMulti(pub async_nats::Client);

    impl TopicPublisher for NatsMulti {
        async fn publish_to(&mut self, topic: &str, payload: Bytes) -> Result<()> {
            Ok(self.0.publish(topic.to_owned(), payload).await?)
        }
        async fn flush(&mut self) -> Result<()> {
            Ok(self.0.flush().await?)
        }
    }

    impl ScaleDriver for NatsDriver {
        type Held = Vec<(async_nats::Client, Vec<async_nats::Subscriber>)>;
        type Multi = NatsMulti;

        async fn hold(&self, patterns: Vec<String>) -> Result<Self::Held> {
            let mut held = Vec::new();
            for chunk in patterns.chunks(SUBSCRIPTIONS_PER_CONNECTION) {
                let client = self.connect().await?;
                let mut subs = Vec::with_capacity(chunk.len());
                for p in chunk {
                    subs.push(client.subscribe(p.clone()).await?);
                }
                // A PING/PONG round trip: the server has every SUB when it answers.
                client.flush().await?;
                held.push((client, subs));
            }
            Ok(held)
        }

        async fn multi_publisher(&self) -> Result<NatsMulti> {
            Ok(NatsMulti(self.connect().await?))
        }
    }
}

/// The `i`th idle subscription: half exact, a quarter `*`, a quarter `>`, all
/// distinct and none matching the measured topic (`bench.fanin.<run id>`).
pub fn idle_pattern(i: u64) -> String {
    match i % 4 {
        0 | 1 => format!("bench.scale.s{i}"),
        2 => format!("bench.*.s{i}"),
        _ => format!("bench.s{i}.>"),
    }
}

/// Runs the sweep over every system and step.
pub async fn sweep(args: &ScaleArgs, bin: &Path, systems: &[System]) -> Result<Sweep> {
    let mut sweep = Sweep::default();
    for &system in systems {
        for &n in &args.steps() {
            eprintln!("scale {} = {n} on {system}", args.dimension.name());
            let point = match system {
                System::Tidings => {
                    let mut extra = Vec::new();
                    if args.dimension == Dimension::Connections {
                        extra = vec!["--max-connections".into(), (n + 64).to_string()];
                    }
                    let driver = spawn_tidings(bin, &extra).await?;
                    let pid = driver.broker_pid();
                    let point = step(&driver, pid, args, n).await;
                    if let Err(e) = driver.shutdown().await {
                        eprintln!("  {e:#}");
                    }
                    point
                }
                #[cfg(feature = "peers")]
                System::Nats => {
                    let driver = crate::driver::nats::NatsDriver::new(&args.nats).await?;
                    let pid = rss::peer_pid(System::Nats, &args.peers_dir).or_else(|| {
                        crate::compare::local_port(&args.nats).and_then(rss::pid_by_port)
                    });
                    step(&driver, pid, args, n).await
                }
                other => Err(anyhow::anyhow!("{other} has no scale driver")),
            };
            match point {
                Ok(p) => {
                    eprintln!("  {:?}", p.values);
                    sweep.points.push(p);
                }
                Err(e) => {
                    eprintln!("  failed: {e:#}");
                    let mut p = Point::new(system, n);
                    p.errors.push(format!("{e:#}"));
                    sweep.points.push(p);
                }
            }
        }
    }
    Ok(sweep)
}

/// One step on one system, measuring the broker process `pid` when known.
async fn step<D: ScaleDriver>(
    driver: &D,
    pid: Option<u32>,
    args: &ScaleArgs,
    n: u64,
) -> Result<Point> {
    let mut point = Point::new(driver.system(), n);
    let common = Common::new(args.deadline(), args.drain());
    match args.dimension {
        Dimension::Subscriptions => {
            let patterns = (0..n.saturating_sub(1)).map(idle_pattern).collect();
            let _held = driver.hold(patterns).await.context("subscribing")?;
            let sampler = pid.map(Sampler::start);
            let meter = pid.map(CpuMeter::start);
            let params = FaninParams {
                publishers: 1,
                size: args.size(false),
                messages: args.messages(),
            };
            let report = fanin::run(driver, &params, &common).await?;
            point.set("msgs/s", report.msgs_per_sec);
            finish_measures(&mut point, sampler, meter, args.messages()).await;
            point.errors.extend(report.errors());
            if report.missing > 0 {
                point.errors.push(format!("{} missing", report.missing));
            }
        }
        Dimension::Topics => {
            let sampler = pid.map(Sampler::start);
            let meter = pid.map(CpuMeter::start);
            let (rate, missing, errors) = topics(driver, args, n, &common).await?;
            point.set("msgs/s", rate);
            finish_measures(&mut point, sampler, meter, args.messages()).await;
            point.errors.extend(errors);
            if missing > 0 {
                point.errors.push(format!("{missing} missing"));
            }
        }
        Dimension::Connections => connections(driver, pid, n, &common, &mut point).await?,
        _ => unreachable!("not a pub/sub dimension"),
    }
    Ok(point)
}

/// Adds the broker's peak RSS and CPU per message to `point`.
async fn finish_measures(
    point: &mut Point,
    sampler: Option<Sampler>,
    meter: Option<CpuMeter>,
    messages: u64,
) {
    if let Some(us) = meter
        .and_then(CpuMeter::finish)
        .and_then(|cpu| cpu::us_per_message(cpu, messages))
    {
        point.set("CPU µs/msg", us);
    }
    if let Some(s) = sampler {
        if let Some(peak) = s.finish(false).await {
            point.set("RSS MiB", peak.kb as f64 / 1024.0);
        }
    }
}

/// Fanin over `n` topics under one wildcard subscription: msgs/s, missing, errors.
async fn topics<D: ScaleDriver>(
    driver: &D,
    args: &ScaleArgs,
    n: u64,
    common: &Common,
) -> Result<(f64, u64, Vec<String>)> {
    let prefix = common.topic("topics");
    let mut sub = driver
        .subscriber(&format!("{prefix}.*"))
        .await
        .context("subscribing")?;
    let mut publisher = driver.multi_publisher().await?;
    let names: Vec<String> = (0..n.max(1)).map(|i| format!("{prefix}.t{i}")).collect();
    let total = args.messages();
    let size = args.size(false);
    let ctl = RunControl::new(common.deadline, common.drain);
    let tracker = Arc::new(SeqTracker::new(total));
    let receiver = tokio::spawn({
        let (ctl, tracker) = (ctl.clone(), tracker.clone());
        async move { receive(&mut sub, &tracker, &ctl, OnComplete::StopSelf).await }
    });
    let mut errors = Vec::new();
    let names_len = names.len() as u64;
    for seq in 0..total {
        if seq % 1024 == 0 && ctl.expired() {
            errors.push(format!("stopped by the deadline after {seq} messages"));
            break;
        }
        let topic = &names[usize::try_from(seq % names_len).unwrap_or(0)];
        if let Err(e) = publisher
            .publish_to(topic, payload::encode(seq, size))
            .await
        {
            errors.push(format!("publish failed: {e:#}"));
            break;
        }
    }
    if let Err(e) = publisher.flush().await {
        errors.push(format!("flush failed: {e:#}"));
    }
    ctl.senders_done.cancel();
    let received = receiver.await.context("the subscriber task")?;
    ctl.stop.cancel();
    if let Some(e) = &received.error {
        errors.push(format!("subscriber: {e}"));
    }
    Ok((received.rate(), tracker.tally().missing, errors))
}

/// `n` idle subscriber connections: broker RSS per connection, and the time one
/// publish takes to reach every one of them.
async fn connections<D: ScaleDriver>(
    driver: &D,
    pid: Option<u32>,
    n: u64,
    common: &Common,
    point: &mut Point,
) -> Result<()> {
    let topic = common.topic("connections");
    let mut publisher = driver
        .publisher(&topic)
        .await
        .context("connecting the publisher")?;
    let before = pid.and_then(|p| rss::read_kb(p, "VmRSS"));
    let meter = pid.map(CpuMeter::start);
    let mut subs = Vec::new();
    let mut opened = futures::stream::iter(0..n)
        .map(|_| driver.subscriber(&topic))
        .buffer_unordered(SETUP_CONCURRENCY);
    while let Some(sub) = opened.next().await {
        subs.push(sub.with_context(|| format!("opening connection {} of {n}", subs.len() + 1))?);
    }
    drop(opened);
    // Let the broker settle (handshakes, first heartbeats) before measuring it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = pid.and_then(|p| rss::read_kb(p, "VmRSS"));
    if let (Some(b), Some(a)) = (before, after) {
        point.set(
            "RSS per connection KiB",
            a.saturating_sub(b) as f64 / n.max(1) as f64,
        );
        point.set("RSS MiB", a as f64 / 1024.0);
    }
    let started = Instant::now();
    publisher.publish(payload::encode(0, 128)).await?;
    publisher.flush().await?;
    let mut arrivals: FuturesUnordered<_> = subs.iter_mut().map(|s| s.next()).collect();
    let mut reached = 0u64;
    let deadline = tokio::time::sleep(common.deadline);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            got = arrivals.next() => match got {
                Some(Ok(Some(_))) => reached += 1,
                Some(_) => {}
                None => break,
            },
            () = &mut deadline => break,
        }
    }
    let took = started.elapsed();
    drop(arrivals);
    point.set("one publish to all ms", took.as_secs_f64() * 1e3);
    if let Some(cpu) = meter.and_then(CpuMeter::finish) {
        point.set("broker CPU s (setup + publish)", cpu.as_secs_f64());
    }
    if reached < n {
        point
            .errors
            .push(format!("one publish reached {reached} of {n} subscribers"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings_protocol::{Pattern, Topic};

    #[test]
    fn idle_patterns_are_distinct_valid_and_never_match_the_measured_topic() {
        let measured = "bench.fanin.4f2a00000001";
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            let p = idle_pattern(i);
            assert!(seen.insert(p.clone()), "{p} twice");
            let pattern = Pattern::new(p.as_str()).expect("a valid pattern");
            assert!(Topic::validate(measured).is_ok());
            assert!(!pattern.matches(measured), "{p} matches {measured}");
        }
    }
}
