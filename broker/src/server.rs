//! The accept loop: admits connections up to the limit, refuses the rest with an
//! error frame, and drives graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tidings_protocol::{ErrorCode, ErrorReply, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, field, info, info_span, warn};

use crate::auth::Authenticator;
use crate::connection::{self, Signals};
use crate::connections::Connections;
use crate::http::{HttpContext, RateHistory};
use crate::outbox::ConnId;
use crate::router::Router;
use crate::shared::{BrokerQueues, Shared};
use crate::stats::Stats;
use crate::telemetry::{Health, StorageMetrics};
use crate::tls::Tls;
use crate::{BrokerError, Config, HttpTls};

/// How long a refused connection gets to read its error frame.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after an accept error (such as running out of file descriptors) so the
/// loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// After the shutdown deadline cut connections off, how long to wait for their
/// tasks to notice.
const KILL_GRACE: Duration = Duration::from_secs(1);

/// Serves connections on `listener` until `shutdown` resolves, then stops accepting,
/// asks every connection to finish the frame in hand and flush what is queued, and
/// waits for them (at most `config.shutdown_timeout`, then cuts them off). Binds
/// and serves `--http-listen` too, unless it is `off`.
///
/// TLS, when configured, is loaded here; use [`run_with_tls`] to keep a handle for
/// reloading it.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BrokerError> {
    config.validate()?;
    let tls = Tls::from_config(&config.security)?;
    run_with_tls(listener, config, tls, shutdown).await
}

