//! Permissions decided over the wire, checked against a small reference evaluator
//! that knows nothing of the broker's: it decides by enumerating every topic of a
//! small universe (tokens `a b c z`, up to one token longer than any pattern), so
//! "covers" and "overlaps" become subset and intersection of match sets.
//!
//! Random users (token login) with random publish/subscribe allow and deny
//! patterns (wildcards included) and random queue rules; random publishes
//! (confirmed), subscriptions and consumes; at least 10,000 decisions. The seed is
//! printed; `TIDINGS_SEED=<n>` replays it.
//!
//! Also: a denied operation keeps the connection open, a denied subscription is
//! not created, and a denied confirmed publish is answered with the error.

mod common;

use common::{Client, within};
use tidings_broker::auth::QueueRight;
use tidings_broker::auth::UserEntry;
use tidings_broker::auth::users::{QueueRuleEntry, TopicRulesEntry};
use tidings_protocol::{Consume, ErrorCode, Frame, Publish, Subscribe};

const USERS: usize = 40;
const OPS_PER_USER: usize = 260;
const ALPHABET: [&str; 3] = ["a", "b", "c"];
const MAX_PATTERN_LEN: usize = 3;

/// xorshift64*: small, seedable, good enough to pick test cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("below n, which is a usize")
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

fn random_topic(rng: &mut Rng) -> String {
    let len = 1 + rng.below(MAX_PATTERN_LEN);
    (0..len)
        .map(|_| ALPHABET[rng.below(ALPHABET.len())])
        .collect::<Vec<_>>()
        .join(".")
}

fn random_pattern(rng: &mut Rng) -> String {
    let len = 1 + rng.below(MAX_PATTERN_LEN);
    let mut tokens: Vec<&str> = (0..len)
        .map(|_| {
            if rng.chance(30) {
                "*"
            } else {
                ALPHABET[rng.below(ALPHABET.len())]
            }
        })
        .collect();
    if rng.chance(30) {
        *tokens.last_mut().unwrap() = ">";
    }
    tokens.join(".")
}

fn random_rules(rng: &mut Rng) -> TopicRulesEntry {
    TopicRulesEntry {
        allow: (0..rng.below(4)).map(|_| random_pattern(rng)).collect(),
        deny: (0..rng.below(3)).map(|_| random_pattern(rng)).collect(),
    }
}

fn random_rights(rng: &mut Rng) -> Vec<QueueRight> {
    [
        QueueRight::Consume,
        QueueRight::Manage,
        QueueRight::DeadLetters,
    ]
    .into_iter()
    .filter(|_| rng.chance(40))
    .collect()
}

/// The reference: every topic of the universe, and match sets over it.
struct Reference {
    universe: Vec<Vec<&'static str>>,
}

impl Reference {
    fn new() -> Reference {
        let tokens = ["a", "b", "c", "z"];
        let mut universe: Vec<Vec<&'static str>> = Vec::new();
        let mut layer: Vec<Vec<&'static str>> = vec![vec![]];
        for _ in 0..=MAX_PATTERN_LEN {
            layer = layer
                .iter()
                .flat_map(|t| {
                    tokens
                        .iter()
                        .map(move |tok| [t.clone(), vec![*tok]].concat())
                })
                .collect();
            universe.extend(layer.iter().cloned());
        }
        Reference { universe }
    }

    /// Naive recursive matching, written apart from the broker's.
    fn matches(pattern: &[&str], topic: &[&str]) -> bool {
        match (pattern.first(), topic.first()) {
            (None, None) => true,
            (Some(&">"), Some(_)) => true,
            (Some(&"*"), Some(_)) => Self::matches(&pattern[1..], &topic[1..]),
            (Some(p), Some(t)) => p == t && Self::matches(&pattern[1..], &topic[1..]),
            _ => false,
        }
    }

    fn set(&self, pattern: &str) -> Vec<bool> {
        let p: Vec<&str> = pattern.split('.').collect();
        self.universe.iter().map(|t| Self::matches(&p, t)).collect()
    }

    fn publish(&self, rules: &TopicRulesEntry, topic: &str) -> bool {
        let t: Vec<&str> = topic.split('.').collect();
        let hit = |p: &String| Self::matches(&p.split('.').collect::<Vec<_>>(), &t);
        !rules.deny.iter().any(hit) && rules.allow.iter().any(hit)
    }

