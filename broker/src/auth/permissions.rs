//! `Permissions`: what one user may publish, subscribe to and do with queues, and
//! the decision for each operation. Deny beats allow; what no rule allows is denied.
//!
//! A publish names one topic, so a rule decides it by matching. A subscription (or
//! a queue binding) names a pattern, which stands for many topics: it is allowed
//! only when an allow rule *covers* it (every topic it matches, the rule matches)
//! and no deny rule *overlaps* it (no topic matches both). A subscription is never
//! half allowed, so nothing has to be filtered at delivery time.

use std::fmt;

use serde::Deserialize;
use tidings_protocol::{Pattern, PatternToken};

/// The inbox prefix under which each user may always subscribe: `_INBOX.<user>.>`.
pub const INBOX_PREFIX: &str = "_INBOX";

/// What a user may do with a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueRight {
    /// CONSUME, CANCEL, CREDIT, ACK, NACK, and QUEUE_INFO.
    Consume,
    /// QUEUE_DECLARE, QUEUE_BIND, QUEUE_UNBIND, QUEUE_DELETE (a binding's pattern
    /// must also be one the user may subscribe to).
    Manage,
    /// DEAD_LETTERS and REDRIVE.
    DeadLetters,
}

impl QueueRight {
    /// The right's name as the config file spells it.
    pub fn name(self) -> &'static str {
        match self {
            QueueRight::Consume => "consume",
            QueueRight::Manage => "manage",
            QueueRight::DeadLetters => "dead_letters",
        }
    }
}

/// An operation that permissions decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Publishing to a topic.
    Publish,
    /// Subscribing to a pattern.
    Subscribe,
    /// Using a queue.
    Queue(QueueRight),
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operation::Publish => f.write_str("publish"),
            Operation::Subscribe => f.write_str("subscribe"),
            Operation::Queue(right) => write!(f, "queue {}", right.name()),
        }
    }
}

/// A refusal: which operation on what, and which rule (if a deny rule) decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The operation.
    pub operation: Operation,
    /// The topic, pattern or queue name asked for.
    pub target: String,
    /// The deny pattern that refused it; `None` when no allow rule covered it.
    pub deny_rule: Option<String>,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.deny_rule {
            Some(rule) => write!(
                f,
                "permission denied: {} `{}` is refused by deny rule `{rule}`",
                self.operation, self.target
            ),
            None => write!(
                f,
                "permission denied: {} `{}` is not covered by any allow rule",
                self.operation, self.target
            ),
        }
    }
}

/// Allow and deny patterns for one kind of operation (publish or subscribe).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicRules {
    /// Patterns that allow.
    pub allow: Vec<Pattern>,
    /// Patterns that deny; they win over `allow`.
    pub deny: Vec<Pattern>,
}

impl TopicRules {
    /// Decides a publish to `topic` (a valid topic).
    fn decide_topic(&self, topic: &str) -> Result<(), Option<&Pattern>> {
        if let Some(rule) = self.deny.iter().find(|p| p.matches(topic)) {
            return Err(Some(rule));
        }
        if self.allow.iter().any(|p| p.matches(topic)) {
            Ok(())
        } else {
            Err(None)
        }
    }

    /// Decides a subscription to `pattern`.
    fn decide_pattern(&self, pattern: &Pattern) -> Result<(), Option<&Pattern>> {
        if let Some(rule) = self
            .deny
            .iter()
            .find(|d| overlaps(d.tokens(), pattern.tokens()))
        {
            return Err(Some(rule));
        }
        if self
            .allow
            .iter()
            .any(|a| covers(a.tokens(), pattern.tokens()))
        {
            Ok(())
        } else {
            Err(None)
        }
    }
}

/// Rights on the queues whose names match `pattern`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRule {
    /// Queue names this rule applies to.
    pub pattern: Pattern,
    /// Rights it grants.
    pub allow: Vec<QueueRight>,
    /// Rights it takes away (over any grant).
    pub deny: Vec<QueueRight>,
}

/// Everything one user may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Publish rules.
    pub publish: TopicRules,
    /// Subscribe rules.
    pub subscribe: TopicRules,
    /// Queue rules.
    pub queues: Vec<QueueRule>,
    /// `_INBOX.<user>.>`: always subscribable, so replies reach the user.
    inbox: Option<Pattern>,
}

