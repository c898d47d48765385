//! Queue bindings are matched by a lookup of the topic (literal bindings) and a
//! token trie (wildcard bindings): with many queues whose bindings share a first
//! token, a publish still reaches exactly the queues it matches, each once.

use bytes::Bytes;
use tidings_broker::queue::{EngineConfig, QueueEngine};
use tidings_protocol::{Publish, QueueOptions, Text};

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
