//! Every kind of bad input gets an ERROR frame with its own code; framing and auth
//! errors close the connection, semantic ones leave it open.

mod common;

use bytes::{BufMut, BytesMut};
use common::{Client, start, start_with};
use tidings_protocol::{
    ErrorCode, Frame, Hello, Message, PROTOCOL_VERSION, Publish, Subscribe, Unsubscribe, Welcome,
};

/// A frame with this type, flags and body, built by hand.
fn raw_frame(kind: u8, flags: u8, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(u32::try_from(body.len() + 2).unwrap());
    b.put_u8(kind);
    b.put_u8(flags);
    b.put_slice(body);
    b
}

/// Semantic errors leave the connection usable: a STATS round trip proves it.
async fn still_open(c: &mut Client) {
    c.stats().await;
}

#[tokio::test]
async fn malformed_frame_closes() {
    let broker = start().await;
    let mut c = Client::hello(broker.addr, "c").await;
    // SUBSCRIBE whose body stops inside the sid.
    c.send_raw(&raw_frame(
        tidings_protocol::kind::Subscribe,
        0,
        &[0, 0, 0, 1, 0],
    ))
    .await;
    c.expect_error(ErrorCode::MalformedFrame).await;
    c.expect_closed().await;

    let mut c = Client::hello(broker.addr, "c").await;
    // A length prefix too short to hold type and flags.
    c.send_raw(&[0, 0, 0, 1, 0x10]).await;
    c.expect_error(ErrorCode::MalformedFrame).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn unknown_type_and_flags_are_skipped() {
    let broker = start().await;
    let mut c = Client::hello(broker.addr, "c").await;
    c.send_raw(&raw_frame(0x7e, 0, b"whatever")).await;
    c.expect_error(ErrorCode::UnknownFrameType).await;
    still_open(&mut c).await;
    c.send_raw(&raw_frame(tidings_protocol::kind::Ping, 0x80, b""))
        .await;
    c.expect_error(ErrorCode::UnknownFlags).await;
    still_open(&mut c).await;
}

#[tokio::test]
async fn server_only_frames_and_second_hello_are_unexpected() {
    let broker = start().await;
    let mut c = Client::hello(broker.addr, "c").await;
    c.send(Frame::Message(Message {
        sid: 1,
        topic: "t".into(),
        ..Message::default()
    }))
    .await;
    c.expect_error(ErrorCode::UnexpectedFrame).await;
    c.send(Frame::Welcome(Welcome {
        minor: None,
        version: 1,
        server_version: "x".into(),
        max_frame_len: 1,
        max_payload: 1,
        heartbeat_ms: 0,
        max_credit: None,
    }))
    .await;
    c.expect_error(ErrorCode::UnexpectedFrame).await;
    c.send(Frame::Hello(Hello {
        minor: None,
        version: PROTOCOL_VERSION,
        client_name: "again".into(),
        token: None,
        user: None,
    }))
    .await;
    c.expect_error(ErrorCode::UnexpectedFrame).await;
    still_open(&mut c).await;
}

#[tokio::test]
async fn oversized_frame_closes_before_it_is_read() {
    let broker = start_with(|c| c.max_payload = 4096).await;
    let mut c = Client::hello(broker.addr, "c").await;
    // Only the header: the broker must refuse on the length alone.
    c.send_raw(&[0x10, 0, 0, 0, 0x10, 0]).await;
    c.expect_error(ErrorCode::FrameTooLarge).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn payload_over_the_limit_is_refused() {
    let broker = start_with(|c| c.max_payload = 4096).await;
    let mut c = Client::hello(broker.addr, "c").await;
    c.subscribe(1, "big", None).await;
    let mut p = Publish::new("big", vec![0u8; 4097]);
    p.request_id = Some(3);
    c.send(Frame::Publish(p)).await;
    let err = c.expect_error(ErrorCode::PayloadTooLarge).await;
    assert_eq!(err.request_id, 3);
    // Exactly at the limit is fine.
    c.publish("big", vec![0u8; 4096]).await;
    assert_eq!(c.message().await.payload.len(), 4096);
}

#[tokio::test]
async fn invalid_topic_and_pattern() {
    let broker = start().await;
    let mut c = Client::hello(broker.addr, "c").await;
    for topic in ["a..b", "a.*", "a.>", "has space", ""] {
        let mut p = Publish::new(topic, &b"x"[..]);
        p.request_id = Some(11);
        c.send(Frame::Publish(p)).await;
        let err = c.expect_error(ErrorCode::InvalidTopic).await;
        assert_eq!(err.request_id, 11);
    }
    let mut p = Publish::new("ok.topic", &b"x"[..]);
    p.reply_to = Some("bad..inbox".into());
    c.send(Frame::Publish(p)).await;
    c.expect_error(ErrorCode::InvalidTopic).await;
    for pattern in ["a.>.b", "a..b", "a*", ""] {
        c.send(Frame::Subscribe(Subscribe {
            request_id: 12,
            sid: 1,
            pattern: pattern.into(),
            group: None,
        }))
        .await;
        let err = c.expect_error(ErrorCode::InvalidPattern).await;
        assert_eq!(err.request_id, 12);
    }
    c.send(Frame::Subscribe(Subscribe {
        request_id: 13,
        sid: 1,
        pattern: "a.b".into(),
        group: Some("".into()),
    }))
    .await;
    c.expect_error(ErrorCode::InvalidArgument).await;
    let stats = c.stats().await;
    assert_eq!(stats.get("errors.invalid_topic"), Some(6));
    assert_eq!(stats.get("errors.invalid_pattern"), Some(4));
    assert_eq!(stats.get("subscriptions.current"), Some(0));
}

#[tokio::test]
async fn duplicate_and_unknown_subscription_ids() {
    let broker = start().await;
    let mut c = Client::hello(broker.addr, "c").await;
    c.subscribe(1, "a", None).await;
    c.send(Frame::Subscribe(Subscribe {
        request_id: 20,
        sid: 1,
        pattern: "b".into(),
        group: None,
    }))
    .await;
    assert_eq!(
        c.expect_error(ErrorCode::DuplicateSubscription)
            .await
            .request_id,
        20
    );
    c.send(Frame::Unsubscribe(Unsubscribe {
        request_id: 21,
        sid: 99,
    }))
    .await;
    assert_eq!(
        c.expect_error(ErrorCode::UnknownSubscription)
            .await
            .request_id,
        21
    );
    // The original subscription is intact.
    c.publish("a", &b"x"[..]).await;
    assert_eq!(c.message().await.sid, 1);
}

#[tokio::test]
async fn nothing_before_the_handshake() {
    let broker = start().await;
    let mut c = Client::connect(broker.addr).await;
    c.send(Frame::Publish(Publish::new("a", &b"x"[..]))).await;
    c.expect_error(ErrorCode::HandshakeRequired).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn unsupported_version_closes() {
    let broker = start().await;
    let mut c = Client::connect(broker.addr).await;
    c.send(Frame::Hello(Hello {
        minor: None,
        version: PROTOCOL_VERSION + 1,
        client_name: "future".into(),
        token: None,
        user: None,
    }))
    .await;
    c.expect_error(ErrorCode::UnsupportedVersion).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn token_is_required_when_configured() {
    let broker = start_with(|c| c.auth_token = Some("s3cret".into())).await;
    for token in [None, Some("wrong"), Some("s3cre"), Some("")] {
        let mut c = Client::connect(broker.addr).await;
        c.send(Frame::Hello(Hello {
            minor: None,
            version: PROTOCOL_VERSION,
            client_name: "c".into(),
            token: token.map(Into::into),
            user: None,
        }))
        .await;
        c.expect_error(ErrorCode::AuthFailed).await;
        c.expect_closed().await;
    }
    let mut c = Client::connect(broker.addr).await;
    c.handshake("c", Some("s3cret")).await;
    let stats = c.stats().await;
    assert_eq!(stats.get("errors.auth_failed"), Some(4));
}

#[tokio::test]
async fn queue_commands_answer_until_queues_exist() {
    let broker = start().await;
    let mut c = Client::hello(broker.addr, "c").await;
    c.send(Frame::QueueList(tidings_protocol::QueueList {
        request_id: 30,
    }))
    .await;
    match c.recv().await {
        // Without the queue engine: a clear error. With it: the (empty) list.
        Some(Frame::Error(e)) => {
            assert_eq!(e.request_id, 30);
            assert_eq!(e.error_code(), Some(ErrorCode::Internal));
        }
        Some(Frame::QueueListReply(r)) => assert_eq!(r.request_id, 30),
        other => panic!("unexpected answer {other:?}"),
    }
    still_open(&mut c).await;
}
