//! Malformed input, field by field: each gives the typed error that names the
//! frame, field and offset, and each error says whether the connection must close.

use bytes::{BufMut, Bytes, BytesMut};
use tidings_protocol::*;
use tokio_util::codec::{Decoder, Encoder};

use crate::samples::{encode, full_options, queue_info, t};

fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
    FrameCodec::default().decode(buf)
}

fn frame_bytes(kind: u8, flags: u8, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u32(u32::try_from(body.len() + 2).unwrap());
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_slice(body);
    out
}

/// Each text field, found by a marker value, replaced by invalid UTF-8.
#[test]
fn invalid_utf8_names_the_field_and_offset() {
    const M: &str = "zq\u{e9}zq";
    let headers_key = vec![(t(M), t("v"))];
    let headers_value = vec![(t("k"), t(M))];
    let cases: Vec<(Frame, &str)> = vec![
        (
            Hello {
                minor: None,
                version: 1,
                client_name: t(M),
                token: None,
                user: None,
            }
            .into(),
            "client_name",
        ),
        (
            Hello {
                minor: None,
                version: 1,
                client_name: t("c"),
                token: Some(t(M)),
                user: None,
            }
            .into(),
            "token",
        ),
        (
            Welcome {
                minor: None,
                version: 1,
                server_version: t(M),
                max_frame_len: 1,
                max_payload: 1,
                heartbeat_ms: 1,
                max_credit: None,
            }
            .into(),
            "server_version",
        ),
        (Publish::new(M, Bytes::new()).into(), "topic"),
        (
            Publish {
                reply_to: Some(t(M)),
                ..Publish::new("a", Bytes::new())
            }
            .into(),
            "reply_to",
        ),
        (
            Publish {
                message_id: Some(t(M)),
                ..Publish::new("a", Bytes::new())
            }
            .into(),
            "message_id",
        ),
        (
            Publish {
                headers: headers_key.clone(),
                ..Publish::new("a", Bytes::new())
            }
            .into(),
            "header_key",
        ),
        (
            Publish {
                headers: headers_value,
                ..Publish::new("a", Bytes::new())
            }
            .into(),
            "header_value",
        ),
        (
            Subscribe {
                request_id: 1,
                sid: 1,
                pattern: t(M),
                group: None,
            }
            .into(),
            "pattern",
        ),
        (
            Subscribe {
                request_id: 1,
                sid: 1,
                pattern: t("a"),
                group: Some(t(M)),
            }
            .into(),
            "group",
        ),
        (
            Message {
                topic: t(M),
                ..Message::default()
            }
            .into(),
            "topic",
        ),
        (
            Message {
                topic: t("a"),
                headers: headers_key,
                ..Message::default()
            }
            .into(),
            "header_key",
        ),
        (
            QueueDeclare {
                request_id: 1,
                name: t(M),
                options: QueueOptions::default(),
            }
            .into(),
            "name",
        ),
        (
            QueueDeclare {
                request_id: 1,
                name: t("q"),
                options: QueueOptions {
                    bindings: vec![t(M)],
                    ..QueueOptions::default()
                },
            }
            .into(),
            "bindings",
        ),
        (
            QueueDeclare {
                request_id: 1,
                name: t("q"),
                options: QueueOptions {
                    dead_letter: Some(t(M)),
                    ..QueueOptions::default()
                },
            }
            .into(),
            "dead_letter",
        ),
        (
            QueueBind {
                request_id: 1,
                name: t("q"),
                pattern: t(M),
            }
            .into(),
            "pattern",
        ),
        (
            DeadLetters {
                request_id: 1,
                queue: t(M),
                limit: 0,
                from: None,
            }
            .into(),
            "queue",
        ),
        (
            Consume {
                limit: None,
                request_id: 1,
                consumer_id: 1,
                queue: t(M),
                credit: 1,
            }
            .into(),
            "queue",
        ),
        (
            Delivery {
                topic: t(M),
                queue: t("q"),
                ..Delivery::default()
            }
            .into(),
            "topic",
        ),
        (ErrorReply::new(1, ErrorCode::Internal, M).into(), "message"),
        (
            ConsumerCancelled::new(1, CancelReason::QueueDeleted, M).into(),
            "message",
        ),
        (
            StatsReply {
                request_id: 1,
                entries: vec![(t(M), 1)],
            }
            .into(),
            "name",
        ),
        (
            QueueInfoReply {
                options: None,
                request_id: 1,
                info: queue_info(M),
            }
            .into(),
            "name",
        ),
        (
            DeadLettersReply {
                request_id: 1,
                letters: vec![DeadLetter {
                    reason: t(M),
                    ..DeadLetter::default()
                }],
                next: None,
            }
            .into(),
            "reason",
        ),
    ];
    for (frame, field) in cases {
        let mut buf = encode(&frame);
        let at = buf
            .windows(M.len())
            .position(|w| w == M.as_bytes())
            .expect("marker is in the encoding");
        // 0xff never occurs in UTF-8.
        buf[at + 2] = 0xff;
        let err = decode(&mut buf).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::InvalidUtf8 {
                frame: frame.name(),
                field,
                offset: at - HEADER_LEN
            },
            "{frame:?}"
        );
        assert!(err.is_fatal());
        assert_eq!(err.code(), ErrorCode::MalformedFrame);
        assert!(buf.is_empty(), "the bad frame was consumed");
    }
}

