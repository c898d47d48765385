//! Topic and pattern rules: the match table with its edge cases (empty tokens, `>`
//! alone, `*` at every position, very deep topics) and validation errors.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use tidings_protocol::{MAX_TOPIC_DEPTH, MAX_TOPIC_LEN, Pattern, PatternToken, Topic, TopicError};

fn deep(token: &str, depth: usize) -> String {
    vec![token; depth].join(".")
}

#[test]
fn match_table() {
    let max_deep = deep("t", MAX_TOPIC_DEPTH);
    let cases: Vec<(&str, &str, bool)> = vec![
        // Literals.
        ("a", "a", true),
        ("a", "A", false),
        ("a.b", "a.b", true),
        ("a.b", "a.bc", false),
        ("a.b", "ab", false),
        ("a", "a.b", false),
        ("a.b", "a", false),
        ("ünï.çødé", "ünï.çødé", true),
        // `>` alone matches everything, at every depth.
        (">", "a", true),
        (">", "a.b", true),
        (">", &max_deep, true),
        // `>` needs at least one token.
        ("a.>", "a", false),
        ("a.>", "a.b", true),
        ("a.>", "a.b.c.d", true),
        ("a.>", "b.c", false),
        ("a.b.>", "a.b", false),
        ("a.b.>", "a.b.c", true),
        // `*` is exactly one token.
        ("*", "a", true),
        ("*", "a.b", false),
        ("*.*", "a", false),
        ("*.*", "a.b", true),
        ("*.*", "a.b.c", false),
        ("*.>", "a", false),
        ("*.>", "a.b", true),
        ("*.>", "a.b.c", true),
        ("*.b.>", "a.b.c", true),
        ("*.b.>", "a.c.c", false),
        ("a.*.>", "a.b", false),
        ("a.*.>", "a.b.c", true),
        // Literal prefixes are whole tokens.
        ("orders.*", "orders.created", true),
        ("orders.*", "ordersx.created", false),
        ("order.*", "orders.created", false),
        ("orders.>", "orders", false),
    ];
    for (pattern, topic, want) in cases {
        let p = Pattern::new(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
        Topic::validate(topic).unwrap_or_else(|e| panic!("{topic}: {e}"));
        assert_eq!(p.matches(topic), want, "{pattern} vs {topic}");
    }
}

#[test]
fn star_at_every_position_of_a_deep_topic() {
    let tokens: Vec<String> = (0..MAX_TOPIC_DEPTH).map(|i| format!("t{i}")).collect();
    let topic = tokens.join(".");
    Topic::validate(&topic).unwrap();
    for i in 0..MAX_TOPIC_DEPTH {
        let mut p = tokens.clone();
        p[i] = "*".into();
        let pattern = Pattern::new(p.join(".")).unwrap();
        assert!(!pattern.is_literal());
        assert!(pattern.matches(&topic), "* at {i}");
        // One token short or one wrong token elsewhere: no match.
        assert!(
            !pattern.matches(&tokens[..MAX_TOPIC_DEPTH - 1].join(".")),
            "* at {i}"
        );
        let mut other = tokens.clone();
        other[(i + 1) % MAX_TOPIC_DEPTH] = "x".into();
        assert!(!pattern.matches(&other.join(".")), "* at {i}");
        // `>` after the star matches the same topic when there is a token left.
        if i + 1 < MAX_TOPIC_DEPTH {
            let mut tail = p[..=i].to_vec();
            tail.push(">".into());
            assert!(
                Pattern::new(tail.join(".")).unwrap().matches(&topic),
                "*.> at {i}"
            );
        }
    }
}

#[test]
fn depth_and_length_limits_are_inclusive() {
    let at_depth = deep("t", MAX_TOPIC_DEPTH);
    assert!(Topic::validate(&at_depth).is_ok());
    assert_eq!(
        Topic::validate(&format!("{at_depth}.t")),
        Err(TopicError::TooDeep)
    );
    assert!(Pattern::new(deep("*", MAX_TOPIC_DEPTH)).is_ok());
    assert_eq!(
        Pattern::new(format!("{}.>", deep("*", MAX_TOPIC_DEPTH))),
        Err(TopicError::TooDeep)
    );
    let at_len = "a".repeat(MAX_TOPIC_LEN);
    assert!(Topic::validate(&at_len).is_ok());
    assert_eq!(
        Topic::validate(&format!("{at_len}b")),
        Err(TopicError::TooLong {
            len: MAX_TOPIC_LEN + 1
        })
    );
    // The length limit is in bytes, not characters.
    let wide = "é".repeat(MAX_TOPIC_LEN / 2 + 1);
    assert!(matches!(
        Topic::validate(&wide),
        Err(TopicError::TooLong { .. })
    ));
}

#[test]
fn invalid_topics() {
    let cases: Vec<(&str, TopicError)> = vec![
        ("", TopicError::Empty),
        (".", TopicError::EmptyToken { position: 0 }),
        ("..", TopicError::EmptyToken { position: 0 }),
        (".a", TopicError::EmptyToken { position: 0 }),
        ("a.", TopicError::EmptyToken { position: 1 }),
        ("a..b", TopicError::EmptyToken { position: 1 }),
        ("a.b.", TopicError::EmptyToken { position: 2 }),
        ("a b", TopicError::Whitespace { position: 0 }),
        ("a.b\tc", TopicError::Whitespace { position: 1 }),
        ("a.\u{a0}", TopicError::Whitespace { position: 1 }),
        ("a.\u{3000}", TopicError::Whitespace { position: 1 }),
        ("a\u{0}", TopicError::Whitespace { position: 0 }),
        ("a.\u{7f}", TopicError::Whitespace { position: 1 }),
        ("a\n", TopicError::Whitespace { position: 0 }),
        (
            "*",
            TopicError::Wildcard {
                wildcard: '*',
                position: 0,
            },
        ),
        (
            ">",
            TopicError::Wildcard {
                wildcard: '>',
                position: 0,
            },
        ),
        (
            "a.*",
            TopicError::Wildcard {
                wildcard: '*',
                position: 1,
            },
        ),
        (
            "a.>",
            TopicError::Wildcard {
                wildcard: '>',
                position: 1,
            },
        ),
        (
            "a.b*",
            TopicError::Wildcard {
                wildcard: '*',
                position: 1,
            },
        ),
    ];
    for (topic, err) in cases {
        assert_eq!(Topic::validate(topic), Err(err.clone()), "{topic:?}");
        assert_eq!(Topic::new(topic), Err(err), "{topic:?}");
    }
}

#[test]
fn invalid_patterns() {
    let cases: Vec<(&str, TopicError)> = vec![
        ("", TopicError::Empty),
        (".", TopicError::EmptyToken { position: 0 }),
        ("*.", TopicError::EmptyToken { position: 1 }),
        (".>", TopicError::EmptyToken { position: 0 }),
        ("a..*", TopicError::EmptyToken { position: 1 }),
        (">.a", TopicError::TailNotLast { position: 0 }),
        ("a.>.b", TopicError::TailNotLast { position: 1 }),
        ("a.>.>", TopicError::TailNotLast { position: 1 }),
        (
            "**",
            TopicError::Wildcard {
                wildcard: '*',
                position: 0,
            },
        ),
        (
            ">>",
            TopicError::Wildcard {
                wildcard: '>',
                position: 0,
            },
        ),
        (
            "*>",
            TopicError::Wildcard {
                wildcard: '*',
                position: 0,
            },
        ),
        (
            "a.b*",
            TopicError::Wildcard {
                wildcard: '*',
                position: 1,
            },
        ),
        (
            "a.>x",
            TopicError::Wildcard {
                wildcard: '>',
                position: 1,
            },
        ),
        (
            "a.* ",
            TopicError::Wildcard {
                wildcard: '*',
                position: 1,
            },
        ),
        ("a. *", TopicError::Whitespace { position: 1 }),
    ];
    for (pattern, err) in cases {
        assert_eq!(Pattern::new(pattern), Err(err), "{pattern:?}");
    }
}

#[test]
fn patterns_parse_into_tokens() {
    let p = Pattern::new("a.*.>").unwrap();
    assert_eq!(
        p.tokens(),
        &[
            PatternToken::Literal("a".into()),
            PatternToken::Any,
            PatternToken::Tail
        ]
    );
    assert_eq!(p.as_str(), "a.*.>");
    assert_eq!(p.to_string(), "a.*.>");
    assert!(Pattern::new("a.b").unwrap().is_literal());
    assert!(!Pattern::new(">").unwrap().is_literal());
    assert_eq!(Topic::new("a.b").unwrap().as_str(), "a.b");
}

#[test]
fn matching_an_invalid_topic_is_harmless() {
    for topic in ["", ".", "a..b", "*", ">", "a.>"] {
        for pattern in [">", "*", "a.>", "*.*", "a.b"] {
            // Either answer is acceptable; what matters is that it returns.
            let _ = Pattern::new(pattern).unwrap().matches(topic);
        }
    }
    // An empty topic is never matched by a literal.
    assert!(!Pattern::new("a").unwrap().matches(""));
}

/// A reference matcher written the obvious recursive way, to check the iterative
/// one against.
fn reference(pattern: &[&str], topic: &[&str]) -> bool {
    match (pattern.first(), topic.first()) {
        (None, None) => true,
        (Some(&">"), Some(_)) => true,
        (Some(&"*"), Some(_)) => reference(&pattern[1..], &topic[1..]),
        (Some(p), Some(t)) => p == t && reference(&pattern[1..], &topic[1..]),
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn matches_agrees_with_a_reference_matcher(
        pattern in vec(select(&["a", "b", "*"][..]), 1..6),
        tail in any::<bool>(),
        topic in vec(select(&["a", "b"][..]), 1..8),
    ) {
        let mut p = pattern;
        if tail {
            p.push(">");
        }
        let t = topic;
        let compiled = Pattern::new(p.join(".")).unwrap();
        prop_assert_eq!(compiled.matches(&t.join(".")), reference(&p, &t));
    }

    #[test]
    fn validation_never_panics(
        chars in vec(select(&['a', '.', '*', '>', ' ', '\t', '\u{0}', '\u{a0}', '\u{e9}'][..]), 0..12),
    ) {
        let s = String::from_iter(chars);
        let topic = Topic::validate(&s);
        let pattern = Pattern::new(s.clone());
        // Every valid topic is a valid, literal pattern that matches it.
        if topic.is_ok() {
            let p = pattern.unwrap();
            prop_assert!(p.is_literal());
            prop_assert!(p.matches(&s));
        }
    }
}
