//! The deterministic power-loss simulation of the queue engine.
//!
//! Each seed drives a real [`QueueEngine`] on a [`SimDisk`] and a [`MemoryIndex`]
//! through a seeded random mix of publishes (with and without confirm, message id and
//! delay), consumers on several sessions, acks, nacks with and without delay, ack
//! timeouts, dead-lettering after `max_deliveries`, redrive, TTL expiry, a length
//! limit, declare/bind/unbind/delete — interleaved with injected I/O errors, power
//! losses (with and without a torn write), process crashes and clean restarts.
//! After every restart the checker opens the store on what survived and holds it
//! against the model (`sim_model.rs`). The workload and every fault come from the
//! seed; the group-commit boundaries also depend on thread timing, which the checker
//! does not rely on.
//!
//! ```text
//! cargo test -p tidings-broker --lib storage::sim_test                      # 2,000 seeds
//! TIDINGS_SIM_SEED=1234 cargo test -p tidings-broker --lib storage::sim_test  # one seed
//! TIDINGS_SIM_SEEDS=1000000 cargo test --release -p tidings-broker --lib storage::sim_test::seeds
//! cargo test -p tidings-broker --lib storage::sim_checks    # the checks of the checker
//! ```

// Random numbers drawn below small bounds always fit the narrower types.
#![allow(clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tidings_protocol::{Delivery, Publish, QueueOptions};
use tokio::sync::mpsc;

use super::sim_model::{DLQ, Fate, Model, Msg, Q, R, check, id_of};
use super::{MemoryIndex, SimDisk, SimError, SimRng, StorageBackend};
use crate::queue::{ConsumerSession, DeliverySink, EngineConfig, QueueEngine, QueueError};

const STEPS: u64 = 36;
/// A seed that takes this long has hung: a failure, not a wait.
const SEED_TIMEOUT: Duration = Duration::from_secs(30);

fn trace(seed: u64, what: &str) {
    if std::env::var_os("TIDINGS_SIM_TRACE").is_some() {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let t = START.get_or_init(std::time::Instant::now).elapsed();
        eprintln!("{t:?} seed {seed}: {what}");
    }
}

/// What a restart logs at warning level and above: named in a failure's report (a
/// message the store skipped as unreadable says where a loss came from).
#[derive(Clone, Default)]
pub(super) struct Logged(Arc<std::sync::Mutex<Vec<u8>>>);

impl Logged {
    pub(super) fn text(&self) -> String {
        let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).trim().to_owned();
        if text.is_empty() {
            "nothing".into()
        } else {
            text
        }
    }
}