    fn subscribe(&self, rules: &TopicRulesEntry, pattern: &str) -> bool {
        let asked = self.set(pattern);
        let subset = |rule: &String| {
            let r = self.set(rule);
            asked.iter().zip(&r).all(|(a, r)| !a || *r)
        };
        let meets = |rule: &String| {
            let r = self.set(rule);
            asked.iter().zip(&r).any(|(a, r)| *a && *r)
        };
        !rules.deny.iter().any(meets) && rules.allow.iter().any(subset)
    }

    fn queue(&self, rules: &[QueueRuleEntry], queue: &str, right: QueueRight) -> bool {
        let q: Vec<&str> = queue.split('.').collect();
        let applies =
            |r: &&QueueRuleEntry| Self::matches(&r.pattern.split('.').collect::<Vec<_>>(), &q);
        !rules
            .iter()
            .filter(applies)
            .any(|r| r.deny.contains(&right))
            && rules
                .iter()
                .filter(applies)
                .any(|r| r.allow.contains(&right))
    }
}

fn token_of(i: usize) -> String {
    format!("token-for-user-{i:04}")
}

#[derive(Debug)]
enum Op {
    Publish(String),
    Subscribe(String),
    Consume(String),
}

#[tokio::test]
async fn permissions_over_the_wire_match_the_reference() {
    let seed = std::env::var("TIDINGS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            (now.as_secs() << 30) ^ u64::from(now.subsec_nanos()) | 1
        });
    println!("permission property test seed: {seed} (replay with TIDINGS_SEED={seed})");
    let mut rng = Rng(seed);

    let users: Vec<UserEntry> = (0..USERS)
        .map(|i| UserEntry {
            name: format!("u{i}"),
            token: Some(token_of(i)),
            publish: random_rules(&mut rng),
            subscribe: random_rules(&mut rng),
            queues: (0..rng.below(3))
                .map(|_| {
                    let allow = random_rights(&mut rng);
                    let mut deny = random_rights(&mut rng);
                    if allow.is_empty() && deny.is_empty() {
                        deny.push(QueueRight::Manage);
                    }
                    QueueRuleEntry {
                        pattern: random_pattern(&mut rng),
                        allow,
                        deny,
                    }
                })
                .collect(),
            ..UserEntry::default()
        })
        .collect();
    let config_users = users.clone();
    let broker = common::start_with(move |c| c.security.users = config_users).await;
    let reference = Reference::new();

    let mut decided = 0usize;
    let mut allowed = 0usize;
    for (i, user) in users.iter().enumerate() {
        let mut c = Client::connect(broker.addr).await;
        c.handshake(&user.name, Some(&token_of(i))).await;
        let ops: Vec<Op> = (0..OPS_PER_USER)
            .map(|_| match rng.below(3) {
                0 => Op::Publish(random_topic(&mut rng)),
                1 => Op::Subscribe(random_pattern(&mut rng)),
                _ => Op::Consume(random_topic(&mut rng)),
            })
            .collect();
        // Pipelined: every operation goes out, then the answers are read in order.
        for (n, op) in ops.iter().enumerate() {
            let request_id = u32::try_from(n).unwrap() + 1;
            let frame = match op {
                Op::Publish(topic) => {
                    let mut p = Publish::new(topic.as_str(), &b"x"[..]);
                    p.request_id = Some(request_id);
                    p.confirm = true;
                    Frame::Publish(p)
                }
                Op::Subscribe(pattern) => Frame::Subscribe(Subscribe {
                    request_id,
                    sid: request_id,
                    pattern: pattern.as_str().into(),
                    group: None,
                }),
                Op::Consume(queue) => Frame::Consume(Consume {
                    limit: None,
                    request_id,
                    consumer_id: request_id,
                    queue: queue.as_str().into(),
                    credit: 1,
                }),
            };
            c.send(frame).await;
        }
        for (n, op) in ops.iter().enumerate() {
            let request_id = u32::try_from(n).unwrap() + 1;
            let frame = loop {
                match c.recv().await {
                    // Subscriptions that were allowed may get messages from this
                    // user's own allowed publishes.
                    Some(Frame::Message(_)) => continue,
                    Some(f) => break f,
                    None => panic!("seed {seed}: connection closed at {op:?}"),
                }
            };
            let (got, want) = match (op, &frame) {
                (_, Frame::Error(e)) if e.error_code() == Some(ErrorCode::PermissionDenied) => {
                    assert_eq!(e.request_id, request_id);
                    (false, None)
                }
                (Op::Publish(_), Frame::Confirm(c)) => {
                    assert_eq!(c.request_id, request_id);
                    (true, None)
                }
                (Op::Subscribe(_), Frame::Ok(ok)) => {
                    assert_eq!(ok.request_id, request_id);
                    (true, None)
                }
                // Allowed, but there is no such queue.
                (Op::Consume(_), Frame::Error(e))
                    if e.error_code() == Some(ErrorCode::QueueNotFound) =>
                {
                    (true, None)
                }
                (op, other) => (
                    false,
                    Some(format!("unexpected answer {other:?} to {op:?}")),
                ),
            };
            if let Some(problem) = want {
                panic!("seed {seed}: user {}: {problem}", user.name);
            }
            let expected = match op {
                Op::Publish(topic) => reference.publish(&user.publish, topic),
                Op::Subscribe(pattern) => reference.subscribe(&user.subscribe, pattern),
                Op::Consume(queue) => reference.queue(&user.queues, queue, QueueRight::Consume),
            };
            assert_eq!(
                got, expected,
                "seed {seed}: user {} ({:?}): {op:?} decided {got}, reference says {expected}",
                user.name, user
            );
            decided += 1;
            allowed += usize::from(got);
        }
    }
    println!("{decided} decisions, {allowed} allowed");
    assert!(decided >= 10_000);
    // Both outcomes must occur often, or the test proves little.
    assert!(
        allowed > decided / 20 && allowed < decided - decided / 20,
        "{allowed} of {decided}"
    );
    broker.handle.shutdown().await;
}