/// A CONSUMER_CANCELLED whose body stops inside a field names that field, and a
/// reason this version does not know still decodes (clients must accept it).
#[test]
fn consumer_cancelled_truncated_and_unknown_reason() {
    let full = [0, 0, 0, 7, 1, 0, 2, b'o', b'k'];
    for (cut, field) in [
        (3, "consumer_id"),
        (4, "reason"),
        (6, "message"),
        (8, "message"),
    ] {
        let mut buf = frame_bytes(kind::ConsumerCancelled, 0, &full[..cut]);
        match decode(&mut buf) {
            Err(ProtocolError::UnexpectedEof {
                frame, field: f, ..
            }) => {
                assert_eq!((frame, f), ("CONSUMER_CANCELLED", field), "cut at {cut}");
            }
            other => panic!("cut at {cut}: expected UnexpectedEof, got {other:?}"),
        }
    }
    let mut body = full.to_vec();
    body[4] = 0xee;
    let mut buf = frame_bytes(kind::ConsumerCancelled, 0, &body);
    let Some(Frame::ConsumerCancelled(c)) = decode(&mut buf).unwrap() else {
        panic!("expected CONSUMER_CANCELLED");
    };
    assert_eq!(
        (c.consumer_id, c.reason, c.cancel_reason()),
        (7, 0xee, None)
    );
    assert_eq!(c.message.as_str(), "ok");
}

#[test]
fn too_short_length_prefix_is_fatal() {
    for len in [0u32, 1] {
        let mut buf = BytesMut::new();
        buf.put_u32(len);
        buf.put_slice(&[kind::Ping, 0]);
        let err = decode(&mut buf).unwrap_err();
        assert_eq!(err, ProtocolError::FrameTooShort { len: len as usize });
        assert!(err.is_fatal());
        assert_eq!(err.code(), ErrorCode::MalformedFrame);
    }
}

#[test]
fn frame_of_exactly_max_len_is_accepted() {
    let frame = Frame::Publish(Publish::new("a", vec![0u8; 100]));
    let bytes = encode(&frame);
    let len = bytes.len() - 4;
    assert_eq!(
        FrameCodec::new(len).decode(&mut bytes.clone()),
        Ok(Some(frame.clone()))
    );
    assert_eq!(
        FrameCodec::new(len - 1).decode(&mut bytes.clone()),
        Err(ProtocolError::FrameTooLarge { len, max: len - 1 })
    );
}

