//! The backlog dimension (tidings only): fill one durable queue with N messages in
//! steps, measuring the publish rate and RSS as the backlog grows; `kill -9` the
//! broker with N stored and time its restart until the queue answers; drain it in
//! steps, measuring the drain rate from disk; then the disk use once it settles.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use tidings_client::{Client, Message, QueueConfig};

use super::{Point, ScaleArgs, Sweep};
use crate::broker_process::BrokerProcess;
use crate::driver::{ConfirmWindow, System};
use crate::payload;
use crate::report::mib;
use crate::rss;
use crate::tracker::SeqTracker;

const QUEUE: &str = "scale-backlog";
const TOPIC: &str = "bench.scale.backlog";
/// Confirms in flight while filling, and the consumer's prefetch while draining.
const WINDOW: usize = 256;
/// How long the broker is left alone after the drain (checkpoints, retired
/// segments) before its disk use is read.
const SETTLE: Duration = Duration::from_secs(3);

/// Bytes allocated on disk under `dir` (what `du` counts).
pub fn disk_use(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            total += disk_use(&entry.path());
        } else {
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                total += meta.blocks() * 512;
            }
            #[cfg(not(unix))]
            {
                total += meta.len();
            }
        }
    }
    total
}

/// Bytes free for an unprivileged writer on the file system holding `dir`.
#[cfg(unix)]
fn free_bytes(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(not(unix))]
fn free_bytes(_dir: &Path) -> Option<u64> {
    None
}

/// Refuses a backlog the disk cannot hold (1.5x its payload, the bound).
pub fn check_room(free: Option<u64>, messages: u64, size: usize, dir: &Path) -> Result<()> {
    let need = messages.saturating_mul(size as u64).saturating_mul(3) / 2;
    match free {
        Some(free) if free < need => bail!(
            "this machine cannot hold a backlog of {messages} messages of {size} bytes: it needs \
             about {} (1.5x the payload) and {} has {} free; pass a smaller --backlog or \
             another --data-dir",
            mib(need / 1024),
            dir.display(),
            mib(free / 1024)
        ),
        _ => Ok(()),
    }
}

async fn connect(addr: &str) -> Result<Client> {
    Client::builder(addr)
        .name("tidings-bench")
        .connect()
        .await
        .with_context(|| format!("connecting to tidings at {addr}"))
}

