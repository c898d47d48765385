//! `Router`: the shared table of subscriptions, matched against published topics
//! through a token trie and a topic -> route cache.
//!
//! Publishing asks the router for the [`Route`] of a topic (a cache hit is one hash
//! lookup under a read lock) and then [`Route::deliver`]s the message, cloning only
//! reference-counted handles: the payload `Bytes` is shared by every copy.

mod cache;
mod memo;
mod trie;

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::BytesMut;
use thiserror::Error;
use tidings_protocol::{Message, Pattern, Text};

pub use cache::CACHE_CAPACITY;
pub use memo::RouteMemo;
pub use trie::Trie;

use crate::outbox::{ConnId, Outbox};
use crate::stats::Stats;
use cache::RouteCache;

/// Why a subscription change was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RouterError {
    /// The connection already has a subscription with this id.
    #[error("subscription id {sid} is already in use on this connection")]
    DuplicateSubscription {
        /// The id.
        sid: u32,
    },
    /// The connection has no subscription with this id.
    #[error("no subscription with id {sid} on this connection")]
    UnknownSubscription {
        /// The id.
        sid: u32,
    },
}

/// One subscription as the router delivers to it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The subscription id, unique on its connection.
    pub sid: u32,
    /// Where its messages go.
    pub outbox: Outbox,
}

impl Target {
    /// Queues the encoded MESSAGE with this subscription's id, in the form its
    /// session's protocol version reads.
    fn send(&self, encoded: &Encoded<'_>) -> bool {
        let bytes = match encoded.v1_0 {
            Some(v1_0) if self.outbox.protocol_minor() == 0 => v1_0,
            _ => encoded.current,
        };
        self.outbox.send_message(bytes, self.sid).is_ok()
    }
}

/// A MESSAGE encoded once for every subscriber.
struct Encoded<'a> {
    /// The 1.1 form.
    current: &'a [u8],
    /// The 1.0 form, without the fields 1.1 added, when it differs (the message
    /// has an id).
    v1_0: Option<&'a [u8]>,
}

/// The members of one group (same pattern, same group name) as of the route's
/// computation, and the group's shared round-robin cursor.
#[derive(Debug)]
struct GroupRoute {
    members: Box<[Target]>,
    cursor: Arc<AtomicUsize>,
}

/// Everything a message published to one topic goes to: every plain subscription,
/// and one member of each group. Cached per topic and shared by publishers.
#[derive(Debug, Default)]
pub struct Route {
    subscribers: Vec<Target>,
    groups: Vec<GroupRoute>,
}

impl Route {
    /// True when no subscription matches.
    pub fn is_empty(&self) -> bool {
        self.subscribers.is_empty() && self.groups.is_empty()
    }

    /// How many copies a message gets: one per plain subscription, one per group.
    pub fn fan_out(&self) -> usize {
        self.subscribers.len() + self.groups.len()
    }

    /// The first destination, other than connection `except`, whose outbox is above
    /// its high-water mark: the publisher should [`Outbox::stall`] for it. Group
    /// members count too, since any of them may have taken the message.
    pub fn pressured(&self, except: ConnId) -> Option<&Outbox> {
        let members = self.groups.iter().flat_map(|g| g.members.iter());
        self.subscribers
            .iter()
            .chain(members)
            .map(|t| &t.outbox)
            .find(|o| o.conn_id() != except && o.is_pressured())
    }

    /// Queues `message` (its `sid` is replaced per subscription) to every
    /// destination and returns how many accepted it. Within a group the members take
    /// turns; a member whose connection is closing is skipped for the next one.
    /// Never waits: a slow subscriber is cut off by its outbox, not waited for.
    pub fn deliver(&self, message: &Message) -> usize {
        self.deliver_with(message, &mut BytesMut::new())
    }

