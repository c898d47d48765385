//! The tidings broker: publish/subscribe, request/reply and durable queues for
//! microservices, over one TCP protocol ([`tidings_protocol`]).
//!
//! ```no_run
//! use tidings_broker::{Broker, Config};
//!
//! # async fn demo() -> Result<(), tidings_broker::BrokerError> {
//! let broker = Broker::start(Config::for_test("/tmp/tidings-example")).await?;
//! println!("clients connect to {}", broker.local_addr());
//! broker.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Architecture
//!
//! - **Server** ([`run`], `server.rs`): the accept loop. A semaphore caps
//!   connections; one past the limit gets ERROR `TooManyConnections` and is closed.
//!   Every task is spawned on a `TaskTracker`; shutdown stops accepting, cancels a
//!   `CancellationToken`, waits for connections under `--shutdown-timeout`, then
//!   cuts off what is left.
//! - **Connection** ([`connection`]): one reader task and one writer task per
//!   client. The reader owns its buffer and calls the codec directly, so unknown
//!   frame types or flags are answered with an error and reading goes on, while
//!   malformed or oversized frames close the connection. It runs the handshake
//!   under `--handshake-timeout`, pings idle peers every `--heartbeat` and
//!   dispatches frames. The writer drains the connection's [`outbox::Outbox`],
//!   encoding everything queued into one buffer per write.
//! - **Outbox**: the only way anything reaches a client. It is bounded in bytes
//!   (`--max-pending-bytes`); overflowing it marks the client a slow consumer,
//!   which is disconnected and counted, so a slow client never slows a publisher
//!   and memory stays bounded.
//! - **Router** ([`router`]): subscriptions in a token trie with `*` and `>`, plus
//!   a topic → route cache invalidated by subscribe and unsubscribe. A publish
//!   looks up its route and queues one MESSAGE per plain subscription and one per
//!   group (round-robin among members), all sharing the payload's `Bytes`.
//! - **Publish path**: the connection validates topic and payload, delivers to the
//!   route, answers `NoResponders` for a request nobody listens to, then hands the
//!   message to the durable-queue side (`connection/queue_state.rs`), which answers
//!   confirms.
//! - **Durable queues** ([`queue`]): the engine behind QUEUE_*, CONSUME, ACK and
//!   NACK. Each queue keeps a bounded window of messages in memory and everything
//!   in sled under `<data-dir>/queues`; writes from all connections meet in one
//!   group commit, and confirms go out only after a real `fdatasync` (by default,
//!   see `--fsync`). Consumers get deliveries within their credit; unacked
//!   deliveries come back on nack, ack timeout or disconnect, with backoff, and
//!   move to a dead-letter queue after `max_deliveries`.
//! - **Stats** ([`Stats`]): relaxed atomic counters reported by STATS_REPLY.
//! - **HTTP** (`http/`): the operators' listener on `--http-listen`, served with
//!   axum beside the client port and stopped after it (so `/readyz` says
//!   "draining" while connections finish): Prometheus `/metrics` built at each
//!   scrape from the counters, `/healthz`, `/readyz`, a JSON API and a dashboard
//!   whose assets are compiled in. It reads [`telemetry`] (the store's metrics
//!   sink and readiness) and [`connections`] (the registry of live connections
//!   each connection joins after its handshake).
//! - **Config** ([`Config`]): clap flags, `TIDINGS_*` variables and a TOML file.

pub mod auth;
pub mod config;
pub mod connection;
pub mod connections;
mod http;
pub mod limits;
pub mod memory;
pub mod outbox;
pub mod queue;
pub mod router;
pub mod security;
mod server;
mod shared;
mod stats;
pub mod storage;
pub mod telemetry;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

pub use config::{Config, ConfigError, HttpListen, HttpTls, LogFormat};
pub use limits::Limits;
pub use security::SecurityConfig;
pub use server::{run, run_with_tls, serve};
pub use stats::Stats;

/// Why the broker could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum BrokerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The durable-queue store could not be opened.
    #[error("cannot open the queue store: {0}")]
    Queues(#[from] queue::QueueError),
    /// The TLS certificate, key or client CA could not be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Some other I/O failure.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Starts brokers in-process (tests, benches, embedding).
#[derive(Debug)]
pub struct Broker;

impl Broker {
    /// Binds `config.listen`, spawns the server, returns at once with a handle.
    pub async fn start(config: Config) -> Result<BrokerHandle, BrokerError> {
        config.validate()?;
        prepare_data_dir(&config)?;
        let listener = bind(config.listen).await?;
        let local_addr = listener.local_addr()?;
        let http = match config.http_listen.0 {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let http_addr = http.as_ref().map(TcpListener::local_addr).transpose()?;
        let tls = tls::Tls::from_config(&config.security)?;
        let token = CancellationToken::new();
        let stop = token.clone();
        let join = tokio::spawn(serve(listener, http, config, tls.clone(), async move {
            stop.cancelled().await
        }));
        Ok(BrokerHandle {
            local_addr,
            http_addr,
            tls,
            token: token.clone(),
            _guard: token.drop_guard(),
            join,
        })
    }
}

/// A running in-process broker. Dropping it without [`BrokerHandle::shutdown`]
/// also stops the server, without waiting.
#[derive(Debug)]
pub struct BrokerHandle {
    local_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    tls: Option<tls::Tls>,
    token: CancellationToken,
    _guard: DropGuard,
    join: JoinHandle<Result<(), BrokerError>>,
}

impl BrokerHandle {
    /// The address the broker listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the HTTP listener (metrics, health, API, dashboard), unless
    /// `--http-listen` is `off`.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Starts the graceful shutdown without waiting for it (readiness turns false
    /// at once); [`BrokerHandle::shutdown`] waits.
    pub fn begin_shutdown(&self) {
        self.token.cancel();
    }

    /// The listener's TLS, to [`tls::Tls::reload`] it; `None` when plaintext.
    pub fn tls(&self) -> Option<&tls::Tls> {
        self.tls.as_ref()
    }

    /// Graceful shutdown: stop accepting, let connections finish, flush, wait (bounded).
    pub async fn shutdown(self) {
        self.token.cancel();
        match self.join.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(error = %err, "broker stopped with an error"),
            Err(err) => tracing::error!(error = %err, "broker task failed"),
        }
    }
}

/// Binds the listen address, naming it in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BrokerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BrokerError::Bind { addr, source })
}

/// Creates the data directory, so a bad path fails at start rather than later.
pub fn prepare_data_dir(config: &Config) -> Result<(), BrokerError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| BrokerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })
}
