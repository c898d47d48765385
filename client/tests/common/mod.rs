//! Shared test support: a real broker on 127.0.0.1:0 with a temporary data
//! directory, restartable on the same address, and time bounds for every await.

#![allow(dead_code)] // each test file uses a different subset

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tempfile::TempDir;
use tidings_broker::{Broker, BrokerHandle, Config};
use tidings_client::{Client, ClientBuilder, ReconnectPolicy};

/// Upper bound for any single await in a test, so that a bug fails instead of
/// hanging.
pub const BOUND: Duration = Duration::from_secs(10);

pub struct TestBroker {
    handle: Option<BrokerHandle>,
    pub addr: SocketAddr,
    pub dir: TempDir,
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        TestBroker::start_with(|_| {}).await
    }

    /// A broker whose test config `adjust` changes first.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestBroker {
        let dir = tempfile::tempdir().expect("a temp dir can be created");
        let mut config = Config::for_test(dir.path());
        adjust(&mut config);
        let handle = Broker::start(config)
            .await
            .expect("the broker starts on port 0");
        let addr = handle.local_addr();
        TestBroker {
            handle: Some(handle),
            addr,
            dir,
        }
    }

    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Shuts the broker down gracefully.
    pub async fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            within(handle.shutdown()).await;
        }
    }

    /// Starts a new broker on the same address and data directory.
    pub async fn start_again(&mut self) {
        let mut config = Config::for_test(self.dir.path());
        config.listen = self.addr;
        // The old listener may linger for a moment; retry binding briefly.
        let deadline = tokio::time::Instant::now() + BOUND;
        loop {
            match Broker::start(config.clone()).await {
                Ok(handle) => {
                    self.handle = Some(handle);
                    return;
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("rebinding {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot restart the broker on {}: {e}", self.addr),
            }
        }
    }

    /// A builder that reconnects quickly, for restart tests.
    pub fn builder(&self) -> ClientBuilder {
        ClientBuilder::new(self.addr())
            .name("test")
            .request_timeout(Duration::from_secs(5))
            .reconnect(ReconnectPolicy::exponential(
                Duration::from_millis(10),
                Duration::from_millis(100),
            ))
    }

    pub async fn client(&self) -> Client {
        within(self.builder().connect())
            .await
            .expect("the client connects")
    }
}

/// Awaits `fut`, failing the test if it takes longer than [`BOUND`].
pub async fn within<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(BOUND, fut)
        .await
        .expect("operation did not finish within the test bound")
}
