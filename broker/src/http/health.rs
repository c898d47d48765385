//! `/healthz` (the process answers) and `/readyz` (listening, storage healthy, not
//! draining), each with a small JSON body.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::Ctx;

/// 200 whenever the process can answer at all.
pub(super) async fn healthz(State(ctx): State<Ctx>) -> Json<Value> {
    Json(json!({ "status": "ok", "uptime_seconds": uptime(&ctx) }))
}

/// 200 when the broker should get traffic, else 503 with the reason.
pub(super) async fn readyz(State(ctx): State<Ctx>) -> (StatusCode, Json<Value>) {
    match ctx.health.ready() {
        Ok(()) => (StatusCode::OK, Json(json!({ "ready": true }))),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": why.to_string() })),
        ),
    }
}

pub(super) fn uptime(ctx: &Ctx) -> u64 {
    stat(ctx, "uptime.seconds")
}

/// One broker counter by its STATS name. A name STATS does not have is a bug
/// here (a renamed counter): debug builds, and so the tests, panic on it.
pub(super) fn stat(ctx: &Ctx, name: &str) -> u64 {
    let found = ctx
        .stats
        .snapshot()
        .into_iter()
        .find(|(n, _)| n.as_str() == name)
        .map(|(_, v)| v);
    debug_assert!(found.is_some(), "STATS has no counter named {name}");
    found.unwrap_or(0)
}
