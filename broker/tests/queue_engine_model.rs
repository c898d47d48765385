//! Model test: random sequences of publishes (some delayed), acks, nacks (with and
//! without a delay), time passing (ack timeouts, delayed messages falling due, TTL
//! expiry), consumers cancelled and restarted with new credit, dead-lettering after
//! max_deliveries, redrive, and crashes — against a real queue engine, checked step
//! by step against a plain model of what must be delivered next, to which consumer
//! credit, with which attempt number, and what is left where. Limits run under both
//! overflow policies.
//!
//! Time is a [`ManualClock`], so timeouts, delays and TTLs happen exactly when the
//! model says; after each step the test waits for the engine to settle, then
//! expects exactly the deliveries the model predicts: a missing one, a wrong order,
//! a wrong attempt or a stray extra delivery fails the step. A message that expired
//! early is missing, one that expired late is a stray delivery or a wrong depth.
//!
//! TTL: a queue with `ttl_ms` drops a message once `now >= published + ttl` when
//! it reaches the head of the queue or is about to be delivered (never while in
//! flight or delayed); it is counted in the queue's `expired` figure, and
//! dead-lettered with reason `expired` when the dead-letter queue exists (here:
//! declared up front). Without one it is only counted; such setups never use up
//! deliveries, so that the dead-letter queue's coming into being cannot race an
//! expiry.
//!
//! Crashes: the store runs on the simulated disk ([`SimDisk`], [`MemoryIndex`]) with
//! `fsync` always. A crash is a process crash (what was written stays) or a power
//! loss (what was not `fdatasync`ed is lost, the newest write maybe torn), and the
//! index loses what its last checkpoint did not hold; then the engine is dropped
//! without a graceful shutdown (its later writes fail on the dead disk handles) and
//! a new one opens on what survived. A crash may follow an ack that was not yet
//! settled. After a crash the model expects:
//!
//! - every confirmed message that was not acked back exactly once, in the order it
//!   was stored (in-flight and retried ones included), with an attempt number that
//!   never goes down (its last attempt or one more);
//! - an acked message never back, except the one acked just before the crash, which
//!   may come back (its ack was not durable) and then only as a redelivery
//!   (attempt >= 2); whether it did is read off the engine's depth and expired
//!   count, which add up to one more if it did;
//! - dead letters, delayed messages and their due times as they were.
//!
//! 1,000 cases by default (`PROPTEST_CASES` overrides); a failure is shrunk, printed
//! with the inputs that reproduce it, and its seed saved to
//! `queue_engine_model.proptest-regressions`, which later runs replay first.
//!
//! ```text
//! cargo test -p tidings-broker --test queue_engine_model
//! MODEL_DEBUG=1 cargo test -p tidings-broker --test queue_engine_model   # dump on a depth mismatch
//! ```

#[path = "common/proptest_config.rs"]
mod proptest_config;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use tidings_broker::queue::{
    ConsumerSession, DeliverySink, EngineConfig, FsyncPolicy, ManualClock, QueueEngine,
};
use tidings_broker::storage::{MemoryIndex, SimDisk, SimRng, StorageBackend};
use tidings_protocol::{Delivery, Overflow, Publish, QueueOptions, Text};
use tokio::sync::mpsc;

const ACK_TIMEOUT: u64 = 1_000;
const START_MS: u64 = 1_700_000_000_000;
/// `max_deliveries` of setups with a TTL and no declared dead-letter queue: never
/// reached in a case.
const NEVER_SPENT: u32 = 1_000;
const DLQ: &str = "q.dlq";

#[derive(Debug, Clone, Copy)]
enum Crash {
    /// `kill -9`: everything written stays, as the operating system holds it.
    Process,
    /// The machine loses power: only what was synced stays.
    PowerLoss { tear: bool },
}

