//! The JSON API's read side: overview, queues (figures, options, consumers),
//! peeking at messages and dead letters, connections and subscriptions. Every
//! list is paginated with a bounded page size.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Ctx;
use super::health::{stat, uptime};
use crate::connections::ConnEntry;
use crate::queue::{PeekedMessage, QueueError, QueueView};

/// Most entries one page of a list holds.
pub(crate) const MAX_PAGE: usize = 1_000;
/// Page size when none is asked for.
const DEFAULT_PAGE: usize = 100;
/// Payload bytes shown in a peeked message's preview.
pub(crate) const PREVIEW_BYTES: usize = 512;

/// An API error: a status and `{"error": "..."}`.
pub(super) struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<QueueError> for ApiError {
    fn from(err: QueueError) -> Self {
        let status = match &err {
            QueueError::NotFound(_) => StatusCode::NOT_FOUND,
            QueueError::ShuttingDown | QueueError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            QueueError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, err.to_string())
    }
}

pub(super) type ApiResult = Result<Json<Value>, ApiError>;

/// Any other path.
pub(super) async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such endpoint".into())
}

/// `offset` and `limit` of a list.
#[derive(Debug, Deserialize)]
pub(super) struct Page {
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

impl Page {
    fn limit(&self) -> usize {
        self.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE)
    }
}

/// GET /api/overview: the broker at a glance, with the rate history.
pub(super) async fn overview(State(ctx): State<Ctx>) -> Json<Value> {
    let views = ctx.engine.views();
    let depth_of: HashMap<&str, u64> = views
        .iter()
        .map(|v| (v.info.name.as_str(), v.info.depth))
        .collect();
    let mut totals = json!({
        "count": views.len(),
        "depth": 0u64, "in_flight": 0u64, "delayed": 0u64, "bytes": 0u64,
        "consumers": 0u64, "dead_letters": 0u64,
        "publish_rate": 0u64, "deliver_rate": 0u64, "ack_rate": 0u64,
    });
    let mut dlqs = std::collections::HashSet::new();
    for v in &views {
        let add = |t: &mut Value, k: &str, n: u64| {
            t[k] = json!(t[k].as_u64().unwrap_or(0) + n);
        };
        add(&mut totals, "depth", v.info.depth);
        add(&mut totals, "in_flight", v.info.in_flight);
        add(&mut totals, "delayed", v.info.delayed);
        add(&mut totals, "bytes", v.info.bytes);
        add(&mut totals, "consumers", u64::from(v.info.consumers));
        add(&mut totals, "publish_rate", v.info.publish_rate);
        add(&mut totals, "deliver_rate", v.info.deliver_rate);
        add(&mut totals, "ack_rate", v.info.ack_rate);
        dlqs.insert(v.options.dead_letter.as_str());
    }
    let dead: u64 = dlqs.iter().filter_map(|n| depth_of.get(n)).sum();
    totals["dead_letters"] = json!(dead);
    let storage = ctx.health.storage();
    let ready = ctx.health.ready();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": uptime(&ctx),
        "ready": ready.is_ok(),
        "not_ready_reason": ready.err().map(|r| r.to_string()),
        "draining": ctx.health.draining(),
        "storage": {
            "healthy": storage.failure().is_none(),
            "failure": storage.failure(),
        },
        "connections": {
            "current": stat(&ctx, "connections.current"),
            "total": stat(&ctx, "connections.total"),
            "rejected": stat(&ctx, "connections.rejected"),
        },
        "messages": { "in": stat(&ctx, "messages.in"), "out": stat(&ctx, "messages.out") },
        "bytes": { "in": stat(&ctx, "bytes.in"), "out": stat(&ctx, "bytes.out") },
        "subscriptions": stat(&ctx, "subscriptions.current"),
        "slow_consumers": stat(&ctx, "connections.slow_consumers"),
        "queues": totals,
        "rate_interval_seconds": super::rates::SAMPLE_EVERY.as_secs(),
        "history": ctx.rates.points(),
    }))
}

/// Query of GET /api/queues.
#[derive(Debug, Deserialize)]
pub(super) struct QueueQuery {
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
    /// Substring of the name.
    #[serde(default)]
    filter: String,
    /// `name` (default), `depth`, `in_flight`, `dead_letters`, `consumers`,
    /// `publish_rate`, `deliver_rate`, `ack_rate`.
    #[serde(default)]
    sort: String,
    /// `asc` or `desc`; numbers default to `desc`, names to `asc`.
    #[serde(default)]
    order: String,
}

