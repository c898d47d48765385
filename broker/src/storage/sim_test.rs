//! The deterministic power-loss simulation of the queue engine.
//!
//! Each seed drives a real [`QueueEngine`] on a [`SimDisk`] and a [`MemoryIndex`]
//! through a seeded random mix of publishes (with and without confirm, message id and
//! delay), consumers on several sessions, acks, nacks with and without delay, ack
//! timeouts, dead-lettering after `max_deliveries`, redrive, TTL expiry, a length
//! limit, declare/bind/unbind/delete — interleaved with injected I/O errors, power
//! losses (with and without a torn write), process crashes and clean restarts.
//! After every restart the checker opens the store on what survived and holds it
//! against the model (see [`check`]). The workload and every fault come from the
//! seed; the group-commit boundaries also depend on thread timing, which the checker
//! does not rely on.
//!
//! ```text
//! cargo test -p tidings-broker --lib storage::sim_test                      # 2,000 seeds
//! TIDINGS_SIM_SEED=1234 cargo test -p tidings-broker --lib storage::sim_test  # one seed
//! TIDINGS_SIM_SEEDS=1000000 cargo test --release -p tidings-broker --lib storage::sim_test::seeds
//! ```

// Random numbers drawn below small bounds always fit the narrower types.
#![allow(clippy::cast_possible_truncation)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tidings_protocol::{Delivery, Publish, QueueOptions};
use tokio::sync::mpsc;

use super::{MemoryIndex, SimDisk, SimError, SimRng, StorageBackend, Store};
use crate::queue::{ConsumerSession, DeliverySink, EngineConfig, QueueEngine, QueueError};

const Q: &str = "q";
const DLQ: &str = "q.dlq";
const R: &str = "r";
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
struct Logged(Arc<std::sync::Mutex<Vec<u8>>>);

