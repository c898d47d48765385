//! The HTTP listener for operators: Prometheus `/metrics`, `/healthz` and
//! `/readyz` for orchestrators, a JSON API under `/api/` and the dashboard at `/`,
//! whose assets are compiled into the binary.
//!
//! ```text
//!  GET  /healthz  /readyz  /metrics
//!  GET  /api/overview  /api/queues  /api/queues/{name}
//!       /api/queues/{name}/messages  /api/queues/{name}/dead-letters
//!       /api/connections  /api/subscriptions
//!  POST /api/queues/{name}/purge  /redrive  /delete   /api/connections/{id}/close
//!  GET  /  /assets/{file}
//! ```
//!
//! At most [`listener::MAX_HTTP_CONNECTIONS`] HTTP connections are served at once.
//! The server runs beside the client listener ([`crate::server`]) and stops after
//! it, so `/readyz` answers "draining" while connections finish. Admin actions
//! are guarded in one place, [`admin::authorize`].
//!
//! With TLS on the client port it serves HTTPS with the same certificate
//! (`--http-tls`, [`crate::HttpTls`]); handshakes run in their own tasks
//! ([`listener`]).

mod admin;
mod api;
mod dashboard;
mod health;
mod listener;
mod metrics;
mod rates;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::auth::Authenticator;
use crate::connections::Connections;
use crate::queue::QueueEngine;
use crate::stats::Stats;
use crate::telemetry::Health;
use crate::tls::Tls;

pub(crate) use rates::RateHistory;

/// How long open HTTP connections get to finish once the server stops.
const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What the handlers read. One per broker, shared by every request.
pub(crate) struct HttpContext {
    pub(crate) stats: Arc<Stats>,
    pub(crate) engine: QueueEngine,
    pub(crate) health: Health,
    pub(crate) connections: Connections,
    pub(crate) rates: RateHistory,
    /// The token admin actions require; `None`: only users may run them.
    pub(crate) admin_token: Option<String>,
    /// The broker's users (`[[users]]`), who may run queue actions their queue
    /// rights allow, authenticating with HTTP Basic.
    pub(crate) auth: Authenticator,
    /// Most queues with their own series in `/metrics`.
    pub(crate) metrics_max_queues: usize,
    /// The queue store's directory, whose segment files `/metrics` sums up.
    pub(crate) queue_dir: PathBuf,
}

type Ctx = Arc<HttpContext>;

fn routes(ctx: Ctx) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::scrape))
        .route("/api/overview", get(api::overview))
        .route("/api/queues", get(api::queues))
        .route("/api/queues/{name}", get(api::queue))
        .route("/api/queues/{name}/messages", get(api::messages))
        .route("/api/queues/{name}/dead-letters", get(api::dead_letters))
        .route("/api/connections", get(api::connections))
        .route("/api/subscriptions", get(api::subscriptions))
        .route("/api/queues/{name}/purge", post(admin::purge))
        .route("/api/queues/{name}/redrive", post(admin::redrive))
        .route("/api/queues/{name}/delete", post(admin::delete_queue))
        .route("/api/connections/{id}/close", post(admin::close_connection))
        .route("/", get(dashboard::index))
        .route("/assets/{file}", get(dashboard::asset))
        .fallback(api::not_found)
        .with_state(ctx)
}

/// Serves HTTP on `listener` until `stop` resolves; then open requests get a short
/// grace period. Also samples the message rates the dashboard charts. With `tls`
/// (the client port's certificate, and the handshake timeout) it serves HTTPS.
pub(crate) async fn serve(
    listener: TcpListener,
    ctx: HttpContext,
    tls: Option<(Tls, Duration)>,
    stop: CancellationToken,
) {
    let ctx = Arc::new(ctx);
    let addr = listener.local_addr().ok();
    let scheme = if tls.is_some() { "https" } else { "http" };
    info!(addr = ?addr, scheme, "HTTP listener (metrics, health, API, dashboard) up");
    let sampler = tokio::spawn(rates::sample(ctx.clone(), stop.clone()));
    let app = routes(ctx);
    let shutdown = stop.clone();
    let server = axum::serve(listener::Limited::new(listener, tls), app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await });
    let served = run_bounded(server.into_future(), &stop).await;
    if let Some(Err(err)) = served {
        warn!(error = %err, "HTTP server failed");
    }
    sampler.abort();
    info!("HTTP listener stopped");
}

/// Runs the server; once `stop` is cancelled, waits at most the grace period for it.
async fn run_bounded<T>(server: impl Future<Output = T>, stop: &CancellationToken) -> Option<T> {
    tokio::pin!(server);
    tokio::select! {
        out = &mut server => return Some(out),
        () = stop.cancelled() => {}
    }
    tokio::time::timeout(HTTP_SHUTDOWN_GRACE, server).await.ok()
}
