//! `Trie`: values stored under topic patterns, found by walking a topic's tokens
//! once, whatever the number of patterns.

use std::collections::HashMap;

use tidings_protocol::Pattern;

/// One pattern token, borrowed from the pattern's text.
#[derive(Clone, Copy)]
enum Token<'a> {
    Literal(&'a str),
    Any,
    Tail,
}

fn tokens(pattern: &Pattern) -> Vec<Token<'_>> {
    pattern
        .as_str()
        .split('.')
        .map(|t| match t {
            "*" => Token::Any,
            ">" => Token::Tail,
            lit => Token::Literal(lit),
        })
        .collect()
}

/// A map from patterns (with `*` and `>`) to values, searchable by topic.
///
/// Each node is one token position; `*` and `>` have their own child slots, so a
/// lookup visits only the branches that can match: its cost grows with the topic's
/// depth and the number of wildcard branches, not with the number of patterns.
/// Generic so that durable-queue bindings can use it as well as subscriptions.
///
/// ```
/// use tidings_broker::router::Trie;
/// use tidings_protocol::Pattern;
///
/// let mut trie = Trie::default();
/// trie.insert(&Pattern::new("orders.*").unwrap(), "star");
/// trie.insert(&Pattern::new("orders.>").unwrap(), "tail");
/// trie.insert(&Pattern::new("orders.eu.created").unwrap(), "exact");
/// let mut found = Vec::new();
/// trie.for_each_match("orders.eu.created", |v| found.push(*v));
/// found.sort();
/// assert_eq!(found, ["exact", "tail"]);
/// ```
#[derive(Debug)]
pub struct Trie<T> {
    root: Node<T>,
    len: usize,
}

#[derive(Debug)]
struct Node<T> {
    values: Vec<T>,
    literal: Children<T>,
    any: Option<Box<Node<T>>>,
    tail: Option<Box<Node<T>>>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            values: Vec::new(),
            literal: Children::Few(Vec::new()),
            any: None,
            tail: None,
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.values.is_empty()
            && self.literal.is_empty()
            && self.any.is_none()
            && self.tail.is_none()
    }
}

/// Literal children up to this many are kept in a list and found by comparing
/// tokens; past it, in a hash map (until removals bring it down to half).
const FEW_CHILDREN: usize = 8;

/// A node's literal children, by token.
///
/// Most nodes have a handful: a topic's walk through them then compares a few short
/// strings instead of hashing each token with SipHash (which the map keeps for nodes
/// with many children, whose tokens clients choose). Routing 100,000 distinct topics,
/// whose every publish misses the route cache and walks the trie, the per-token hashes
/// were over a tenth of the broker's instructions.
#[derive(Debug)]
enum Children<T> {
    Few(Vec<(Box<str>, Node<T>)>),
    Many(HashMap<Box<str>, Node<T>>),
}

impl<T> Children<T> {
    fn is_empty(&self) -> bool {
        match self {
            Children::Few(v) => v.is_empty(),
            Children::Many(m) => m.is_empty(),
        }
    }

    fn get(&self, token: &str) -> Option<&Node<T>> {
        match self {
            Children::Few(v) => v.iter().find(|(t, _)| &**t == token).map(|(_, n)| n),
            Children::Many(m) => m.get(token),
        }
    }

    fn get_mut(&mut self, token: &str) -> Option<&mut Node<T>> {
        match self {
            Children::Few(v) => v.iter_mut().find(|(t, _)| &**t == token).map(|(_, n)| n),
            Children::Many(m) => m.get_mut(token),
        }
    }

    /// The child under `token`, made (empty) if there is none.
    fn get_or_insert(&mut self, token: &str) -> &mut Node<T> {
        if let Children::Few(v) = self {
            if v.len() == FEW_CHILDREN && !v.iter().any(|(t, _)| &**t == token) {
                *self = Children::Many(std::mem::take(v).into_iter().collect());
            }
        }
        match self {
            Children::Few(v) => {
                let i = match v.iter().position(|(t, _)| &**t == token) {
                    Some(i) => i,
                    None => {
                        v.push((token.into(), Node::default()));
                        v.len() - 1
                    }
                };
                &mut v[i].1
            }
            Children::Many(m) => m.entry(token.into()).or_default(),
        }
    }

