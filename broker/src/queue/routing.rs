//! `Routes`: which queues a topic goes to. Bindings live in the router's token trie,
//! so a publish costs a walk down its topic's tokens however many queues there are
//! (a linear scan of every binding sharing the topic's first token made each
//! publish O(queues): `tidings-bench scale queues`). A first-token set in front
//! keeps a publish that matches no binding at one hash lookup and no allocation.

use std::collections::HashSet;
use std::sync::Arc;

use tidings_protocol::Pattern;

use crate::queue::queue::Queue;
use crate::router::Trie;

/// The binding index. Rebuilt whenever a binding or queue changes (rare), read on
/// every publish.
#[derive(Default)]
pub(crate) struct Routes {
    /// Every binding, to its queue.
    trie: Trie<Arc<Queue>>,
    /// The literal first tokens of the bindings.
    firsts: HashSet<String>,
    /// True when a binding starts with a wildcard (any topic may match).
    wild: bool,
}

impl Routes {
    /// Indexes every binding of `queues`. Patterns were validated when bound.
    pub fn build<'a>(queues: impl Iterator<Item = &'a Arc<Queue>>) -> Self {
        let mut routes = Routes::default();
        for q in queues {
            let bindings = q
                .bindings
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            for b in bindings {
                let Ok(pattern) = Pattern::new(b) else {
                    continue;
                };
                let first = pattern.as_str().split('.').next().unwrap_or("*");
                if first == "*" || first == ">" {
                    routes.wild = true;
                } else {
                    routes.firsts.insert(first.to_owned());
                }
                routes.trie.insert(&pattern, q.clone());
            }
        }
        routes
    }

    /// Calls `f` once for every queue with a binding matching `topic`.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&Arc<Queue>)) {
        let first = topic.split('.').next().unwrap_or(topic);
        if !self.wild && !self.firsts.contains(first) {
            return;
        }
        let mut seen: Option<Vec<*const Queue>> = None;
        self.trie.for_each_match(topic, |q| {
            // A queue bound twice to matching patterns takes the message once.
            let seen = seen.get_or_insert_with(Vec::new);
            let ptr = Arc::as_ptr(q);
            if seen.contains(&ptr) {
                return;
            }
            seen.push(ptr);
            f(q);
        });
    }
}
