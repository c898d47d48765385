//! Hand-built frames: every variant of `Frame`, with and without its optional fields.

use bytes::{Bytes, BytesMut};
use tidings_protocol::*;
use tokio_util::codec::Encoder;

/// Shorthand for a `Text`.
pub fn t(s: &str) -> Text {
    Text::from(s)
}

/// Encodes one frame with the default codec.
pub fn encode(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::default()
        .encode(frame, &mut buf)
        .expect("sample frames are small enough to encode");
    buf
}

/// A fully populated `QueueOptions` (every `present` bit set).
pub fn full_options() -> QueueOptions {
    QueueOptions {
        bindings: vec![t("orders.>"), t("billing.*.failed")],
        max_deliveries: Some(7),
        ack_timeout_ms: Some(45_000),
        backoff_ms: Some(vec![100, 1_000, 10_000]),
        max_length: Some(1_000_000),
        max_bytes: Some(1 << 30),
        overflow: Some(Overflow::DropHead),
        ttl_ms: Some(86_400_000),
        dedup_window_ms: Some(300_000),
        dead_letter: Some(t("orders.dead")),
    }
}

/// A `QueueInfo` with every figure distinct, so a swapped field shows.
pub fn queue_info(name: &str) -> QueueInfo {
    QueueInfo {
        name: t(name),
        bindings: vec![t("orders.>")],
        depth: 1,
        bytes: 2,
        in_flight: 3,
        delayed: 4,
        consumers: 5,
        dead_lettered: 6,
        published: 7,
        delivered: 8,
        acked: 9,
        publish_rate: 10,
        deliver_rate: 11,
        ack_rate: 12,
    }
}

