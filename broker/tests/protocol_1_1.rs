//! Protocol 1.1 over TCP: the minor version is negotiated in the handshake, 1.1
//! sessions get the new fields (MESSAGE and DELIVERY ids and reply topics,
//! QUEUE_INFO options) while 1.0 sessions get exactly the 1.0 layouts, errors about
//! undecodable frames carry their request id, unknown HELLO flags can be probed, the
//! server's max credit is announced to 1.1 sessions (and a larger credit clamped to
//! it), and no frame the server sends is larger than the `max_frame_len` it
//! announced.

mod common;

use bytes::{BufMut, Bytes, BytesMut};
use common::{Client, start, start_with};
use tidings_protocol::{
    Ack, Consume, Credit, Delivery, ErrorCode, Frame, Hello, MAX_ENVELOPE_LEN, PROTOCOL_MINOR,
    PROTOCOL_VERSION, Publish, QueueDeclare, QueueInfoRequest, QueueOptions, Text, kind,
};
use tokio::io::AsyncReadExt;

fn raw_frame(kind: u8, flags: u8, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(u32::try_from(body.len() + 2).unwrap());
    b.put_u8(kind);
    b.put_u8(flags);
    b.put_slice(body);
    b
}

async fn declare(c: &mut Client, name: &str, options: QueueOptions) {
    let request_id = c.request_id();
    c.send(Frame::QueueDeclare(QueueDeclare {
        request_id,
        name: name.into(),
        options,
    }))
    .await;
    c.expect_ok(request_id).await;
}

/// Starts a consumer; deliveries may overtake the OK, so they are kept for
/// [`delivery`].
async fn consume(c: &mut Client, consumer_id: u32, queue: &str) -> Vec<Delivery> {
    let request_id = c.request_id();
    c.send(Frame::Consume(Consume {
        limit: None,
        request_id,
        consumer_id,
        queue: queue.into(),
        credit: 8,
    }))
    .await;
    let mut early = Vec::new();
    loop {
        match c.recv().await {
            Some(Frame::Ok(ok)) if ok.request_id == request_id => return early,
            Some(Frame::Delivery(d)) => early.push(d),
            other => panic!("expected OK {request_id}, got {other:?}"),
        }
    }
}

/// The next delivery: one that overtook the CONSUME's OK, or the next frame.
async fn delivery(c: &mut Client, early: &mut Vec<Delivery>) -> Delivery {
    if !early.is_empty() {
        return early.remove(0);
    }
    match c.recv().await {
        Some(Frame::Delivery(d)) => d,
        other => panic!("expected DELIVERY, got {other:?}"),
    }
}

fn with_id_and_reply(topic: &str) -> Publish {
    Publish {
        message_id: Some("order-7".into()),
        reply_to: Some("_INBOX.me.1".into()),
        ..Publish::new(topic, "x")
    }
}

#[tokio::test]
async fn welcome_states_the_minor_version_only_when_asked() {
    let broker = start().await;
    let mut old = Client::connect(broker.addr).await;
    let welcome = old.handshake_minor("old", None, None).await;
    assert_eq!(welcome.minor, None, "a 1.0 client gets a 1.0 WELCOME");
    let mut new = Client::connect(broker.addr).await;
    let welcome = new.handshake_minor("new", None, Some(1)).await;
    assert_eq!(welcome.minor, Some(PROTOCOL_MINOR));
    // A client newer than the server gets the server's minor version.
    let mut newer = Client::connect(broker.addr).await;
    let welcome = newer.handshake_minor("newer", None, Some(9)).await;
    assert_eq!(welcome.minor, Some(PROTOCOL_MINOR));
    assert_eq!(
        welcome.max_frame_len as usize,
        welcome.max_payload as usize + tidings_protocol::FRAME_OVERHEAD
    );
}