#[derive(Debug, Clone)]
enum Op {
    /// Publish this many messages at once, delayed by this much (0: not delayed).
    Publish(u8, u64),
    Ack(usize),
    Nack(usize, Option<u64>),
    /// Time passes.
    Advance(u64),
    /// Cancel a consumer and start it again with this credit.
    Recycle(usize, u32),
    Redrive,
    /// The broker dies, right after acking this outstanding delivery (if any) without
    /// waiting; `seed` drives what the power loss keeps.
    Crash {
        how: Crash,
        ack: Option<usize>,
        seed: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (1u8..4, prop_oneof![3 => Just(0u64), 1 => Just(200u64), 1 => Just(700u64)])
            .prop_map(|(n, d)| Op::Publish(n, d)),
        4 => any::<usize>().prop_map(Op::Ack),
        3 => (any::<usize>(), prop_oneof![2 => Just(None), 1 => Just(Some(300u64))])
            .prop_map(|(i, d)| Op::Nack(i, d)),
        2 => prop_oneof![Just(100u64), Just(400u64), Just(1_100u64)].prop_map(Op::Advance),
        1 => (0usize..2, 1u32..4).prop_map(|(c, credit)| Op::Recycle(c, credit)),
        1 => Just(Op::Redrive),
        1 => (
            prop_oneof![
                Just(Crash::Process),
                any::<bool>().prop_map(|tear| Crash::PowerLoss { tear }),
            ],
            proptest::option::of(any::<usize>()),
            any::<u64>(),
        )
            .prop_map(|(how, ack, seed)| Op::Crash { how, ack, seed }),
    ]
}

#[derive(Debug, Clone, Copy)]
struct Setup {
    max_deliveries: u32,
    max_length: Option<u64>,
    drop_head: bool,
    credits: [u32; 2],
    ttl: Option<u64>,
    /// `q.dlq` is declared before the first message (else a dead letter creates it).
    declare_dlq: bool,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        2u32..4,
        prop_oneof![Just(None), (3u64..8).prop_map(Some)],
        any::<bool>(),
        (1u32..4, 1u32..4),
        prop_oneof![2 => Just(None), 1 => prop_oneof![Just(500u64), Just(900), Just(1_500)].prop_map(Some)],
        any::<bool>(),
    )
        .prop_map(
            |(max_deliveries, max_length, drop_head, (a, b), ttl, declare_dlq)| Setup {
                max_deliveries: if ttl.is_some() && !declare_dlq {
                    NEVER_SPENT
                } else {
                    max_deliveries
                },
                max_length,
                drop_head,
                credits: [a, b],
                ttl,
                declare_dlq,
            },
        )
}

struct Sink(mpsc::UnboundedSender<Delivery>);

impl DeliverySink for Sink {
    fn deliver(&self, d: Delivery) -> bool {
        self.0.send(d).is_ok()
    }
}

/// A message the model knows: its id is its payload.
#[derive(Debug, Clone, Copy)]
struct Held {
    id: u64,
    /// The queue's seq: the order it is stored in.
    seq: u64,
    /// When it was stored (published or redriven): its TTL counts from here.
    published: u64,
}

#[derive(Debug, Clone, Copy)]
struct Out {
    held: Held,
    consumer: usize,
    delivery_id: u64,
    deadline: u64,
}

#[derive(Default)]
struct Model {
    next_id: u64,
    next_seq: u64,
    now: u64,
    ttl: Option<u64>,
    /// Redeliveries, served first.
    retry: VecDeque<Held>,
    /// Fresh ready messages in seq order.
    fresh: VecDeque<Held>,
    /// Delayed messages by (due, seq).
    delayed: Vec<(u64, Held)>,
    out: Vec<Out>,
    /// Ids in the dead-letter queue with their reason (any order).
    letters: Vec<(u64, &'static str)>,
    /// Whether `q.dlq` exists: declared, or created by a dead letter.
    dlq_exists: bool,
    /// Messages expired since the engine started (its `expired` figure).
    expired: u64,
    /// Attempt of the last delivery, per id (deliveries made so far).
    attempts: HashMap<u64, u32>,
    /// Ids whose next delivery follows a crash (its attempt may repeat).
    restarted: HashMap<u64, bool>,
    /// Acked just before a crash and back after it: must come as a redelivery.
    ack_undone: HashSet<u64>,
    credits: [u32; 2],
}

impl Model {
    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn held(&self) -> usize {
        self.retry.len() + self.fresh.len() + self.delayed.len() + self.out.len()
    }