    /// [`Route::deliver`], encoding the message once into `scratch` (cleared
    /// first; reuse it across calls to avoid an allocation per message) and
    /// copying those bytes to each destination.
    pub fn deliver_with(&self, message: &Message, scratch: &mut BytesMut) -> usize {
        scratch.clear();
        // The subscribers' `sid` is patched into each copy; the one encoded is 0.
        if let Err(err) = message.encode_frame(scratch, true) {
            // Messages are built from decoded PUBLISH frames within limits, so
            // this is a broker bug.
            tracing::error!(error = %err, "cannot encode MESSAGE");
            return 0;
        }
        // Only a message with an id reads differently in 1.0; it gets its second
        // form here, once, when some subscriber may need it.
        let mut v1_0 = BytesMut::new();
        if message.message_id.is_some() && message.encode_frame(&mut v1_0, false).is_err() {
            return 0;
        }
        let message = Encoded {
            current: scratch,
            v1_0: (!v1_0.is_empty()).then_some(&v1_0[..]),
        };
        let message = &message;
        let mut sent = 0;
        for target in &self.subscribers {
            sent += usize::from(target.send(message));
        }
        for group in &self.groups {
            let n = group.members.len();
            let start = group.cursor.fetch_add(1, Ordering::Relaxed);
            for i in 0..n {
                if group.members[(start + i) % n].send(message) {
                    sent += 1;
                    break;
                }
            }
        }
        sent
    }
}

#[derive(Debug)]
enum Entry {
    Single(Target),
    Group {
        name: Box<str>,
        members: Vec<Target>,
        cursor: Arc<AtomicUsize>,
    },
}

#[derive(Debug)]
struct SubKey {
    pattern: Pattern,
    group: Option<Box<str>>,
}

#[derive(Debug, Default)]
struct State {
    trie: Trie<Entry>,
    by_conn: HashMap<ConnId, HashMap<u32, SubKey>>,
    count: usize,
}

#[derive(Debug)]
struct Inner {
    // Lock order: `state` before `cache`, always.
    state: RwLock<State>,
    cache: RwLock<RouteCache>,
    /// Bumped (after the cache is invalidated) by every subscription change, so a
    /// [`RouteMemo`] knows when its route may be stale without taking a lock.
    generation: AtomicU64,
    stats: Arc<Stats>,
}

/// The subscription table: a cloneable handle shared by every connection.
///
/// ```
/// use std::sync::Arc;
/// use tidings_broker::outbox::{ConnId, Outbox};
/// use tidings_broker::router::Router;
/// use tidings_broker::Stats;
/// use tidings_protocol::{Message, Pattern};
///
/// let stats = Arc::new(Stats::default());
/// let router = Router::new(stats.clone());
/// let (outbox, _rx) = Outbox::channel(ConnId(1), 1 << 20, stats);
/// router.subscribe(&outbox, 1, Pattern::new("orders.*").unwrap(), None).unwrap();
/// let route = router.route("orders.created");
/// assert_eq!(route.fan_out(), 1);
/// assert_eq!(route.deliver(&Message { topic: "orders.created".into(), ..Message::default() }), 1);
/// assert!(router.route("payments.created").is_empty());
/// ```
#[derive(Debug, Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl Default for Router {
    fn default() -> Self {
        Router::new(Arc::new(Stats::default()))
    }
}

impl Router {
    /// An empty router that keeps the `subscriptions` gauge of `stats`.
    pub fn new(stats: Arc<Stats>) -> Router {
        Router {
            inner: Arc::new(Inner {
                state: RwLock::new(State::default()),
                cache: RwLock::new(RouteCache::default()),
                generation: AtomicU64::new(0),
                stats,
            }),
        }
    }

