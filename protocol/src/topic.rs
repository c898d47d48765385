//! `Topic` and `Pattern`: validation and wildcard matching.
//!
//! Topics are dot-separated tokens; patterns may use `*` (exactly one token) and
//! `>` (one or more trailing tokens, last only). Matching walks both token lists
//! once, without recursion, so its cost is linear in the topic's depth.

use std::fmt;

use thiserror::Error;

/// Longest topic or pattern, in bytes.
pub const MAX_TOPIC_LEN: usize = 1024;
/// Most tokens in a topic or pattern.
pub const MAX_TOPIC_DEPTH: usize = 128;

/// Why a topic or pattern was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TopicError {
    /// Nothing at all.
    #[error("topic is empty")]
    Empty,
    /// Longer than [`MAX_TOPIC_LEN`].
    #[error("topic is {len} bytes long; the limit is {MAX_TOPIC_LEN}")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// More tokens than [`MAX_TOPIC_DEPTH`].
    #[error("topic has more than {MAX_TOPIC_DEPTH} tokens")]
    TooDeep,
    /// Two dots in a row, or a leading or trailing dot.
    #[error("empty token at position {position}")]
    EmptyToken {
        /// Zero-based token index.
        position: usize,
    },
    /// A token holds whitespace or a control character.
    #[error("token {position} contains whitespace or a control character")]
    Whitespace {
        /// Zero-based token index.
        position: usize,
    },
    /// `*` or `>` in a topic, or inside a longer token of a pattern.
    #[error("wildcard `{wildcard}` not allowed in token {position}")]
    Wildcard {
        /// The character.
        wildcard: char,
        /// Zero-based token index.
        position: usize,
    },
    /// `>` somewhere other than the last token.
    #[error("`>` must be the last token of a pattern (found at token {position})")]
    TailNotLast {
        /// Zero-based token index.
        position: usize,
    },
}

/// Validates `s`; returns its depth.
fn check_shape(s: &str, allow_wildcards: bool) -> Result<usize, TopicError> {
    match plain_depth(s.as_bytes()) {
        Some(depth) => Ok(depth),
        None => check_shape_slowly(s, allow_wildcards),
    }
}

/// The depth of a valid topic made of printable ASCII without wildcards, in one pass
/// over its bytes, eight at a time; `None` for anything else, which
/// [`check_shape_slowly`] then judges (and explains). Every publish is validated, in
/// the client and the broker, and the token iterator of the slow path was a tenth of
/// the client's profile; a byte at a time, this check was still 8 % of the broker's
/// instructions routing 100,000 distinct topics (every publish a new topic).
fn plain_depth(s: &[u8]) -> Option<usize> {
    let (&first, _) = s.split_first()?;
    if s.len() > MAX_TOPIC_LEN || first == b'.' || s.last() == Some(&b'.') {
        return None;
    }
    let mut dots = 0;
    // Whether the byte before the current word is a dot.
    let mut after_dot = false;
    let mut words = s.chunks_exact(8);
    for word in &mut words {
        let mut le = [0; 8];
        le.copy_from_slice(word);
        let v = u64::from_le_bytes(le);
        if not_plain(v) != 0 {
            return None;
        }
        let d = bytes_equal(v, b'.');
        // Two dots in a row (an empty token), within the word or across its start.
        if d & (d >> 8) != 0 || (after_dot && d & 0x80 != 0) {
            return None;
        }
        after_dot = d >> 63 != 0;
        dots += d.count_ones() as usize;
    }
    for &b in words.remainder() {
        match b {
            b'.' if after_dot => return None,
            b'.' => {
                dots += 1;
                after_dot = true;
            }
            // Space and controls, wildcards, and non-ASCII (whose whitespace and
            // controls the slow path knows).
            0..=b' ' | b'*' | b'>' | 0x7f.. => return None,
            _ => after_dot = false,
        }
    }
    let depth = dots + 1;
    (depth <= MAX_TOPIC_DEPTH).then_some(depth)
}

const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// `b` in every byte.
const fn splat(b: u8) -> u64 {
    0x0101_0101_0101_0101 * b as u64
}

