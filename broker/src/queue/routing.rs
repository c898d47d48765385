//! `Routes`: which queues a topic goes to, indexed by the bindings' first token so a
//! publish that matches no binding costs one hash lookup and no allocation.

use std::collections::HashMap;
use std::sync::Arc;

use tidings_protocol::Pattern;

use crate::queue::queue::Queue;

/// The binding index. Rebuilt whenever a binding or queue changes (rare), read on
/// every publish.
#[derive(Default)]
pub(crate) struct Routes {
    /// Bindings whose first token is a literal, by that token.
    by_first: HashMap<String, Vec<(Pattern, Arc<Queue>)>>,
    /// Bindings starting with a wildcard.
    wild: Vec<(Pattern, Arc<Queue>)>,
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
                    routes.wild.push((pattern, q.clone()));
                } else {
                    routes
                        .by_first
                        .entry(first.to_owned())
                        .or_default()
                        .push((pattern, q.clone()));
                }
            }
        }
        routes
    }

    /// Calls `f` once for every queue with a binding matching `topic`.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&Arc<Queue>)) {
        let first = topic.split('.').next().unwrap_or(topic);
        let literal = self.by_first.get(first).map(Vec::as_slice).unwrap_or(&[]);
        let mut seen: Option<Vec<*const Queue>> = None;
        for (pattern, q) in literal.iter().chain(self.wild.iter()) {
            if !pattern.matches(topic) {
                continue;
            }
            // A queue bound twice to matching patterns takes the message once.
            let seen = seen.get_or_insert_with(Vec::new);
            let ptr = Arc::as_ptr(q);
            if seen.contains(&ptr) {
                continue;
            }
            seen.push(ptr);
            f(q);
        }
    }
}