/// GET /api/queues: a page of queues, filtered and sorted.
pub(super) async fn queues(State(ctx): State<Ctx>, Query(q): Query<QueueQuery>) -> ApiResult {
    let page = Page {
        offset: q.offset,
        limit: q.limit,
    };
    let views = ctx.engine.views();
    let total = views.len();
    let depth_of: HashMap<String, u64> = views
        .iter()
        .map(|v| (v.info.name.to_string(), v.info.depth))
        .collect();
    let dead = |v: &QueueView| depth_of.get(&v.options.dead_letter).copied().unwrap_or(0);
    let filter = q.filter.to_lowercase();
    let mut matched: Vec<&QueueView> = views
        .iter()
        .filter(|v| filter.is_empty() || v.info.name.to_lowercase().contains(&filter))
        .collect();
    let key: Option<fn(&QueueView) -> u64> = match q.sort.as_str() {
        "" | "name" => None,
        "depth" => Some(|v| v.info.depth),
        "in_flight" => Some(|v| v.info.in_flight),
        "consumers" => Some(|v| u64::from(v.info.consumers)),
        "publish_rate" => Some(|v| v.info.publish_rate),
        "deliver_rate" => Some(|v| v.info.deliver_rate),
        "ack_rate" => Some(|v| v.info.ack_rate),
        "dead_letters" => None,
        other => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("unknown sort `{other}`"),
            ));
        }
    };
    let desc = match q.order.as_str() {
        "asc" => false,
        "desc" => true,
        "" => !matches!(q.sort.as_str(), "" | "name"),
        other => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("unknown order `{other}` (use asc or desc)"),
            ));
        }
    };
    if q.sort == "dead_letters" {
        matched.sort_by(|a, b| dead(a).cmp(&dead(b)).then(a.info.name.cmp(&b.info.name)));
    } else if let Some(key) = key {
        matched.sort_by(|a, b| key(a).cmp(&key(b)).then(a.info.name.cmp(&b.info.name)));
    }
    if desc {
        matched.reverse();
    }
    let count = matched.len();
    let rows: Vec<Value> = matched
        .into_iter()
        .skip(page.offset)
        .take(page.limit())
        .map(|v| queue_json(v, dead(v)))
        .collect();
    Ok(Json(json!({
        "total": total,
        "matched": count,
        "offset": page.offset,
        "limit": page.limit(),
        "queues": rows,
    })))
}

fn queue_json(v: &QueueView, dead_letters: u64) -> Value {
    let i = &v.info;
    let o = &v.options;
    json!({
        "name": i.name.as_str(),
        "bindings": i.bindings.iter().map(|b| b.as_str()).collect::<Vec<_>>(),
        "depth": i.depth,
        "bytes": i.bytes,
        "in_flight": i.in_flight,
        "delayed": i.delayed,
        "ready": i.depth.saturating_sub(i.in_flight + i.delayed),
        "consumers": i.consumers,
        "dead_letters": dead_letters,
        "published": i.published,
        "delivered": i.delivered,
        "acked": i.acked,
        "redelivered": v.redelivered,
        "dead_lettered": i.dead_lettered,
        "expired": v.expired,
        "rejected": v.rejected,
        "dropped": v.dropped,
        "duplicates": v.duplicates,
        "rates": { "publish": i.publish_rate, "deliver": i.deliver_rate, "ack": i.ack_rate },
        "options": {
            "max_deliveries": o.max_deliveries,
            "ack_timeout_ms": o.ack_timeout_ms,
            "backoff_ms": o.backoff_ms,
            "max_length": o.max_length,
            "max_bytes": o.max_bytes,
            "overflow": o.overflow,
            "ttl_ms": o.ttl_ms,
            "dedup_window_ms": o.dedup_window_ms,
            "dead_letter": o.dead_letter,
        },
    })
}

/// GET /api/queues/{name}: one queue with its consumers and their connections.
pub(super) async fn queue(State(ctx): State<Ctx>, Path(name): Path<String>) -> ApiResult {
    let view = ctx.engine.view(&name)?;
    let dead = ctx
        .engine
        .view(&view.options.dead_letter)
        .map_or(0, |d| d.info.depth);
    let consumers: Vec<Value> = ctx
        .engine
        .consumers(&name)?
        .into_iter()
        .map(|c| {
            let conn = ctx.connections.by_queue_session(c.session_id);
            json!({
                "consumer_id": c.consumer_id,
                "unacked": c.unacked,
                "window": c.window,
                "connection": conn.map(|e| json!({
                    "id": e.id,
                    "client_name": e.client_name,
                    "peer": e.peer.to_string(),
                    "user": e.user,
                })),
            })
        })
        .collect();
    let mut out = queue_json(&view, dead);
    out["consumer_list"] = Value::Array(consumers);
    Ok(Json(out))
}

/// `from` and `limit` of a peek.
#[derive(Debug, Deserialize)]
pub(super) struct PeekQuery {
    #[serde(default)]
    from: u64,
    limit: Option<u32>,
}

