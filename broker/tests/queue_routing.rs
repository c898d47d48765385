//! Queue bindings are matched by a lookup of the topic (literal bindings) and a
//! token trie (wildcard bindings): with many queues whose bindings share a first
//! token, a publish still reaches exactly the queues it matches, each once. The
//! index changes one queue at a time; a property test holds it to a model through
//! declares, binds, unbinds and deletes (256 cases unless `PROPTEST_CASES` says
//! otherwise; a failure is shrunk and printed, and its seed saved to
//! `queue_routing.proptest-regressions` to be replayed first).

#[path = "common/proptest_config.rs"]
mod proptest_config;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use proptest::prelude::*;
use tidings_broker::queue::{EngineConfig, FsyncPolicy, QueueEngine};
use tidings_broker::storage::{MemoryIndex, SimDisk, StorageBackend};
use tidings_protocol::{Pattern, Publish, QueueOptions, Text};

fn bound_to(patterns: &[String]) -> QueueOptions {
    QueueOptions {
        bindings: patterns.iter().map(|p| Text::from(p.as_str())).collect(),
        ..Default::default()
    }
}

fn msg(topic: &str) -> Publish {
    Publish {
        request_id: Some(1),
        confirm: true,
        ..Publish::new(topic, Bytes::from_static(b"x"))
    }
}

#[tokio::test]
async fn many_queues_under_one_prefix_each_get_only_their_topics() {
    let dir = tempfile::tempdir().unwrap();
    let engine = QueueEngine::open(EngineConfig::new(dir.path())).expect("engine opens");
    for i in 0..200 {
        engine
            .declare(&format!("q{i}"), &bound_to(&[format!("bench.q{i}")]))
            .await
            .unwrap();
    }
    // One queue sees everything under the prefix, twice over (it takes each once),
    // one sees the second token of every topic, one starts with a wildcard.
    engine
        .declare("all", &bound_to(&["bench.>".into(), "bench.*".into()]))
        .await
        .unwrap();
    engine
        .declare("tails", &bound_to(&["*.q7".into()]))
        .await
        .unwrap();
    assert_eq!(engine.publish(&msg("bench.q7")).await.unwrap().queues, 3);
    assert_eq!(engine.publish(&msg("bench.q150")).await.unwrap().queues, 2);
    assert_eq!(
        engine
            .publish(&msg("bench.q150.deeper"))
            .await
            .unwrap()
            .queues,
        1
    );
    assert_eq!(engine.publish(&msg("other.q7")).await.unwrap().queues, 1);
    assert_eq!(engine.publish(&msg("other.q8")).await.unwrap().queues, 0);
    assert_eq!(engine.info("q7").unwrap().depth, 1);
    assert_eq!(engine.info("q150").unwrap().depth, 1);
    assert_eq!(engine.info("q8").unwrap().depth, 0);
    assert_eq!(engine.info("all").unwrap().depth, 3);
    assert_eq!(engine.info("tails").unwrap().depth, 2);
    engine.shutdown().await;
}

#[tokio::test]
async fn a_queue_bound_by_a_literal_and_wildcards_takes_a_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let engine = QueueEngine::open(EngineConfig::new(dir.path())).expect("engine opens");
    // 40 queues, each bound to the literal topic and to two wildcards matching it:
    // more than the short list of queues already reached holds, so the set is used.
    for i in 0..40 {
        let patterns = ["orders.eu".into(), "orders.*".into(), "orders.>".into()];
        engine
            .declare(&format!("q{i}"), &bound_to(&patterns))
            .await
            .unwrap();
    }
    engine
        .declare(
            "twice",
            &bound_to(&["orders.eu".into(), "orders.eu".into()]),
        )
        .await
        .unwrap();
    engine
        .declare("wild", &bound_to(&["*.eu".into()]))
        .await
        .unwrap();
    assert_eq!(engine.publish(&msg("orders.eu")).await.unwrap().queues, 42);
    assert_eq!(engine.publish(&msg("orders.us")).await.unwrap().queues, 40);
    assert_eq!(engine.publish(&msg("stock.eu")).await.unwrap().queues, 1);
    for i in 0..40 {
        assert_eq!(engine.info(&format!("q{i}")).unwrap().depth, 2, "q{i}");
    }
    assert_eq!(engine.info("twice").unwrap().depth, 1);
    assert_eq!(engine.info("wild").unwrap().depth, 2);
    engine.shutdown().await;
}

/// Patterns that overlap in every way: a literal twice, wildcards matching it, and
/// ones that match nothing else in the pool.
const PATTERNS: [&str; 7] = ["a.b", "a.*", "a.>", "*.b", "c.d", ">", "a.b.c"];
const TOPICS: [&str; 6] = ["a.b", "a.c", "c.d", "x.b", "a.b.c", "z"];
const QUEUES: usize = 4;

#[derive(Debug, Clone)]
enum RouteOp {
    /// Declares (or redeclares, which adds bindings) queue `q`.
    Declare(usize, Vec<usize>),
    Bind(usize, usize),
    Unbind(usize, usize),
    Delete(usize),
    Publish(usize),
}