#[test]
fn publish_confirm_without_request_id_is_invalid() {
    for flags in [Publish::FLAG_CONFIRM, Publish::FLAG_CHECK_RESPONDERS] {
        let mut body = BytesMut::new();
        body.put_u16(1);
        body.put_slice(b"a");
        body.put_u16(0);
        let err = decode(&mut frame_bytes(kind::Publish, flags, &body)).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::InvalidValue {
                frame: "PUBLISH",
                field: "flags",
                value: u64::from(flags)
            }
        );
        assert!(err.is_fatal());
    }
}

#[test]
fn unknown_queue_option_bits_and_overflow_values_are_invalid() {
    let declare = |options: QueueOptions| {
        encode(
            &QueueDeclare {
                request_id: 1,
                name: t("q"),
                options,
            }
            .into(),
        )
    };
    // `present` sits right after request_id(4) name(2+1) bindings count(2).
    let mut buf = declare(QueueOptions::default());
    buf[HEADER_LEN + 9..HEADER_LEN + 11].copy_from_slice(&0x0200u16.to_be_bytes());
    assert_eq!(
        decode(&mut buf),
        Err(ProtocolError::InvalidValue {
            frame: "QUEUE_DECLARE",
            field: "present",
            value: 0x200
        })
    );

    let mut buf = declare(QueueOptions {
        overflow: Some(Overflow::DropHead),
        ..QueueOptions::default()
    });
    let last = buf.len() - 1;
    buf[last] = 2;
    let err = decode(&mut buf).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::InvalidValue {
            frame: "QUEUE_DECLARE",
            field: "overflow",
            value: 2
        }
    );
    assert!(err.is_fatal());
}

#[test]
fn huge_counts_do_not_allocate_ahead_of_the_bytes() {
    // An ACK claiming u32::MAX ids with none present: an error, not a 32 GiB Vec.
    let mut body = BytesMut::new();
    body.put_u32(1);
    body.put_u32(u32::MAX);
    let err = decode(&mut frame_bytes(kind::Ack, 0, &body)).unwrap_err();
    assert!(matches!(
        err,
        ProtocolError::UnexpectedEof {
            frame: "ACK",
            field: "ids",
            ..
        }
    ));
    // Same for every counted list.
    for (kind, prefix) in [
        (kind::StatsReply, 4usize),
        (kind::QueueListReply, 4),
        (kind::DeadLettersReply, 4),
    ] {
        let mut body = BytesMut::new();
        body.put_bytes(0, prefix);
        body.put_u32(u32::MAX);
        assert!(matches!(
            decode(&mut frame_bytes(kind, 0, &body)),
            Err(ProtocolError::UnexpectedEof { .. })
        ));
    }
}

#[test]
fn fatality_and_codes_of_every_error() {
    let table: Vec<(ProtocolError, bool, ErrorCode)> = vec![
        (
            ProtocolError::FrameTooLarge { len: 9, max: 8 },
            true,
            ErrorCode::FrameTooLarge,
        ),
        (
            ProtocolError::FrameTooShort { len: 1 },
            true,
            ErrorCode::MalformedFrame,
        ),
        (
            ProtocolError::UnknownFrameType { kind: 0xee },
            false,
            ErrorCode::UnknownFrameType,
        ),
        (
            ProtocolError::UnknownFlags {
                frame: "PING",
                flags: 1,
            },
            false,
            ErrorCode::UnknownFlags,
        ),
        (
            ProtocolError::UnexpectedEof {
                frame: "ACK",
                field: "ids",
                offset: 4,
                need: 4,
                have: 0,
            },
            true,
            ErrorCode::MalformedFrame,
        ),
        (
            ProtocolError::InvalidUtf8 {
                frame: "PUBLISH",
                field: "topic",
                offset: 2,
            },
            true,
            ErrorCode::MalformedFrame,
        ),
        (
            ProtocolError::InvalidValue {
                frame: "PUBLISH",
                field: "flags",
                value: 2,
            },
            true,
            ErrorCode::MalformedFrame,
        ),
        (
            ProtocolError::TrailingBytes {
                frame: "OK",
                count: 1,
            },
            true,
            ErrorCode::MalformedFrame,
        ),
        (
            ProtocolError::UnexpectedFrame { frame: "WELCOME" },
            false,
            ErrorCode::UnexpectedFrame,
        ),
    ];
    for (err, fatal, code) in table {
        assert_eq!(err.is_fatal(), fatal, "{err}");
        assert_eq!(err.code(), code, "{err}");
        assert_eq!(
            code.closes_connection(),
            fatal,
            "{err}: code and error agree"
        );
    }
}

