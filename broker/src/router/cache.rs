//! `RouteCache`: recently published topics and their routes, so the hot path skips
//! the trie walk. Entries are invalidated when a subscription that matches them
//! comes or goes.

use std::collections::HashMap;
use std::sync::Arc;

use tidings_protocol::Pattern;

use super::Route;

/// Most topics cached, which bounds the cache's memory whatever topics clients
/// invent.
pub const CACHE_CAPACITY: usize = 16 * 1024;

/// Misses a full cache lets by, keeping what it holds, before it starts over. More
/// topics cycling than the cache holds never fit: had every miss inserted, and every
/// `CACHE_CAPACITY` of them dropped the lot, each miss would pay for an entry made
/// and dropped on top of the trie walk (`scale topics`, 100,000 topics: the route
/// cache's churn was ~15 % of the broker's samples). A working set that moved gets in
/// after at most this many misses.
const MISSES_BEFORE_RESTART: usize = 4 * CACHE_CAPACITY;

/// Topic -> route, bounded.
#[derive(Debug, Default)]
pub(crate) struct RouteCache {
    map: HashMap<Box<str>, Arc<Route>>,
    /// Misses since the cache was last found full.
    misses_while_full: usize,
}

impl RouteCache {
    pub(crate) fn get(&self, topic: &str) -> Option<Arc<Route>> {
        self.map.get(topic).cloned()
    }

    /// Caches the route of a topic that missed, unless the cache is full (see
    /// [`MISSES_BEFORE_RESTART`]).
    pub(crate) fn insert(&mut self, topic: &str, route: Arc<Route>) {
        if self.map.len() < CACHE_CAPACITY {
            self.misses_while_full = 0;
        } else {
            self.misses_while_full += 1;
            if self.misses_while_full < MISSES_BEFORE_RESTART {
                return;
            }
            self.map.clear();
            self.misses_while_full = 0;
        }
        self.map.insert(topic.into(), route);
    }

    /// Drops the routes a change to `pattern`'s subscriptions affects.
    pub(crate) fn invalidate(&mut self, pattern: &Pattern) {
        if pattern.is_literal() {
            self.map.remove(pattern.as_str());
        } else {
            self.map.retain(|topic, _| !pattern.matches(topic));
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidation_is_selective_and_size_bounded() {
        let mut cache = RouteCache::default();
        let route = Arc::new(Route::default());
        cache.insert("a.b", route.clone());
        cache.insert("a.c", route.clone());
        cache.insert("x.y", route.clone());
        cache.invalidate(&Pattern::new("a.*").unwrap());
        assert!(cache.get("a.b").is_none() && cache.get("a.c").is_none());
        assert!(cache.get("x.y").is_some());
        cache.invalidate(&Pattern::new("x.y").unwrap());
        assert_eq!(cache.len(), 0);
        for i in 0..CACHE_CAPACITY + 10 {
            cache.insert(&format!("t.{i}"), route.clone());
        }
        assert!(cache.len() <= CACHE_CAPACITY);
    }

    #[test]
    fn a_full_cache_keeps_what_it_holds_until_it_has_missed_enough_to_start_over() {
        let mut cache = RouteCache::default();
        let route = Arc::new(Route::default());
        for i in 0..CACHE_CAPACITY {
            cache.insert(&format!("t.{i}"), route.clone());
        }
        assert_eq!(cache.len(), CACHE_CAPACITY);
        // Topics that do not fit are routed uncached; the cached ones stay hits.
        for i in 0..MISSES_BEFORE_RESTART - 1 {
            cache.insert(&format!("u.{i}"), route.clone());
        }
        assert!(cache.get("t.0").is_some() && cache.get("u.0").is_none());
        assert_eq!(cache.len(), CACHE_CAPACITY);
        // A working set that moved gets in: the next miss starts the cache over.
        cache.insert("v.0", route.clone());
        assert!(cache.get("v.0").is_some() && cache.get("t.0").is_none());
        assert_eq!(cache.len(), 1);
        // Room again (an invalidation, a restart): misses are cached at once.
        cache.insert("v.1", route.clone());
        assert!(cache.get("v.1").is_some());
    }
}
