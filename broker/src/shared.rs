//! `Shared`: the broker-wide state every connection sees (config, router, stats,
//! durable queues, authenticator), built by the server at start. It sits below both the server
//! and the connections so that neither has to import the other for it.

use std::sync::Arc;

use crate::auth::Authenticator;
use crate::connections::Connections;
use crate::queue::{EngineConfig, QueueEngine};
use crate::router::Router;
use crate::stats::Stats;
use crate::telemetry::StorageMetrics;
use crate::{BrokerError, Config};

/// State every connection shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) router: Router,
    pub(crate) stats: Arc<Stats>,
    pub(crate) queues: BrokerQueues,
    pub(crate) auth: Authenticator,
    /// Live connections, as operators see them (the HTTP API).
    pub(crate) connections: Connections,
}

/// The broker-wide queue state: the engine, opened by the server at start and
/// shut down (flushed) after the connections have drained.
pub(crate) struct BrokerQueues {
    pub(crate) engine: QueueEngine,
}

impl std::fmt::Debug for BrokerQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerQueues").finish_non_exhaustive()
    }
}

impl BrokerQueues {
    /// Opens the queues kept under `config.data_dir`; the store reports to `metrics`.
    pub(crate) fn open(
        config: &Config,
        metrics: Arc<StorageMetrics>,
    ) -> Result<BrokerQueues, BrokerError> {
        let mut engine_config = EngineConfig::new(config.data_dir.join("queues"));
        engine_config.metrics = metrics;
        engine_config.fsync = config.fsync;
        engine_config.ready_window = config.queue_window;
        engine_config.max_credit = config.max_credit;
        engine_config.max_message_id_len = config.limits.max_message_id_len;
        engine_config.repair = config.repair;
        Ok(BrokerQueues {
            engine: QueueEngine::open(engine_config)?,
        })
    }

    /// Called once every connection has finished: make everything durable.
    pub(crate) async fn shutdown(&self) {
        self.engine.shutdown().await;
    }
}