/// Every frame variant, most of them twice: bare and with every optional field.
pub fn all() -> Vec<(&'static str, Frame)> {
    let headers = vec![
        (t("content-type"), t("application/json")),
        (t("traceparent"), t("00-abc-def-01")),
    ];
    vec![
        (
            "hello",
            Hello {
                minor: None,
                version: PROTOCOL_VERSION,
                client_name: t("billing"),
                token: None,
                user: None,
            }
            .into(),
        ),
        (
            "hello+token",
            Hello {
                minor: None,
                version: PROTOCOL_VERSION,
                client_name: t(""),
                token: Some(t("s3cret")),
                user: None,
            }
            .into(),
        ),
        (
            "welcome",
            Welcome {
                minor: None,
                version: 1,
                server_version: t("0.1.0"),
                max_frame_len: 1_114_112,
                max_payload: 1_048_576,
                heartbeat_ms: 15_000,
                max_credit: None,
            }
            .into(),
        ),
        ("ping", Ping.into()),
        ("pong", Pong.into()),
        (
            "publish",
            Publish::new("orders.created", &b"{\"id\":7}"[..]).into(),
        ),
        ("publish-empty", Publish::new("a", Bytes::new()).into()),
        (
            "publish-full",
            Publish {
                request_id: Some(42),
                confirm: true,
                check_responders: true,
                topic: t("orders.created"),
                reply_to: Some(t("_inbox.7f.1")),
                message_id: Some(t("order-7")),
                delay_ms: Some(60_000),
                headers: headers.clone(),
                payload: Bytes::from_static(b"payload"),
            }
            .into(),
        ),
        (
            "publish-request-id-only",
            Publish {
                request_id: Some(u32::MAX),
                ..Publish::new("x.y", &b"\0\x01"[..])
            }
            .into(),
        ),
        (
            "subscribe",
            Subscribe {
                request_id: 1,
                sid: 2,
                pattern: t("orders.*.created"),
                group: None,
            }
            .into(),
        ),
        (
            "subscribe+group",
            Subscribe {
                request_id: 1,
                sid: 2,
                pattern: t(">"),
                group: Some(t("workers")),
            }
            .into(),
        ),
        (
            "unsubscribe",
            Unsubscribe {
                request_id: 3,
                sid: 2,
            }
            .into(),
        ),
        (
            "message",
            Message {
                message_id: None,
                sid: 2,
                topic: t("orders.eu.created"),
                reply_to: None,
                headers: vec![],
                payload: Bytes::from_static(b"hi"),
            }
            .into(),
        ),
        (
            "message-full",
            Message {
                message_id: None,
                sid: 9,
                topic: t("svc.echo"),
                reply_to: Some(t("_inbox.1")),
                headers: headers.clone(),
                payload: Bytes::from_static(&[0, 255, 1, 254]),
            }
            .into(),
        ),
        (
            "queue-declare",
            QueueDeclare {
                request_id: 4,
                name: t("orders"),
                options: QueueOptions::default(),
            }
            .into(),
        ),
        (
            "queue-declare-full",
            QueueDeclare {
                request_id: 4,
                name: t("orders"),
                options: full_options(),
            }
            .into(),
        ),
        (
            "queue-delete",
            QueueDelete {
                request_id: 5,
                name: t("orders"),
            }
            .into(),
        ),
        (
            "queue-bind",
            QueueBind {
                request_id: 6,
                name: t("orders"),
                pattern: t("orders.>"),
            }
            .into(),
        ),
        (
            "queue-unbind",
            QueueUnbind {
                request_id: 7,
                name: t("orders"),
                pattern: t("orders.>"),
            }
            .into(),
        ),
        (
            "queue-info",
            QueueInfoRequest {
                request_id: 8,
                name: t("orders"),
            }
            .into(),
        ),
        ("queue-list", QueueList { request_id: 9 }.into()),
        (
            "dead-letters",
            DeadLetters {
                request_id: 10,
                queue: t("orders"),
                limit: 0,
                from: None,
            }
            .into(),
        ),
        (
            "dead-letters+from",
            DeadLetters {
                request_id: 10,
                queue: t("orders"),
                limit: 50,
                from: Some(1 << 40),
            }
            .into(),
        ),
        (
            "redrive",
            Redrive {
                request_id: 11,
                queue: t("orders"),
                limit: 100,
            }
            .into(),
        ),
        (
            "consume",
            Consume {
                limit: None,
                request_id: 12,
                consumer_id: 1,
                queue: t("orders"),
                credit: 64,
            }
            .into(),
        ),
        (
            "cancel",
            Cancel {
                request_id: 13,
                consumer_id: 1,
            }
            .into(),
        ),
        (
            "credit",
            Credit {
                consumer_id: 1,
                credit: 32,
            }
            .into(),
        ),
        (
            "delivery",
            Delivery {
                reply_to: None,
                message_id: None,
                consumer_id: 1,
                delivery_id: 1 << 40,
                attempt: 1,
                queue: t("orders"),
                topic: t("orders.created"),
                headers: vec![],
                payload: Bytes::from_static(b"{}"),
            }
            .into(),
        ),
        (
            "delivery+headers",
            Delivery {
                reply_to: None,
                message_id: None,
                consumer_id: 1,
                delivery_id: 2,
                attempt: 3,
                queue: t("orders"),
                topic: t("orders.created"),
                headers: headers.clone(),
                payload: Bytes::new(),
            }
            .into(),
        ),
        (
            "consumer-cancelled",
            ConsumerCancelled::new(1, CancelReason::QueueDeleted, "queue orders was deleted")
                .into(),
        ),
        (
            "consumer-cancelled-unknown-reason",
            ConsumerCancelled {
                consumer_id: u32::MAX,
                reason: 200,
                message: t(""),
            }
            .into(),
        ),
        (
            "ack",
            Ack {
                request_id: 14,
                ids: vec![1, 2, u64::MAX],
            }
            .into(),
        ),
        (
            "ack-empty",
            Ack {
                request_id: 14,
                ids: vec![],
            }
            .into(),
        ),
        (
            "nack",
            Nack {
                request_id: 15,
                delay_ms: None,
                ids: vec![4],
            }
            .into(),
        ),
        (
            "nack+delay",
            Nack {
                request_id: 15,
                delay_ms: Some(5_000),
                ids: vec![4, 5],
            }
            .into(),
        ),
        ("stats", Stats { request_id: 16 }.into()),
        ("ok", OkReply { request_id: 17 }.into()),
        (
            "error",
            ErrorReply::new(18, ErrorCode::InvalidTopic, "empty token at position 1").into(),
        ),
        (
            "error-unknown-code",
            ErrorReply {
                request_id: 0,
                code: 65_000,
                message: t(""),
            }
            .into(),
        ),
        (
            "confirm",
            Confirm {
                request_id: 19,
                queues: 2,
                rejected: 0,
                duplicate: false,
            }
            .into(),
        ),
        (
            "confirm+duplicate",
            Confirm {
                request_id: 19,
                queues: 1,
                rejected: 1,
                duplicate: true,
            }
            .into(),
        ),
        (
            "queue-info-reply",
            QueueInfoReply {
                options: None,
                request_id: 20,
                info: queue_info("orders"),
            }
            .into(),
        ),
        (
            "queue-list-reply",
            QueueListReply {
                request_id: 21,
                queues: vec![queue_info("a"), queue_info("b")],
            }
            .into(),
        ),
        (
            "queue-list-reply-empty",
            QueueListReply {
                request_id: 21,
                queues: vec![],
            }
            .into(),
        ),
        (
            "dead-letters-reply",
            DeadLettersReply {
                request_id: 22,
                letters: vec![
                    DeadLetter {
                        id: 1,
                        topic: t("orders.created"),
                        attempts: 5,
                        reason: t("max_deliveries"),
                        headers: headers.clone(),
                        payload: Bytes::from_static(b"poison"),
                    },
                    DeadLetter::default(),
                ],
                next: None,
            }
            .into(),
        ),
        (
            "dead-letters-reply+more",
            DeadLettersReply {
                request_id: 22,
                letters: vec![DeadLetter::default()],
                next: Some(7),
            }
            .into(),
        ),
        (
            "redrive-reply",
            RedriveReply {
                request_id: 23,
                moved: 3,
            }
            .into(),
        ),
        (
            "stats-reply",
            StatsReply {
                request_id: 24,
                entries: vec![(t("connections.current"), 3), (t("messages.in"), 1 << 33)],
            }
            .into(),
        ),
    ]
}

