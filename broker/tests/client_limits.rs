//! The limits on what one client may make the broker hold, each refused with
//! `LimitExceeded` naming its flag while the connection stays open; and error
//! replies whose text would be too long, cut short and marked instead of dropped.

mod common;

use common::Client;
use tidings_protocol::{
    Ack, Consume, ErrorCode, Frame, MAX_ERROR_MESSAGE_LEN, Publish, QueueBind, QueueDeclare,
    QueueOptions, Subscribe, Unsubscribe,
};

async fn limited(c: &mut Client, frame: Frame, flag: &str) {
    c.send(frame).await;
    let e = c.expect_error(ErrorCode::LimitExceeded).await;
    assert!(e.message.contains(&format!("`{flag}`")), "{}", e.message);
}

fn declare(request_id: u32, name: &str, bindings: &[&str]) -> Frame {
    Frame::QueueDeclare(QueueDeclare {
        request_id,
        name: name.into(),
        options: QueueOptions {
            bindings: bindings.iter().map(|b| (*b).into()).collect(),
            ..QueueOptions::default()
        },
    })
}

#[tokio::test]
async fn each_limit_refuses_and_names_its_flag() {
    let broker = common::start_with(|c| {
        c.limits.max_subscriptions = 2;
        c.limits.max_queues = 2;
        c.limits.max_bindings = 2;
        c.limits.max_consumers = 1;
        c.limits.max_header_bytes = 100;
        c.limits.max_message_id_len = 8;
    })
    .await;
    let mut c = Client::hello(broker.addr, "limits").await;

    c.subscribe(1, "a.>", None).await;
    c.subscribe(2, "b.>", None).await;
    let sub = |sid| {
        Frame::Subscribe(Subscribe {
            request_id: 10 + sid,
            sid,
            pattern: "c.>".into(),
            group: None,
        })
    };
    limited(&mut c, sub(3), "max-subscriptions").await;
    c.unsubscribe(1).await;
    c.send(sub(4)).await;
    c.expect_ok(14).await;
    c.send(Frame::Unsubscribe(Unsubscribe {
        request_id: 15,
        sid: 4,
    }))
    .await;
    c.expect_ok(15).await;

    c.send(declare(20, "q1", &["x.1", "x.2"])).await;
    c.expect_ok(20).await;
    c.send(declare(21, "q2", &[])).await;
    c.expect_ok(21).await;
    limited(&mut c, declare(22, "q3", &[]), "max-queues").await;
    // Re-declaring an existing queue is no new queue.
    c.send(declare(23, "q2", &[])).await;
    c.expect_ok(23).await;
    limited(
        &mut c,
        declare(24, "q2", &["y.1", "y.2", "y.3"]),
        "max-bindings",
    )
    .await;
    let bind = Frame::QueueBind(QueueBind {
        request_id: 25,
        name: "q1".into(),
        pattern: "x.3".into(),
    });
    limited(&mut c, bind, "max-bindings").await;

    let consume = |request_id, consumer_id| {
        Frame::Consume(Consume {
            limit: None,
            request_id,
            consumer_id,
            queue: "q1".into(),
            credit: 1,
        })
    };
    c.send(consume(30, 1)).await;
    c.expect_ok(30).await;
    limited(&mut c, consume(31, 2), "max-consumers").await;

    let mut p = Publish::new("h.x", &b"x"[..]);
    p.headers = vec![("k".into(), "v".repeat(200).into())];
    p.request_id = Some(40);
    p.confirm = true;
    limited(&mut c, Frame::Publish(p), "max-header-bytes").await;
    let mut p = Publish::new("h.x", &b"x"[..]);
    p.message_id = Some("0123456789".into());
    p.request_id = Some(41);
    p.confirm = true;
    limited(&mut c, Frame::Publish(p), "max-message-id-len").await;

    // Still open and served.
    assert!(c.stats().await.get("errors.limit_exceeded").unwrap_or(0) >= 6);
    broker.handle.shutdown().await;
}

#[tokio::test]
async fn long_error_texts_are_cut_and_marked_not_dropped() {
    let broker = common::start().await;
    let mut c = Client::hello(broker.addr, "long errors").await;

    // An invalid topic of 60,000 bytes, echoed in the error.
    let topic = format!("{}.>", "t".repeat(60_000));
    let mut p = Publish::new(topic.as_str(), &b"x"[..]);
    p.request_id = Some(1);
    p.confirm = true;
    c.send(Frame::Publish(p)).await;
    let e = c.expect_error(ErrorCode::InvalidTopic).await;
    assert_eq!(e.request_id, 1);
    assert!(e.message.len() <= MAX_ERROR_MESSAGE_LEN);
    assert!(
        e.message.contains("[truncated,"),
        "{}",
        &e.message[e.message.len() - 80..]
    );

    // An ack of 10,000 unknown deliveries, listed in the error.
    c.send(Frame::Ack(Ack {
        request_id: 2,
        ids: (1_000_000..1_010_000).collect(),
    }))
    .await;
    let e = c.expect_error(ErrorCode::UnknownDelivery).await;
    assert_eq!(e.request_id, 2);
    assert!(e.message.len() <= MAX_ERROR_MESSAGE_LEN);
    assert!(
        e.message.ends_with("bytes in all]"),
        "{}",
        &e.message[e.message.len() - 80..]
    );
    broker.handle.shutdown().await;
}