    /// Removes the child under `token`; a map that shrinks to half the list's
    /// size becomes a list again.
    fn remove(&mut self, token: &str) {
        match self {
            Children::Few(v) => v.retain(|(t, _)| &**t != token),
            Children::Many(m) => {
                m.remove(token);
                if m.len() <= FEW_CHILDREN / 2 {
                    *self = Children::Few(m.drain().collect());
                }
            }
        }
    }
}

impl<T> Default for Trie<T> {
    fn default() -> Self {
        Trie {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<T> Trie<T> {
    /// Number of values stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a value under `pattern`.
    pub fn insert(&mut self, pattern: &Pattern, value: T) {
        let mut node = &mut self.root;
        for token in tokens(pattern) {
            node = match token {
                Token::Literal(lit) => node.literal.get_or_insert(lit),
                Token::Any => node.any.get_or_insert_with(Default::default),
                Token::Tail => node.tail.get_or_insert_with(Default::default),
            };
        }
        node.values.push(value);
        self.len += 1;
    }

    /// Runs `f` on the values stored exactly under `pattern` (not on those of other
    /// patterns matching it), then prunes nodes left empty. Returns `None` when no
    /// value is stored under `pattern`.
    pub fn update<R>(&mut self, pattern: &Pattern, f: impl FnOnce(&mut Vec<T>) -> R) -> Option<R> {
        let tokens = tokens(pattern);
        let before;
        let result;
        {
            let node = descend(&mut self.root, &tokens)?;
            before = node.values.len();
            result = f(&mut node.values);
            let after = node.values.len();
            self.len = self.len + after - before;
        }
        prune(&mut self.root, &tokens);
        Some(result)
    }

    /// Removes and returns the first value under `pattern` for which `pred` holds.
    pub fn remove(&mut self, pattern: &Pattern, mut pred: impl FnMut(&T) -> bool) -> Option<T> {
        self.update(pattern, |values| {
            let i = values.iter().position(&mut pred)?;
            Some(values.swap_remove(i))
        })
        .flatten()
    }

    /// Calls `f` on every value whose pattern matches `topic`.
    pub fn for_each_match<'a>(&'a self, topic: &str, mut f: impl FnMut(&'a T)) {
        // Topics of up to STACK_TOKENS tokens (nearly all) are split without
        // allocating.
        const STACK_TOKENS: usize = 16;
        let mut stack = [""; STACK_TOKENS];
        let mut n = 0;
        for token in split_dots(topic) {
            if n == STACK_TOKENS {
                let tokens: Vec<&str> = split_dots(topic).collect();
                return collect(&self.root, &tokens, &mut f);
            }
            stack[n] = token;
            n += 1;
        }
        collect(&self.root, &stack[..n], &mut f);
    }
}

/// `topic.split('.')`, by a scan of its bytes: topics' tokens are short, and
/// `str::split`'s searcher cost more per token than the scan (3.4 % of the broker's
/// samples routing 100,000 distinct topics).
fn split_dots(topic: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(topic);
    std::iter::from_fn(move || {
        let s = rest?;
        match s.bytes().position(|b| b == b'.') {
            Some(i) => {
                rest = s.get(i + 1..);
                s.get(..i)
            }
            None => {
                rest = None;
                Some(s)
            }
        }
    })
}

fn descend<'n, T>(node: &'n mut Node<T>, tokens: &[Token<'_>]) -> Option<&'n mut Node<T>> {
    let Some((first, rest)) = tokens.split_first() else {
        return Some(node);
    };
    let child = match first {
        Token::Literal(lit) => node.literal.get_mut(lit)?,
        Token::Any => node.any.as_deref_mut()?,
        Token::Tail => node.tail.as_deref_mut()?,
    };
    descend(child, rest)
}

/// Removes empty nodes along `tokens`; returns whether `node` itself is now empty.
fn prune<T>(node: &mut Node<T>, tokens: &[Token<'_>]) -> bool {
    if let Some((first, rest)) = tokens.split_first() {
        match first {
            Token::Literal(lit) => {
                if let Some(child) = node.literal.get_mut(lit) {
                    if prune(child, rest) {
                        node.literal.remove(lit);
                    }
                }
            }
            Token::Any => {
                if node.any.as_deref_mut().is_some_and(|c| prune(c, rest)) {
                    node.any = None;
                }
            }
            Token::Tail => {
                if node.tail.as_deref_mut().is_some_and(|c| prune(c, rest)) {
                    node.tail = None;
                }
            }
        }
    }
    node.is_empty()
}

fn collect<'a, T>(node: &'a Node<T>, tokens: &[&str], f: &mut impl FnMut(&'a T)) {
    let Some((first, rest)) = tokens.split_first() else {
        node.values.iter().for_each(&mut *f);
        return;
    };
    // `>` matches one or more remaining tokens, and here at least one remains.
    if let Some(tail) = &node.tail {
        tail.values.iter().for_each(&mut *f);
    }
    if let Some(child) = node.literal.get(first) {
        collect(child, rest, f);
    }
    if let Some(any) = &node.any {
        collect(any, rest, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matches(trie: &Trie<u32>, topic: &str) -> Vec<u32> {
        let mut v = Vec::new();
        trie.for_each_match(topic, |x| v.push(*x));
        v.sort_unstable();
        v
    }

    #[test]
    fn split_dots_is_str_split() {
        for topic in [
            "",
            ".",
            "a",
            "a.b",
            "a..b",
            ".a",
            "a.",
            "orders.eu.new",
            "é.ü.x",
        ] {
            let ours: Vec<&str> = split_dots(topic).collect();
            let std: Vec<&str> = topic.split('.').collect();
            assert_eq!(ours, std, "{topic:?}");
        }
    }

    #[test]
    fn wildcards() {
        let mut trie = Trie::default();
        let pats = ["a.b.c", "a.*.c", "a.>", "*.b.*", ">", "a.b", "a.*"];
        for (i, p) in (0u32..).zip(pats) {
            trie.insert(&Pattern::new(p).unwrap(), i);
        }
        assert_eq!(matches(&trie, "a.b.c"), [0, 1, 2, 3, 4]);
        assert_eq!(matches(&trie, "a.b"), [2, 4, 5, 6]);
        assert_eq!(matches(&trie, "a"), [4]);
        assert_eq!(matches(&trie, "x.b.y"), [3, 4]);
        assert_eq!(matches(&trie, "a.b.c.d"), [2, 4]);
    }

    #[test]
    fn topics_longer_than_the_stack_buffer_match_too() {
        let mut trie = Trie::default();
        let long: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
        let topic = long.join(".");
        trie.insert(&Pattern::new(&topic).unwrap(), 1);
        trie.insert(&Pattern::new("t0.>").unwrap(), 2);
        trie.insert(
            &Pattern::new(format!("{}.*", long[..39].join("."))).unwrap(),
            3,
        );
        assert_eq!(matches(&trie, &topic), [1, 2, 3]);
        assert_eq!(matches(&trie, &long[..16].join(".")), [2]);
    }

    #[test]
    fn remove_prunes() {
        let mut trie = Trie::default();
        let p = Pattern::new("a.*.c.>").unwrap();
        trie.insert(&p, 1);
        trie.insert(&p, 2);
        assert_eq!(trie.remove(&p, |v| *v == 1), Some(1));
        assert_eq!(trie.remove(&p, |v| *v == 1), None);
        assert_eq!(trie.remove(&p, |v| *v == 2), Some(2));
        assert!(trie.is_empty());
        assert!(trie.root.is_empty());
        assert_eq!(trie.remove(&Pattern::new("x").unwrap(), |_| true), None);
    }

    #[test]
    fn a_node_past_its_few_children_keeps_every_child() {
        let mut trie = Trie::default();
        let n = u32::try_from(FEW_CHILDREN).unwrap() * 3;
        for i in 0..n {
            trie.insert(&Pattern::new(format!("a.t{i}")).unwrap(), i);
        }
        trie.insert(&Pattern::new("a.*").unwrap(), 1000);
        assert!(matches!(
            trie.root.literal.get("a").unwrap().literal,
            Children::Many(_)
        ));
        for i in 0..n {
            assert_eq!(matches(&trie, &format!("a.t{i}")), [i, 1000]);
        }
        for i in 0..n {
            let p = Pattern::new(format!("a.t{i}")).unwrap();
            assert_eq!(trie.remove(&p, |v| *v == i), Some(i));
            let left = n - 1 - i;
            let node = &trie.root.literal.get("a").unwrap().literal;
            if usize::try_from(left).unwrap() <= FEW_CHILDREN / 2 {
                assert!(matches!(node, Children::Few(_)), "{left} left");
            }
            for j in i + 1..n {
                assert_eq!(matches(&trie, &format!("a.t{j}")), [j, 1000]);
            }
        }
        assert_eq!(matches(&trie, "a.t0"), [1000]);
        trie.remove(&Pattern::new("a.*").unwrap(), |_| true);
        assert!(trie.root.is_empty());
    }

    /// A trie of `pats`, each stored under its index; and the parsed patterns.
    fn numbered(pats: &[String]) -> (Trie<u32>, Vec<Pattern>) {
        let mut trie = Trie::default();
        let parsed: Vec<Pattern> = pats
            .iter()
            .map(|p| Pattern::new(p.as_str()).unwrap())
            .collect();
        for (i, p) in (0u32..).zip(&parsed) {
            trie.insert(p, i);
        }
        (trie, parsed)
    }

    proptest! {
        /// Wide nodes (past FEW_CHILDREN, kept in a map) and removals: what is left
        /// matches as the patterns say. A failure prints its inputs, and proptest
        /// saves its seed for the next run to replay first.
        #[test]
        fn wide_nodes_and_removals_agree_with_pattern_matches(
            pats in prop::collection::vec("(t[0-9]{1,2}|\\*)(\\.(t[0-9]{1,2}|\\*)){0,2}(\\.>)?", 1..60),
            topics in prop::collection::vec("t[0-9]{1,2}(\\.t[0-9]{1,2}){0,3}", 1..20),
            removed in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
        ) {
            let (mut trie, parsed) = numbered(&pats);
            let mut live: Vec<bool> = vec![true; parsed.len()];
            for r in &removed {
                let i = r.index(parsed.len());
                let got = trie.remove(&parsed[i], |v| *v == u32::try_from(i).unwrap());
                prop_assert_eq!(got.is_some(), live[i]);
                live[i] = false;
            }
            for t in &topics {
                let expected: Vec<u32> = (0u32..).zip(&parsed).zip(&live)
                    .filter(|((_, p), live)| **live && p.matches(t)).map(|((i, _), _)| i).collect();
                prop_assert_eq!(matches(&trie, t), expected);
            }
            if live.iter().all(|l| !l) {
                prop_assert!(trie.root.is_empty());
            }
        }
    }

    proptest! {
        #[test]
        fn agrees_with_pattern_matches(
            pats in prop::collection::vec("(a|b|\\*)(\\.(a|b|\\*)){0,3}(\\.>)?", 1..12),
            topics in prop::collection::vec("(a|b|c)(\\.(a|b|c)){0,4}", 1..12),
        ) {
            let (trie, parsed) = numbered(&pats);
            for t in &topics {
                let expected: Vec<u32> = (0u32..).zip(&parsed)
                    .filter(|(_, p)| p.matches(t)).map(|(i, _)| i).collect();
                prop_assert_eq!(matches(&trie, t), expected);
            }
        }
    }
}
