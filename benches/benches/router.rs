//! Criterion: routing one topic against 10,000 subscriptions, wildcards included.
//!
//! Run with `cargo bench -p tidings-bench --bench router`. Measures the broker's
//! subscription trie (`tidings_broker::router::Trie`), the path a publish takes on a
//! route-cache miss; a hit is one hash lookup on top of it.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use tidings_broker::router::Trie;
use tidings_protocol::Pattern;

/// 10,000 patterns shaped like a service mesh over 100 services: 70 % exact topics,
/// 20 % with a `*` in the middle, 10 % `>` tails, with repeats (several services
/// subscribing to the same pattern), as real subscription tables have.
fn patterns(count: usize) -> Vec<Pattern> {
    (0..count)
        .map(|i| {
            let text = match i % 10 {
                0 => format!("svc{}.>", (i / 10) % 100),
                1 | 2 => format!("svc{}.*.event{}", (i + 2) % 100, (i + 2) % 1000),
                _ => format!("svc{}.region{}.event{}", i % 100, i % 7, i % 1000),
            };
            Pattern::new(text.as_str()).expect("generated patterns are valid")
        })
        .collect()
}

fn route_10k(c: &mut Criterion) {
    let mut trie = Trie::default();
    for (i, p) in patterns(10_000).iter().enumerate() {
        trie.insert(p, i);
    }
    let mut group = c.benchmark_group("route_10k_subscriptions");
    group.throughput(Throughput::Elements(1));
    // A topic matched by an exact pattern, a `*` pattern and a `>` pattern;
    // one matched by `>` only; one matched by nothing.
    for topic in [
        "svc13.region3.event13",
        "svc20.region9.nothing",
        "other.region1.event1",
    ] {
        let mut matched = 0usize;
        trie.for_each_match(topic, |_| matched += 1);
        group.bench_with_input(
            BenchmarkId::new(format!("{matched}_matches"), topic),
            topic,
            |b, topic| {
                b.iter(|| {
                    let mut found = 0usize;
                    trie.for_each_match(black_box(topic), |v| found += *v);
                    found
                });
            },
        );
    }
    group.finish();
}

// What `criterion_group!`/`criterion_main!` expand to, minus the undocumented public
// function the macro would add.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    route_10k(&mut criterion);
    criterion.final_summary();
}