/// Runs the backlog sweep.
pub async fn sweep(args: &ScaleArgs, bin: &Path) -> Result<Sweep> {
    let n = args
        .backlog
        .unwrap_or(if args.quick { 20_000 } else { 10_000_000 })
        .max(1);
    let steps = args.points.clamp(1, n);
    let size = args.size(true);
    let temp;
    let dir: PathBuf = match &args.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::tempdir().context("creating a temporary data dir")?;
            temp.path().to_owned()
        }
    };
    let free = free_bytes(&dir);
    check_room(free, n, size, &dir)?;
    if let Some(free) = free {
        eprintln!(
            "backlog: {n} messages of {size} bytes in {}, {} free",
            dir.display(),
            mib(free / 1024)
        );
    }
    let mut sweep = Sweep::default();
    let chunks = crate::workload::split(n, usize::try_from(steps).unwrap_or(1));

    // Fill.
    let broker = BrokerProcess::start_in(bin, &dir, &[], None).await?;
    let addr = broker.addr().to_string();
    let client = connect(&addr).await?;
    client
        .declare_queue(QueueConfig::new(QUEUE).bind(TOPIC))
        .await
        .context("declaring the queue")?;
    let mut stored = 0u64;
    for chunk in &chunks {
        let started = Instant::now();
        let mut window = ConfirmWindow::new(WINDOW);
        for seq in chunk.clone() {
            let c = client.clone();
            let message = Message::new(TOPIC, payload::encode(seq, size));
            window
                .push(Box::pin(async move {
                    let confirm = c.publish_confirmed(message).await?;
                    ensure!(
                        confirm.queues == 1,
                        "confirmed into {} queues",
                        confirm.queues
                    );
                    Ok(())
                }))
                .await?;
        }
        window.drain().await?;
        let took = started.elapsed().as_secs_f64();
        let mut point = Point::new(System::Tidings, stored);
        point.set(
            "publish msgs/s",
            (chunk.end - chunk.start) as f64 / took.max(1e-9),
        );
        if let Some(kb) = rss::read_kb(broker.pid(), "VmRSS") {
            point.set("RSS MiB", kb as f64 / 1024.0);
        }
        eprintln!("  stored {stored}: {:?}", point.values);
        sweep.points.push(point);
        stored = chunk.end;
    }
    let full_disk = disk_use(&dir);
    let live = n * size as u64;
    let fill_peak = rss::read_kb(broker.pid(), "VmHWM");
    drop(client);

    // kill -9 with everything stored, then time the restart until the queue answers.
    broker.kill().await?;
    let restarted = Instant::now();
    let broker = BrokerProcess::start_in(bin, &dir, &[], None).await?;
    let addr = broker.addr().to_string();
    let client = connect(&addr).await?;
    let info = client
        .queue_info(QUEUE)
        .await
        .context("asking for the queue")?;
    let ready = restarted.elapsed();
    ensure!(
        info.depth >= n,
        "after kill -9 the queue holds {} of {n} confirmed messages",
        info.depth
    );

    // Drain.
    let tracker = SeqTracker::new(n);
    let mut consumer = client
        .consume(QUEUE, u32::try_from(WINDOW).unwrap_or(256))
        .await
        .context("attaching the consumer")?;
    let deadline = Instant::now() + args.deadline();
    let mut remaining = n;
    for chunk in &chunks {
        let want = chunk.end - chunk.start;
        let started = Instant::now();
        let mut got = 0;
        while got < want {
            let next = tokio::time::timeout_at(deadline.into(), consumer.next()).await;
            let Ok(Some(delivery)) = next else {
                bail!(
                    "the drain stopped after {} of {n} messages",
                    n - remaining + got
                );
            };
            match payload::decode(delivery.payload()) {
                Some(stamp) => {
                    tracker.record(stamp.seq);
                }
                None => tracker.record_foreign(),
            }
            delivery.ack().await?;
            got += 1;
        }
        let took = started.elapsed().as_secs_f64();
        let mut point = Point::new(System::Tidings, remaining);
        point.set("drain msgs/s", want as f64 / took.max(1e-9));
        if let Some(kb) = rss::read_kb(broker.pid(), "VmRSS") {
            point.set("RSS MiB", kb as f64 / 1024.0);
        }
        eprintln!("  drained to {}: {:?}", remaining - want, point.values);
        sweep.points.push(point);
        remaining -= want;
    }
    drop(consumer);
    tokio::time::sleep(SETTLE).await;
    let drained_disk = disk_use(&dir);
    let drain_peak = rss::read_kb(broker.pid(), "VmHWM");
    drop(client);
    if let Err(e) = broker.stop().await {
        eprintln!("{e:#}");
    }
    let tally = tracker.tally();
    if tally.missing > 0 || tally.foreign > 0 {
        if let Some(last) = sweep.points.last_mut() {
            last.errors.push(format!(
                "{} missing, {} foreign after the drain",
                tally.missing, tally.foreign
            ));
        }
    }
    let peak = |kb: Option<u64>| kb.map_or("-".into(), mib);
    sweep.notes = vec![
        format!(
            "backlog: {n} messages of {size} bytes ({} of payload)",
            mib(live / 1024)
        ),
        format!(
            "ready after kill -9 with {n} stored: {:.2} s (process start to the queue's first answer)",
            ready.as_secs_f64()
        ),
        format!(
            "disk use: {} with everything stored ({:.2}x the payload); {} after the drain settled ({} s)",
            mib(full_disk / 1024),
            full_disk as f64 / live.max(1) as f64,
            mib(drained_disk / 1024),
            SETTLE.as_secs()
        ),
        format!(
            "broker peak RSS (VmHWM): {} while filling, {} after the restart while draining",
            peak(fill_peak),
            peak(drain_peak)
        ),
    ];
    Ok(sweep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_too_small_is_named() {
        let dir = Path::new("/data");
        let err = check_room(Some(1 << 30), 10_000_000, 1024, dir).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("cannot hold a backlog of 10000000 messages"),
            "{text}"
        );
        assert!(text.contains("/data has 1024.0 MiB free"), "{text}");
        assert!(check_room(Some(16 << 30), 10_000_000, 1024, dir).is_ok());
        assert!(
            check_room(None, 10_000_000, 1024, dir).is_ok(),
            "unknown: try"
        );
    }

    #[test]
    fn disk_use_counts_allocated_blocks() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("sub")).expect("dir");
        std::fs::write(dir.path().join("sub/a"), vec![1u8; 10_000]).expect("write");
        assert!(disk_use(dir.path()) >= 10_000);
    }
}
