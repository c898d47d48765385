//! What the broker's parts report for operators, below both the parts that report
//! and the HTTP side that shows it: [`StorageMetrics`] (the store calls it) and
//! [`Health`] (the server sets it, `/readyz` reads it).

mod storage;

pub use storage::StorageMetrics;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the broker should receive traffic: listening, storage healthy, not
/// draining. A cheap `Clone` handle.
#[derive(Debug, Clone, Default)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Debug, Default)]
struct HealthInner {
    listening: AtomicBool,
    draining: AtomicBool,
    storage: Arc<StorageMetrics>,
}

/// Why the broker is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// The client listener is not accepting yet.
    NotListening,
    /// Shutdown began: connections are finishing, no new ones are taken.
    Draining,
    /// A write or sync of the queue store failed; the store takes no more writes
    /// until a restart recovers from what is on disk.
    StorageFailed(String),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::NotListening => f.write_str("not listening yet"),
            NotReady::Draining => f.write_str("draining: shutting down"),
            NotReady::StorageFailed(why) => write!(f, "storage failed: {why}"),
        }
    }
}

impl Health {
    /// A health handle that judges storage by `storage`.
    pub fn new(storage: Arc<StorageMetrics>) -> Health {
        Health {
            inner: Arc::new(HealthInner {
                storage,
                ..HealthInner::default()
            }),
        }
    }

    /// The client listener accepts connections.
    pub fn set_listening(&self) {
        self.inner.listening.store(true, Ordering::Relaxed);
    }

    /// Shutdown began.
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }

    /// Whether shutdown began.
    pub fn draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// The storage figures this health reads.
    pub fn storage(&self) -> &Arc<StorageMetrics> {
        &self.inner.storage
    }

    /// `Ok` when the broker should receive traffic, else the first reason not to.
    pub fn ready(&self) -> Result<(), NotReady> {
        if let Some(why) = self.inner.storage.failure() {
            return Err(NotReady::StorageFailed(why));
        }
        if self.draining() {
            return Err(NotReady::Draining);
        }
        if !self.inner.listening.load(Ordering::Relaxed) {
            return Err(NotReady::NotListening);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_listening_draining_and_storage() {
        let storage = Arc::new(StorageMetrics::default());
        let health = Health::new(storage.clone());
        assert_eq!(health.ready(), Err(NotReady::NotListening));
        health.set_listening();
        assert_eq!(health.ready(), Ok(()));
        storage.failed("fdatasync of the queue log: EIO");
        assert!(matches!(health.ready(), Err(NotReady::StorageFailed(w)) if w.contains("EIO")));
        let health = Health::default();
        health.set_listening();
        health.set_draining();
        assert_eq!(health.ready(), Err(NotReady::Draining));
    }
}
