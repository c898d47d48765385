//! PROTOCOL.md's worked examples, held to the codec byte for byte.
//!
//! Every example in the spec is a fenced `hex` block right after a marker line
//! `<!-- example: NAME -->`. Inside a block, `#` starts a comment and every other
//! token is one byte in two hex digits.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use tidings_protocol::*;
use tokio_util::codec::Decoder;

use crate::samples::{encode, t};

/// The frame each named example must encode.
fn examples() -> BTreeMap<&'static str, Frame> {
    let json = Bytes::from_static(b"{\"id\":7}");
    BTreeMap::from([
        (
            "hello",
            Hello {
                minor: None,
                version: 1,
                client_name: t("billing"),
                token: None,
                user: None,
            }
            .into(),
        ),
        (
            "hello-token",
            Hello {
                minor: None,
                version: 1,
                client_name: t("billing"),
                token: Some(t("s3cret")),
                user: None,
            }
            .into(),
        ),
        (
            "hello-user",
            Hello {
                minor: None,
                version: 1,
                client_name: t("billing"),
                token: Some(t("s3cret")),
                user: Some(t("svc")),
            }
            .into(),
        ),
        (
            "hello-1-1",
            Hello {
                user: None,
                version: 1,
                client_name: t("billing"),
                token: None,
                minor: Some(1),
            }
            .into(),
        ),
        (
            "welcome",
            Welcome {
                version: 1,
                server_version: t("0.1.0"),
                max_frame_len: 1_114_112,
                max_payload: 1_048_576,
                heartbeat_ms: 10_000,
                minor: Some(1),
                max_credit: Some(1024),
            }
            .into(),
        ),
        (
            "welcome-1-0",
            Welcome {
                version: 1,
                server_version: t("0.1.0"),
                max_frame_len: 1_114_112,
                max_payload: 1_048_576,
                heartbeat_ms: 10_000,
                minor: None,
                max_credit: None,
            }
            .into(),
        ),
        ("ping", Ping.into()),
        ("pong", Pong.into()),
        (
            "publish",
            Publish::new("orders.created", json.clone()).into(),
        ),
        (
            "publish-confirm",
            Publish {
                request_id: Some(7),
                confirm: true,
                headers: vec![(t("content-type"), t("application/json"))],
                ..Publish::new("orders.created", json.clone())
            }
            .into(),
        ),
        (
            "subscribe",
            Subscribe {
                request_id: 1,
                sid: 1,
                pattern: t("orders.*"),
                group: None,
            }
            .into(),
        ),
        (
            "subscribe-group",
            Subscribe {
                request_id: 2,
                sid: 2,
                pattern: t("jobs.>"),
                group: Some(t("w")),
            }
            .into(),
        ),
        (
            "message",
            Message {
                message_id: None,
                sid: 1,
                topic: t("orders.created"),
                reply_to: None,
                headers: vec![],
                payload: json.clone(),
            }
            .into(),
        ),
        ("ok", OkReply { request_id: 1 }.into()),
        (
            "confirm",
            Confirm {
                request_id: 7,
                queues: 1,
                rejected: 0,
                duplicate: false,
            }
            .into(),
        ),
        (
            "error",
            ErrorReply::new(1, ErrorCode::InvalidPattern, "bad pattern").into(),
        ),
        (
            "queue-declare",
            QueueDeclare {
                request_id: 3,
                name: t("orders"),
                options: QueueOptions {
                    bindings: vec![t("orders.>")],
                    max_deliveries: Some(10),
                    ack_timeout_ms: Some(60_000),
                    ..QueueOptions::default()
                },
            }
            .into(),
        ),
        (
            "consume",
            Consume {
                limit: None,
                request_id: 4,
                consumer_id: 1,
                queue: t("orders"),
                credit: 16,
            }
            .into(),
        ),
        (
            "delivery",
            Delivery {
                reply_to: None,
                message_id: None,
                consumer_id: 1,
                delivery_id: 1,
                attempt: 1,
                queue: t("orders"),
                topic: t("orders.created"),
                headers: vec![],
                payload: json.clone(),
            }
            .into(),
        ),
        (
            "consumer-cancelled",
            ConsumerCancelled::new(1, CancelReason::QueueDeleted, "queue deleted").into(),
        ),
        (
            "ack",
            Ack {
                request_id: 5,
                ids: vec![1, 2],
            }
            .into(),
        ),
        (
            "nack",
            Nack {
                request_id: 6,
                delay_ms: Some(5_000),
                ids: vec![3],
            }
            .into(),
        ),
        (
            "unsubscribe",
            Unsubscribe {
                request_id: 2,
                sid: 1,
            }
            .into(),
        ),
        (
            "message-id",
            Message {
                sid: 1,
                topic: t("orders.created"),
                reply_to: None,
                message_id: Some(t("order-7")),
                headers: vec![],
                payload: json.clone(),
            }
            .into(),
        ),
        (
            "queue-delete",
            QueueDelete {
                request_id: 8,
                name: t("orders"),
            }
            .into(),
        ),
        (
            "queue-bind",
            QueueBind {
                request_id: 9,
                name: t("orders"),
                pattern: t("orders.>"),
            }
            .into(),
        ),
        (
            "queue-unbind",
            QueueUnbind {
                request_id: 10,
                name: t("orders"),
                pattern: t("orders.>"),
            }
            .into(),
        ),
        (
            "queue-info",
            QueueInfoRequest {
                request_id: 11,
                name: t("orders"),
            }
            .into(),
        ),
        ("queue-list", QueueList { request_id: 12 }.into()),
        (
            "dead-letters",
            DeadLetters {
                request_id: 13,
                queue: t("orders"),
                limit: 10,
                from: None,
            }
            .into(),
        ),
        (
            "redrive",
            Redrive {
                request_id: 14,
                queue: t("orders"),
                limit: 0,
            }
            .into(),
        ),
        (
            "consume-limit",
            Consume {
                request_id: 4,
                consumer_id: 2,
                queue: t("orders"),
                credit: 1,
                limit: Some(1),
            }
            .into(),
        ),
        (
            "cancel",
            Cancel {
                request_id: 15,
                consumer_id: 1,
            }
            .into(),
        ),
        (
            "credit",
            Credit {
                consumer_id: 1,
                credit: 16,
            }
            .into(),
        ),
        (
            "delivery-1-1",
            Delivery {
                consumer_id: 1,
                delivery_id: 2,
                attempt: 1,
                queue: t("orders"),
                topic: t("orders.created"),
                reply_to: Some(t("_INBOX.7")),
                message_id: Some(t("order-7")),
                headers: vec![],
                payload: json.clone(),
            }
            .into(),
        ),
        ("stats", Stats { request_id: 16 }.into()),
        (
            "queue-info-reply",
            QueueInfoReply {
                request_id: 11,
                info: QueueInfo {
                    name: t("orders"),
                    bindings: vec![t("orders.>")],
                    depth: 3,
                    bytes: 24,
                    in_flight: 1,
                    consumers: 1,
                    published: 3,
                    delivered: 1,
                    ..QueueInfo::default()
                },
                options: Some(Box::new(QueueOptions {
                    bindings: vec![t("orders.>")],
                    max_deliveries: Some(5),
                    ack_timeout_ms: Some(30_000),
                    backoff_ms: Some(vec![]),
                    overflow: Some(Overflow::RejectPublish),
                    dedup_window_ms: Some(120_000),
                    dead_letter: Some(t("orders.dlq")),
                    ..QueueOptions::default()
                })),
            }
            .into(),
        ),
        (
            "queue-list-reply",
            QueueListReply {
                request_id: 12,
                queues: vec![QueueInfo {
                    name: t("q"),
                    ..QueueInfo::default()
                }],
            }
            .into(),
        ),
        (
            "dead-letters-reply",
            DeadLettersReply {
                request_id: 13,
                letters: vec![DeadLetter {
                    id: 1,
                    topic: t("orders.created"),
                    attempts: 5,
                    reason: t("max_deliveries"),
                    headers: vec![],
                    payload: json.clone(),
                }],
                next: None,
            }
            .into(),
        ),
        (
            "redrive-reply",
            RedriveReply {
                request_id: 14,
                moved: 1,
            }
            .into(),
        ),
        (
            "stats-reply",
            StatsReply {
                request_id: 16,
                entries: vec![(t("connections.current"), 2), (t("messages.in"), 7)],
            }
            .into(),
        ),
        (
            "error-request-id",
            ErrorReply::new(79, ErrorCode::MalformedFrame, "bad overflow").into(),
        ),
    ])
}