#[tokio::test]
async fn message_carries_the_message_id_on_1_1_sessions_only() {
    let broker = start().await;
    let mut old = Client::hello_minor(broker.addr, "old", None).await;
    let mut new = Client::hello_minor(broker.addr, "new", Some(1)).await;
    old.subscribe(1, "orders.>", None).await;
    new.subscribe(1, "orders.>", None).await;
    let mut publisher = Client::hello(broker.addr, "pub").await;
    publisher
        .send(Frame::Publish(with_id_and_reply("orders.created")))
        .await;
    let m = new.message().await;
    assert_eq!(m.message_id.as_deref(), Some("order-7"));
    assert_eq!(m.reply_to.as_deref(), Some("_INBOX.me.1"));
    let m = old.message().await;
    assert_eq!(m.message_id, None, "1.0 MESSAGE has no message_id");
    assert_eq!(m.reply_to.as_deref(), Some("_INBOX.me.1"));
    // The 1.0 bytes carry no 1.1 flag: a 1.0 reader would refuse flag 0x02.
    publisher.publish("orders.plain", "y").await;
    assert_eq!(new.message().await.message_id, None);
    assert_eq!(old.message().await.payload, Bytes::from_static(b"y"));
}

#[tokio::test]
async fn delivery_carries_reply_to_and_message_id_on_1_1_sessions() {
    let broker = start().await;
    let mut new = Client::hello_minor(broker.addr, "new", Some(1)).await;
    declare(
        &mut new,
        "jobs",
        QueueOptions {
            bindings: vec!["jobs.>".into()],
            ..QueueOptions::default()
        },
    )
    .await;
    let mut publisher = Client::hello(broker.addr, "pub").await;
    publisher
        .send(Frame::Publish(with_id_and_reply("jobs.resize")))
        .await;
    publisher.publish("jobs.plain", "z").await;
    publisher.stats().await; // both publishes were handled
    let mut early = consume(&mut new, 1, "jobs").await;
    let d = delivery(&mut new, &mut early).await;
    assert_eq!(d.reply_to.as_deref(), Some("_INBOX.me.1"));
    assert_eq!(d.message_id.as_deref(), Some("order-7"));
    let d = delivery(&mut new, &mut early).await;
    assert_eq!((d.reply_to, d.message_id), (None, None));

    // The same stored message to a 1.0 consumer: the 1.0 layout.
    drop(new);
    let mut old = Client::hello_minor(broker.addr, "old", None).await;
    let mut early = consume(&mut old, 1, "jobs").await;
    let d = delivery(&mut old, &mut early).await;
    assert_eq!(d.attempt, 2, "redelivered after the first consumer left");
    assert_eq!((d.reply_to, d.message_id), (None, None));
}

#[tokio::test]
async fn reply_to_survives_a_restart_of_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let config = tidings_broker::Config::for_test(dir.path());
    let broker = tidings_broker::Broker::start(config.clone()).await.unwrap();
    let mut c = Client::hello_minor(broker.local_addr(), "c", Some(1)).await;
    declare(
        &mut c,
        "jobs",
        QueueOptions {
            bindings: vec!["jobs.>".into()],
            ..QueueOptions::default()
        },
    )
    .await;
    let request_id = c.request_id();
    c.send(Frame::Publish(Publish {
        request_id: Some(request_id),
        confirm: true,
        ..with_id_and_reply("jobs.resize")
    }))
    .await;
    assert!(matches!(c.recv().await, Some(Frame::Confirm(_))));
    drop(c);
    broker.shutdown().await;

    let broker = tidings_broker::Broker::start(config).await.unwrap();
    let mut c = Client::hello_minor(broker.local_addr(), "c", Some(1)).await;
    let mut early = consume(&mut c, 1, "jobs").await;
    let d = delivery(&mut c, &mut early).await;
    assert_eq!(d.reply_to.as_deref(), Some("_INBOX.me.1"));
    assert_eq!(d.message_id.as_deref(), Some("order-7"));
    broker.shutdown().await;
}