impl Permissions {
    /// Permissions for `user` (whose own inbox is always readable).
    pub fn new(
        user: &str,
        publish: TopicRules,
        subscribe: TopicRules,
        queues: Vec<QueueRule>,
    ) -> Permissions {
        // A user name that is not a valid topic token (it has a dot, say) simply has
        // no inbox grant; config validation refuses such names anyway.
        let inbox = Pattern::new(format!("{INBOX_PREFIX}.{user}.>"))
            .ok()
            .filter(|p| p.tokens().len() == 3);
        Permissions {
            publish,
            subscribe,
            queues,
            inbox,
        }
    }

    /// The pattern of this user's own inbox, `_INBOX.<user>.>`.
    pub fn inbox(&self) -> Option<&Pattern> {
        self.inbox.as_ref()
    }

    /// May the user publish to `topic` (a valid topic)?
    pub fn check_publish(&self, topic: &str) -> Result<(), Denied> {
        self.publish
            .decide_topic(topic)
            .map_err(|rule| denied(Operation::Publish, topic, rule))
    }

    /// May the user subscribe to `pattern`? Its own inbox always; otherwise by the
    /// subscribe rules.
    pub fn check_subscribe(&self, pattern: &Pattern) -> Result<(), Denied> {
        if let Some(inbox) = &self.inbox
            && covers(inbox.tokens(), pattern.tokens())
        {
            return Ok(());
        }
        self.subscribe
            .decide_pattern(pattern)
            .map_err(|rule| denied(Operation::Subscribe, pattern.as_str(), rule))
    }

    /// May the user do `right` on the queue `queue`?
    pub fn check_queue(&self, queue: &str, right: QueueRight) -> Result<(), Denied> {
        let matching = || self.queues.iter().filter(|r| r.pattern.matches(queue));
        if let Some(rule) = matching().find(|r| r.deny.contains(&right)) {
            return Err(Denied {
                operation: Operation::Queue(right),
                target: queue.to_owned(),
                deny_rule: Some(rule.pattern.as_str().to_owned()),
            });
        }
        if matching().any(|r| r.allow.contains(&right)) {
            Ok(())
        } else {
            Err(Denied {
                operation: Operation::Queue(right),
                target: queue.to_owned(),
                deny_rule: None,
            })
        }
    }

    /// True when the user has any right at all on `queue` (QUEUE_LIST shows only
    /// such queues).
    pub fn sees_queue(&self, queue: &str) -> bool {
        [
            QueueRight::Consume,
            QueueRight::Manage,
            QueueRight::DeadLetters,
        ]
        .into_iter()
        .any(|right| self.check_queue(queue, right).is_ok())
    }
}

fn denied(operation: Operation, target: &str, rule: Option<&Pattern>) -> Denied {
    Denied {
        operation,
        target: target.to_owned(),
        deny_rule: rule.map(|p| p.as_str().to_owned()),
    }
}

/// Does `outer` match every topic that `inner` matches?
pub fn covers(outer: &[PatternToken], inner: &[PatternToken]) -> bool {
    match (outer.split_first(), inner.split_first()) {
        (None, None) => true,
        // `>` takes one or more tokens; `inner` has at least one left here.
        (Some((PatternToken::Tail, _)), Some(_)) => true,
        (None, Some(_)) | (Some(_), None) => false,
        // `>` in `inner` matches topics of any length beyond; only `>` covers it.
        (Some(_), Some((PatternToken::Tail, _))) => false,
        (Some((PatternToken::Any, o)), Some((_, i))) => covers(o, i),
        (Some((PatternToken::Literal(a), o)), Some((PatternToken::Literal(b), i))) => {
            a == b && covers(o, i)
        }
        (Some((PatternToken::Literal(_), _)), Some((PatternToken::Any, _))) => false,
    }
}

