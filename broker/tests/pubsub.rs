//! Publish/subscribe over TCP: fan-out, wildcards, groups, request/reply and
//! unsubscribe, against a real broker.

mod common;

use std::collections::HashSet;

use common::{Client, start, within};
use tidings_protocol::{ErrorCode, Frame, Publish};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_reaches_every_subscriber_in_order() {
    let broker = start().await;
    let mut subs = Vec::new();
    for i in 0..3 {
        let mut c = Client::hello(broker.addr, &format!("sub{i}")).await;
        c.subscribe(1, "orders.created", None).await;
        subs.push(c);
    }
    let mut publisher = Client::hello(broker.addr, "pub").await;
    for i in 0..100u32 {
        let mut p = Publish::new("orders.created", i.to_be_bytes().to_vec());
        p.headers = vec![("content-type".into(), "application/octet-stream".into())];
        publisher.send(Frame::Publish(p)).await;
    }
    for sub in &mut subs {
        for i in 0..100u32 {
            let m = sub.message().await;
            assert_eq!(m.sid, 1);
            assert_eq!(m.topic, "orders.created");
            assert_eq!(&m.payload[..], &i.to_be_bytes());
            assert_eq!(m.headers.len(), 1);
            assert_eq!(m.reply_to, None);
        }
    }
    let stats = publisher.stats().await;
    assert_eq!(stats.get("messages.in"), Some(100));
    assert_eq!(stats.get("messages.out"), Some(300));
    assert_eq!(stats.get("subscriptions.current"), Some(3));
    assert_eq!(stats.get("connections.current"), Some(4));
    broker.handle.shutdown().await;
}

#[tokio::test]
async fn wildcards_match_per_token() {
    let broker = start().await;
    let mut c = Client::hello(broker.addr, "wild").await;
    let patterns = [
        (1, "a.*"),
        (2, "a.>"),
        (3, "a.b.c"),
        (4, "*.b.*"),
        (5, ">"),
        (6, "a.*.c"),
    ];
    for (sid, p) in patterns {
        c.subscribe(sid, p, None).await;
    }
    let cases: [(&str, &[u32]); 6] = [
        ("a.b", &[1, 2, 5]),
        ("a.b.c", &[2, 3, 4, 5, 6]),
        ("a", &[5]),
        ("x.b.y", &[4, 5]),
        ("a.b.c.d", &[2, 5]),
        ("a.x.c", &[2, 5, 6]),
    ];
    for (topic, expected) in cases {
        c.publish(topic, &b"x"[..]).await;
        let mut got: Vec<u32> = Vec::new();
        for _ in 0..expected.len() {
            let m = c.message().await;
            assert_eq!(m.topic, topic);
            got.push(m.sid);
        }
        got.sort_unstable();
        assert_eq!(got, expected, "topic {topic}");
    }
    // Nothing extra was delivered: the next frame is the stats reply.
    c.stats().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_of_three_shares_each_message_exactly_once() {
    const N: usize = 3000;
    let broker = start().await;
    let mut members = Vec::new();
    for i in 0..3 {
        let mut c = Client::hello(broker.addr, &format!("worker{i}")).await;
        c.subscribe(1, "jobs.>", Some("workers")).await;
        // A plain subscription on each member marks the end of the run.
        c.subscribe(2, "control.done", None).await;
        members.push(c);
    }
    let readers: Vec<_> = members
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    let m = c.message().await;
                    if m.sid == 2 {
                        return seen;
                    }
                    seen.push(u32::from_be_bytes(m.payload[..].try_into().unwrap()));
                }
            })
        })
        .collect();
    let mut publisher = Client::hello(broker.addr, "pub").await;
    for i in 0..3000u32 {
        publisher
            .publish("jobs.work", i.to_be_bytes().to_vec())
            .await;
    }
    publisher.publish("control.done", &b"end"[..]).await;
    let mut all = Vec::new();
    for r in readers {
        let seen = within("a group member", r).await.unwrap();
        assert!(
            seen.len() >= N / 3 - 10,
            "round-robin spreads work: one member got only {}",
            seen.len()
        );
        all.extend(seen);
    }
    assert_eq!(all.len(), N, "every message exactly once in total");
    let unique: HashSet<u32> = all.into_iter().collect();
    assert_eq!(unique.len(), N);
}