impl Logged {
    fn text(&self) -> String {
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

/// What the model knows of one message of `q`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Not confirmed: may or may not be stored.
    Maybe,
    /// Confirmed and not acked: must be stored (in `q` or its dead-letter queue).
    Required,
    /// Acked (not necessarily durably): may come back only as a redelivery.
    Acked,
}

#[derive(Debug)]
struct Msg {
    fate: Fate,
    message_id: Option<String>,
    delay_ms: u64,
    /// Queues a delivery of it came from, with the attempt: its moves.
    seen: Vec<(String, u32)>,
    /// The queue of the delivery that was acked.
    acked_in: String,
}

#[derive(Default)]
struct Model {
    msgs: BTreeMap<u64, Msg>,
    /// Message ids answered `duplicate: true`: some copy must be stored (or acked).
    duplicate_ids: HashSet<String>,
    /// Payload ids published to `r` in its current life, and whether `r` exists.
    r_ids: HashSet<u64>,
    r_exists: bool,
    /// `r` was deleted or declared with a result we do not know.
    r_unknown: bool,
    /// Moves seen since the start: for the report of a loss.
    redrives: u64,
    next_id: u64,
    /// A call returned StorageFailure in this run: every later write must fail.
    failed: bool,
    /// Faults, redrives and restarts, in order: for the report of a failure.
    events: Vec<String>,
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
enum Broken {
    Not,
    /// `fdatasync` does nothing.
    NoopSync,
    /// The index is applied before the log is durable: a move done in one round
    /// (delayed to ready) can then lose its message.
    IndexAhead,
}

fn config(disk: &SimDisk, index: &MemoryIndex, seed: u64, broken: Broken) -> EngineConfig {
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

fn q_options() -> QueueOptions {
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

fn id_of(payload: &[u8]) -> u64 {
    u64::from_be_bytes(payload[..8].try_into().expect("8-byte id"))
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

/// Opens the store on what survived and holds it against the model:
///
/// - every confirmed message that was not acked is stored (ready, delayed, in flight
///   or dead-lettered; a move may leave it in both queues, never in neither);
/// - within one queue, no message is stored twice and no message id twice;
/// - an acked message that comes back does so as a redelivery (attempt >= 2);
/// - each queue's stored counters (depth, bytes) equal what it holds;
/// - a message id answered `duplicate` has a stored (or acked) copy;
/// - a deleted queue does not come back, and a re-created one holds nothing of
///   its earlier life.
fn check(config: &EngineConfig, model: &mut Model) -> Result<(), String> {
    let mut config = config.clone();
    config.ready_window = usize::MAX;
    config.ready_window_bytes = usize::MAX;
    config.delayed_window = usize::MAX;
    let opened = Store::open(&config).map_err(|e| format!("restart refused: {e}"))?;
    opened.store.shutdown();
    let mut stored: HashMap<u64, Vec<&'static str>> = HashMap::new();
    let mut r_seen = false;
    for q in &opened.queues {
        let name: &'static str = match q.name.as_str() {
            Q => Q,
            DLQ => DLQ,
            R => R,
            other => return Err(format!("unknown queue {other} came back")),
        };
        let all: Vec<_> = q.ready.iter().chain(&q.delayed).collect();
        let c = q.counters;
        let bytes = |v: &[super::Loaded]| v.iter().map(|l| l.message.size()).sum::<u64>();
        if (c.m_count, c.m_bytes, c.d_count, c.d_bytes)
            != (
                q.ready.len() as u64,
                bytes(&q.ready),
                q.delayed.len() as u64,
                bytes(&q.delayed),
            )
        {
            return Err(format!(
                "{name}: counters say {} ready ({} bytes) and {} delayed ({} bytes), the store holds {} ({}) and {} ({})",
                c.m_count,
                c.m_bytes,
                c.d_count,
                c.d_bytes,
                q.ready.len(),
                bytes(&q.ready),
                q.delayed.len(),
                bytes(&q.delayed)
            ));
        }
        let mut ids = HashSet::new();
        let mut mids = HashSet::new();
        for l in &all {
            let id = id_of(&l.message.payload);
            // A message that moved between queues and was caught by a crash between
            // the two steps of a later move may be stored twice (at-least-once);
            // nothing else may.
            let moved = model
                .msgs
                .get(&id)
                .is_some_and(|m| m.seen.iter().any(|(at, _)| at.contains(DLQ)));
            if !ids.insert(id) && !moved {
                return Err(format!(
                    "{name}: message {id} is stored twice (keys {:?}, history {:?}, events {:?})",
                    all.iter()
                        .filter(|o| id_of(&o.message.payload) == id)
                        .map(|o| (o.key, o.message.deliveries))
                        .collect::<Vec<_>>(),
                    model.msgs.get(&id).map(|m| &m.seen),
                    model.events
                ));
            }
            if let Some(mid) = &l.message.message_id {
                if !mids.insert(mid.to_string()) && !moved {
                    return Err(format!("{name}: message id {mid} is stored twice"));
                }
            }
            stored.entry(id).or_default().push(name);
            if let Some(m) = model.msgs.get_mut(&id) {
                m.seen.push((
                    format!(
                        "stored in {name} at {:?}, mark {}, deliveries {}",
                        l.key, c.mark, l.message.deliveries
                    ),
                    0,
                ));
            }
            if name == R {
                r_seen = true;
                if !model.r_unknown && !model.r_ids.contains(&id) {
                    return Err(format!(
                        "r holds message {id} from an earlier life of the queue"
                    ));
                }
            }
            if let Some(m) = model.msgs.get(&id) {
                let redelivery = l.message.deliveries >= 1 || (l.key.0 == 0 && l.key.1 <= c.mark);
                // A copy of a message that moved may be another copy than the acked
                // one (a redrive makes a fresh message): checked for unmoved ones.
                if m.fate == Fate::Acked && m.acked_in == name && !redelivery && !moved {
                    return Err(format!(
                        "{name}: acked message {id} came back as a first delivery (seq {:?}, mark {}, deliveries seen {:?}, events {:?})",
                        l.key, c.mark, m.seen, model.events
                    ));
                }
            }
        }
    }
    if r_seen && !model.r_exists && !model.r_unknown {
        return Err("the deleted queue r came back with messages".into());
    }
    for (id, m) in &model.msgs {
        let home = stored
            .get(id)
            .is_some_and(|qs| qs.iter().any(|q| *q == Q || *q == DLQ));
        if m.fate == Fate::Required && !home {
            return Err(format!(
                "LOSS: confirmed message {id} is gone (delay {} ms, message id {:?}, deliveries seen {:?}, redrives {}, events {:?})",
                m.delay_ms, m.message_id, m.seen, model.redrives, model.events
            ));
        }
    }
    for mid in &model.duplicate_ids {
        let copy = model.msgs.iter().any(|(id, m)| {
            m.message_id.as_deref() == Some(mid)
                && (stored.contains_key(id) || m.fate == Fate::Acked)
        });
        if !copy {
            return Err(format!(
                "message id {mid} was answered duplicate but no copy is stored"
            ));
        }
    }
    // What is stored now is durable: from here on it is required like a confirm, and
    // an acked message that came back is a stored message again.
    for (id, m) in model.msgs.iter_mut() {
        let back = stored
            .get(id)
            .is_some_and(|qs| qs.contains(&Q) || qs.contains(&DLQ));
        if matches!(m.fate, Fate::Maybe | Fate::Acked) && back {
            m.fate = Fate::Required;
            m.acked_in.clear();
        }
    }
    model.r_exists = opened.queues.iter().any(|q| q.name == R);
    model.r_unknown = false;
    Ok(())
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

fn config_for_check(disk: &SimDisk, index: &MemoryIndex, seed: u64) -> EngineConfig {
    config(disk, index, seed, Broken::Not)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs `count` seeds from `first`, a few at a time; returns the failures.
fn run_seeds(first: u64, count: u64, broken: Broken) -> Vec<(u64, String)> {
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

/// A broker whose store stopped on a failed `fsync` of the segment directory, right
/// after it created a segment, leaves that segment with records in the page cache and
/// no durable name. The next start replays those records into the index (and makes
/// the index durable); it must make the name durable first, or a power loss after it
/// leaves the index counting messages in a file that is gone.
#[test]
fn a_start_makes_the_names_of_the_segments_it_replayed_durable() {
    runtime().block_on(async {
        let disk = SimDisk::new();
        let index = MemoryIndex::new();
        let mut config = config(&disk, &index, 3, Broken::Not);
        config.segment_bytes = 4 << 10;
        let engine = tokio::task::block_in_place(|| QueueEngine::open(config.clone())).unwrap();
        engine.declare(Q, &q_options()).await.unwrap();
        // Larger than a segment: its round starts a new one, whose directory fsync fails.
        disk.fail_next_dir_sync(SimError::Io);
        let big = Publish::new("t.a", Bytes::from(vec![7u8; 6 << 10]));
        let confirm = engine.publish(&big).await;
        assert!(
            matches!(confirm, Err(QueueError::Storage(_))),
            "{confirm:?}"
        );
        engine.shutdown().await;
        // A restart on the same disk (the machine stayed up), then the power goes.
        let opened = tokio::task::block_in_place(|| Store::open(&config)).unwrap();
        opened.store.shutdown();
        drop(opened);
        disk.power_loss(&mut SimRng::new(1), false);
        let (disk, index) = (disk.reboot(), index.reboot());
        let config = config_for_check(&disk, &index, 3);
        let logged = Logged::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(logged.clone())
            .finish();
        let opened = tracing::subscriber::with_default(subscriber, || {
            tokio::task::block_in_place(|| Store::open(&config))
        })
        .unwrap();
        opened.store.shutdown();
        let q = opened.queues.iter().find(|q| q.name == Q).expect("q");
        assert_eq!(
            (q.counters.m_count, q.ready.len()),
            (1, 1),
            "the replayed message stays, in a segment that is still there ({})",
            logged.text()
        );
    });
}

/// The proof cannot pass vacuously: with `fdatasync` made a no-op, confirmed
/// messages must be found lost.
#[test]
fn a_noop_fdatasync_is_caught() {
    // About one seed in twenty finds a loss (the rest end in a clean restart, or
    // their power loss hits nothing confirmed): 400 seeds leave no room for luck.
    const SEEDS: u64 = 400;
    let failures = run_seeds(0, SEEDS, Broken::NoopSync);
    let losses = failures.iter().filter(|(_, e)| e.contains("LOSS")).count();
    eprintln!("fdatasync a no-op: {losses} of {SEEDS} seeds found a loss");
    assert!(
        losses > 0,
        "no loss found with fdatasync a no-op: the checker proves nothing ({failures:?})"
    );
}

/// The checker catches the order the issue describes: with the index written before
/// the log is durable (sled writes back on its own), a power loss leaves an index
/// that disagrees with the log — counters off, a delayed message both moved and not,
/// a confirmed message gone.
#[test]
fn an_index_ahead_of_the_log_is_caught() {
    // About 3 % of seeds hit such a state (a power loss right after sled wrote back
    // a round that was not durable yet): 600 seeds find 10 to 30 of them.
    let failures = run_seeds(0, 600, Broken::IndexAhead);
    eprintln!(
        "index ahead of the log: {} of 600 seeds found it",
        failures.len()
    );
    for (seed, err) in failures.iter().take(3) {
        eprintln!("index ahead of the log, seed {seed}: {err}");
    }
    assert!(
        failures.len() >= 3,
        "the checker hardly notices an index ahead of the log: {failures:?}"
    );
}
