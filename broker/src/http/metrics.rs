//! `/metrics`: the broker in the Prometheus (OpenMetrics) text format, built with
//! prometheus-client at each scrape from the broker's own counters, so nothing on
//! the message path knows about Prometheus.
//!
//! Names: `tidings_` prefix, `_total` for counters, base units (`_bytes`,
//! `_seconds`). Per-queue series carry a `queue` label; at most
//! `--metrics-max-queues` queues (first by name) get their own, the rest are
//! summed into `queue="_other"`, so the number of series stays bounded however
//! many queues exist.

use std::path::Path;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tidings_protocol::ErrorCode;

use super::Ctx;
use super::health::stat;
use crate::queue::QueueView;
use crate::stats::snake_case;

/// The `queue` label value that sums the queues past the cap.
pub(crate) const OTHER_QUEUES: &str = "_other";

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;
type U64Gauge = Gauge<u64, std::sync::atomic::AtomicU64>;

enum Kind {
    Gauge,
    Counter,
}

/// Per-queue figures: name (after `tidings_queue_`), help, kind, value.
type QueueFigure = (&'static str, &'static str, Kind, fn(&QueueView) -> u64);

const QUEUE_FIGURES: &[QueueFigure] = &[
    (
        "messages",
        "Messages stored and not acked (ready, delayed, in flight).",
        Kind::Gauge,
        |q| q.info.depth,
    ),
    (
        "bytes",
        "Bytes of the stored, unacked messages as max_bytes counts them (payload, topic, headers, ids and a fixed overhead each).",
        Kind::Gauge,
        |q| q.info.bytes,
    ),
    (
        "in_flight_messages",
        "Messages delivered and awaiting an ack.",
        Kind::Gauge,
        |q| q.info.in_flight,
    ),
    (
        "delayed_messages",
        "Messages waiting for a delay or backoff.",
        Kind::Gauge,
        |q| q.info.delayed,
    ),
    ("consumers", "Attached consumers.", Kind::Gauge, |q| {
        u64::from(q.info.consumers)
    }),
    (
        "published_messages",
        "Messages stored since the broker started.",
        Kind::Counter,
        |q| q.info.published,
    ),
    (
        "delivered_messages",
        "Deliveries since the broker started.",
        Kind::Counter,
        |q| q.info.delivered,
    ),
    (
        "acked_messages",
        "Acks since the broker started.",
        Kind::Counter,
        |q| q.info.acked,
    ),
    (
        "redelivered_messages",
        "Deliveries after the first attempt.",
        Kind::Counter,
        |q| q.redelivered,
    ),
    (
        "dead_lettered_messages",
        "Messages moved to the dead-letter queue.",
        Kind::Counter,
        |q| q.info.dead_lettered,
    ),
    (
        "expired_messages",
        "Messages whose TTL passed.",
        Kind::Counter,
        |q| q.expired,
    ),
    (
        "rejected_messages",
        "Publishes refused because the queue was full.",
        Kind::Counter,
        |q| q.rejected,
    ),
    (
        "dropped_messages",
        "Messages dropped to make room (drop-head).",
        Kind::Counter,
        |q| q.dropped,
    ),
    (
        "duplicate_messages",
        "Publishes recognised as duplicates by message id.",
        Kind::Counter,
        |q| q.duplicates,
    ),
];