#[tokio::test]
async fn request_reply_and_no_responders() {
    let broker = start().await;
    let mut responder = Client::hello(broker.addr, "svc").await;
    responder.subscribe(1, "svc.echo", None).await;
    let mut requester = Client::hello(broker.addr, "caller").await;
    requester.subscribe(9, "_INBOX.caller.>", None).await;

    let mut request = Publish::new("svc.echo", &b"ping"[..]);
    request.request_id = Some(41);
    request.check_responders = true;
    request.reply_to = Some("_INBOX.caller.41".into());
    requester.send(Frame::Publish(request)).await;

    let m = responder.message().await;
    assert_eq!(&m.payload[..], b"ping");
    let reply_to = m.reply_to.expect("reply_to carried through");
    assert_eq!(reply_to, "_INBOX.caller.41");
    responder.publish(&reply_to, &b"pong"[..]).await;

    let reply = requester.message().await;
    assert_eq!(reply.sid, 9);
    assert_eq!(reply.topic, "_INBOX.caller.41");
    assert_eq!(&reply.payload[..], b"pong");

    let mut lonely = Publish::new("svc.nobody", &b"?"[..]);
    lonely.request_id = Some(42);
    lonely.check_responders = true;
    lonely.reply_to = Some("_INBOX.caller.42".into());
    requester.send(Frame::Publish(lonely)).await;
    let err = requester.expect_error(ErrorCode::NoResponders).await;
    assert_eq!(err.request_id, 42);

    // Without the flag, publishing into the void is silent.
    requester.publish("svc.nobody", &b"?"[..]).await;
    let stats = requester.stats().await;
    assert_eq!(stats.get("errors.no_responders"), Some(1));
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let broker = start().await;
    let mut c = Client::hello(broker.addr, "c").await;
    c.subscribe(1, "news.*", None).await;
    c.subscribe(2, "marker", None).await;
    c.publish("news.a", &b"1"[..]).await;
    assert_eq!(c.message().await.sid, 1);
    c.unsubscribe(1).await;
    c.publish("news.a", &b"2"[..]).await;
    c.publish("marker", &b"m"[..]).await;
    // Had "news.a" still been delivered, it would come before the marker.
    let m = c.message().await;
    assert_eq!((m.sid, &m.topic[..]), (2, "marker"));
    // The sid is free again.
    c.subscribe(1, "news.b", None).await;
    c.publish("news.b", &b"3"[..]).await;
    assert_eq!(c.message().await.sid, 1);
}

#[tokio::test]
async fn subscriptions_end_with_their_connection() {
    let broker = start().await;
    let mut a = Client::hello(broker.addr, "a").await;
    a.subscribe(1, "t", None).await;
    let mut b = Client::hello(broker.addr, "b").await;
    assert_eq!(b.stats().await.get("subscriptions.current"), Some(1));
    drop(a);
    // The broker notices the close asynchronously; its gauge says when.
    within("the subscription to go", async {
        loop {
            if b.stats().await.get("connections.current") == Some(1) {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let mut p = Publish::new("t", &b"x"[..]);
    p.request_id = Some(5);
    p.check_responders = true;
    b.send(Frame::Publish(p)).await;
    b.expect_error(ErrorCode::NoResponders).await;
}

#[tokio::test]
async fn ping_is_answered_and_confirm_without_queues_is_zero() {
    let broker = start().await;
    let mut c = Client::hello(broker.addr, "c").await;
    c.send(Frame::Ping(tidings_protocol::Ping)).await;
    assert_eq!(c.recv().await, Some(Frame::Pong(tidings_protocol::Pong)));
    let mut p = Publish::new("orders.created", &b"x"[..]);
    p.request_id = Some(77);
    p.confirm = true;
    c.send(Frame::Publish(p)).await;
    match c.recv().await {
        Some(Frame::Confirm(confirm)) => {
            assert_eq!(confirm.request_id, 77);
            assert_eq!(confirm.queues, 0);
        }
        other => panic!("expected CONFIRM, got {other:?}"),
    }
}