fn rules(allow: &[&str], deny: &[&str]) -> TopicRulesEntry {
    TopicRulesEntry {
        allow: allow.iter().map(|s| s.to_string()).collect(),
        deny: deny.iter().map(|s| s.to_string()).collect(),
    }
}

#[tokio::test]
async fn refusals_keep_the_connection_and_create_nothing() {
    let users = vec![
        UserEntry {
            name: "limited".into(),
            token: Some(token_of(1)),
            publish: rules(&["orders.>"], &["orders.secret"]),
            subscribe: rules(&["orders.*"], &[]),
            ..UserEntry::default()
        },
        UserEntry {
            name: "other".into(),
            token: Some(token_of(2)),
            publish: rules(&[">"], &[]),
            ..UserEntry::default()
        },
    ];
    let broker = common::start_with(move |c| c.security.users = users).await;
    let mut c = Client::connect(broker.addr).await;
    c.handshake("limited", Some(&token_of(1))).await;

    // A denied subscription is answered and not created: nothing arrives on it.
    c.send(Frame::Subscribe(Subscribe {
        request_id: 1,
        sid: 1,
        pattern: "billing.>".into(),
        group: None,
    }))
    .await;
    let e = c.expect_error(ErrorCode::PermissionDenied).await;
    assert_eq!(e.request_id, 1);
    assert!(
        e.message.contains("subscribe") && e.message.contains("billing.>"),
        "{}",
        e.message
    );
    c.subscribe(2, "orders.*", None).await;

    // A denied confirmed publish is answered with the error, naming the rule.
    let mut p = Publish::new("orders.secret", &b"x"[..]);
    p.request_id = Some(5);
    p.confirm = true;
    c.send(Frame::Publish(p)).await;
    let e = c.expect_error(ErrorCode::PermissionDenied).await;
    assert_eq!(e.request_id, 5);
    assert!(e.message.contains("orders.secret"), "{}", e.message);

    // The other user publishes to billing: the denied subscription gets nothing,
    // the allowed one gets its message.
    let mut other = Client::connect(broker.addr).await;
    other.handshake("other", Some(&token_of(2))).await;
    other.publish("billing.x", &b"not for you"[..]).await;
    other.publish("orders.new", &b"for you"[..]).await;
    let m = within("message", c.message()).await;
    assert_eq!(m.sid, 2);
    assert_eq!(m.topic, "orders.new");

    // Still open and served.
    let stats = c.stats().await;
    assert!(stats.get("errors.permission_denied").unwrap_or(0) >= 2);
    broker.handle.shutdown().await;
}