    fn outstanding(&self, consumer: usize) -> u32 {
        u32::try_from(self.out.iter().filter(|o| o.consumer == consumer).count()).unwrap()
    }

    /// Drop-head's victim: the oldest ready message.
    fn drop_oldest(&mut self) -> bool {
        self.retry
            .pop_front()
            .or_else(|| self.fresh.pop_front())
            .is_some()
    }

    /// A delivery came back (nack, timeout, cancel): requeued or dead-lettered.
    fn take_back(&mut self, o: Out, delay: Option<u64>, max: u32) {
        let deliveries = self.attempts.get(&o.held.id).copied().unwrap_or(0);
        if deliveries >= max {
            self.letters.push((o.held.id, "max_deliveries"));
            self.dlq_exists = true;
            return;
        }
        match delay.filter(|d| *d > 0) {
            None => self.retry.push_back(o.held),
            Some(d) => {
                let seq = self.seq();
                self.delayed.push((self.now + d, Held { seq, ..o.held }));
            }
        }
    }

    /// Past its TTL now: never earlier.
    fn is_expired(&self, h: &Held) -> bool {
        self.ttl.is_some_and(|ttl| self.now >= h.published + ttl)
    }

    fn expire(&mut self, h: Held) {
        self.expired += 1;
        if self.dlq_exists {
            self.letters.push((h.id, "expired"));
        }
    }

    /// Expired messages at the head of the retry and the ready queue leave; one
    /// behind a live message waits until it gets to the head.
    fn expire_head(&mut self) {
        while self.retry.front().is_some_and(|h| self.is_expired(h)) {
            let h = self.retry.pop_front().unwrap();
            self.expire(h);
        }
        while self.fresh.front().is_some_and(|h| self.is_expired(h)) {
            let h = self.fresh.pop_front().unwrap();
            self.expire(h);
        }
    }
}

/// The consumer id of model consumer `i` (0 or 1).
fn cid(i: usize) -> u32 {
    u32::try_from(i).unwrap() + 1
}

/// The simulated machine: its disk and index outlive each engine.
struct Machine {
    disk: SimDisk,
    index: MemoryIndex,
    clock: ManualClock,
}

impl Machine {
    fn config(&self) -> EngineConfig {
        let mut c = EngineConfig::new("/sim/model");
        c.storage = StorageBackend::simulated(self.disk.clone(), self.index.clone());
        // A confirm means durable, so a power loss keeps every confirmed message.
        c.fsync = FsyncPolicy::Always;
        c.clock = Some(self.clock.clone());
        c
    }

