//! Model test: random publish / ack / nack / restart sequences against a real queue
//! engine, checked step by step against a plain `VecDeque` model of what must be
//! delivered next, with which attempt number, and what is left.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use tidings_broker::queue::{ConsumerSession, DeliverySink, EngineConfig, QueueEngine};
use tidings_protocol::{Delivery, Publish, QueueOptions, Text};
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
enum Op {
    Publish(u8),
    Ack(usize),
    Nack(usize),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..4).prop_map(Op::Publish),
        3 => any::<usize>().prop_map(Op::Ack),
        2 => any::<usize>().prop_map(Op::Nack),
        1 => Just(Op::Restart),
    ]
}

struct Sink(mpsc::UnboundedSender<Delivery>);

impl DeliverySink for Sink {
    fn deliver(&self, d: Delivery) -> bool {
        self.0.send(d).is_ok()
    }
}

/// What the queue must hold: redeliveries first, then fresh messages, in order.
#[derive(Default)]
struct Model {
    next: u64,
    retry: VecDeque<u64>,
    fresh: VecDeque<u64>,
    /// Delivered and not acked: (message, delivery id).
    outstanding: Vec<(u64, u64)>,
    /// Last attempt number seen per message.
    attempts: HashMap<u64, u32>,
}

impl Model {
    fn total(&self) -> usize {
        self.retry.len() + self.fresh.len() + self.outstanding.len()
    }
}

struct Live {
    engine: QueueEngine,
    session: ConsumerSession,
    rx: mpsc::UnboundedReceiver<Delivery>,
}

async fn start(dir: &std::path::Path, credit: u32) -> Live {
    let engine = QueueEngine::open(EngineConfig::new(dir)).unwrap();
    let options = QueueOptions {
        bindings: vec![Text::from("t")],
        max_deliveries: Some(1000),
        ..Default::default()
    };
    engine.declare("q", &options).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let session = engine.session(Arc::new(Sink(tx)));
    session.consume(1, "q", credit).unwrap();
    Live {
        engine,
        session,
        rx,
    }
}

/// Receives the deliveries the model expects now, checking order and attempts.
async fn settle(live: &mut Live, model: &mut Model, credit: usize) -> Result<(), TestCaseError> {
    while model.outstanding.len() < credit {
        let Some(id) = model.retry.pop_front().or_else(|| model.fresh.pop_front()) else {
            break;
        };
        let d = tokio::time::timeout(Duration::from_secs(5), live.rx.recv())
            .await
            .map_err(|_| TestCaseError::fail(format!("message {id} was not delivered")))?
            .ok_or_else(|| TestCaseError::fail("sink closed"))?;
        let got: u64 = String::from_utf8_lossy(&d.payload).parse().unwrap();
        prop_assert_eq!(got, id, "delivery order");
        match model.attempts.get(&id) {
            None => prop_assert_eq!(d.attempt, 1, "first delivery of {}", id),
            Some(prev) => prop_assert!(
                d.attempt > *prev || (d.attempt >= 2 && d.attempt == *prev),
                "message {} attempt {} after {}",
                id,
                d.attempt,
                prev
            ),
        }
        model.attempts.insert(id, d.attempt);
        model.outstanding.push((id, d.delivery_id));
    }
    prop_assert!(live.rx.try_recv().is_err(), "an unexpected extra delivery");
    let info = live.engine.info("q").unwrap();
    prop_assert_eq!(info.depth, model.total() as u64);
    prop_assert_eq!(info.in_flight, model.outstanding.len() as u64);
    Ok(())
}

async fn run(ops: Vec<Op>, credit: u32) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let credit_n = credit as usize;
    let mut live = start(dir.path(), credit).await;
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Publish(n) => {
                let futures: Vec<_> = (0..n)
                    .map(|_| {
                        let id = model.next;
                        model.next += 1;
                        model.fresh.push_back(id);
                        let p = Publish {
                            request_id: Some(1),
                            confirm: true,
                            ..Publish::new("t", Bytes::from(id.to_string()))
                        };
                        live.engine.publish(&p)
                    })
                    .collect();
                for f in futures {
                    prop_assert_eq!(f.await.unwrap().queues, 1);
                }
            }
            Op::Ack(i) if !model.outstanding.is_empty() => {
                let (_, did) = model.outstanding.remove(i % model.outstanding.len());
                live.session.ack(&[did]).unwrap();
            }
            Op::Nack(i) if !model.outstanding.is_empty() => {
                let (id, did) = model.outstanding.remove(i % model.outstanding.len());
                live.session.nack(&[did], None).unwrap();
                model.retry.push_back(id);
            }
            Op::Ack(_) | Op::Nack(_) => {}
            Op::Restart => {
                let Live {
                    engine, session, ..
                } = live;
                // Stop the store before the session lets go of its deliveries, as a
                // crash would: only the delivery mark tells the restarted engine that
                // the outstanding messages were delivered.
                engine.shutdown().await;
                drop(session);
                drop(engine);
                live = start(dir.path(), credit).await;
                // After a restart everything left is ready again, in publish order.
                let mut all: Vec<u64> = model
                    .retry
                    .drain(..)
                    .chain(model.fresh.drain(..))
                    .chain(model.outstanding.drain(..).map(|(id, _)| id))
                    .collect();
                all.sort_unstable();
                model.fresh = all.into();
            }
        }
        settle(&mut live, &mut model, credit_n).await?;
    }
    live.engine.shutdown().await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn queue_matches_model(ops in proptest::collection::vec(op(), 1..40), credit in 1u32..5) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(ops, credit))?;
    }
}