/// The flag bits each frame type defines, so tests can set the others.
pub fn known_flags(kind: u8) -> u8 {
    match kind {
        kind::Hello => Hello::FLAG_TOKEN | Hello::FLAG_USER | Hello::FLAG_MINOR,
        kind::Welcome => Welcome::FLAG_MINOR | Welcome::FLAG_MAX_CREDIT,
        kind::Publish => 0x3f,
        kind::Subscribe => Subscribe::FLAG_GROUP,
        kind::Message => Message::FLAG_REPLY_TO | Message::FLAG_MESSAGE_ID,
        kind::Delivery => Delivery::FLAG_REPLY_TO | Delivery::FLAG_MESSAGE_ID,
        kind::QueueInfo => QueueInfoReply::FLAG_OPTIONS,
        kind::Consume => Consume::FLAG_LIMIT,
        kind::Nack => Nack::FLAG_DELAY,
        kind::DeadLetters => DeadLetters::FLAG_FROM,
        kind::DeadLettersReply => DeadLettersReply::FLAG_MORE,
        kind::Confirm => Confirm::FLAG_DUPLICATE,
        _ => 0,
    }
}

/// Frames whose last field is a payload taking the rest of the frame: extra bytes
/// are payload, not trailing garbage.
pub fn ends_in_payload(frame: &Frame) -> Option<usize> {
    match frame {
        Frame::Publish(p) => Some(p.payload.len()),
        Frame::Message(m) => Some(m.payload.len()),
        Frame::Delivery(d) => Some(d.payload.len()),
        _ => None,
    }
}
