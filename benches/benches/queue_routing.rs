//! Criterion: the queue side of a publish with 100,000 wildcard queue bindings.
//!
//! Run with `cargo bench -p tidings-bench --bench queue_routing`. Wildcard queue
//! bindings are matched through the router's pattern trie, so a publish whose topic
//! matches no binding should cost the same with 100,000 bindings as with a few: the groups
//! compare `QueueEngine::publish_now` on such a topic with no bindings, with 4 (one
//! of each shape), 1,000 and 100,000 (`*` and `>` patterns under distinct first
//! tokens, plus `*`-first ones that every topic has to be checked against).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use tidings_broker::queue::{EngineConfig, Published, QueueEngine};
use tidings_protocol::{Publish, QueueOptions, Text};

/// `count` wildcard patterns, none matching `orders.eu.created`.
fn bindings(count: usize) -> Vec<Text> {
    (0..count)
        .map(|i| match i % 4 {
            0 => format!("svc{i}.*"),
            1 => format!("svc{i}.>"),
            2 => format!("*.svc{i}.event"),
            _ => format!("svc{}.*.event{i}", i % 1000),
        })
        .map(Text::from)
        .collect()
}

fn publish_unmatched(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut group = c.benchmark_group("queue_publish_no_binding_matches");
    group.throughput(Throughput::Elements(1));
    for count in [0usize, 4, 1_000, 100_000] {
        let dir = tempfile::tempdir().expect("a temp dir");
        let engine = runtime.block_on(async {
            let engine = QueueEngine::open(EngineConfig::new(dir.path())).expect("engine opens");
            if count > 0 {
                let options = QueueOptions {
                    bindings: bindings(count),
                    ..QueueOptions::default()
                };
                engine.declare("wide", &options).await.expect("declare");
            }
            engine
        });
        let publish = Publish::new("orders.eu.created", &b"{}"[..]);
        group.bench_with_input(BenchmarkId::from_parameter(count), &publish, |b, p| {
            b.iter(|| match engine.publish_now(black_box(p)) {
                Published::Done(Ok(outcome)) => outcome.queues,
                other => panic!("no binding should match: {other:?}"),
            });
        });
        runtime.block_on(engine.shutdown());
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    publish_unmatched(&mut c);
    c.final_summary();
}
