//! `Routes`: which queues a topic goes to. Literal bindings (no `*` or `>`, nearly
//! every binding in practice) are found with one hash lookup of the whole topic;
//! wildcard bindings live in the same pattern trie as subscriptions ([`Trie`]),
//! walked only when there are any. So a publish costs one lookup, plus one walk over
//! its topic's tokens when wildcard bindings exist, whatever the number of
//! bindings. (The walk split every topic into tokens and hashed each one: ~6 % of
//! the broker's samples in the `queue` benchmark, for one literal binding.)

use std::sync::Arc;

// Seeded per process; keys are binding patterns and queue addresses.
use foldhash::{HashMap, HashSet};
use smallvec::SmallVec;

use tidings_protocol::Pattern;

use crate::queue::durable::Queue;
use crate::router::Trie;

/// The binding index, read on every publish. Built once at start and then changed
/// one queue at a time ([`Routes::rebind`]): rebuilt from every queue at each
/// change, declaring 10,000 queues cost 10,000 × 10,000 patterns parsed and
/// indexed (~0.5 s of CPU for the first thousand alone).
#[derive(Default)]
pub(crate) struct Routes {
    /// Literal binding -> the queues bound to it.
    exact: HashMap<Box<str>, Vec<Arc<Queue>>>,
    /// Wildcard bindings.
    wild: Trie<Arc<Queue>>,
}

impl Routes {
    /// Indexes every binding of `queues`. Patterns were validated when bound.
    pub fn build<'a>(queues: impl Iterator<Item = &'a Arc<Queue>>) -> Self {
        let mut routes = Routes::default();
        for q in queues {
            routes.rebind(q, &[], &q.bindings_now());
        }
        routes
    }

    /// Moves `q` from the bindings `old` (what the index holds for it) to `new`.
    /// Each distinct pattern is indexed once per queue, so a queue bound twice to
    /// one pattern takes the message once, and adding needs no scan of the queues
    /// already bound to it (10,000 queues may share a topic). Removing does scan
    /// them, once per pattern removed: deleting N queues that share one topic
    /// costs N²/2 pointer comparisons, rare enough to leave.
    pub fn rebind(&mut self, q: &Arc<Queue>, old: &[String], new: &[String]) {
        let old: HashSet<&str> = old.iter().map(String::as_str).collect();
        let new: HashSet<&str> = new.iter().map(String::as_str).collect();
        for gone in old.difference(&new) {
            self.unbind(q, gone);
        }
        for added in new.difference(&old) {
            self.bind(q, added);
        }
    }

    fn bind(&mut self, q: &Arc<Queue>, binding: &str) {
        let Ok(pattern) = Pattern::new(binding) else {
            return;
        };
        if pattern.is_literal() {
            let bound = self.exact.entry(pattern.as_str().into()).or_default();
            bound.push(q.clone());
        } else {
            self.wild.insert(&pattern, q.clone());
        }
    }

    fn unbind(&mut self, q: &Arc<Queue>, binding: &str) {
        let Ok(pattern) = Pattern::new(binding) else {
            return;
        };
        if pattern.is_literal() {
            if let Some(bound) = self.exact.get_mut(pattern.as_str()) {
                bound.retain(|other| !Arc::ptr_eq(other, q));
                if bound.is_empty() {
                    self.exact.remove(pattern.as_str());
                }
            }
        } else {
            self.wild.remove(&pattern, |other| Arc::ptr_eq(other, q));
        }
    }

    /// How many (queue, binding) pairs are indexed: each distinct binding of each
    /// queue once.
    pub fn len(&self) -> usize {
        self.exact.values().map(Vec::len).sum::<usize>() + self.wild.len()
    }

    /// No queue has a binding.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wild.is_empty()
    }

    /// Calls `f` once for every queue with a binding matching `topic`.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&Arc<Queue>)) {
        let exact = self.exact.get(topic).map_or(&[][..], Vec::as_slice);
        exact.iter().for_each(&mut f);
        if self.wild.is_empty() {
            return;
        }
        // A queue bound to several matching patterns takes the message once.
        let mut seen = Seen::default();
        exact.iter().for_each(|q| {
            seen.first_time(q);
        });
        self.wild.for_each_match(topic, |q| {
            if seen.first_time(q) {
                f(q);
            }
        });
    }
}

/// The queues a publish has reached: a short list on the stack, then a set, so
/// that a wildcard matching thousands of queues costs a hash per queue, not a scan
/// of the list, and the usual few cost no allocation.
#[derive(Default)]
struct Seen {
    few: SmallVec<[*const Queue; Seen::FEW]>,
    many: Option<HashSet<*const Queue>>,
}

impl Seen {
    /// Beyond this many the list moves into the set.
    const FEW: usize = 16;

    /// Records `q`; false if it was recorded before.
    fn first_time(&mut self, q: &Arc<Queue>) -> bool {
        let ptr = Arc::as_ptr(q);
        if let Some(many) = &mut self.many {
            return many.insert(ptr);
        }
        if self.few.contains(&ptr) {
            return false;
        }
        if self.few.len() < Self::FEW {
            self.few.push(ptr);
            return true;
        }
        let mut many: HashSet<*const Queue> = self.few.drain(..).collect();
        many.insert(ptr);
        self.many = Some(many);
        true
    }
}
