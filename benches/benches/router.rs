//! Criterion: routing one topic against 10,000 subscriptions, wildcards included.
//!
//! Run with `cargo bench -p tidings-bench --bench router`. Two groups: the broker's
//! subscription trie alone (`tidings_broker::router::Trie`), and `Router::route`, the
//! call a publish makes, with its topic -> route cache hit and missed.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput};
use tidings_broker::Stats;
use tidings_broker::outbox::{ConnId, Outbox, OutboxReceiver};
use tidings_broker::router::{CACHE_CAPACITY, Router, Trie};
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
    // A topic matched by exact, `*` and `>` subscriptions (21 of them); one matched
    // by `>` subscriptions only; one matched by nothing. The bench id says how many.
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

/// The router with 10,000 subscriptions spread over 100 connections.
fn router_10k() -> (Router, Vec<OutboxReceiver>) {
    let stats = Arc::new(Stats::default());
    let router = Router::new(stats.clone());
    let (outboxes, receivers): (Vec<Outbox>, Vec<OutboxReceiver>) = (0..100)
        .map(|conn| Outbox::channel(ConnId(conn), 1 << 20, stats.clone()))
        .unzip();
    for (sid, pattern) in (0u32..).zip(patterns(10_000)) {
        let outbox = &outboxes[sid as usize % outboxes.len()];
        router
            .subscribe(outbox, sid, pattern, None)
            .expect("every sid is unique");
    }
    (router, receivers)
}

fn route_cached_and_not(c: &mut Criterion) {
    let (router, _receivers) = router_10k();
    let mut group = c.benchmark_group("router_route_10k_subscriptions");
    group.throughput(Throughput::Elements(1));
    group.bench_function("cache_hit", |b| {
        b.iter(|| router.route(black_box("svc13.region3.event13")).fan_out());
    });
    // Twice as many distinct topics as the cache holds, visited in a cycle: every
    // lookup walks the trie and fills the cache.
    let topics: Vec<String> = (0..2 * CACHE_CAPACITY)
        .map(|k| format!("svc{}.region{}.event{}", k % 100, k % 7, k % 1000))
        .collect();
    let mut next = topics.iter().cycle();
    group.bench_function("cache_miss", |b| {
        b.iter(|| {
            let topic = next.next().expect("cycle never ends");
            router.route(black_box(topic)).fan_out()
        });
    });
    group.finish();
}

/// A wildcard subscription that comes and goes while the route cache is full (a
/// client reconnecting, say): each change drops the cached routes it affects.
fn wildcard_churn_with_a_full_cache(c: &mut Criterion) {
    let (router, _receivers) = router_10k();
    let stats = Arc::new(Stats::default());
    let (outbox, _rx) = Outbox::channel(ConnId(1_000), 1 << 20, stats);
    for k in 0..CACHE_CAPACITY {
        router.route(&format!("svc{}.region{}.event{}", k % 100, k % 7, k));
    }
    let mut group = c.benchmark_group("router_wildcard_churn_full_cache");
    group.throughput(Throughput::Elements(1));
    let pattern = Pattern::new("svc13.*.event13").expect("a valid pattern");
    group.bench_function("subscribe_unsubscribe", |b| {
        b.iter(|| {
            router
                .subscribe(&outbox, 1, pattern.clone(), None)
                .expect("not subscribed yet");
            router.unsubscribe(outbox.conn_id(), 1).expect("subscribed");
        });
    });
    group.finish();
}

// What `criterion_group!`/`criterion_main!` expand to, minus the undocumented public
// function the macro would add.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    route_10k(&mut criterion);
    route_cached_and_not(&mut criterion);
    wildcard_churn_with_a_full_cache(&mut criterion);
    criterion.final_summary();
}