    // A panic while a lock is held cannot leave the table half-updated in a way that
    // breaks the next reader (every update is a single push or remove), so poisoning
    // is ignored rather than spreading the panic to every connection.
    fn state(&self) -> RwLockReadGuard<'_, State> {
        self.inner.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn state_mut(&self) -> RwLockWriteGuard<'_, State> {
        self.inner.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn cache_mut(&self) -> RwLockWriteGuard<'_, RouteCache> {
        self.inner.cache.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes `sid` of `outbox`'s connection to `pattern`, optionally in
    /// `group`.
    pub fn subscribe(
        &self,
        outbox: &Outbox,
        sid: u32,
        pattern: Pattern,
        group: Option<&str>,
    ) -> Result<(), RouterError> {
        let mut state = self.state_mut();
        let State {
            trie,
            by_conn,
            count,
        } = &mut *state;
        let subs = by_conn.entry(outbox.conn_id()).or_default();
        let MapEntry::Vacant(slot) = subs.entry(sid) else {
            return Err(RouterError::DuplicateSubscription { sid });
        };
        let target = Target {
            sid,
            outbox: outbox.clone(),
        };
        match group {
            None => trie.insert(&pattern, Entry::Single(target)),
            Some(name) => {
                let joined = trie.update(&pattern, |entries| {
                    for entry in entries.iter_mut() {
                        if let Entry::Group {
                            name: n, members, ..
                        } = entry
                        {
                            if &**n == name {
                                members.push(target.clone());
                                return true;
                            }
                        }
                    }
                    false
                });
                if joined != Some(true) {
                    trie.insert(
                        &pattern,
                        Entry::Group {
                            name: name.into(),
                            members: vec![target],
                            cursor: Arc::new(AtomicUsize::new(0)),
                        },
                    );
                }
            }
        }
        self.cache_mut().invalidate(&pattern);
        self.inner.generation.fetch_add(1, Ordering::Release);
        slot.insert(SubKey {
            pattern,
            group: group.map(Into::into),
        });
        *count += 1;
        self.inner.stats.subscriptions_changed(1);
        Ok(())
    }

    /// Ends subscription `sid` of connection `conn`.
    pub fn unsubscribe(&self, conn: ConnId, sid: u32) -> Result<(), RouterError> {
        let mut state = self.state_mut();
        let key = state
            .by_conn
            .get_mut(&conn)
            .and_then(|subs| subs.remove(&sid))
            .ok_or(RouterError::UnknownSubscription { sid })?;
        if state.by_conn.get(&conn).is_some_and(HashMap::is_empty) {
            state.by_conn.remove(&conn);
        }
        self.remove_entry(&mut state, conn, sid, &key);
        Ok(())
    }

    /// Ends every subscription of `conn` (it disconnected); returns how many.
    pub fn remove_connection(&self, conn: ConnId) -> usize {
        let mut state = self.state_mut();
        let Some(subs) = state.by_conn.remove(&conn) else {
            return 0;
        };
        for (sid, key) in &subs {
            self.remove_entry(&mut state, conn, *sid, key);
        }
        subs.len()
    }

    fn remove_entry(&self, state: &mut State, conn: ConnId, sid: u32, key: &SubKey) {
        let is_target = |t: &Target| t.sid == sid && t.outbox.conn_id() == conn;
        match &key.group {
            None => {
                state.trie.remove(
                    &key.pattern,
                    |e| matches!(e, Entry::Single(t) if is_target(t)),
                );
            }
            Some(group) => {
                state.trie.update(&key.pattern, |entries| {
                    let Some(i) = entries
                        .iter()
                        .position(|e| matches!(e, Entry::Group { name, .. } if name == group))
                    else {
                        return;
                    };
                    if let Entry::Group { members, .. } = &mut entries[i] {
                        members.retain(|t| !is_target(t));
                        if members.is_empty() {
                            entries.swap_remove(i);
                        }
                    }
                });
            }
        }
        self.cache_mut().invalidate(&key.pattern);
        self.inner.generation.fetch_add(1, Ordering::Release);
        state.count -= 1;
        self.inner.stats.subscriptions_changed(-1);
    }