#[test]
fn error_codes_are_stable() {
    let expected: &[(u16, &str, bool)] = &[
        (1, "MalformedFrame", true),
        (2, "FrameTooLarge", true),
        (3, "UnknownFrameType", false),
        (4, "UnknownFlags", false),
        (5, "UnsupportedVersion", true),
        (6, "HandshakeRequired", true),
        (7, "HandshakeTimeout", true),
        (8, "AuthFailed", true),
        (9, "UnexpectedFrame", false),
        (10, "TooManyConnections", true),
        (11, "SlowConsumer", true),
        (12, "HeartbeatTimeout", true),
        (13, "ShuttingDown", true),
        (20, "InvalidTopic", false),
        (21, "InvalidPattern", false),
        (22, "DuplicateSubscription", false),
        (23, "UnknownSubscription", false),
        (24, "NoResponders", false),
        (25, "PayloadTooLarge", false),
        (26, "InvalidArgument", false),
        (30, "QueueNotFound", false),
        (31, "QueueOptionsMismatch", false),
        (32, "InvalidQueue", false),
        (33, "UnknownDelivery", false),
        (34, "DuplicateConsumer", false),
        (35, "UnknownConsumer", false),
        (36, "QueueFull", false),
        (37, "StorageFailure", false),
        (40, "PermissionDenied", false),
        (41, "LimitExceeded", false),
        (42, "ClosedByOperator", true),
        (45, "EnvelopeTooLarge", false),
        (99, "Internal", false),
    ];
    let actual: Vec<(u16, &str, bool)> = ErrorCode::ALL
        .iter()
        .map(|c| (*c as u16, c.name(), c.closes_connection()))
        .collect();
    assert_eq!(actual, expected);
    for (value, _, _) in expected {
        assert_eq!(ErrorCode::from_u16(*value).map(|c| c as u16), Some(*value));
    }
    assert_eq!(ErrorCode::from_u16(0), None);
    assert_eq!(ErrorCode::from_u16(1000), None);
    // Unknown codes survive decoding so that old clients can report them.
    let reply = ErrorReply {
        request_id: 1,
        code: 1000,
        message: t("new"),
    };
    assert_eq!(reply.error_code(), None);
    let mut buf = encode(&reply.clone().into());
    assert_eq!(decode(&mut buf), Ok(Some(Frame::Error(reply))));
}

#[test]
fn encoder_refuses_fields_too_long_for_their_prefix() {
    let frame = Frame::Publish(Publish::new("a".repeat(65_536), Bytes::new()));
    let mut dst = BytesMut::from(&b"keep"[..]);
    let err = FrameCodec::new(usize::MAX)
        .encode(&frame, &mut dst)
        .unwrap_err();
    assert_eq!(
        err,
        ProtocolError::TooLongToEncode {
            frame: "PUBLISH",
            field: "topic",
            len: 65_536,
            max: 65_535
        }
    );
    assert_eq!(
        &dst[..],
        b"keep",
        "a failed encode leaves the buffer as it was"
    );
}

#[test]
fn encoder_refuses_frames_over_its_max() {
    let frame = Frame::QueueDeclare(QueueDeclare {
        request_id: 1,
        name: t("orders"),
        options: full_options(),
    });
    let len = encode(&frame).len() - 4;
    let mut dst = BytesMut::new();
    let err = FrameCodec::new(len - 1)
        .encode(frame.clone(), &mut dst)
        .unwrap_err();
    assert_eq!(err, ProtocolError::FrameTooLarge { len, max: len - 1 });
    assert!(dst.is_empty());
    FrameCodec::new(len).encode(frame, &mut dst).unwrap();
    assert_eq!(dst.len(), len + 4);
}