/// GET /metrics.
pub(super) async fn scrape(State(ctx): State<Ctx>) -> Response {
    let registry = build(&ctx);
    let mut body = String::with_capacity(64 * 1024);
    if let Err(err) = encode(&mut body, &registry) {
        tracing::error!(error = %err, "cannot encode metrics");
        return (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response();
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let g = U64Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn build(ctx: &Ctx) -> Registry {
    let mut r = Registry::with_prefix("tidings");
    broker_metrics(ctx, &mut r);
    queue_metrics(ctx, &mut r);
    storage_metrics(ctx, &mut r);
    process_metrics(ctx, &mut r);
    r
}

fn broker_metrics(ctx: &Ctx, r: &mut Registry) {
    let s = |name| stat(ctx, name);
    gauge(
        r,
        "connections",
        "Open client connections.",
        s("connections.current"),
    );
    counter(
        r,
        "connections_opened",
        "Client connections admitted.",
        s("connections.total"),
    );
    counter(
        r,
        "connections_rejected",
        "Client connections refused at the connection limit.",
        s("connections.rejected"),
    );
    counter(
        r,
        "messages_received",
        "PUBLISH frames received.",
        s("messages.in"),
    );
    counter(
        r,
        "messages_sent",
        "MESSAGE frames queued for subscribers (queue deliveries: tidings_queue_delivered_messages_total).",
        s("messages.out"),
    );
    counter(
        r,
        "received_bytes",
        "Bytes read from client sockets.",
        s("bytes.in"),
    );
    counter(
        r,
        "sent_bytes",
        "Bytes written to client sockets.",
        s("bytes.out"),
    );
    gauge(
        r,
        "subscriptions",
        "Live subscriptions.",
        s("subscriptions.current"),
    );
    counter(
        r,
        "slow_consumers",
        "Connections disconnected as slow consumers.",
        s("connections.slow_consumers"),
    );
    gauge(
        r,
        "outbound_pending_peak_bytes",
        "Most bytes ever queued for one connection.",
        s("outbound.pending_bytes_peak"),
    );
    let errors = Family::<Labels, Counter>::default();
    for code in ErrorCode::ALL {
        errors
            .get_or_create(&vec![("code".to_owned(), snake_case(code.name()))])
            .inc_by(ctx.stats.errors(*code));
    }
    r.register("errors", "ERROR frames sent, by code.", errors);
}

fn queue_metrics(ctx: &Ctx, r: &mut Registry) {
    let views = ctx.engine.views();
    gauge(r, "queues", "Durable queues.", views.len() as u64);
    let cap = ctx.metrics_max_queues;
    let omitted = views.len().saturating_sub(cap);
    gauge(
        r,
        "metrics_queues_omitted",
        "Queues summed into queue=\"_other\" because of --metrics-max-queues.",
        omitted as u64,
    );
    let sub = r.sub_registry_with_prefix("queue");
    for (name, help, kind, value) in QUEUE_FIGURES {
        let series = |q: &QueueView| vec![("queue".to_owned(), q.info.name.to_string())];
        let other = vec![("queue".to_owned(), OTHER_QUEUES.to_owned())];
        match kind {
            Kind::Gauge => {
                let family = Family::<Labels, U64Gauge>::default();
                for q in &views[..views.len().min(cap)] {
                    family.get_or_create(&series(q)).set(value(q));
                }
                if omitted > 0 {
                    let sum = views[cap..].iter().map(value).sum();
                    family.get_or_create(&other).set(sum);
                }
                sub.register(*name, *help, family);
            }
            Kind::Counter => {
                let family = Family::<Labels, Counter>::default();
                for q in &views[..views.len().min(cap)] {
                    family.get_or_create(&series(q)).inc_by(value(q));
                }
                if omitted > 0 {
                    let sum = views[cap..].iter().map(value).sum();
                    family.get_or_create(&other).inc_by(sum);
                }
                sub.register(*name, *help, family);
            }
        }
    }
}

fn storage_metrics(ctx: &Ctx, r: &mut Registry) {
    let storage = ctx.health.storage();
    let (bytes, segments) = log_files(&ctx.queue_dir);
    let sub = r.sub_registry_with_prefix("storage");
    gauge(
        sub,
        "log_bytes",
        "Bytes of queue log segment files on disk.",
        bytes,
    );
    gauge(
        sub,
        "log_segments",
        "Queue log segment files on disk.",
        segments,
    );
    sub.register(
        "fsync_duration_seconds",
        "Time of each fdatasync round of the queue log.",
        storage.fsync_seconds.clone(),
    );
    sub.register(
        "commit_batch_messages",
        "Messages written per group-commit round.",
        storage.batch_messages.clone(),
    );
    sub.register(
        "checkpoint_duration_seconds",
        "Time of each index checkpoint (sled flush and sync).",
        storage.checkpoint_seconds.clone(),
    );
    sub.register(
        "failures",
        "Failed writes or syncs of the queue store.",
        storage.failures.clone(),
    );
    gauge(
        sub,
        "failed",
        "1 once a write or sync failed: the store takes no more writes until a restart.",
        u64::from(storage.failure().is_some()),
    );
}

fn process_metrics(ctx: &Ctx, r: &mut Registry) {
    gauge(
        r,
        "uptime_seconds",
        "Seconds since the broker started.",
        stat(ctx, "uptime.seconds"),
    );
    let sub = r.sub_registry_with_prefix("process");
    if let Some(rss) = resident_bytes() {
        gauge(sub, "resident_memory_bytes", "Resident set size.", rss);
    }
    if let Some(fds) = open_fds() {
        gauge(sub, "open_fds", "Open file descriptors.", fds);
    }
    let info = Family::<Labels, U64Gauge>::default();
    info.get_or_create(&vec![(
        "version".to_owned(),
        env!("CARGO_PKG_VERSION").to_owned(),
    )])
    .set(1);
    r.register(
        "build_info",
        "The broker's version (value is always 1).",
        info,
    );
}

/// Total bytes and count of `*.seg` files at most two levels below `dir`.
fn log_files(dir: &Path) -> (u64, u64) {
    fn walk(dir: &Path, depth: u32, acc: &mut (u64, u64)) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let path = entry.path();
            if meta.is_dir() && depth > 0 {
                walk(&path, depth - 1, acc);
            } else if meta.is_file() && path.extension().is_some_and(|e| e == "seg") {
                acc.0 += meta.len();
                acc.1 += 1;
            }
        }
    }
    let mut acc = (0, 0);
    walk(dir, 2, &mut acc);
    acc
}

/// Resident set size from `/proc/self/status` (`VmRSS`, in KiB; Linux only).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn open_fds() -> Option<u64> {
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64)
}
