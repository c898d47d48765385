//! `RouteCache`: recently published topics and their routes, so the hot path skips
//! the trie walk. Entries are invalidated when a subscription that matches them
//! comes or goes.

use std::collections::HashMap;
use std::sync::Arc;

use tidings_protocol::Pattern;

use super::Route;

/// Most topics cached; past this the cache starts over, which bounds its memory
/// whatever topics clients invent.
pub const CACHE_CAPACITY: usize = 16 * 1024;

/// Topic -> route, bounded.
#[derive(Debug, Default)]
pub(crate) struct RouteCache {
    map: HashMap<Box<str>, Arc<Route>>,
}

impl RouteCache {
    pub(crate) fn get(&self, topic: &str) -> Option<Arc<Route>> {
        self.map.get(topic).cloned()
    }

    pub(crate) fn insert(&mut self, topic: &str, route: Arc<Route>) {
        if self.map.len() >= CACHE_CAPACITY {
            self.map.clear();
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
}