#[tokio::test]
async fn queue_info_returns_options_that_declare_again_as_a_match() {
    let broker = start().await;
    let mut c = Client::hello_minor(broker.addr, "c", Some(1)).await;
    declare(
        &mut c,
        "orders",
        QueueOptions {
            bindings: vec!["orders.>".into()],
            max_deliveries: Some(3),
            max_length: Some(100),
            ..QueueOptions::default()
        },
    )
    .await;
    let request_id = c.request_id();
    c.send(Frame::QueueInfoRequest(QueueInfoRequest {
        request_id,
        name: "orders".into(),
    }))
    .await;
    let options = match c.recv().await {
        Some(Frame::QueueInfo(reply)) => reply.options.expect("options on a 1.1 session"),
        other => panic!("expected QUEUE_INFO_REPLY, got {other:?}"),
    };
    assert_eq!(options.max_deliveries, Some(3));
    assert_eq!(options.max_length, Some(100));
    assert_eq!(options.ack_timeout_ms, Some(30_000), "defaults filled in");
    assert_eq!(options.dedup_window_ms, Some(120_000));
    assert_eq!(options.dead_letter.as_deref(), Some("orders.dlq"));
    assert_eq!(options.max_bytes, None, "unlimited stays absent");
    assert_eq!(options.bindings, vec![Text::from("orders.>")]);
    // Declaring exactly what came back is a match, not a mismatch.
    declare(&mut c, "orders", *options).await;

    // A 1.0 session gets the 1.0 reply.
    let mut old = Client::hello(broker.addr, "old").await;
    old.send(Frame::QueueInfoRequest(QueueInfoRequest {
        request_id: 9,
        name: "orders".into(),
    }))
    .await;
    match old.recv().await {
        Some(Frame::QueueInfo(reply)) => assert_eq!(reply.options, None),
        other => panic!("expected QUEUE_INFO_REPLY, got {other:?}"),
    }
}

#[tokio::test]
async fn undecodable_frames_are_answered_under_their_request_id() {
    let broker = start().await;
    let mut c = Client::hello(broker.addr, "c").await;
    // Unknown flags on SUBSCRIBE with request id 77: skipped, connection open.
    c.send_raw(&raw_frame(
        kind::Subscribe,
        0x80,
        &[0, 0, 0, 77, 0, 0, 0, 1],
    ))
    .await;
    let e = c.expect_error(ErrorCode::UnknownFlags).await;
    assert_eq!(e.request_id, 77);
    c.stats().await;
    // A server-only type is refused for its type, under its request id, even with
    // a body that would not decode.
    c.send_raw(&raw_frame(kind::Ok, 0x80, &[0, 0, 0, 78, 1]))
        .await;
    let e = c.expect_error(ErrorCode::UnexpectedFrame).await;
    assert_eq!(e.request_id, 0, "type checked before anything is read");
    c.stats().await;
    // QUEUE_DECLARE with request id 79 and overflow 2, out of its domain: closes.
    let body = [0, 0, 0, 79, 0, 1, b'q', 0, 0, 0, 0x20, 2];
    c.send_raw(&raw_frame(kind::QueueDeclare, 0, &body)).await;
    let e = c.expect_error(ErrorCode::MalformedFrame).await;
    assert_eq!(e.request_id, 79);
    c.expect_closed().await;
}

#[tokio::test]
async fn unknown_hello_flags_can_be_probed() {
    let broker = start().await;
    let mut c = Client::connect(broker.addr).await;
    // HELLO with a flag this server does not define (0x80).
    let mut body = vec![0, 1, 0, 1, b'c'];
    body.extend_from_slice(b"future field");
    c.send_raw(&raw_frame(kind::Hello, 0x80, &body)).await;
    c.expect_error(ErrorCode::UnknownFlags).await;
    // The connection still waits for a HELLO.
    c.send(Frame::Hello(Hello {
        user: None,
        version: PROTOCOL_VERSION,
        client_name: "c".into(),
        token: None,
        minor: Some(1),
    }))
    .await;
    assert!(matches!(c.recv().await, Some(Frame::Welcome(_))));
    c.stats().await;
    // Any other first frame still closes.
    let mut c = Client::connect(broker.addr).await;
    c.send_raw(&raw_frame(0x7e, 0, b"")).await;
    c.expect_error(ErrorCode::HandshakeRequired).await;
    c.expect_closed().await;
}