/// `(name, bytes)` of every example in the spec, in document order.
fn parse_examples(doc: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut lines = doc.lines().enumerate();
    let mut pending: Option<String> = None;
    while let Some((n, line)) = lines.next() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("<!-- example:") {
            let name = rest
                .strip_suffix("-->")
                .expect("marker closes on its line")
                .trim();
            assert!(
                pending.is_none(),
                "line {}: marker without a hex block",
                n + 1
            );
            pending = Some(name.to_owned());
        } else if line == "```hex" {
            let name = pending
                .take()
                .unwrap_or_else(|| panic!("line {}: hex block without a marker", n + 1));
            let mut bytes = Vec::new();
            for (m, line) in lines.by_ref() {
                if line.trim() == "```" {
                    break;
                }
                let code = line.split('#').next().unwrap_or("");
                for token in code.split_whitespace() {
                    assert_eq!(token.len(), 2, "line {}: `{token}` is not one byte", m + 1);
                    bytes.push(
                        u8::from_str_radix(token, 16)
                            .unwrap_or_else(|_| panic!("line {}: bad hex `{token}`", m + 1)),
                    );
                }
            }
            out.push((name, bytes));
        } else if pending.is_some() && !line.is_empty() {
            panic!(
                "line {}: a marker must be followed by a ```hex block",
                n + 1
            );
        }
    }
    assert!(pending.is_none(), "marker at the end of the document");
    out
}

