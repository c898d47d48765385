//! `RouteCache`: recently published topics and their routes, so the hot path skips
//! the trie walk. Entries are invalidated when a subscription that matches them
//! comes or goes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tidings_protocol::{Pattern, PatternToken};

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
///
/// The topics cached are also listed by their first token, so that a wildcard
/// subscription whose first token is literal (`orders.*`, nearly all of them)
/// looks only at the topics that start with it. Scanning every cached topic, each
/// wildcard subscribe or unsubscribe cost ~0.6 ms with the cache full, under the
/// lock every publish's lookup takes (`cargo bench -p tidings-bench --bench router
/// -- wildcard_churn`): a thousand clients reconnecting with one wildcard each were
/// a second of stalled publishing.
#[derive(Debug, Default)]
pub(crate) struct RouteCache {
    map: HashMap<Box<str>, Arc<Route>>,
    /// First token -> the cached topics that start with it.
    heads: HashMap<Box<str>, HashSet<Box<str>>>,
    /// Misses since the cache was last found full.
    misses_while_full: usize,
}

/// A topic's first token.
fn head(topic: &str) -> &str {
    topic.split_once('.').map_or(topic, |(first, _)| first)
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
            self.heads.clear();
            self.misses_while_full = 0;
        }
        if self.map.insert(topic.into(), route).is_none() {
            // The head's own string is allocated only the first time it is seen.
            match self.heads.get_mut(head(topic)) {
                Some(topics) => {
                    topics.insert(topic.into());
                }
                None => {
                    self.heads
                        .insert(head(topic).into(), HashSet::from([topic.into()]));
                }
            }
        }
    }

    /// Drops the routes a change to `pattern`'s subscriptions affects: the one
    /// topic of a literal pattern, the topics under a wildcard pattern's first
    /// token, or for a pattern that starts with a wildcard, every cached topic it
    /// matches (a scan of them all, as before).
    pub(crate) fn invalidate(&mut self, pattern: &Pattern) {
        if pattern.is_literal() {
            let topic = pattern.as_str();
            if self.map.remove(topic).is_some()
                && let Some(topics) = self.heads.get_mut(head(topic))
            {
                topics.remove(topic);
                if topics.is_empty() {
                    self.heads.remove(head(topic));
                }
            }
            return;
        }
        let map = &mut self.map;
        let mut drop_matching = |topics: &mut HashSet<Box<str>>| {
            topics.retain(|topic| {
                let hit = pattern.matches(topic);
                if hit {
                    map.remove(topic);
                }
                !hit
            });
        };
        match pattern.tokens().first() {
            Some(PatternToken::Literal(first)) => {
                if let Some(topics) = self.heads.get_mut(first.as_str()) {
                    drop_matching(topics);
                    if topics.is_empty() {
                        self.heads.remove(first.as_str());
                    }
                }
            }
            _ => self.heads.retain(|_, topics| {
                drop_matching(topics);
                !topics.is_empty()
            }),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        debug_assert_eq!(
            self.map.len(),
            self.heads.values().map(HashSet::len).sum::<usize>(),
            "every cached topic is listed under its first token once"
        );
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

    /// Against the rule it replaces (drop every cached topic the pattern matches),
    /// over random topics and patterns: literal, with a literal first token, and
    /// starting with a wildcard.
    #[test]
    fn invalidation_by_first_token_drops_what_a_full_scan_would() {
        let tokens = ["a", "b", "c"];
        let route = Arc::new(Route::default());
        for seed in 0..50u64 {
            let mut rng = crate::storage::SimRng::new(seed);
            let mut pick = |n: usize| usize::try_from(rng.below(n as u64)).unwrap();
            let mut cache = RouteCache::default();
            let mut model: std::collections::BTreeSet<String> = Default::default();
            for step in 0..400 {
                let depth = 1 + pick(3);
                if pick(2) == 0 {
                    let topic: Vec<&str> = (0..depth).map(|_| tokens[pick(3)]).collect();
                    let topic = topic.join(".");
                    cache.insert(&topic, route.clone());
                    model.insert(topic);
                } else {
                    let pattern: Vec<&str> = (0..depth)
                        .map(|i| match pick(5) {
                            0 => "*",
                            1 if i == depth - 1 => ">",
                            _ => tokens[pick(3)],
                        })
                        .collect();
                    let pattern = Pattern::new(pattern.join(".")).unwrap();
                    cache.invalidate(&pattern);
                    model.retain(|t| !pattern.matches(t));
                }
                assert_eq!(cache.len(), model.len(), "seed {seed} step {step}");
                for topic in &model {
                    assert!(
                        cache.get(topic).is_some(),
                        "seed {seed} step {step}: {topic}"
                    );
                }
            }
        }
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
