//! `RouteMemo`: what one publisher remembers between its publishes. Its last topic
//! and route, reused without a lock or a hash while no subscription changed; and how
//! well the shared route cache has been serving it, so that a publisher whose topics
//! never repeat soon enough stops paying for the cache.
//!
//! A publisher cycling over more topics than the cache holds misses on every
//! publish, and each miss pays for the cache on top of the trie walk: its read lock,
//! a SipHash of the topic, a probe, then its write lock to count (or insert) the
//! miss, and the inserts and restarts that follow (`scale topics`, 100,000 topics:
//! `Router::route_memo` 13 % of the broker's samples, against 2 % with one topic).
//! So each memo counts its own lookups. Once at most one in [`RARE_HITS`] of a
//! window of [`WINDOW`] lookups hit, the memo routes its next [`BYPASS`] topics
//! through the trie alone, neither looking them up nor inserting them, and then
//! tries the cache again. Skipping the cache never changes a route (the trie is the
//! truth; the cache only remembers it), and it keeps such a publisher from churning
//! the entries every other publisher's hot topics need. The counts are the memo's
//! own, so publishers share no counter.

use std::sync::Arc;

use tidings_protocol::Text;

use super::Route;

/// Lookups a memo judges the cache's use by.
pub(crate) const WINDOW: u16 = 256;
/// The cache is bypassed when no more than `WINDOW / RARE_HITS` of a window hit.
pub(crate) const RARE_HITS: u16 = 16;
/// Publishes routed past the cache before it is tried again: 16 windows, so a
/// publisher that keeps missing does the cache's work on about 6 % of its
/// publishes, and one whose topics start to repeat is back on the cache within
/// this many.
pub(crate) const BYPASS: u32 = 16 * WINDOW as u32;

/// One publisher's last topic and its route, reused without a lock or a hash while
/// no subscription changed: a connection publishing to one topic over and over
/// (the common case) routes each message with one atomic load and one compare.
#[derive(Debug, Default)]
pub struct RouteMemo {
    /// The last topic, the router's generation it was routed at, and its route.
    pub(super) last: Option<(Text, u64, Arc<Route>)>,
    pub(super) cache_use: CacheUse,
}

impl RouteMemo {
    /// True when `topic` is the last topic routed through this memo, which
    /// [`Router::route_memo`](super::Router::route_memo) is only given once it is
    /// valid.
    pub fn is_last(&self, topic: &str) -> bool {
        self.last
            .as_ref()
            .is_some_and(|(t, _, _)| t.as_str() == topic)
    }
}

/// How the route cache has been serving one publisher (see the module docs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct CacheUse {
    /// Lookups in the current window, and how many of them hit.
    looked: u16,
    hits: u16,
    /// Publishes left to route past the cache.
    bypass_left: u32,
}

impl CacheUse {
    /// Whether the next route should be looked up in the cache (and inserted on a
    /// miss); counts down a bypass.
    pub(crate) fn wants_cache(&mut self) -> bool {
        if self.bypass_left == 0 {
            return true;
        }
        self.bypass_left -= 1;
        false
    }

    /// Records a lookup's outcome; at the end of a window, starts a bypass if hits
    /// were rare.
    pub(crate) fn looked_up(&mut self, hit: bool) {
        self.looked += 1;
        self.hits += u16::from(hit);
        if self.looked == WINDOW {
            if self.hits <= WINDOW / RARE_HITS {
                self.bypass_left = BYPASS;
            }
            self.looked = 0;
            self.hits = 0;
        }
    }

    #[cfg(test)]
    pub(crate) fn bypassing(&self) -> bool {
        self.bypass_left > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `n` publishes whose lookups hit when `hit(i)`; returns how many of them
    /// looked the cache up.
    fn run(use_: &mut CacheUse, n: u32, hit: impl Fn(u32) -> bool) -> u32 {
        let mut looked = 0;
        for i in 0..n {
            if use_.wants_cache() {
                looked += 1;
                use_.looked_up(hit(i));
            }
        }
        looked
    }

    #[test]
    fn a_publisher_that_keeps_missing_bypasses_the_cache_and_tries_it_again() {
        let mut use_ = CacheUse::default();
        // The first window looks everything up, then the bypass starts.
        assert_eq!(
            run(&mut use_, u32::from(WINDOW), |_| false),
            u32::from(WINDOW)
        );
        assert!(use_.bypassing());
        assert_eq!(run(&mut use_, BYPASS, |_| false), 0, "nothing looked up");
        assert!(!use_.bypassing());
        // Over a long run of misses, one window of lookups per bypass.
        let n = 10 * (BYPASS + u32::from(WINDOW));
        assert_eq!(run(&mut use_, n, |_| false), 10 * u32::from(WINDOW));
    }

    #[test]
    fn hits_keep_a_publisher_on_the_cache() {
        let mut use_ = CacheUse::default();
        // One hit in eight is enough (the bound is one in sixteen).
        assert_eq!(run(&mut use_, 100_000, |i| i % 8 == 0), 100_000);
        assert!(!use_.bypassing());
        // Exactly at the bound bypasses; one more hit does not.
        let bound = u32::from(WINDOW / RARE_HITS);
        let mut at_bound = CacheUse::default();
        run(&mut at_bound, u32::from(WINDOW), |i| i < bound);
        assert!(at_bound.bypassing());
        let mut above = CacheUse::default();
        run(&mut above, u32::from(WINDOW), |i| i <= bound);
        assert!(!above.bypassing());
    }

    #[test]
    fn a_publisher_whose_topics_start_to_repeat_is_back_on_the_cache_after_one_bypass() {
        let mut use_ = CacheUse::default();
        run(&mut use_, u32::from(WINDOW), |_| false);
        assert!(use_.bypassing());
        // From now on every lookup would hit: within one bypass it looks again and
        // stays.
        run(&mut use_, BYPASS, |_| true);
        assert_eq!(run(&mut use_, 10_000, |_| true), 10_000);
    }
}