    /// [`Router::route`] through a publisher's memo: the memo's route when `topic`
    /// is its last one and no subscription changed since, else a fresh lookup that
    /// the memo keeps. `topic` must be valid.
    pub fn route_memo(&self, topic: &Text, memo: &mut RouteMemo) -> Arc<Route> {
        // Loaded before the lookup: a change that lands during it bumps past this
        // value, so the memo is never trusted beyond what it saw.
        let generation = self.inner.generation.load(Ordering::Acquire);
        if let Some((t, g, route)) = &memo.last {
            if *g == generation && t.as_str() == topic.as_str() {
                return route.clone();
            }
        }
        // The memo's last route, unless the cache or a stalled publish still holds
        // it, is refilled in place: a topic that misses a full cache allocates no new
        // route (a group's member list is still copied).
        let reuse = memo.last.take().map(|(_, _, route)| route);
        // Past the cache while it has been missing for this publisher (memo.rs).
        let use_cache = memo.cache_use.wants_cache();
        let (route, hit) = self.route_reusing(topic, reuse, use_cache);
        if use_cache {
            memo.cache_use.looked_up(hit);
        }
        memo.last = Some((topic.clone(), generation, route.clone()));
        route
    }

    /// The destinations of a message published to `topic` (a valid topic).
    pub fn route(&self, topic: &str) -> Arc<Route> {
        self.route_reusing(topic, None, true).0
    }

    /// [`Router::route`], computing a route that missed the cache into `reuse` if
    /// nothing else holds it; with `use_cache` false, from the trie alone, neither
    /// looked up in the cache nor inserted. True with the route if it was a hit.
    fn route_reusing(
        &self,
        topic: &str,
        reuse: Option<Arc<Route>>,
        use_cache: bool,
    ) -> (Arc<Route>, bool) {
        if use_cache
            && let Some(route) = self
                .inner
                .cache
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(topic)
        {
            return (route, true);
        }
        let state = self.state();
        let fill = |route: &mut Route| {
            route.subscribers.clear();
            route.groups.clear();
            state.trie.for_each_match(topic, |entry| match entry {
                Entry::Single(t) => route.subscribers.push(t.clone()),
                Entry::Group {
                    members, cursor, ..
                } => route.groups.push(GroupRoute {
                    members: members.clone().into_boxed_slice(),
                    cursor: cursor.clone(),
                }),
            });
            // A route refilled after a topic with many subscribers does not keep
            // their room (it may go into the cache).
            if route.subscribers.capacity() > 2 * route.subscribers.len() + 8 {
                route.subscribers.shrink_to_fit();
            }
            if route.groups.capacity() > 2 * route.groups.len() + 8 {
                route.groups.shrink_to_fit();
            }
        };
        let mut route = reuse.unwrap_or_default();
        match Arc::get_mut(&mut route) {
            Some(unshared) => fill(unshared),
            None => {
                let mut fresh = Route::default();
                fill(&mut fresh);
                route = Arc::new(fresh);
            }
        }
        // Still under the state lock, so no subscription change can slip in between
        // computing this route and caching it.
        if use_cache {
            self.cache_mut().insert(topic, route.clone());
        }
        (route, false)
    }

    /// Number of subscriptions (group members count one each).
    pub fn len(&self) -> usize {
        self.state().count
    }

    /// True when there are no subscriptions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::OutboxReceiver;

    fn outbox(id: u64) -> (Outbox, OutboxReceiver) {
        Outbox::channel(ConnId(id), 1 << 20, Arc::new(Stats::default()))
    }

    fn msg(topic: &str) -> Message {
        Message {
            topic: topic.into(),
            ..Message::default()
        }
    }

    #[test]
    fn duplicate_and_unknown_ids() {
        let router = Router::default();
        let (a, _ra) = outbox(1);
        let (b, _rb) = outbox(2);
        let p = Pattern::new("x.>").unwrap();
        router.subscribe(&a, 1, p.clone(), None).unwrap();
        assert_eq!(
            router.subscribe(&a, 1, p.clone(), None),
            Err(RouterError::DuplicateSubscription { sid: 1 })
        );
        // The same id on another connection is a different subscription.
        router.subscribe(&b, 1, p.clone(), None).unwrap();
        assert_eq!(router.len(), 2);
        assert_eq!(
            router.unsubscribe(ConnId(1), 9),
            Err(RouterError::UnknownSubscription { sid: 9 })
        );
        router.unsubscribe(ConnId(1), 1).unwrap();
        assert_eq!(router.route("x.y").fan_out(), 1);
        assert_eq!(router.remove_connection(ConnId(2)), 1);
        assert!(router.route("x.y").is_empty());
        assert!(router.is_empty());
    }