/// The order of checks on a server: length, type known, type allowed from a client,
/// flags, body. A server-only frame with unknown flags and a broken body is
/// refused for its type (non-fatal, skipped), not for its flags or body.
#[test]
fn server_codec_refuses_server_only_types_before_flags_and_body() {
    let mut codec = FrameCodec::for_server(1024);
    let mut buf = frame_bytes(kind::Welcome, 0x80, &[0xff]);
    buf.extend_from_slice(&encode(&Frame::Ping(Ping)));
    let err = codec.decode(&mut buf).unwrap_err();
    assert_eq!(err, ProtocolError::UnexpectedFrame { frame: "WELCOME" });
    assert!(!err.is_fatal());
    assert_eq!(codec.decode(&mut buf), Ok(Some(Frame::Ping(Ping))));
    // Every server-only type, however broken its body, is refused for its type.
    for kind in 0..=255u8 {
        if Frame::direction_of(kind) != Some(Direction::ServerToClient) {
            continue;
        }
        let mut buf = frame_bytes(kind, 0xff, &[1, 2, 3]);
        assert_eq!(
            codec.decode(&mut buf).unwrap_err().code(),
            ErrorCode::UnexpectedFrame,
            "type 0x{kind:02x}"
        );
        assert!(buf.is_empty(), "type 0x{kind:02x}: the frame was skipped");
    }
    // A client's codec still decodes them.
    let mut buf = encode(&OkReply { request_id: 1 }.into());
    assert!(FrameCodec::default().decode(&mut buf).unwrap().is_some());
    // Flags are checked before the body: unknown flags on a truncated ACK.
    let mut buf = frame_bytes(kind::Ack, 0x80, &[0, 0, 0, 9]);
    assert_eq!(
        codec.decode(&mut buf).unwrap_err(),
        ProtocolError::UnknownFlags {
            frame: "ACK",
            flags: 0x80
        }
    );
}

/// A frame that fails to decode leaves its request id behind when it had one.
#[test]
fn failed_decodes_report_the_request_id_when_readable() {
    let mut codec = FrameCodec::for_server(1024);
    // QUEUE_DECLARE with request id 42 and an overflow value out of its domain.
    let mut body = vec![0, 0, 0, 42, 0, 1, b'q', 0, 0, 0, 0x20, 7];
    let mut buf = frame_bytes(kind::QueueDeclare, 0, &body);
    assert!(codec.decode(&mut buf).unwrap_err().is_fatal());
    assert_eq!(codec.failed_request_id(), Some(42));
    // Unknown flags on SUBSCRIBE: skipped, still with its id.
    let mut buf = frame_bytes(kind::Subscribe, 0x40, &[0, 0, 0, 7, 0, 0, 0, 1]);
    codec.decode(&mut buf).unwrap_err();
    assert_eq!(codec.failed_request_id(), Some(7));
    // A body too short for the id: none.
    let mut buf = frame_bytes(kind::Ack, 0, &[0, 0]);
    codec.decode(&mut buf).unwrap_err();
    assert_eq!(codec.failed_request_id(), None);
    // PUBLISH carries one only with flag REQUEST_ID.
    body = vec![0, 0, 0, 5, 0, 1, b' ', 0];
    let mut buf = frame_bytes(kind::Publish, Publish::FLAG_REQUEST_ID, &body[..6]);
    codec.decode(&mut buf).unwrap_err();
    assert_eq!(codec.failed_request_id(), Some(5));
    let mut buf = frame_bytes(kind::Publish, 0, &[0, 9]);
    codec.decode(&mut buf).unwrap_err();
    assert_eq!(codec.failed_request_id(), None);
    // CREDIT has none: its first field is a consumer id.
    let mut buf = frame_bytes(kind::Credit, 0, &[0, 0, 0, 3]);
    codec.decode(&mut buf).unwrap_err();
    assert_eq!(codec.failed_request_id(), None);
    // A good decode clears it.
    let mut buf = encode(&Frame::Ping(Ping));
    codec.decode(&mut buf).unwrap();
    assert_eq!(codec.failed_request_id(), None);
}
