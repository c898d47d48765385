//! The JSON API's admin actions: purge, redrive, delete a queue, close a
//! connection. POST only, and every one passes [`authorize`] first.
//!
//! Who: the admin token may do everything; a configured user, over HTTP Basic,
//! the queue actions its rights allow (see [`authorize`]).
//!
//! CSRF: the token (or password) travels in the `Authorization` header, which a page on another
//! origin cannot set without a CORS preflight that this server never approves, and
//! a request whose `Origin` or `Sec-Fetch-Site` says it came from another site is
//! refused outright. Cookies are never used.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use serde_json::json;
use tracing::info;

use base64::Engine as _;

use super::Ctx;
use super::api::{ApiError, ApiResult};
use crate::auth::{Credentials, QueueRight};

/// What an admin action touches, for [`authorize`].
#[derive(Debug, Clone, Copy)]
pub(super) enum Action<'a> {
    /// Purge or delete a queue: the queue's `manage` right.
    ManageQueue(&'a str),
    /// Redrive a queue's dead letters: its `dead_letters` right.
    Redrive(&'a str),
    /// Close a client connection: the admin token only (no user right covers
    /// other users' connections).
    CloseConnection,
}

/// Whether the request may run `action`. The one place that decides: the admin
/// token (`Authorization: Bearer`, `--http-admin-token` or else `--auth-token`)
/// may do everything; a configured user (`Authorization: Basic`) may run the queue
/// actions its queue rights allow.
pub(super) async fn authorize(
    ctx: &Ctx,
    headers: &HeaderMap,
    action: Action<'_>,
) -> Result<(), ApiError> {
    same_origin(headers)?;
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let forbidden = |m: String| Err(ApiError(StatusCode::FORBIDDEN, m));
    let unauthorized = |m: &str| Err(ApiError(StatusCode::UNAUTHORIZED, m.to_owned()));
    if let Some(token) = header.and_then(|v| v.strip_prefix("Bearer ")) {
        let Some(expected) = ctx.admin_token.as_deref() else {
            return forbidden(
                "admin actions are off: start the broker with --http-admin-token".into(),
            );
        };
        if !constant_time_eq(token.trim().as_bytes(), expected.as_bytes()) {
            return unauthorized("wrong admin token");
        }
        return Ok(());
    }
    if let Some(basic) = header.and_then(|v| v.strip_prefix("Basic ")) {
        if !ctx.auth.has_users() {
            return forbidden("no users are configured: use the admin token".into());
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        let Some((user, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
            return unauthorized("malformed Basic credentials");
        };
        let principal = ctx
            .auth
            .authenticate(Credentials {
                user: Some(user),
                secret: Some(password),
                ..Credentials::default()
            })
            .await;
        let Ok(principal) = principal else {
            return unauthorized("wrong user or password");
        };
        let allowed = match action {
            Action::ManageQueue(queue) => principal.check_queue(queue, QueueRight::Manage),
            Action::Redrive(queue) => principal.check_queue(queue, QueueRight::DeadLetters),
            Action::CloseConnection => {
                return forbidden("closing a connection needs the admin token".into());
            }
        };
        return allowed.map_err(|denied| ApiError(StatusCode::FORBIDDEN, denied.to_string()));
    }
    if ctx.admin_token.is_none() && !ctx.auth.has_users() {
        return forbidden("admin actions are off: start the broker with --http-admin-token".into());
    }
    unauthorized("admin actions need `Authorization: Bearer <token>` (or Basic for a user)")
}

/// Refuses requests that say they come from another site or origin.
fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
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
    authorize(&ctx, &headers, Action::ManageQueue(&name)).await?;
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
    authorize(&ctx, &headers, Action::Redrive(&name)).await?;
    ctx.engine.settle().await;
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
    authorize(&ctx, &headers, Action::ManageQueue(&name)).await?;
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
    authorize(&ctx, &headers, Action::CloseConnection).await?;
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