/// Is there a topic that both patterns match?
pub fn overlaps(a: &[PatternToken], b: &[PatternToken]) -> bool {
    match (a.split_first(), b.split_first()) {
        (None, None) => true,
        // `>` matches any one-or-more tail; the other side has a token left, and
        // whatever it needs can follow.
        (Some((PatternToken::Tail, _)), Some(_)) | (Some(_), Some((PatternToken::Tail, _))) => true,
        (None, Some(_)) | (Some(_), None) => false,
        (Some((PatternToken::Literal(x), a)), Some((PatternToken::Literal(y), b))) => {
            x == y && overlaps(a, b)
        }
        (Some((_, a)), Some((_, b))) => overlaps(a, b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::new(s).unwrap()
    }

    fn rules(allow: &[&str], deny: &[&str]) -> TopicRules {
        TopicRules {
            allow: allow.iter().map(|s| p(s)).collect(),
            deny: deny.iter().map(|s| p(s)).collect(),
        }
    }

    #[test]
    fn covering() {
        let c = |a: &str, b: &str| covers(p(a).tokens(), p(b).tokens());
        assert!(c("a.>", "a.b"));
        assert!(c("a.>", "a.*.>"));
        assert!(c("a.*", "a.b"));
        assert!(c("a.*", "a.*"));
        assert!(!c("a.*", "a.>"));
        assert!(!c("a.b", "a.*"));
        assert!(!c("a.>", "a"));
        assert!(c(">", "x.y.z"));
        assert!(!c("a.*.c", "a.*"));
    }

    #[test]
    fn overlapping() {
        let o = |a: &str, b: &str| overlaps(p(a).tokens(), p(b).tokens());
        assert!(o("a.>", "*.b"));
        assert!(o("a.*", "*.b"));
        assert!(!o("a.*", "b.*"));
        assert!(!o("a.*", "a.*.c"));
        assert!(o("a.>", "a.*.c"));
        assert!(!o("a.>", "a"));
        assert!(o(">", "*"));
    }

    #[test]
    fn deny_beats_allow_and_default_is_deny() {
        let perms = Permissions::new(
            "alice",
            rules(&["orders.>"], &["orders.secret.>"]),
            rules(&["orders.>"], &["orders.secret.*"]),
            vec![],
        );
        assert!(perms.check_publish("orders.eu").is_ok());
        let err = perms.check_publish("orders.secret.x").unwrap_err();
        assert_eq!(err.deny_rule.as_deref(), Some("orders.secret.>"));
        assert!(err.to_string().contains("orders.secret.x"));
        assert!(
            perms
                .check_publish("billing.x")
                .unwrap_err()
                .deny_rule
                .is_none()
        );
        assert!(perms.check_subscribe(&p("orders.eu.*")).is_ok());
        // `orders.*.x` could match orders.secret.x: refused as a whole.
        assert!(perms.check_subscribe(&p("orders.*.x")).is_err());
        assert!(perms.check_subscribe(&p("orders.>")).is_err());
    }

    #[test]
    fn own_inbox_only() {
        let perms = Permissions::new("alice", rules(&[], &[]), rules(&[], &[]), vec![]);
        assert!(perms.check_subscribe(&p("_INBOX.alice.>")).is_ok());
        assert!(perms.check_subscribe(&p("_INBOX.alice.abc.>")).is_ok());
        assert!(perms.check_subscribe(&p("_INBOX.bob.>")).is_err());
        assert!(perms.check_subscribe(&p("_INBOX.*.>")).is_err());
        assert!(perms.check_subscribe(&p("_INBOX.>")).is_err());
    }

    #[test]
    fn queue_rights() {
        let perms = Permissions::new(
            "w",
            TopicRules::default(),
            TopicRules::default(),
            vec![
                QueueRule {
                    pattern: p("jobs.>"),
                    allow: vec![QueueRight::Consume, QueueRight::Manage],
                    deny: vec![],
                },
                QueueRule {
                    pattern: p("jobs.admin"),
                    allow: vec![],
                    deny: vec![QueueRight::Manage],
                },
            ],
        );
        assert!(perms.check_queue("jobs.email", QueueRight::Consume).is_ok());
        assert!(perms.check_queue("jobs.admin", QueueRight::Consume).is_ok());
        assert!(perms.check_queue("jobs.admin", QueueRight::Manage).is_err());
        assert!(
            perms
                .check_queue("jobs.email", QueueRight::DeadLetters)
                .is_err()
        );
        assert!(!perms.sees_queue("other"));
        assert!(perms.sees_queue("jobs.x"));
    }
}
