//! `Connections`: the registry of live client connections that operators see
//! (peer, client name, user, subscriptions, consumers, pending bytes, traffic)
//! and can close. Connections register after their handshake and leave when the
//! [`Registered`] guard drops; the HTTP API reads it.
//!
//! Per-connection counters are relaxed atomics on the connection's own entry, so
//! the publish path pays an uncontended increment, never a shared lock.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::outbox::Outbox;

/// Most subscriptions of one connection that are listed (the count is exact).
pub const MAX_SUBSCRIPTIONS_LISTED: usize = 1_000;

/// The registry. A cheap `Clone` handle.
#[derive(Clone, Default)]
pub struct Connections {
    inner: Arc<RwLock<BTreeMap<u64, Arc<ConnEntry>>>>,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("live", &self.len())
            .finish()
    }
}

/// A subscription as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionEntry {
    /// The client's subscription id.
    pub sid: u32,
    /// The topic pattern.
    pub pattern: String,
    /// The queue group, if any.
    pub group: Option<String>,
}

/// One live connection.
pub struct ConnEntry {
    /// The broker's connection id.
    pub id: u64,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Wall-clock milliseconds when it connected.
    pub connected_ms: u64,
    /// The client name it gave in HELLO.
    pub client_name: String,
    /// The user it authenticated as, if users are configured.
    pub user: Option<String>,
    /// PUBLISH frames received from it.
    pub messages_in: AtomicU64,
    /// Its queue session (0: none).
    pub queue_session: AtomicU64,
    subscriptions: Mutex<BTreeMap<u32, SubscriptionEntry>>,
    outbox: Outbox,
    close: CancellationToken,
}

impl std::fmt::Debug for ConnEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnEntry")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .field("client_name", &self.client_name)
            .finish_non_exhaustive()
    }
}

/// What a connection tells the registry when it registers.
pub struct NewConnection {
    /// The broker's connection id.
    pub id: u64,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The client name from HELLO.
    pub client_name: String,
    /// The authenticated user, if any.
    pub user: Option<String>,
    /// Its queue session's id (0: none).
    pub queue_session: u64,
    /// Its outbox: pending bytes and messages sent are read from it.
    pub outbox: Outbox,
    /// Cancelled to close the connection (an operator's close).
    pub close: CancellationToken,
}

impl ConnEntry {
    /// Bytes queued for it and not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.outbox.pending_bytes()
    }

    /// MESSAGE and DELIVERY frames queued for it.
    pub fn messages_out(&self) -> u64 {
        self.outbox.messages_queued()
    }

    /// Its subscriptions (at most [`MAX_SUBSCRIPTIONS_LISTED`]) and how many it has.
    pub fn subscriptions(&self) -> (Vec<SubscriptionEntry>, usize) {
        let subs = self.lock_subs();
        let listed = subs
            .values()
            .take(MAX_SUBSCRIPTIONS_LISTED)
            .cloned()
            .collect();
        (listed, subs.len())
    }

    /// It subscribed.
    pub fn subscribed(&self, sid: u32, pattern: &str, group: Option<&str>) {
        self.lock_subs().insert(
            sid,
            SubscriptionEntry {
                sid,
                pattern: pattern.to_owned(),
                group: group.map(str::to_owned),
            },
        );
    }

    /// It unsubscribed.
    pub fn unsubscribed(&self, sid: u32) {
        self.lock_subs().remove(&sid);
    }

    /// A PUBLISH arrived from it.
    pub fn message_in(&self) {
        self.messages_in.fetch_add(1, Relaxed);
    }

    fn lock_subs(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, SubscriptionEntry>> {
        self.subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Keeps a connection listed; dropping it removes the entry.
#[derive(Debug)]
pub struct Registered {
    entry: Arc<ConnEntry>,
    registry: Connections,
}

impl Registered {
    /// The entry, to update counters and subscriptions.
    pub fn entry(&self) -> &Arc<ConnEntry> {
        &self.entry
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.write().remove(&self.entry.id);
    }
}

impl Connections {
    /// Lists a connection until the returned guard drops.
    pub fn register(&self, new: NewConnection) -> Registered {
        let connected_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let entry = Arc::new(ConnEntry {
            id: new.id,
            peer: new.peer,
            connected_ms,
            client_name: new.client_name,
            user: new.user,
            messages_in: AtomicU64::new(0),
            queue_session: AtomicU64::new(new.queue_session),
            subscriptions: Mutex::new(BTreeMap::new()),
            outbox: new.outbox,
            close: new.close,
        });
        self.write().insert(entry.id, entry.clone());
        Registered {
            entry,
            registry: self.clone(),
        }
    }

    /// How many connections are listed.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `limit` connections from the `offset`-th on, by id (oldest first).
    pub fn page(&self, offset: usize, limit: usize) -> Vec<Arc<ConnEntry>> {
        self.read()
            .values()
            .skip(offset)
            .take(limit)
            .cloned()
            .collect()
    }

    /// The connection with this id.
    pub fn get(&self, id: u64) -> Option<Arc<ConnEntry>> {
        self.read().get(&id).cloned()
    }

    /// The connection whose queue session this is.
    pub fn by_queue_session(&self, session: u64) -> Option<Arc<ConnEntry>> {
        if session == 0 {
            return None;
        }
        self.read()
            .values()
            .find(|e| e.queue_session.load(Relaxed) == session)
            .cloned()
    }

    /// Asks connection `id` to close: it flushes what is queued, sends ERROR
    /// `ClosedByOperator` and closes. False if no such connection is listed.
    pub fn close(&self, id: u64) -> bool {
        match self.get(id) {
            Some(entry) => {
                entry.close.cancel();
                true
            }
            None => false,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Arc<ConnEntry>>> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Arc<ConnEntry>>> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::ConnId;
    use crate::stats::Stats;
    use tidings_protocol::{Frame, Ping};

    fn new(id: u64) -> NewConnection {
        let (outbox, _receiver) = Outbox::channel(ConnId(id), 1 << 20, Arc::new(Stats::default()));
        outbox.send(Frame::Ping(Ping)).unwrap();
        NewConnection {
            id,
            peer: SocketAddr::from(([127, 0, 0, 1], 4000)),
            client_name: format!("c{id}"),
            user: None,
            queue_session: 0,
            outbox,
            close: CancellationToken::new(),
        }
    }

    #[test]
    fn entries_leave_with_their_guard_and_close_cancels() {
        let registry = Connections::default();
        let a = registry.register(new(1));
        let b = registry.register(new(2));
        a.entry().subscribed(5, "orders.>", Some("workers"));
        a.entry().queue_session.store(9, Relaxed);
        assert_eq!(registry.len(), 2);
        assert_eq!(registry.page(1, 10)[0].id, 2);
        assert_eq!(registry.by_queue_session(9).map(|e| e.id), Some(1));
        assert_eq!(a.entry().subscriptions().1, 1);
        assert!(a.entry().pending_bytes() > 0, "the PING is queued");
        assert_eq!(a.entry().messages_out(), 0);
        assert!(registry.close(2));
        assert!(b.entry().close.is_cancelled());
        drop(b);
        assert!(!registry.close(2));
        assert_eq!(registry.len(), 1);
    }
}