    #[test]
    fn cache_sees_new_and_removed_subscriptions() {
        let router = Router::default();
        let (a, _ra) = outbox(1);
        assert!(router.route("a.b").is_empty());
        router
            .subscribe(&a, 1, Pattern::new("a.*").unwrap(), None)
            .unwrap();
        assert_eq!(router.route("a.b").fan_out(), 1);
        router
            .subscribe(&a, 2, Pattern::new("a.b").unwrap(), None)
            .unwrap();
        assert_eq!(router.route("a.b").fan_out(), 2);
        router.unsubscribe(ConnId(1), 1).unwrap();
        assert_eq!(router.route("a.b").fan_out(), 1);
    }

    #[test]
    fn memo_sees_subscription_changes() {
        let router = Router::default();
        let (a, _ra) = outbox(1);
        let mut memo = RouteMemo::default();
        let topic = Text::from("m.x");
        assert!(router.route_memo(&topic, &mut memo).is_empty());
        assert!(memo.is_last("m.x") && !memo.is_last("m.y"));
        router
            .subscribe(&a, 1, Pattern::new("m.>").unwrap(), None)
            .unwrap();
        assert_eq!(router.route_memo(&topic, &mut memo).fan_out(), 1);
        assert_eq!(router.route_memo(&topic, &mut memo).fan_out(), 1);
        router.unsubscribe(ConnId(1), 1).unwrap();
        assert!(router.route_memo(&topic, &mut memo).is_empty());
    }

    /// A publisher whose topics never repeat stops using the cache after one window
    /// (memo.rs); its routes stay right while it routes past the cache, and the
    /// cache goes on serving other publishers.
    #[test]
    fn a_memo_that_keeps_missing_routes_past_the_cache_and_stays_right() {
        fn publish(router: &Router, memo: &mut RouteMemo, n: &mut u32) -> usize {
            *n += 1;
            router
                .route_memo(&Text::from(format!("c.t{n}")), memo)
                .fan_out()
        }
        let cached = |router: &Router| router.inner.cache.read().unwrap().len();
        let router = Router::default();
        let (a, _ra) = outbox(1);
        router
            .subscribe(&a, 1, Pattern::new("c.*").unwrap(), None)
            .unwrap();
        let (mut memo, mut n) = (RouteMemo::default(), 0);
        for _ in 0..memo::WINDOW {
            assert_eq!(publish(&router, &mut memo, &mut n), 1);
        }
        assert_eq!(
            cached(&router),
            usize::from(memo::WINDOW),
            "one window cached"
        );
        assert!(memo.cache_use.bypassing());
        for _ in 0..100 {
            assert_eq!(publish(&router, &mut memo, &mut n), 1);
        }
        assert_eq!(cached(&router), usize::from(memo::WINDOW), "no more cached");
        // Subscriptions that come and go during the bypass are seen at once.
        router
            .subscribe(&a, 2, Pattern::new("c.>").unwrap(), None)
            .unwrap();
        for _ in 0..100 {
            assert_eq!(publish(&router, &mut memo, &mut n), 2);
        }
        router.unsubscribe(ConnId(1), 1).unwrap();
        for _ in 0..100 {
            assert_eq!(publish(&router, &mut memo, &mut n), 1);
        }
        assert_eq!(cached(&router), 0, "invalidated, and nothing cached since");
        // Another publisher's topic is cached as before.
        let mut other = RouteMemo::default();
        assert_eq!(
            router
                .route_memo(&Text::from("c.hot"), &mut other)
                .fan_out(),
            1
        );
        assert_eq!(cached(&router), 1);
        // Once the bypass is over, the first publisher looks the cache up again.
        while memo.cache_use.bypassing() {
            publish(&router, &mut memo, &mut n);
        }
        publish(&router, &mut memo, &mut n);
        assert_eq!(cached(&router), 2);
    }

