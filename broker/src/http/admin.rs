//! The JSON API's admin actions: purge, redrive, delete a queue, close a
//! connection. POST only, and every one passes [`authorize`] first.
//!
//! CSRF: the token travels in the `Authorization` header, which a page on another
//! origin cannot set without a CORS preflight that this server never approves, and
//! a request whose `Origin` or `Sec-Fetch-Site` says it came from another site is
//! refused outright. Cookies are never used.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use serde_json::json;
use tracing::info;

use super::Ctx;
use super::api::{ApiError, ApiResult};

/// Whether the request may run an admin action. The one place that decides, so
/// that it can move to per-user rights without touching the handlers.
pub(super) fn authorize(ctx: &Ctx, headers: &HeaderMap) -> Result<(), ApiError> {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if site != "same-origin" && site != "none" {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "cross-site requests may not run admin actions".into(),
            ));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let same = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|rest| rest == host);
        if !same {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("origin `{origin}` may not run admin actions"),
            ));
        }
    }
    let Some(expected) = ctx.admin_token.as_deref() else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "admin actions are off: start the broker with --http-admin-token".into(),
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError(
                StatusCode::UNAUTHORIZED,
                "admin actions need `Authorization: Bearer <token>`".into(),
            )
        })?;
    if !constant_time_eq(presented.trim().as_bytes(), expected.as_bytes()) {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "wrong admin token".into(),
        ));
    }
    Ok(())
}

/// Compares without an early exit, so timing does not reveal how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0);
    }
    diff == 0
}

/// POST /api/queues/{name}/purge: removes the ready messages.
pub(super) async fn purge(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    authorize(&ctx, &headers)?;
    let purged = ctx.engine.purge(&name).await?;
    info!(queue = %name, purged, "queue purged over HTTP");
    Ok(Json(json!({ "queue": name, "purged": purged })))
}

/// Query of a redrive.
#[derive(Debug, Deserialize)]
pub(super) struct RedriveQuery {
    /// Most dead letters to move (0 or absent: all).
    #[serde(default)]
    limit: u32,
}

/// POST /api/queues/{name}/redrive?limit=N: moves dead letters back.
pub(super) async fn redrive(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<RedriveQuery>,
) -> ApiResult {
    authorize(&ctx, &headers)?;
    ctx.engine.settle().await?;
    let moved = ctx.engine.redrive(&name, q.limit).await?;
    info!(queue = %name, moved, "dead letters redriven over HTTP");
    Ok(Json(json!({ "queue": name, "moved": moved })))
}

/// POST /api/queues/{name}/delete: deletes the queue and its messages.
pub(super) async fn delete_queue(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    authorize(&ctx, &headers)?;
    ctx.engine.delete(&name).await?;
    info!(queue = %name, "queue deleted over HTTP");
    Ok(Json(json!({ "deleted": name })))
}

/// POST /api/connections/{id}/close: closes a client connection.
pub(super) async fn close_connection(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult {
    authorize(&ctx, &headers)?;
    if !ctx.connections.close(id) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no connection with id {id}"),
        ));
    }
    info!(connection = id, "connection closed over HTTP");
    Ok(Json(json!({ "closed": id })))
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"secret!", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }
}