/// With the largest payload and the largest envelope, a MESSAGE and a DELIVERY
/// (with a 1,024-byte queue name) still fit in the announced `max_frame_len`: the
/// test client decodes with exactly that limit. More envelope is refused with
/// `EnvelopeTooLarge` and the connection stays open.
#[tokio::test]
async fn frames_for_a_max_size_publish_fit_the_announced_max_frame() {
    let broker = start_with(|c| {
        c.max_payload = 4096;
        // The largest the broker's own limits may be set to.
        c.limits.max_message_id_len = 1024;
        c.limits.max_header_bytes = tidings_broker::limits::MAX_HEADER_BYTES_LIMIT;
    })
    .await;
    let mut c = Client::hello_minor(broker.addr, "c", Some(1)).await;
    let queue = "q".repeat(1024);
    declare(
        &mut c,
        &queue,
        QueueOptions {
            bindings: vec![">".into()],
            dead_letter: Some("dlq".into()),
            ..QueueOptions::default()
        },
    )
    .await;
    c.subscribe(1, ">", None).await;
    let topic = "t".repeat(1024);
    let mut publish = Publish {
        request_id: Some(50),
        confirm: true,
        reply_to: Some("r".repeat(1024).into()),
        message_id: Some("m".repeat(1024).into()),
        delay_ms: None,
        ..Publish::new(topic.as_str(), vec![7u8; 4096])
    };
    // Fill the envelope to exactly its limit with headers whose bytes are exactly
    // the largest `--max-header-bytes` allows: each header costs 4 bytes of prefixes
    // beyond its key and value.
    let header_bytes = tidings_broker::limits::MAX_HEADER_BYTES_LIMIT;
    let prefixes = MAX_ENVELOPE_LEN - publish.envelope_len() - header_bytes;
    let count = prefixes / 4;
    assert_eq!(prefixes % 4, 0);
    let (each, extra) = (header_bytes / count, header_bytes % count);
    publish.headers = (0..count)
        .map(|i| {
            let value = "v".repeat(each - 1 + usize::from(i < extra));
            (Text::from("k"), Text::from(value))
        })
        .collect();
    assert_eq!(publish.envelope_len(), MAX_ENVELOPE_LEN);
    c.send(Frame::Publish(publish.clone())).await;
    let mut got_message = false;
    let mut got_confirm = false;
    while !(got_message && got_confirm) {
        match c.recv().await {
            Some(Frame::Message(m)) => {
                assert_eq!(m.payload.len(), 4096);
                got_message = true;
            }
            Some(Frame::Confirm(confirm)) => {
                assert_eq!((confirm.request_id, confirm.queues), (50, 1));
                got_confirm = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut early = consume(&mut c, 1, &queue).await;
    let d = delivery(&mut c, &mut early).await;
    assert_eq!(d.payload.len(), 4096);
    assert_eq!(d.queue.len(), 1024);

    // Four bytes more of envelope (an empty header: prefixes only, so within the
    // header-bytes limit) are refused.
    publish.request_id = Some(51);
    publish.headers.push((Text::from(""), Text::from("")));
    c.send(Frame::Publish(publish)).await;
    let e = c.expect_error(ErrorCode::EnvelopeTooLarge).await;
    assert_eq!(e.request_id, 51);
    c.stats().await;
}

#[tokio::test]
async fn welcome_announces_the_max_credit_on_1_1_sessions_only() {
    let broker = start_with(|config| config.max_credit = 7).await;
    let mut new = Client::connect(broker.addr).await;
    let welcome = new.handshake_minor("new", None, Some(1)).await;
    assert_eq!(welcome.max_credit, Some(7), "the broker's --max-credit");

    // A 1.0 HELLO: the WELCOME's bytes are exactly the 1.0 layout, no flag set and
    // nothing after heartbeat_ms.
    let mut old = Client::connect(broker.addr).await;
    old.send(Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        client_name: "old".into(),
        token: None,
        user: None,
        minor: None,
    }))
    .await;
    let mut len = [0u8; 4];
    common::within("WELCOME length", old.stream.read_exact(&mut len))
        .await
        .unwrap();
    let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
    common::within("WELCOME", old.stream.read_exact(&mut frame))
        .await
        .unwrap();
    assert_eq!(frame[..2], [kind::Welcome, 0], "type WELCOME, no flags");
    let version = env!("CARGO_PKG_VERSION");
    // version, server_version (u16 length + text), max_frame_len, max_payload,
    // heartbeat_ms.
    assert_eq!(
        frame.len(),
        2 + 2 + 2 + version.len() + 4 + 4 + 4,
        "{frame:02x?}"
    );
}

#[tokio::test]
async fn a_credit_above_the_announced_cap_is_clamped_to_it() {
    let broker = start_with(|config| config.max_credit = 2).await;
    let mut c = Client::connect(broker.addr).await;
    let welcome = c.handshake_minor("c", None, Some(1)).await;
    let cap = welcome.max_credit.expect("a 1.1 session is told the cap");
    assert_eq!(cap, 2);
    declare(
        &mut c,
        "capped",
        QueueOptions {
            bindings: vec!["capped".into()],
            ..QueueOptions::default()
        },
    )
    .await;
    for i in 0..5 {
        let request_id = c.request_id();
        c.send(Frame::Publish(Publish {
            request_id: Some(request_id),
            confirm: true,
            ..Publish::new("capped", i.to_string())
        }))
        .await;
        match c.recv().await {
            Some(Frame::Confirm(conf)) => assert_eq!(conf.queues, 1),
            other => panic!("expected CONFIRM, got {other:?}"),
        }
    }
    // CONSUME asks for 100: it succeeds, and the window is the announced cap.
    let request_id = c.request_id();
    c.send(Frame::Consume(Consume {
        limit: None,
        request_id,
        consumer_id: 1,
        queue: "capped".into(),
        credit: 100,
    }))
    .await;
    let mut got = Vec::new();
    let mut ok = false;
    while !ok || got.len() < 2 {
        match c.recv().await {
            Some(Frame::Ok(reply)) if reply.request_id == request_id => ok = true,
            Some(Frame::Delivery(d)) => got.push(d),
            other => panic!("expected OK or DELIVERY, got {other:?}"),
        }
    }
    // CREDIT past the cap changes nothing either. Frames are handled in order and
    // a delivery it let out would go out before the QUEUE_INFO reply.
    c.send(Frame::Credit(Credit {
        consumer_id: 1,
        credit: 1_000,
    }))
    .await;
    let info = queue_info(&mut c, "capped").await;
    assert_eq!(
        info.in_flight,
        u64::from(cap),
        "credit 100 was clamped to {cap}"
    );
    // Acking one makes room for exactly one more.
    let request_id = c.request_id();
    c.send(Frame::Ack(Ack {
        request_id,
        ids: vec![got[0].delivery_id],
    }))
    .await;
    let mut next = None;
    let mut acked = false;
    while !acked || next.is_none() {
        match c.recv().await {
            Some(Frame::Ok(reply)) if reply.request_id == request_id => acked = true,
            Some(Frame::Delivery(d)) if next.is_none() => next = Some(d),
            other => panic!("expected OK or one DELIVERY, got {other:?}"),
        }
    }
    assert_eq!(next.unwrap().payload, Bytes::from_static(b"2"));
    let info = queue_info(&mut c, "capped").await;
    assert_eq!((info.in_flight, info.depth), (2, 4));
}

async fn queue_info(c: &mut Client, name: &str) -> tidings_protocol::QueueInfo {
    let request_id = c.request_id();
    c.send(Frame::QueueInfoRequest(QueueInfoRequest {
        request_id,
        name: name.into(),
    }))
    .await;
    match c.recv().await {
        Some(Frame::QueueInfo(reply)) if reply.request_id == request_id => reply.info,
        other => panic!("expected QUEUE_INFO_REPLY, got {other:?}"),
    }
}