    #[test]
    fn a_memo_s_route_refilled_in_place_is_its_new_topic_s_and_never_one_still_held() {
        let router = Router::default();
        let (a, _ra) = outbox(1);
        let (b, _rb) = outbox(2);
        router
            .subscribe(&a, 1, Pattern::new("r.*").unwrap(), None)
            .unwrap();
        router
            .subscribe(&b, 2, Pattern::new("r.x").unwrap(), None)
            .unwrap();
        // A full cache keeps what it holds: the topics below are routed uncached.
        for i in 0..CACHE_CAPACITY {
            router.route(&format!("fill.{i}"));
        }
        let mut memo = RouteMemo::default();
        let (x, y) = (Text::from("r.x"), Text::from("r.y"));
        let first = router.route_memo(&x, &mut memo);
        assert_eq!(first.fan_out(), 2);
        // `first` is still held: r.y gets a route of its own.
        let held = router.route_memo(&y, &mut memo);
        assert!(!Arc::ptr_eq(&first, &held));
        assert_eq!((first.fan_out(), held.fan_out()), (2, 1));
        let held_at = Arc::as_ptr(&held);
        drop((first, held));
        // Nothing but the memo holds r.y's route now: r.x's is computed into it.
        let again = router.route_memo(&x, &mut memo);
        assert_eq!(Arc::as_ptr(&again), held_at);
        assert_eq!(again.fan_out(), 2);
        assert_eq!(again.deliver(&msg("r.x")), 2);
        drop(again);
        let last = router.route_memo(&y, &mut memo);
        assert_eq!(last.fan_out(), 1);
        assert!(last.pressured(ConnId(0)).is_none());
    }

    #[test]
    fn a_refilled_route_does_not_keep_the_room_of_a_bigger_one() {
        let router = Router::default();
        let boxes: Vec<_> = (1..=40).map(outbox).collect();
        for (sid, (o, _)) in (1..).zip(&boxes) {
            router
                .subscribe(o, sid, Pattern::new("c.many").unwrap(), None)
                .unwrap();
        }
        router
            .subscribe(&boxes[0].0, 99, Pattern::new("c.one").unwrap(), None)
            .unwrap();
        for i in 0..CACHE_CAPACITY {
            router.route(&format!("fill.{i}"));
        }
        let mut memo = RouteMemo::default();
        let many = router.route_memo(&Text::from("c.many"), &mut memo);
        assert_eq!(many.fan_out(), 40);
        let at = Arc::as_ptr(&many);
        drop(many);
        let one = router.route_memo(&Text::from("c.one"), &mut memo);
        assert_eq!(Arc::as_ptr(&one), at, "refilled in place");
        assert_eq!(one.fan_out(), 1);
        assert!(
            one.subscribers.capacity() <= 10,
            "{}",
            one.subscribers.capacity()
        );
    }

    #[test]
    fn group_members_take_turns() {
        let router = Router::default();
        let boxes: Vec<_> = (1..=3).map(outbox).collect();
        let p = Pattern::new("jobs.*").unwrap();
        for (o, _) in &boxes {
            router.subscribe(o, 7, p.clone(), Some("workers")).unwrap();
        }
        // A different group on the same pattern gets its own copy.
        router
            .subscribe(&boxes[0].0, 8, p.clone(), Some("audit"))
            .unwrap();
        let route = router.route("jobs.x");
        assert_eq!(route.fan_out(), 2);
        for _ in 0..30 {
            assert_eq!(route.deliver(&msg("jobs.x")), 2);
        }
        let pending: Vec<usize> = boxes.iter().map(|(o, _)| o.pending_bytes()).collect();
        // 30 for workers spread 10/10/10, plus 30 audit copies on the first.
        assert_eq!(pending[1], pending[2]);
        assert_eq!(pending[0], pending[1] * 4);
        router.remove_connection(ConnId(2));
        assert_eq!(router.route("jobs.x").fan_out(), 2);
        router.remove_connection(ConnId(1));
        router.remove_connection(ConnId(3));
        assert!(router.route("jobs.x").is_empty());
    }
}