/// [`run`] with TLS already loaded (`None`: plaintext), so the caller can keep a
/// clone of `tls` and [`Tls::reload`] it (on SIGHUP, say).
pub async fn run_with_tls(
    listener: TcpListener,
    config: Config,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BrokerError> {
    let http = match config.http_listen.0 {
        Some(addr) => Some(crate::bind(addr).await?),
        None => None,
    };
    serve(listener, http, config, tls, shutdown).await
}

/// Like [`run_with_tls`], with the HTTP listener already bound (or none), so the
/// caller knows its address.
pub async fn serve(
    listener: TcpListener,
    http: Option<TcpListener>,
    config: Config,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BrokerError> {
    config.validate()?;
    let auth = Authenticator::new(config.auth_token.as_deref(), &config.security.users)
        .map_err(|e| crate::ConfigError::Security(e.into()))?;
    let stats = Arc::new(Stats::default());
    let storage = Arc::new(StorageMetrics::default());
    let health = Health::new(storage.clone());
    let queues = BrokerQueues::open(&config, storage)?;
    let connections = Connections::default();
    let http_stop = CancellationToken::new();
    let http_auth = match http {
        // Its own instance: HTTP logins wait on their own argon2 permits.
        Some(_) => Some(
            Authenticator::new(config.auth_token.as_deref(), &config.security.users)
                .map_err(|e| crate::ConfigError::Security(e.into()))?,
        ),
        None => None,
    };
    // The HTTP side shares the client port's certificate (and so its reloads).
    let http_tls = match config.http_tls {
        HttpTls::Off => None,
        HttpTls::On | HttpTls::Auto => tls.clone().map(|tls| (tls, config.handshake_timeout)),
    };
    let http_task = http.zip(http_auth).map(|(listener, http_auth)| {
        let ctx = HttpContext {
            auth: http_auth,
            stats: stats.clone(),
            engine: queues.engine.clone(),
            health: health.clone(),
            connections: connections.clone(),
            rates: RateHistory::default(),
            admin_token: config
                .http_admin_token
                .clone()
                .or_else(|| config.auth_token.clone()),
            metrics_max_queues: config.metrics_max_queues,
            queue_dir: config.data_dir.join("queues"),
        };
        tokio::spawn(crate::http::serve(
            listener,
            ctx,
            http_tls,
            http_stop.clone(),
        ))
    });
    let shared = Arc::new(Shared {
        router: Router::new(stats.clone()),
        stats,
        queues,
        connections,
        auth,
        config,
    });
    health.set_listening();
    let signals = Signals {
        shutdown: CancellationToken::new(),
        kill: CancellationToken::new(),
    };
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(shared.config.max_connections));
    let next_id = AtomicU64::new(1);
    tokio::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Accept errors are per-connection (aborted handshakes) or
                    // transient (out of descriptors): log, pause, go on.
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.stats.connection_rejected();
            shared.stats.error(ErrorCode::TooManyConnections);
            warn!(%peer, limit = shared.config.max_connections, "connection refused: at the connection limit");
            let limit = shared.config.max_connections;
            tracker.spawn(refuse(stream, limit, signals.shutdown.clone()));
            continue;
        };
        let conn = ConnId(next_id.fetch_add(1, Ordering::Relaxed));
        let span =
            info_span!("conn", id = conn.0, %peer, client = field::Empty, user = field::Empty);
        let shared = shared.clone();
        let signals = signals.clone();
        let inner_tracker = tracker.clone();
        let acceptor = tls.as_ref().map(Tls::acceptor);
        tracker.spawn(
            async move {
                shared.stats.connection_opened();
                // We coalesce writes ourselves; Nagle would only add latency.
                let _ = stream.set_nodelay(true);
                let peer = Some(peer);
                match acceptor {
                    None => {
                        let (read, write) = stream.into_split();
                        let transport = connection::Transport {
                            read,
                            write,
                            peer,
                            certificate_names: Vec::new(),
                        };
                        connection::serve(transport, conn, shared.clone(), signals, inner_tracker)
                            .await;
                    }
                    Some(acceptor) => {
                        // The TLS handshake counts against the handshake timeout, so
                        // a plaintext client (or a silent one) is closed within it.
                        let timeout = shared.config.handshake_timeout;
                        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls_stream)) => {
                                let certificate_names = tls_stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|chain| chain.first())
                                    .map(crate::tls::certificate_names)
                                    .unwrap_or_default();
                                let (read, write) = tokio::io::split(tls_stream);
                                let transport = connection::Transport {
                                    read,
                                    write,
                                    peer,
                                    certificate_names,
                                };
                                connection::serve(
                                    transport,
                                    conn,
                                    shared.clone(),
                                    signals,
                                    inner_tracker,
                                )
                                .await;
                            }
                            Ok(Err(err)) => {
                                shared.stats.error(ErrorCode::HandshakeRequired);
                                info!(error = %err, "TLS handshake failed");
                            }
                            Err(_) => {
                                shared.stats.error(ErrorCode::HandshakeTimeout);
                                info!(?timeout, "TLS handshake timed out");
                            }
                        }
                    }
                }
                shared.stats.connection_closed();
                drop(permit);
            }
            .instrument(span),
        );
    }

    drop(listener);
    health.set_draining();
    let open = tracker.len();
    info!(connections = open, "shutting down: no longer accepting");
    signals.shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(shared.config.shutdown_timeout, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = tracker.len(),
            timeout = ?shared.config.shutdown_timeout,
            "connections did not finish in time; closing them"
        );
        signals.kill.cancel();
        let _ = tokio::time::timeout(KILL_GRACE, tracker.wait()).await;
    }
    shared.queues.shutdown().await;
    // Last, so that /readyz says "draining" while connections finish.
    http_stop.cancel();
    if let Some(task) = http_task {
        let _ = task.await;
    }
    info!("shutdown complete");
    Ok(())
}

/// Tells a connection over the limit why it is refused, then closes it.
async fn refuse(mut stream: TcpStream, limit: usize, shutdown: CancellationToken) {
    let mut buf = BytesMut::new();
    let error = ErrorReply::new(
        0,
        ErrorCode::TooManyConnections,
        format!("the server is at its limit of {limit} connections"),
    );
    if Frame::Error(error).encode(&mut buf).is_err() {
        return;
    }
    let _ = tokio::time::timeout(REFUSE_TIMEOUT, async {
        stream.write_all(&buf).await?;
        stream.shutdown().await?;
        // Drain whatever the client sent (its HELLO) so closing does not reset the
        // connection before the client reads the error.
        let mut sink = [0u8; 1024];
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} } => {}
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}