    /// Cuts the engine off its disk as `how` says; the engine's writes from now on
    /// fail (its handles belong to the old run).
    fn crash(&mut self, how: Crash, rng: &mut SimRng) {
        match how {
            Crash::Process => self.disk.process_crash(),
            Crash::PowerLoss { tear } => self.disk.power_loss(rng, tear),
        }
        self.index.power_loss(rng);
        self.disk = self.disk.reboot();
        self.index = self.index.reboot();
    }
}

struct Live {
    engine: QueueEngine,
    session: ConsumerSession,
    rx: mpsc::UnboundedReceiver<Delivery>,
}

/// Opens the engine on what the disk holds and declares the queues (a match for
/// what is stored after a crash). No consumers yet.
async fn open(machine: &Machine, s: &Setup) -> QueueEngine {
    let config = machine.config();
    let engine = tokio::task::block_in_place(|| QueueEngine::open(config)).unwrap();
    if s.declare_dlq {
        engine.declare(DLQ, &QueueOptions::default()).await.unwrap();
    }
    let options = QueueOptions {
        bindings: vec![Text::from("t")],
        max_deliveries: Some(s.max_deliveries),
        ack_timeout_ms: Some(ACK_TIMEOUT),
        max_length: s.max_length,
        ttl_ms: s.ttl,
        overflow: Some(if s.drop_head {
            Overflow::DropHead
        } else {
            Overflow::RejectPublish
        }),
        ..Default::default()
    };
    engine.declare("q", &options).await.unwrap();
    engine
}

fn attach(engine: QueueEngine, credits: [u32; 2]) -> Live {
    let (tx, rx) = mpsc::unbounded_channel();
    let session = engine.session(Arc::new(Sink(tx)));
    for (i, credit) in credits.iter().enumerate() {
        session.consume(cid(i), "q", *credit).unwrap();
    }
    Live {
        engine,
        session,
        rx,
    }
}

/// Waits for quiet, then receives exactly the deliveries the model expects.
async fn settle(live: &mut Live, model: &mut Model) -> Result<(), TestCaseError> {
    live.engine.settle().await;
    loop {
        let free = |m: &Model, c: usize| m.credits[c].saturating_sub(m.outstanding(c));
        if free(model, 0) + free(model, 1) == 0 {
            break;
        }
        let Some(held) = model.retry.pop_front().or_else(|| model.fresh.pop_front()) else {
            break;
        };
        if model.is_expired(&held) {
            model.expire(held);
            continue;
        }
        let d = tokio::time::timeout(Duration::from_secs(5), live.rx.recv())
            .await
            .map_err(|_| TestCaseError::fail(format!("message {} was not delivered", held.id)))?
            .ok_or_else(|| TestCaseError::fail("sink closed"))?;
        let got: u64 = String::from_utf8_lossy(&d.payload).parse().unwrap();
        prop_assert_eq!(got, held.id, "delivery order");
        let consumer = d.consumer_id as usize - 1;
        prop_assert!(
            free(model, consumer) > 0,
            "consumer {} had no credit",
            consumer + 1
        );
        let prev = model.attempts.get(&held.id).copied().unwrap_or(0);
        if model.restarted.remove(&held.id).unwrap_or(false) {
            let low = prev.max(1);
            prop_assert!(
                d.attempt >= low && d.attempt <= low + 1,
                "message {} attempt {} after {} and a crash",
                held.id,
                d.attempt,
                prev
            );
        } else {
            prop_assert_eq!(d.attempt, prev + 1, "attempt of message {}", held.id);
        }
        if model.ack_undone.remove(&held.id) {
            prop_assert!(
                d.attempt >= 2,
                "message {} acked before a crash came back as attempt {}",
                held.id,
                d.attempt
            );
        }
        model.attempts.insert(held.id, d.attempt);
        model.out.push(Out {
            held,
            consumer,
            delivery_id: d.delivery_id,
            deadline: model.now + ACK_TIMEOUT,
        });
    }
    model.expire_head();
    if let Ok(d) = live.rx.try_recv() {
        return Err(TestCaseError::fail(format!("a stray delivery {d:?}")));
    }
    let info = live.engine.info("q").unwrap();
    if std::env::var("MODEL_DEBUG").is_ok() && info.depth != model.held() as u64 {
        eprintln!(
            "info {info:?}\nretry {:?}\nfresh {:?}\ndelayed {:?}\nout {:?}\nletters {:?}\nstats {:?}",
            model.retry,
            model.fresh,
            model.delayed,
            model.out,
            model.letters,
            live.engine.stats()
        );
    }
    prop_assert_eq!(info.depth, model.held() as u64, "depth");
    prop_assert_eq!(info.in_flight, model.out.len() as u64, "in flight");
    prop_assert_eq!(info.delayed, model.delayed.len() as u64, "delayed");
    prop_assert_eq!(
        live.engine.view("q").unwrap().expired,
        model.expired,
        "expired"
    );
    let dlq = live.engine.info(DLQ).map(|i| i.depth).unwrap_or(0);
    prop_assert_eq!(dlq, model.letters.len() as u64, "dead letters");
    prop_assert_eq!(
        live.engine.info(DLQ).is_ok(),
        model.dlq_exists,
        "q.dlq exists"
    );
    Ok(())
}

/// Crashes the engine and opens a new one on what survived; brings the model to
/// what must be there after it.
async fn crash(
    live: Live,
    machine: &mut Machine,
    model: &mut Model,
    s: &Setup,
    how: Crash,
    ack: Option<usize>,
    seed: u64,
) -> Result<Live, TestCaseError> {
    let mut rng = SimRng::new(seed);
    // An ack the crash may catch before it is durable.
    let unsettled = match ack {
        Some(i) if !model.out.is_empty() => {
            let o = model.out.remove(i % model.out.len());
            live.session.ack(&[o.delivery_id]).unwrap();
            Some(o.held)
        }
        _ => None,
    };
    machine.crash(how, &mut rng);
    let Live {
        engine, session, ..
    } = live;
    // No graceful shutdown reaches the disk: the old engine's handles are dead, so
    // letting its session go and stopping its tasks writes nothing.
    drop(session);
    engine.shutdown().await;
    drop(engine);

    let engine = open(machine, s).await;
    engine.settle().await;
    // Everything the queue held comes back ready, in the order it was stored.
    let mut ready: Vec<Held> = model
        .retry
        .drain(..)
        .chain(model.fresh.drain(..))
        .chain(model.out.drain(..).map(|o| o.held))
        .collect();
    let certain = (ready.len() + model.delayed.len()) as u64;
    // Whatever expires on the way is counted: depth and expired together say
    // whether the unsettled ack was undone.
    let view = engine.view("q").unwrap();
    let present = view.info.depth + view.expired;
    if let Some(h) = unsettled {
        prop_assert!(
            present == certain || present == certain + 1,
            "{} messages and {} expired after a crash, {} expected (or one more)",
            view.info.depth,
            view.expired,
            certain
        );
        if present == certain + 1 {
            ready.push(h);
            model.ack_undone.insert(h.id);
        }
    } else {
        prop_assert_eq!(present, certain, "messages after a crash");
    }
    ready.sort_by_key(|h| h.seq);
    for h in &ready {
        model.restarted.insert(h.id, true);
    }
    model.fresh = ready.into();
    model.expired = 0;
    Ok(attach(engine, model.credits))
}

async fn run(s: Setup, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut machine = Machine {
        disk: SimDisk::new(),
        index: MemoryIndex::new(),
        clock: ManualClock::new(START_MS),
    };
    let mut model = Model {
        now: START_MS,
        ttl: s.ttl,
        credits: s.credits,
        dlq_exists: s.declare_dlq,
        ..Model::default()
    };
    let mut live = attach(open(&machine, &s).await, model.credits);
    let max = s.max_deliveries;
    for op in ops {
        match op {
            Op::Publish(n, delay) => {
                // One at a time, each settled: a message delivered as soon as it
                // commits can no longer be dropped by the next publish, so the
                // order of the two would otherwise be a race.
                for _ in 0..n {
                    let id = model.next_id;
                    model.next_id += 1;
                    let mut p = Publish {
                        request_id: Some(1),
                        confirm: true,
                        ..Publish::new("t", Bytes::from(id.to_string()))
                    };
                    p.delay_ms = (delay > 0).then_some(delay);
                    let fits = s.max_length.is_none_or(|l| (model.held() as u64) < l);
                    let stored = fits || (s.drop_head && model.drop_oldest());
                    if stored {
                        let seq = model.seq();
                        let held = Held {
                            id,
                            seq,
                            published: model.now,
                        };
                        if delay > 0 {
                            model.delayed.push((model.now + delay, held));
                        } else {
                            model.fresh.push_back(held);
                        }
                    }
                    let outcome = live.engine.publish(&p).await.unwrap();
                    prop_assert_eq!(
                        (outcome.queues, outcome.rejected),
                        if stored { (1, 0) } else { (0, 1) },
                        "publish of {}",
                        id
                    );
                    settle(&mut live, &mut model).await?;
                }
            }
            Op::Ack(i) if !model.out.is_empty() => {
                let o = model.out.remove(i % model.out.len());
                live.session.ack(&[o.delivery_id]).unwrap();
            }
            Op::Nack(i, delay) if !model.out.is_empty() => {
                let o = model.out.remove(i % model.out.len());
                live.session
                    .nack(&[o.delivery_id], delay.map(Duration::from_millis))
                    .unwrap();
                model.take_back(o, delay, max);
            }
            Op::Ack(_) | Op::Nack(..) => {}
            Op::Advance(ms) => {
                model.now += ms;
                // Ack timeouts first, by (deadline, seq); then delayed messages due,
                // by (due, seq), each to the end of the queue with a new seq (and its
                // first publish time still).
                let mut timed_out: Vec<Out> = Vec::new();
                model.out.retain(|o| {
                    let due = o.deadline <= model.now;
                    if due {
                        timed_out.push(*o);
                    }
                    !due
                });
                timed_out.sort_by_key(|o| (o.deadline, o.held.seq));
                for o in timed_out {
                    model.take_back(o, None, max);
                }
                model.delayed.sort_by_key(|(due, h)| (*due, h.seq));
                let now = model.now;
                let (due, later): (Vec<_>, Vec<_>) =
                    model.delayed.drain(..).partition(|(d, _)| *d <= now);
                model.delayed = later;
                for (_, h) in due {
                    let seq = model.seq();
                    model.fresh.push_back(Held { seq, ..h });
                }
                machine.clock.advance(ms);
            }
            Op::Recycle(c, credit) => {
                live.session.cancel(cid(c)).unwrap();
                let mut back: Vec<Out> = Vec::new();
                model.out.retain(|o| {
                    if o.consumer == c {
                        back.push(*o);
                    }
                    o.consumer != c
                });
                back.sort_by_key(|o| o.held.seq);
                for o in back {
                    model.take_back(o, None, max);
                }
                // Settle before the new consumer: the returned messages must not
                // race its start.
                model.credits[c] = 0;
                settle(&mut live, &mut model).await?;
                model.credits[c] = credit;
                live.session.consume(cid(c), "q", credit).unwrap();
            }
            // With drop-head and a length limit, which message a redriven copy
            // drops races with deliveries of the copies before it (redrive appends
            // them in one go); the model cannot say, so it leaves that mix out.
            Op::Redrive if s.drop_head && s.max_length.is_some() => {}
            Op::Redrive => {
                let letters = live
                    .engine
                    .dead_letters("q", 0, 0, usize::MAX)
                    .await
                    .unwrap()
                    .letters;
                let mut listed: Vec<(u64, String)> = letters
                    .iter()
                    .map(|l| {
                        (
                            String::from_utf8_lossy(&l.payload).parse().unwrap(),
                            l.reason.to_string(),
                        )
                    })
                    .collect();
                let order: Vec<u64> = listed.iter().map(|(id, _)| *id).collect();
                let mut expected: Vec<(u64, String)> = model
                    .letters
                    .iter()
                    .map(|(id, reason)| (*id, (*reason).to_owned()))
                    .collect();
                listed.sort_unstable();
                expected.sort_unstable();
                prop_assert_eq!(listed, expected, "dead letters");
                // Redriven in the listed order, each as a publish would be: a new
                // message, its TTL counted from now.
                let mut moved = 0u64;
                for id in order {
                    let fits = s.max_length.is_none_or(|l| (model.held() as u64) < l);
                    let stored = fits || (s.drop_head && model.drop_oldest());
                    if !stored {
                        break;
                    }
                    moved += 1;
                    let at = model.letters.iter().position(|(l, _)| *l == id).unwrap();
                    model.letters.remove(at);
                    model.attempts.remove(&id);
                    model.restarted.remove(&id);
                    model.ack_undone.remove(&id);
                    let seq = model.seq();
                    model.fresh.push_back(Held {
                        id,
                        seq,
                        published: model.now,
                    });
                }
                match live.engine.redrive("q", 0).await {
                    Ok(n) => prop_assert_eq!(n, moved, "redriven"),
                    Err(e) => prop_assert!(moved == 0, "redrive failed after moving: {}", e),
                }
            }
            Op::Crash { how, ack, seed } => {
                live = crash(live, &mut machine, &mut model, &s, how, ack, seed).await?;
            }
        }
        settle(&mut live, &mut model).await?;
    }
    live.engine.shutdown().await;
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config::model_config(
        1_000,
        "tests/queue_engine_model.proptest-regressions"
    ))]

    #[test]
    fn queue_matches_model(s in setup(), ops in proptest::collection::vec(op(), 1..24)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(s, ops))?;
    }
}
