//! `Routes`: which queues a topic goes to. Bindings live in the same pattern trie
//! as subscriptions ([`Trie`]), so a publish costs one walk over its topic's
//! tokens whatever the number of bindings, and one that matches none allocates
//! nothing.

use std::sync::Arc;

use tidings_protocol::Pattern;

use crate::queue::durable::Queue;
use crate::router::Trie;

/// The binding index. Rebuilt whenever a binding or queue changes (rare), read on
/// every publish.
#[derive(Default)]
pub(crate) struct Routes {
    bindings: Trie<Arc<Queue>>,
}

impl Routes {
    /// Indexes every binding of `queues`. Patterns were validated when bound.
    pub fn build<'a>(queues: impl Iterator<Item = &'a Arc<Queue>>) -> Self {
        let mut bindings = Trie::default();
        for q in queues {
            let patterns = q
                .bindings
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            for b in patterns {
                if let Ok(pattern) = Pattern::new(b) {
                    bindings.insert(&pattern, q.clone());
                }
            }
        }
        Routes { bindings }
    }

    /// Calls `f` once for every queue with a binding matching `topic`.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&Arc<Queue>)) {
        let mut first: Option<*const Queue> = None;
        let mut seen: Vec<*const Queue> = Vec::new();
        self.bindings.for_each_match(topic, |q| {
            // A queue bound twice to matching patterns takes the message once.
            let ptr = Arc::as_ptr(q);
            match first {
                None => first = Some(ptr),
                Some(p) if p == ptr => return,
                Some(_) => {
                    if seen.contains(&ptr) {
                        return;
                    }
                    seen.push(ptr);
                }
            }
            f(q);
        });
    }
}