#[tokio::test]
async fn queue_rights_over_the_wire() {
    use tidings_protocol::{
        DeadLetters, QueueBind, QueueDeclare, QueueDelete, QueueList, QueueOptions,
    };
    let users = vec![
        UserEntry {
            name: "ops".into(),
            token: Some(token_of(1)),
            subscribe: rules(&["jobs.>"], &["jobs.secret.>"]),
            queues: vec![
                QueueRuleEntry {
                    pattern: "jobs.*".into(),
                    allow: vec![QueueRight::Manage, QueueRight::Consume],
                    deny: vec![],
                },
                QueueRuleEntry {
                    pattern: "jobs.payroll".into(),
                    allow: vec![],
                    deny: vec![QueueRight::Manage],
                },
            ],
            ..UserEntry::default()
        },
        UserEntry {
            name: "admin".into(),
            token: Some(token_of(2)),
            subscribe: rules(&[">"], &[]),
            queues: vec![QueueRuleEntry {
                pattern: ">".into(),
                allow: vec![QueueRight::Manage],
                deny: vec![],
            }],
            ..UserEntry::default()
        },
    ];
    let broker = common::start_with(move |c| c.security.users = users).await;
    let declare = |request_id, name: &str, bindings: &[&str]| {
        Frame::QueueDeclare(QueueDeclare {
            request_id,
            name: name.into(),
            options: QueueOptions {
                bindings: bindings.iter().map(|b| (*b).into()).collect(),
                ..QueueOptions::default()
            },
        })
    };
    let mut admin = Client::connect(broker.addr).await;
    admin.handshake("admin", Some(&token_of(2))).await;
    admin.send(declare(1, "other.queue", &[])).await;
    admin.expect_ok(1).await;
    admin.send(declare(2, "jobs.payroll", &[])).await;
    admin.expect_ok(2).await;

    let mut ops = Client::connect(broker.addr).await;
    ops.handshake("ops", Some(&token_of(1))).await;
    ops.send(declare(1, "jobs.email", &["jobs.email.>"])).await;
    ops.expect_ok(1).await;
    // A binding the user could not subscribe to is refused, and nothing is made.
    ops.send(declare(2, "jobs.leak", &["jobs.secret.>"])).await;
    let e = ops.expect_error(ErrorCode::PermissionDenied).await;
    assert!(e.message.contains("jobs.secret.>"), "{}", e.message);
    ops.send(Frame::QueueBind(QueueBind {
        request_id: 3,
        name: "jobs.email".into(),
        pattern: "billing.>".into(),
    }))
    .await;
    ops.expect_error(ErrorCode::PermissionDenied).await;
    // Deny beats allow: jobs.payroll matches both rules.
    ops.send(Frame::QueueDelete(QueueDelete {
        request_id: 4,
        name: "jobs.payroll".into(),
    }))
    .await;
    let e = ops.expect_error(ErrorCode::PermissionDenied).await;
    assert!(e.message.contains("jobs.payroll"), "{}", e.message);
    ops.send(Frame::DeadLetters(DeadLetters {
        request_id: 5,
        queue: "jobs.email".into(),
        limit: 0,
        from: None,
    }))
    .await;
    ops.expect_error(ErrorCode::PermissionDenied).await;
    // QUEUE_LIST shows only the queues the user has a right on.
    ops.send(Frame::QueueList(QueueList { request_id: 6 }))
        .await;
    match ops.recv().await {
        Some(Frame::QueueListReply(r)) => {
            let mut names: Vec<&str> = r.queues.iter().map(|q| q.name.as_str()).collect();
            names.sort_unstable();
            assert_eq!(names, ["jobs.email", "jobs.payroll"]);
        }
        other => panic!("expected QUEUE_LIST_REPLY, got {other:?}"),
    }
    broker.handle.shutdown().await;
}