/// 0x80 in each byte of `v` equal to `b`, 0 in the others. Exact: no carry crosses
/// from one byte into the next, since each byte's low seven bits plus 0x7f stay
/// below 0x100.
fn bytes_equal(v: u64, b: u8) -> u64 {
    let x = v ^ splat(b);
    !(((x & LOW7) + LOW7) | x | LOW7)
}

/// Nonzero when a byte of `v` is one [`plain_depth`] leaves to the slow path: below
/// `!` (space and controls), `*`, `>`, DEL or non-ASCII.
fn not_plain(v: u64) -> u64 {
    // High bit of (low seven bits + 0x5f) is clear exactly for bytes below 0x21.
    let below_bang = !(((v & LOW7) + splat(0x80 - 0x21)) | v) & HIGH;
    // Low seven bits + 1 reach 0x80 only for 0x7f; and any byte from 0x80.
    let del_or_high = (((v & LOW7) + splat(1)) | v) & HIGH;
    below_bang | del_or_high | bytes_equal(v, b'*') | bytes_equal(v, b'>')
}

fn check_shape_slowly(s: &str, allow_wildcards: bool) -> Result<usize, TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong { len: s.len() });
    }
    let mut depth = 0;
    let mut tokens = s.split('.').peekable();
    while let Some(token) = tokens.next() {
        let position = depth;
        depth += 1;
        if depth > MAX_TOPIC_DEPTH {
            return Err(TopicError::TooDeep);
        }
        if token.is_empty() {
            return Err(TopicError::EmptyToken { position });
        }
        if allow_wildcards && token == "*" {
            continue;
        }
        if allow_wildcards && token == ">" {
            if tokens.peek().is_some() {
                return Err(TopicError::TailNotLast { position });
            }
            continue;
        }
        for c in token.chars() {
            if c.is_whitespace() || c.is_control() {
                return Err(TopicError::Whitespace { position });
            }
            if c == '*' || c == '>' {
                return Err(TopicError::Wildcard {
                    wildcard: c,
                    position,
                });
            }
        }
    }
    Ok(depth)
}

/// A validated topic: the name a message is published to.
///
/// ```
/// use tidings_protocol::Topic;
/// assert!(Topic::validate("orders.eu.created").is_ok());
/// assert!(Topic::validate("orders..created").is_err());
/// assert!(Topic::validate("orders.*").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic(String);

impl Topic {
    /// Checks a topic without allocating.
    pub fn validate(s: &str) -> Result<(), TopicError> {
        check_shape(s, false).map(|_| ())
    }

    /// Validates and keeps a topic.
    pub fn new(s: impl Into<String>) -> Result<Self, TopicError> {
        let s = s.into();
        Self::validate(&s)?;
        Ok(Self(s))
    }

    /// The topic string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One token of a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PatternToken {
    /// Matches this exact token.
    Literal(String),
    /// `*`: any one token.
    Any,
    /// `>`: one or more trailing tokens.
    Tail,
}

/// A validated subscription or binding pattern.
///
/// ```
/// use tidings_protocol::Pattern;
/// let p = Pattern::new("orders.*.created").unwrap();
/// assert!(p.matches("orders.eu.created"));
/// assert!(!p.matches("orders.created"));
/// assert!(Pattern::new("orders.>").unwrap().matches("orders.eu.created"));
/// assert!(!Pattern::new("orders.>").unwrap().matches("orders"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    source: String,
    tokens: Vec<PatternToken>,
}