fn route_op() -> impl Strategy<Value = RouteOp> {
    let q = 0..QUEUES;
    let p = 0..PATTERNS.len();
    prop_oneof![
        (q.clone(), proptest::collection::vec(p.clone(), 0..4))
            .prop_map(|(q, ps)| RouteOp::Declare(q, ps)),
        (q.clone(), p.clone()).prop_map(|(q, p)| RouteOp::Bind(q, p)),
        (q.clone(), p).prop_map(|(q, p)| RouteOp::Unbind(q, p)),
        q.prop_map(RouteOp::Delete),
        (0..TOPICS.len()).prop_map(RouteOp::Publish),
    ]
}

fn sim_config(disk: &SimDisk, index: &MemoryIndex) -> EngineConfig {
    let mut config = EngineConfig::new("/sim/routing");
    config.storage = StorageBackend::simulated(disk.clone(), index.clone());
    config.fsync = FsyncPolicy::Always;
    config
}

type Model = BTreeMap<usize, (BTreeSet<&'static str>, u64)>;

/// Publishes to every topic of the pool, checking each count of queues.
async fn publish_everywhere(engine: &QueueEngine, model: &mut Model) -> Result<(), TestCaseError> {
    for t in 0..TOPICS.len() {
        publish_checked(engine, model, t).await?;
    }
    Ok(())
}

/// Publishes to topic `t`, checks how many queues took it, and counts the depth
/// each queue should now have.
async fn publish_checked(
    engine: &QueueEngine,
    model: &mut Model,
    t: usize,
) -> Result<(), TestCaseError> {
    let topic = TOPICS[t];
    let mut expected = 0;
    for (patterns, depth) in model.values_mut() {
        if patterns
            .iter()
            .any(|p| Pattern::new(*p).unwrap().matches(topic))
        {
            expected += 1;
            *depth += 1;
        }
    }
    let outcome = engine.publish(&msg(topic)).await.unwrap();
    prop_assert_eq!(outcome.queues, expected, "queues for {}", topic);
    Ok(())
}

/// The index holds each distinct binding of each queue once, and nothing of a
/// deleted queue or a dropped binding (which no publish would show: a deleted
/// queue takes nothing); every queue has the depth the model says.
fn check_index(engine: &QueueEngine, model: &Model) -> Result<(), TestCaseError> {
    let bindings: usize = model.values().map(|(patterns, _)| patterns.len()).sum();
    prop_assert_eq!(engine.routed_bindings(), bindings, "bindings indexed");
    for (q, (_, depth)) in model {
        prop_assert_eq!(
            engine.info(&format!("q{q}")).unwrap().depth,
            *depth,
            "q{}",
            q
        );
    }
    Ok(())
}

/// Runs `ops` on an engine over a simulated disk and checks every publish's count
/// of queues, and after every op the bindings indexed and every queue's depth,
/// against the model: a queue takes a message once if any of its bindings
/// matches. Then a clean restart must build the same index from what is stored.
async fn routes_match_model(ops: Vec<RouteOp>) -> Result<(), TestCaseError> {
    let (disk, index) = (SimDisk::new(), MemoryIndex::new());
    let engine = QueueEngine::open(sim_config(&disk, &index)).expect("engine opens");
    let mut model: Model = BTreeMap::new();
    for op in ops {
        match op {
            RouteOp::Declare(q, ps) => {
                let patterns: Vec<String> = ps.iter().map(|&p| PATTERNS[p].to_owned()).collect();
                engine
                    .declare(&format!("q{q}"), &bound_to(&patterns))
                    .await
                    .unwrap();
                let entry = model.entry(q).or_default();
                entry.0.extend(ps.iter().map(|&p| PATTERNS[p]));
            }
            RouteOp::Bind(q, p) | RouteOp::Unbind(q, p) => {
                let (name, pattern) = (format!("q{q}"), PATTERNS[p]);
                let bind = matches!(op, RouteOp::Bind(..));
                let result = if bind {
                    engine.bind(&name, pattern).await
                } else {
                    engine.unbind(&name, pattern).await
                };
                match model.get_mut(&q) {
                    Some(entry) => {
                        result.unwrap();
                        if bind {
                            entry.0.insert(pattern);
                        } else {
                            entry.0.remove(pattern);
                        }
                    }
                    None => prop_assert!(result.is_err(), "{:?} of a missing queue", op),
                }
            }
            RouteOp::Delete(q) => {
                let result = engine.delete(&format!("q{q}")).await;
                prop_assert_eq!(result.is_ok(), model.remove(&q).is_some());
            }
            RouteOp::Publish(t) => publish_checked(&engine, &mut model, t).await?,
        }
        check_index(&engine, &model)?;
    }
    engine.shutdown().await;
    let (disk, index) = (disk.reboot(), index.reboot());
    let engine = QueueEngine::open(sim_config(&disk, &index)).expect("engine reopens");
    check_index(&engine, &model)?;
    publish_everywhere(&engine, &mut model).await?;
    check_index(&engine, &model)?;
    engine.shutdown().await;
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config::model_config(
        256,
        "tests/queue_routing.proptest-regressions"
    ))]

    #[test]
    fn routes_follow_every_binding_change(ops in proptest::collection::vec(route_op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(routes_match_model(ops))?;
    }
}