impl PeekQuery {
    fn limit(&self) -> u32 {
        self.limit.unwrap_or(50)
    }
}

/// GET /api/queues/{name}/messages: stored messages, not consumed.
pub(super) async fn messages(
    State(ctx): State<Ctx>,
    Path(name): Path<String>,
    Query(q): Query<PeekQuery>,
) -> ApiResult {
    let messages = ctx.engine.peek(&name, q.from, q.limit()).await?;
    Ok(Json(peek_json(&name, &name, q.from, &messages)))
}

/// GET /api/queues/{name}/dead-letters: the dead-letter queue's messages, not
/// consumed.
pub(super) async fn dead_letters(
    State(ctx): State<Ctx>,
    Path(name): Path<String>,
    Query(q): Query<PeekQuery>,
) -> ApiResult {
    let (dlq, letters) = ctx
        .engine
        .peek_dead_letters(&name, q.from, q.limit())
        .await?;
    Ok(Json(peek_json(&name, &dlq, q.from, &letters)))
}

#[derive(Serialize)]
struct MessageJson<'a> {
    id: u64,
    topic: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    message_id: Option<&'a str>,
    published_ms: u64,
    deliveries: u32,
    payload_bytes: usize,
    /// The payload's first bytes as text (invalid UTF-8 replaced).
    payload_preview: String,
    payload_truncated: bool,
    payload_utf8: bool,
    reason: Option<&'a str>,
    attempts: Option<u32>,
}

fn peek_json(queue: &str, read_from: &str, from: u64, messages: &[PeekedMessage]) -> Value {
    let list: Vec<MessageJson<'_>> = messages
        .iter()
        .map(|m| {
            let cut = m.payload.len().min(PREVIEW_BYTES);
            let shown = &m.payload[..cut];
            MessageJson {
                id: m.id,
                topic: m.topic.as_str(),
                headers: m
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect(),
                message_id: m.message_id.as_ref().map(|t| t.as_str()),
                published_ms: m.published_ms,
                deliveries: m.deliveries,
                payload_bytes: m.payload.len(),
                payload_preview: String::from_utf8_lossy(shown).into_owned(),
                payload_truncated: cut < m.payload.len(),
                payload_utf8: std::str::from_utf8(&m.payload).is_ok(),
                reason: m.dead.as_ref().map(|(r, _)| r.as_str()),
                attempts: m.dead.as_ref().map(|(_, a)| *a),
            }
        })
        .collect();
    let next = messages.last().map(|m| m.id + 1);
    json!({
        "queue": queue,
        "read_from": read_from,
        "from": from,
        "next_from": next,
        "messages": list,
    })
}

fn connection_json(e: &ConnEntry, with_subscriptions: bool) -> Value {
    let (subs, count) = e.subscriptions();
    let mut out = json!({
        "id": e.id,
        "peer": e.peer.to_string(),
        "client_name": e.client_name,
        "user": e.user,
        "connected_ms": e.connected_ms,
        "pending_bytes": e.pending_bytes(),
        "messages_in": e.messages_in.load(Relaxed),
        "messages_out": e.messages_out(),
        "subscription_count": count,
    });
    if with_subscriptions {
        out["subscriptions"] = subs
            .iter()
            .map(|s| json!({ "sid": s.sid, "pattern": s.pattern, "group": s.group }))
            .collect();
    }
    out
}

/// GET /api/connections: a page of live connections, oldest first.
pub(super) async fn connections(State(ctx): State<Ctx>, Query(p): Query<Page>) -> Json<Value> {
    let list: Vec<Value> = ctx
        .connections
        .page(p.offset, p.limit())
        .iter()
        .map(|e| connection_json(e, true))
        .collect();
    Json(json!({
        "total": ctx.connections.len(),
        "offset": p.offset,
        "limit": p.limit(),
        "connections": list,
    }))
}

/// GET /api/subscriptions: a page of subscriptions, by connection.
pub(super) async fn subscriptions(State(ctx): State<Ctx>, Query(p): Query<Page>) -> Json<Value> {
    let mut out = Vec::new();
    let mut seen = 0usize;
    let mut total = 0usize;
    for e in ctx.connections.page(0, usize::MAX) {
        let (subs, count) = e.subscriptions();
        total += count;
        for s in subs {
            if seen >= p.offset && out.len() < p.limit() {
                out.push(json!({
                    "connection": e.id,
                    "client_name": e.client_name,
                    "sid": s.sid,
                    "pattern": s.pattern,
                    "group": s.group,
                }));
            }
            seen += 1;
        }
    }
    Json(json!({
        "total": total,
        "offset": p.offset,
        "limit": p.limit(),
        "subscriptions": out,
    }))
}