impl Pattern {
    /// Validates and parses a pattern.
    pub fn new(s: impl Into<String>) -> Result<Self, TopicError> {
        let source = s.into();
        check_shape(&source, true)?;
        let tokens = source
            .split('.')
            .map(|t| match t {
                "*" => PatternToken::Any,
                ">" => PatternToken::Tail,
                lit => PatternToken::Literal(lit.to_owned()),
            })
            .collect();
        Ok(Self { source, tokens })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The parsed tokens.
    pub fn tokens(&self) -> &[PatternToken] {
        &self.tokens
    }

    /// True when the pattern has no wildcard, so it matches exactly one topic.
    pub fn is_literal(&self) -> bool {
        self.tokens
            .iter()
            .all(|t| matches!(t, PatternToken::Literal(_)))
    }

    /// Does `topic` match? `topic` is assumed to be a valid topic; an invalid one
    /// simply may or may not match, it never panics.
    pub fn matches(&self, topic: &str) -> bool {
        let mut topic_tokens = topic.split('.');
        for token in &self.tokens {
            match token {
                PatternToken::Tail => return topic_tokens.next().is_some(),
                PatternToken::Any => {
                    if topic_tokens.next().is_none() {
                        return false;
                    }
                }
                PatternToken::Literal(lit) => match topic_tokens.next() {
                    Some(t) if t == lit => {}
                    _ => return false,
                },
            }
        }
        topic_tokens.next().is_none()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        /// The one-pass check accepts exactly what the full one accepts, with the same
        /// depth, wherever it gives an answer at all.
        #[test]
        fn the_fast_path_agrees_with_the_full_check(
            bytes in proptest::collection::vec(
                prop::sample::select(&[b'a', b'Z', b'0', b'-', b'.', b'*', b'>', b' ', b'\t', 0, 0x7f, 0xc3, 0xa9][..]),
                0..40,
            ),
        ) {
            if let Ok(s) = std::str::from_utf8(&bytes) {
                if let Some(depth) = plain_depth(s.as_bytes()) {
                    prop_assert_eq!(check_shape_slowly(s, false), Ok(depth));
                    prop_assert_eq!(check_shape_slowly(s, true), Ok(depth));
                }
                prop_assert_eq!(check_shape(s, false), check_shape_slowly(s, false));
                prop_assert_eq!(check_shape(s, true), check_shape_slowly(s, true));
            }
        }
    }

    /// The fast path a byte at a time, as it was before it went eight at a time.
    fn plain_depth_bytewise(s: &[u8]) -> Option<usize> {
        if s.is_empty() || s.len() > MAX_TOPIC_LEN {
            return None;
        }
        let mut depth = 1;
        let mut token_len = 0;
        for &b in s {
            match b {
                b'.' if token_len == 0 => return None,
                b'.' => {
                    depth += 1;
                    token_len = 0;
                }
                0..=b' ' | b'*' | b'>' | 0x7f.. => return None,
                _ => token_len += 1,
            }
        }
        (token_len > 0 && depth <= MAX_TOPIC_DEPTH).then_some(depth)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// Eight bytes at a time judges every byte string as one byte at a time does:
        /// any bytes (the edges of each class among them), any length across words.
        #[test]
        fn the_word_at_a_time_check_agrees_with_the_bytewise_one(
            bytes in proptest::collection::vec(
                prop_oneof![
                    4 => prop::sample::select(&[b'a', b'.', b'.', b'!', b' ', b'*', b'>', b'~', 0x7f, 0x80, 0x20, 0x21, 0x29, 0x2b, 0x3d, 0x3f, 0xff, 0][..]),
                    1 => any::<u8>(),
                ],
                0..70,
            ),
        ) {
            prop_assert_eq!(plain_depth(&bytes), plain_depth_bytewise(&bytes));
        }
    }

    #[test]
    fn the_word_at_a_time_check_judges_every_byte_in_every_position() {
        for len in 1..=24 {
            for at in 0..len {
                for b in 0..=u8::MAX {
                    let mut s = vec![b'a'; len];
                    s[at] = b;
                    assert_eq!(
                        plain_depth(&s),
                        plain_depth_bytewise(&s),
                        "{b:#x} at {at} of {len}"
                    );
                    if at + 1 < len {
                        s[at + 1] = b'.';
                        assert_eq!(
                            plain_depth(&s),
                            plain_depth_bytewise(&s),
                            "{b:#x}. at {at} of {len}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_fast_path_knows_the_limits() {
        let deep = vec!["a"; MAX_TOPIC_DEPTH].join(".");
        assert_eq!(plain_depth(deep.as_bytes()), Some(MAX_TOPIC_DEPTH));
        assert_eq!(plain_depth(format!("{deep}.a").as_bytes()), None);
        assert_eq!(
            check_shape(&format!("{deep}.a"), false),
            Err(TopicError::TooDeep)
        );
        let long = "a".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(plain_depth(long.as_bytes()), None);
        assert!(matches!(
            check_shape(&long, false),
            Err(TopicError::TooLong { .. })
        ));
        for bad in ["", ".a", "a.", "a..b"] {
            assert_eq!(plain_depth(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn match_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("a", "a", true),
            ("a", "b", false),
            ("a.b", "a.b", true),
            ("a.b", "a", false),
            ("a", "a.b", false),
            ("*", "a", true),
            ("*", "a.b", false),
            (">", "a", true),
            (">", "a.b.c", true),
            ("a.>", "a", false),
            ("a.>", "a.b", true),
            ("a.>", "a.b.c", true),
            ("*.b.c", "a.b.c", true),
            ("a.*.c", "a.b.c", true),
            ("a.b.*", "a.b.c", true),
            ("a.b.*", "a.b", false),
            ("a.b.*", "a.b.c.d", false),
            ("*.*.*", "a.b.c", true),
            ("*.*.*", "a.b", false),
            ("*.>", "a", false),
            ("*.>", "a.b", true),
            ("*.b.>", "a.b.c.d", true),
            ("*.b.>", "a.x.c.d", false),
            ("orders.*", "orders.created", true),
            ("orders.*", "ordersx.created", false),
            ("orders", "orders.created", false),
        ];
        for (pattern, topic, want) in cases {
            let p = Pattern::new(*pattern).unwrap();
            Topic::validate(topic).unwrap();
            assert_eq!(p.matches(topic), *want, "{pattern} vs {topic}");
        }
    }

    #[test]
    fn deep_topics_match_without_recursion() {
        let deep: Vec<&str> = std::iter::repeat_n("t", MAX_TOPIC_DEPTH).collect();
        let topic = deep.join(".");
        Topic::validate(&topic).unwrap();
        let stars: Vec<&str> = std::iter::repeat_n("*", MAX_TOPIC_DEPTH).collect();
        assert!(Pattern::new(stars.join(".")).unwrap().matches(&topic));
        assert!(Pattern::new("t.>").unwrap().matches(&topic));
        let too_deep = format!("{topic}.t");
        assert_eq!(Topic::validate(&too_deep), Err(TopicError::TooDeep));
    }

    #[test]
    fn invalid_topics_and_patterns() {
        assert_eq!(Topic::validate(""), Err(TopicError::Empty));
        assert_eq!(
            Topic::validate("."),
            Err(TopicError::EmptyToken { position: 0 })
        );
        assert_eq!(
            Topic::validate("a."),
            Err(TopicError::EmptyToken { position: 1 })
        );
        assert_eq!(
            Topic::validate(".a"),
            Err(TopicError::EmptyToken { position: 0 })
        );
        assert_eq!(
            Topic::validate("a..b"),
            Err(TopicError::EmptyToken { position: 1 })
        );
        assert_eq!(
            Topic::validate("a b"),
            Err(TopicError::Whitespace { position: 0 })
        );
        assert_eq!(
            Topic::validate("a.\tb"),
            Err(TopicError::Whitespace { position: 1 })
        );
        assert!(matches!(
            Topic::validate("a.*"),
            Err(TopicError::Wildcard { .. })
        ));
        assert!(matches!(
            Topic::validate(">"),
            Err(TopicError::Wildcard { .. })
        ));
        assert!(matches!(
            Pattern::new("a.>.b"),
            Err(TopicError::TailNotLast { position: 1 })
        ));
        assert!(matches!(
            Pattern::new("a.b*"),
            Err(TopicError::Wildcard { .. })
        ));
        assert!(matches!(
            Pattern::new("a.>x"),
            Err(TopicError::Wildcard { .. })
        ));
        assert!(Pattern::new(">").is_ok());
        assert!(Pattern::new("*").is_ok());
        let long = "a".repeat(MAX_TOPIC_LEN + 1);
        assert!(matches!(
            Topic::validate(&long),
            Err(TopicError::TooLong { .. })
        ));
        assert!(Topic::validate("ünïcode.tópic").is_ok());
    }

    #[test]
    fn star_at_every_position() {
        let topic = "a.b.c.d.e";
        for i in 0..5 {
            let mut tokens: Vec<&str> = topic.split('.').collect();
            tokens[i] = "*";
            let p = Pattern::new(tokens.join(".")).unwrap();
            assert!(p.matches(topic), "{p}");
            assert!(!p.matches("a.b.c.d"), "{p}");
            assert!(!p.matches("a.b.c.d.e.f"), "{p}");
            tokens[(i + 1) % 5] = "zz";
            assert!(!Pattern::new(tokens.join(".")).unwrap().matches(topic));
        }
    }
}