#[test]
fn protocol_md_examples_match_the_codec() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/PROTOCOL.md");
    let doc = std::fs::read_to_string(path).expect("PROTOCOL.md exists beside Cargo.toml");
    let found = parse_examples(&doc);
    let mut wanted = examples();
    let mut codec = FrameCodec::default();
    for (name, bytes) in &found {
        let frame = wanted
            .remove(name.as_str())
            .unwrap_or_else(|| panic!("PROTOCOL.md example `{name}` is unknown or repeated"));
        assert_eq!(
            hex(&encode(&frame)),
            hex(bytes),
            "example `{name}`: the codec's bytes (left) differ from PROTOCOL.md (right)"
        );
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            codec.decode(&mut buf),
            Ok(Some(frame)),
            "example `{name}` decodes"
        );
        assert!(buf.is_empty(), "example `{name}` holds exactly one frame");
    }
    assert!(
        wanted.is_empty(),
        "missing from PROTOCOL.md: {:?}",
        wanted.keys()
    );
}

#[test]
fn example_parser_reads_comments_and_rejects_nothing_valid() {
    let doc = "text\n<!-- example: x -->\n```hex\n00 01 # comment 02\nff\n```\n";
    assert_eq!(
        parse_examples(doc),
        vec![("x".to_owned(), vec![0, 1, 0xff])]
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every frame type this version defines has at least one example in PROTOCOL.md.
#[test]
fn every_frame_type_has_an_example() {
    let mut missing = Vec::new();
    let examples = examples();
    for kind in 0..=255u8 {
        let Some(name) = Frame::name_of(kind) else {
            continue;
        };
        if !examples.values().any(|f| f.kind() == kind) {
            missing.push(name);
        }
    }
    assert!(missing.is_empty(), "no example for {missing:?}");
}