impl std::io::Write for Logged {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logged {
    type Writer = Logged;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

struct Sink(mpsc::UnboundedSender<Delivery>);

impl DeliverySink for Sink {
    fn deliver(&self, d: Delivery) -> bool {
        self.0.send(d).is_ok()
    }
}

struct Run {
    engine: QueueEngine,
    sessions: Vec<(ConsumerSession, mpsc::UnboundedReceiver<Delivery>)>,
    /// Received and not acked: (session, delivery id, payload id).
    outstanding: Vec<(usize, u64, u64)>,
    /// The queue each outstanding delivery came from.
    delivered_from: HashMap<(usize, u64), String>,
}

/// How the store under test is broken, for the self-checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Broken {
    Not,
    /// `fdatasync` does nothing.
    NoopSync,
    /// The index is applied before the log is durable: a move done in one round
    /// (delayed to ready) can then lose its message.
    IndexAhead,
}

pub(super) fn config(
    disk: &SimDisk,
    index: &MemoryIndex,
    seed: u64,
    broken: Broken,
) -> EngineConfig {
    let mut c = EngineConfig::new(format!("/sim/{seed}"));
    c.storage = if broken == Broken::IndexAhead {
        StorageBackend::simulated_index_ahead(disk.clone(), index.clone())
    } else {
        StorageBackend::simulated(disk.clone(), index.clone())
    };
    // The index overlay written through at once, now and then, and at checkpoints.
    // The index-ahead self-check writes through at once: what it shows is sled
    // writing back early on its own, which an overlay holding the writes would hide
    // in most seeds (and then the check would pass by luck or not at all).
    let overlay = if broken == Broken::IndexAhead {
        0
    } else {
        [0, 4, 100_000][usize::try_from(seed % 3).unwrap_or(0)]
    };
    c.storage = c.storage.with_overlay_limit(overlay);
    // Small segments: rolls (and the writer's sync before each) are frequent, a
    // few messages apart in half the seeds.
    c.segment_bytes = if (seed / 3) % 2 == 0 {
        6 << 10
    } else {
        24 << 10
    };
    c.checkpoint_interval = Duration::from_millis(15);
    c.ready_window = 6;
    c.ready_window_bytes = 16 << 10;
    c.delayed_window = 3;
    c
}

pub(super) fn q_options() -> QueueOptions {
    QueueOptions {
        bindings: vec!["t.>".into()],
        max_deliveries: Some(2),
        ack_timeout_ms: Some(25),
        backoff_ms: Some(vec![0, 5]),
        max_length: Some(40),
        ..Default::default()
    }
}

fn r_options() -> QueueOptions {
    QueueOptions {
        bindings: vec!["t.r.*".into()],
        ttl_ms: Some(15),
        ..Default::default()
    }
}

fn payload(id: u64, rng: &mut SimRng) -> Bytes {
    let mut p = id.to_be_bytes().to_vec();
    p.resize(8 + rng.below(2500) as usize, 0xab);
    Bytes::from(p)
}

async fn start(config: &EngineConfig, rng: &mut SimRng) -> Result<Run, String> {
    let engine = tokio::task::block_in_place(|| QueueEngine::open(config.clone()))
        .map_err(|e| format!("open: {e}"))?;
    let mut sessions = Vec::new();
    for s in 0..3u32 {
        let (tx, rx) = mpsc::unbounded_channel();
        let session = engine.session(Arc::new(Sink(tx)));
        // Best effort: a queue may not exist yet or the store may refuse.
        let _ = session.consume(1, Q, 1 + rng.below(4) as u32);
        if s == 2 {
            let _ = session.consume(2, DLQ, 2);
        }
        sessions.push((session, rx));
    }
    Ok(Run {
        engine,
        sessions,
        outstanding: Vec::new(),
        delivered_from: HashMap::new(),
    })
}

fn drain(run: &mut Run, model: &mut Model) {
    for (i, (_, rx)) in run.sessions.iter_mut().enumerate() {
        while let Ok(d) = rx.try_recv() {
            let id = id_of(&d.payload);
            if let Some(m) = model.msgs.get_mut(&id) {
                m.seen.push((
                    format!(
                        "{}@{}{}",
                        d.queue,
                        model.events.len(),
                        if model.failed { "!" } else { "" }
                    ),
                    d.attempt,
                ));
            }
            run.outstanding.push((i, d.delivery_id, id));
            run.delivered_from
                .insert((i, d.delivery_id), d.queue.to_string());
        }
    }
}

/// Notes a result of a write that claims durability when `durable`; Err if such a
/// claim was made for a write issued after a failure had been seen.
fn outcome(
    model: &mut Model,
    issued_after_failure: bool,
    durable: Result<bool, &QueueError>,
    what: &str,
) -> Result<(), String> {
    match durable {
        Ok(true) if issued_after_failure => Err(format!(
            "{what} succeeded after the store had failed (fail-stop broken)"
        )),
        Err(QueueError::Storage(e)) => {
            if !model.failed {
                model.events.push(format!("failure seen: {e}"));
            }
            model.failed = true;
            Ok(())
        }
        _ => Ok(()),
    }
}

async fn publish(run: &mut Run, model: &mut Model, rng: &mut SimRng) -> Result<(), String> {
    let burst = 1 + rng.below(4);
    let mut waits = Vec::new();
    for _ in 0..burst {
        let id = model.next_id;
        model.next_id += 1;
        let to_r = model.r_exists && rng.chance(25);
        let topic = if to_r { "t.r.x" } else { "t.a" };
        let mut p = Publish::new(topic, payload(id, rng));
        let message_id = rng
            .chance(30)
            .then(|| format!("m{}", rng.below(model.next_id / 2 + 1)));
        p.message_id = message_id.as_deref().map(Into::into);
        let delay_ms = if rng.chance(20) { 1 + rng.below(20) } else { 0 };
        p.delay_ms = (delay_ms > 0).then_some(delay_ms);
        model.msgs.insert(
            id,
            Msg {
                fate: Fate::Maybe,
                message_id: message_id.clone(),
                delay_ms,
                seen: Vec::new(),
                acked_in: String::new(),
            },
        );
        if to_r {
            model.r_ids.insert(id);
        }
        let confirm = rng.chance(80);
        let fut = run.engine.publish(&p);
        if confirm {
            waits.push((id, to_r, message_id, model.failed, fut));
        } else {
            drop(fut);
        }
    }
    for (id, to_r, message_id, after_failure, fut) in waits {
        let r = fut.await;
        outcome(
            model,
            after_failure,
            r.as_ref().map(|o| o.queues > 0),
            "a confirm",
        )?;
        if let Ok(o) = r {
            let took_q = if to_r { o.queues == 2 } else { o.queues == 1 };
            if o.duplicate {
                if let Some(mid) = message_id {
                    if !to_r {
                        model.duplicate_ids.insert(mid);
                    }
                }
            } else if took_q {
                if let Some(m) = model.msgs.get_mut(&id) {
                    m.fate = Fate::Required;
                }
            }
        }
    }
    Ok(())
}

async fn step(
    run: &mut Run,
    model: &mut Model,
    rng: &mut SimRng,
    disk: &SimDisk,
) -> Result<(), String> {
    drain(run, model);
    match rng.below(100) {
        0..=34 => publish(run, model, rng).await?,
        35..=54 if !run.outstanding.is_empty() => {
            let i = rng.below(run.outstanding.len() as u64) as usize;
            let (s, delivery, id) = run.outstanding.swap_remove(i);
            let queue = run
                .delivered_from
                .remove(&(s, delivery))
                .unwrap_or_default();
            // An ack is not a durability claim; an unknown delivery timed out and
            // went back, so nothing changed.
            let r = run.sessions[s].0.ack(&[delivery]);
            if let Some(m) = model.msgs.get_mut(&id) {
                m.seen
                    .push((format!("ack of {queue} delivery {delivery}: {r:?}"), 0));
                if r.is_ok() {
                    m.fate = Fate::Acked;
                    m.acked_in = queue;
                }
            }
        }
        55..=64 if !run.outstanding.is_empty() => {
            let i = rng.below(run.outstanding.len() as u64) as usize;
            let (s, delivery, id) = run.outstanding.swap_remove(i);
            let delay = rng
                .chance(50)
                .then(|| Duration::from_millis(1 + rng.below(15)));
            let r = run.sessions[s].0.nack(&[delivery], delay);
            if let Some(m) = model.msgs.get_mut(&id) {
                m.seen.push((format!("nack {delay:?}: {r:?}"), 0));
            }
        }
        65..=74 => {
            // Time passes: delays fall due, ack timeouts, TTLs and dead-lettering run.
            tokio::time::sleep(Duration::from_millis(5 + rng.below(25))).await;
        }
        75..=78 => {
            let after = model.failed;
            let r = run.engine.redrive(Q, 0).await;
            outcome(model, after, r.as_ref().map(|n| *n > 0), "a redrive")?;
            model.events.push(format!("redrive {r:?}"));
            model.redrives += 1;
        }
        79..=82 => {
            if model.r_exists && rng.chance(50) {
                let r = run.engine.delete(R).await;
                match r {
                    Ok(()) => {
                        model.r_exists = false;
                        model.r_unknown = false;
                        model.r_ids.clear();
                    }
                    Err(QueueError::NotFound(_)) => {}
                    Err(_) => model.r_unknown = true,
                }
            } else {
                match run.engine.declare(R, &r_options()).await {
                    Ok(()) if !model.r_exists => {
                        model.r_exists = true;
                        model.r_ids.clear();
                    }
                    Ok(()) => {}
                    Err(_) => model.r_unknown = true,
                }
            }
        }
        83..=85 => {
            let pattern = if rng.chance(50) { "t.r.y" } else { "t.z" };
            if rng.chance(50) {
                let _ = run.engine.bind(R, pattern).await;
            } else {
                let _ = run.engine.unbind(R, pattern).await;
            }
        }
        86..=88 => {
            let credit = 1 + rng.below(3) as u32;
            let s = rng.below(run.sessions.len() as u64) as usize;
            let _ = run.sessions[s].0.credit(1, credit);
        }
        89..=91 if !model.failed => {
            let n = rng.below(4);
            match rng.below(4) {
                0 => disk.fail_sync(n, SimError::Io),
                1 => disk.fail_write(n, SimError::NoSpace),
                2 => disk.fail_write(n, SimError::Io),
                // Directory fsyncs are rare among syncs (one per new segment), so
                // counting syncs seldom hits one: aimed at directly.
                _ => {
                    model.events.push("directory fsync fault armed".into());
                    disk.fail_next_dir_sync(SimError::Io);
                    return Ok(());
                }
            }
            model.events.push(format!("fault armed in {n}"));
        }
        _ => {}
    }
    Ok(())
}

/// How a run ends.
#[derive(Debug, Clone, Copy)]
enum End {
    PowerLoss { tear: bool },
    ProcessCrash,
    Clean,
}

/// Runs one seed; Err names what the checker found.
async fn run_seed(seed: u64, broken: Broken) -> Result<(), String> {
    let mut rng = SimRng::new(seed);
    let mut disk = SimDisk::new();
    let mut index = MemoryIndex::new();
    disk.set_noop_sync(broken == Broken::NoopSync);
    let mut model = Model::default();
    let restarts = 1 + rng.below(3);
    for round in 0..restarts {
        let config = config(&disk, &index, seed, broken);
        trace(seed, "start");
        let mut run = start(&config, &mut rng).await?;
        trace(seed, "started");
        if round == 0 {
            run.engine
                .declare(Q, &q_options())
                .await
                .map_err(|e| format!("declare: {e}"))?;
            for (s, _) in &run.sessions {
                let _ = s.consume(1, Q, 2);
            }
        }
        for _ in 0..STEPS / restarts {
            let t = std::time::Instant::now();
            step(&mut run, &mut model, &mut rng, &disk).await?;
            if t.elapsed() > Duration::from_millis(300) {
                trace(
                    seed,
                    &format!("slow step {:?}: {:?}", t.elapsed(), model.events.last()),
                );
            }
        }
        trace(seed, "steps done");
        drain(&mut run, &mut model);
        let end = match rng.below(10) {
            0..=5 => End::PowerLoss {
                tear: rng.chance(50),
            },
            6..=7 => End::ProcessCrash,
            _ => End::Clean,
        };
        match end {
            End::PowerLoss { tear } => {
                // The disk first: whatever the index gets after this was durable.
                disk.power_loss(&mut rng, tear);
                index.power_loss(&mut rng);
            }
            End::ProcessCrash => {
                disk.process_crash();
                index.power_loss(&mut rng);
            }
            End::Clean => run.engine.shutdown().await,
        }
        trace(seed, &format!("{end:?}"));
        model.events.push(format!("{end:?}"));
        let Run {
            engine, sessions, ..
        } = run;
        drop(sessions);
        engine.shutdown().await;
        trace(seed, "shut down");
        let checked = std::time::Instant::now();
        disk.clear_faults();
        disk = disk.reboot();
        index = index.reboot();
        model.failed = false;
        let logged = Logged::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .without_time()
            .with_writer(logged.clone())
            .finish();
        tokio::task::block_in_place(|| {
            tracing::subscriber::with_default(subscriber, || {
                check(&config_for_check(&disk, &index, seed), &mut model)
            })
        })
        .map_err(|e| {
            format!(
                "after {end:?} (run {round}): {e}\n  the restart logged: {}",
                logged.text()
            )
        })?;
        trace(seed, &format!("checked in {:?}", checked.elapsed()));
    }
    Ok(())
}

pub(super) fn config_for_check(disk: &SimDisk, index: &MemoryIndex, seed: u64) -> EngineConfig {
    config(disk, index, seed, Broken::Not)
}

pub(super) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs `count` seeds from `first`, a few at a time; returns the failures.
pub(super) fn run_seeds(first: u64, count: u64, broken: Broken) -> Vec<(u64, String)> {
    runtime().block_on(async move {
        let mut failures = Vec::new();
        let mut next = first;
        let mut running = tokio::task::JoinSet::new();
        while next < first + count || !running.is_empty() {
            while next < first + count && running.len() < 8 {
                let seed = next;
                next += 1;
                running.spawn(async move {
                    let run = tokio::time::timeout(SEED_TIMEOUT, run_seed(seed, broken));
                    let result = run.await.unwrap_or_else(|_| Err("the run hung".into()));
                    (seed, result)
                });
            }
            if let Some(Ok((seed, Err(err)))) = running.join_next().await {
                failures.push((seed, err));
            }
        }
        failures.sort();
        failures
    })
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn seeds() {
    let (first, count) = match env_u64("TIDINGS_SIM_SEED") {
        Some(seed) => (seed, 1),
        None => (
            env_u64("TIDINGS_SIM_FIRST").unwrap_or(0),
            env_u64("TIDINGS_SIM_SEEDS").unwrap_or(2000),
        ),
    };
    let failures = run_seeds(first, count, Broken::Not);
    for (seed, err) in &failures {
        eprintln!(
            "simulation seed {seed} failed: {err}\n  rerun: TIDINGS_SIM_SEED={seed} cargo test -p tidings-broker --lib storage::sim_test::seeds"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {count} seeds failed (first: seed {})",
        failures.len(),
        failures[0].0
    );
}
