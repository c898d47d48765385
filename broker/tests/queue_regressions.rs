//! Queue semantics over the wire, one test per bug found by trying the documented
//! behaviour from PROTOCOL.md (issue 12): a real broker on 127.0.0.1:0, raw frames
//! through the real codec, restarts on the same data dir.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Client, WAIT, within};
use tidings_broker::queue::MESSAGE_OVERHEAD;
use tidings_broker::{Broker, BrokerHandle, Config};
use tidings_protocol::{
    Ack, Cancel, CancelReason, Confirm, Consume, DeadLetter, DeadLetters, Delivery, ErrorCode,
    Frame, Nack, Overflow, Publish, QueueDeclare, QueueDelete, QueueInfo, QueueInfoRequest,
    QueueOptions, Redrive, Text,
};

/// A broker whose data dir outlives it, so a test can restart on it.
struct Restartable {
    dir: tempfile::TempDir,
    handle: Option<BrokerHandle>,
    adjust: fn(&mut Config),
}

impl Restartable {
    async fn start(adjust: fn(&mut Config)) -> Self {
        let mut b = Restartable {
            dir: tempfile::tempdir().unwrap(),
            handle: None,
            adjust,
        };
        b.boot().await;
        b
    }

    async fn boot(&mut self) {
        let mut config = Config::for_test(self.dir.path());
        (self.adjust)(&mut config);
        self.handle = Some(Broker::start(config).await.expect("broker starts"));
    }

    fn addr(&self) -> SocketAddr {
        self.handle.as_ref().unwrap().local_addr()
    }

    async fn restart(&mut self) {
        if let Some(h) = self.handle.take() {
            within("shutdown", h.shutdown()).await;
        }
        self.boot().await;
    }

    async fn client(&self) -> Q {
        Q(Client::hello(self.addr(), "test").await, VecDeque::new())
    }
}

/// A raw client with queue helpers. Deliveries that arrive while it waits for an
/// answer are kept for [`Q::delivery`].
struct Q(Client, VecDeque<Delivery>);

impl Q {
    /// Sends a request and returns its answer, keeping deliveries that come first.
    async fn request(&mut self, frame: Frame) -> Frame {
        let request_id = frame.request_id().unwrap();
        self.0.send(frame).await;
        loop {
            match self.0.recv().await.expect("an answer") {
                Frame::Delivery(d) => self.1.push_back(d),
                f if f.request_id() == Some(request_id) => return f,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    async fn declare(&mut self, name: &str, options: QueueOptions) -> Frame {
        let request_id = self.0.request_id();
        self.request(Frame::QueueDeclare(QueueDeclare {
            request_id,
            name: name.into(),
            options,
        }))
        .await
    }

    async fn declare_ok(&mut self, name: &str, options: QueueOptions) {
        match self.declare(name, options).await {
            Frame::Ok(_) => {}
            other => panic!("declare {name}: {other:?}"),
        }
    }

    async fn publish(&mut self, topic: &str, payload: &str) -> Confirm {
        let request_id = self.0.request_id();
        let frame = Frame::Publish(Publish {
            request_id: Some(request_id),
            confirm: true,
            ..Publish::new(topic, Bytes::copy_from_slice(payload.as_bytes()))
        });
        match self.request(frame).await {
            Frame::Confirm(c) => c,
            other => panic!("expected CONFIRM, got {other:?}"),
        }
    }

    async fn info(&mut self, name: &str) -> QueueInfo {
        let request_id = self.0.request_id();
        let frame = Frame::QueueInfoRequest(QueueInfoRequest {
            request_id,
            name: name.into(),
        });
        match self.request(frame).await {
            Frame::QueueInfo(r) => r.info,
            other => panic!("expected QUEUE_INFO_REPLY, got {other:?}"),
        }
    }

    async fn consume(&mut self, consumer_id: u32, queue: &str, credit: u32) {
        let request_id = self.0.request_id();
        let frame = Frame::Consume(Consume {
            request_id,
            consumer_id,
            queue: queue.into(),
            credit,
            limit: None,
        });
        match self.request(frame).await {
            Frame::Ok(_) => {}
            other => panic!("expected OK, got {other:?}"),
        }
    }

    async fn delivery(&mut self) -> Delivery {
        if let Some(d) = self.1.pop_front() {
            return d;
        }
        match self.0.recv().await {
            Some(Frame::Delivery(d)) => d,
            other => panic!("expected DELIVERY, got {other:?}"),
        }
    }

    async fn deliveries(&mut self, n: usize) -> Vec<Delivery> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.delivery().await);
        }
        out
    }

    async fn nack(&mut self, id: u64) {
        let request_id = self.0.request_id();
        let answer = self
            .request(Frame::Nack(Nack {
                request_id,
                delay_ms: None,
                ids: vec![id],
            }))
            .await;
        assert!(matches!(answer, Frame::Ok(_)), "{answer:?}");
    }

    async fn dead_letters(
        &mut self,
        queue: &str,
        from: Option<u64>,
    ) -> (Vec<DeadLetter>, Option<u64>) {
        let request_id = self.0.request_id();
        let answer = self
            .request(Frame::DeadLetters(DeadLetters {
                request_id,
                queue: queue.into(),
                limit: 0,
                from,
            }))
            .await;
        match answer {
            Frame::DeadLettersReply(r) => (r.letters, r.next),
            other => panic!("expected DEAD_LETTERS_REPLY, got {other:?}"),
        }
    }

    async fn redrive(&mut self, queue: &str) -> u64 {
        let request_id = self.0.request_id();
        let answer = self
            .request(Frame::Redrive(Redrive {
                request_id,
                queue: queue.into(),
                limit: 0,
            }))
            .await;
        match answer {
            Frame::RedriveReply(r) => r.moved,
            other => panic!("expected REDRIVE_REPLY, got {other:?}"),
        }
    }

    /// Polls DEAD_LETTERS until `queue` has `n` letters (moves finish in the
    /// background once the copy is durable).
    async fn wait_letters(&mut self, queue: &str, n: usize) -> Vec<DeadLetter> {
        let deadline = Instant::now() + WAIT;
        loop {
            let (letters, _) = self.dead_letters(queue, None).await;
            if letters.len() == n {
                return letters;
            }
            assert!(
                Instant::now() < deadline,
                "{queue} never had {n} letters: {letters:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn bound(binding: &str) -> QueueOptions {
    QueueOptions {
        bindings: vec![Text::from(binding)],
        ..QueueOptions::default()
    }
}

fn body(d: &Delivery) -> &str {
    std::str::from_utf8(&d.payload).unwrap()
}

#[tokio::test]
async fn drop_head_refuses_a_message_that_can_never_fit_without_touching_the_queue() {
    let mut broker = Restartable::start(|_| {}).await;
    let mut c = broker.client().await;
    // Room for exactly one 4-byte message on topic "t".
    let max_bytes = MESSAGE_OVERHEAD + 1 + 4;
    c.declare_ok(
        "q",
        QueueOptions {
            max_bytes: Some(max_bytes),
            overflow: Some(Overflow::DropHead),
            ..bound("t")
        },
    )
    .await;
    let first = c.publish("t", "cccc").await;
    assert_eq!((first.queues, first.rejected), (1, 0));
    let big = c.publish("t", "dddddd").await;
    assert_eq!((big.queues, big.rejected), (0, 1), "larger than max_bytes");
    assert_eq!(c.info("q").await.depth, 1, "cccc is still there");
    drop(c);
    broker.restart().await;
    let mut c = broker.client().await;
    c.consume(1, "q", 10).await;
    assert_eq!(body(&c.delivery().await), "cccc");
    assert_eq!(c.info("q").await.in_flight, 1, "and nothing else");
}

#[tokio::test]
async fn limits_count_messages_in_flight_under_both_policies() {
    let broker = Restartable::start(|_| {}).await;
    let mut c = broker.client().await;
    for (name, overflow) in [
        ("reject", Overflow::RejectPublish),
        ("drop", Overflow::DropHead),
    ] {
        c.declare_ok(
            name,
            QueueOptions {
                max_length: Some(2),
                overflow: Some(overflow),
                ..bound(name)
            },
        )
        .await;
        c.publish(name, "a").await;
        c.publish(name, "b").await;
    }
    c.consume(1, "reject", 1).await;
    let held_reject = c.deliveries(1).await;
    c.consume(2, "drop", 1).await;
    let held_drop = c.deliveries(1).await;
    assert_eq!((body(&held_reject[0]), body(&held_drop[0])), ("a", "a"));

    let r = c.publish("reject", "c").await;
    assert_eq!(
        (r.queues, r.rejected),
        (0, 1),
        "a in flight + b = max_length"
    );
    assert_eq!(c.info("reject").await.depth, 2);

    let d = c.publish("drop", "c").await;
    assert_eq!((d.queues, d.rejected), (1, 0));
    let info = c.info("drop").await;
    assert_eq!(
        (info.depth, info.in_flight),
        (2, 1),
        "b was dropped, a stays in flight"
    );
    let request_id = c.0.request_id();
    let answer = c
        .request(Frame::Ack(Ack {
            request_id,
            ids: vec![held_drop[0].delivery_id],
        }))
        .await;
    assert!(matches!(answer, Frame::Ok(_)));
    assert_eq!(body(&c.delivery().await), "c");
}

#[tokio::test]
async fn a_shared_dead_letter_queue_keeps_each_queues_letters_apart() {
    let broker = Restartable::start(|_| {}).await;
    let mut c = broker.client().await;
    for name in ["sa", "sb"] {
        c.declare_ok(
            name,
            QueueOptions {
                max_deliveries: Some(1),
                dead_letter: Some("grave".into()),
                ..bound(name)
            },
        )
        .await;
        c.publish(name, &format!("from-{name}")).await;
    }
    // Before anything is dead-lettered: an empty list, not QueueNotFound.
    assert_eq!(c.dead_letters("sa", None).await, (vec![], None));
    for (id, name) in [(1, "sa"), (2, "sb")] {
        c.consume(id, name, 1).await;
        let d = c.delivery().await;
        c.nack(d.delivery_id).await;
    }
    let sa = c.wait_letters("sa", 1).await;
    assert_eq!(&sa[0].payload[..], b"from-sa");
    assert_eq!(sa[0].reason, "max_deliveries");
    let sb = c.wait_letters("sb", 1).await;
    assert_eq!(&sb[0].payload[..], b"from-sb");

    assert_eq!(c.redrive("sa").await, 1);
    assert_eq!(c.dead_letters("sa", None).await.0.len(), 0);
    assert_eq!(
        c.dead_letters("sb", None).await.0.len(),
        1,
        "sb's letter stays"
    );
    assert_eq!(c.info("grave").await.depth, 1);
    // The redriven message is back in sa as a fresh message.
    let back = c.delivery().await;
    assert_eq!(
        (body(&back), back.attempt, back.queue.as_str()),
        ("from-sa", 1, "sa")
    );
}

#[tokio::test]
async fn deleting_a_queue_cancels_its_consumers_and_frees_their_ids() {
    let broker = Restartable::start(|_| {}).await;
    let mut consumer = broker.client().await;
    let mut admin = broker.client().await;
    consumer.declare_ok("q", bound("t")).await;
    admin.publish("t", "m").await;
    consumer.consume(5, "q", 10).await;
    let got = consumer.deliveries(1).await;

    let request_id = admin.0.request_id();
    let answer = admin
        .request(Frame::QueueDelete(QueueDelete {
            request_id,
            name: "q".into(),
        }))
        .await;
    assert!(matches!(answer, Frame::Ok(_)), "{answer:?}");
    match consumer.0.recv().await {
        Some(Frame::ConsumerCancelled(n)) => {
            assert_eq!(n.consumer_id, 5);
            assert_eq!(n.cancel_reason(), Some(CancelReason::QueueDeleted));
            assert!(n.message.contains('q'), "{n:?}");
        }
        other => panic!("expected CONSUMER_CANCELLED, got {other:?}"),
    }
    // The id is free and the old delivery unknown.
    let request_id = consumer.0.request_id();
    consumer
        .0
        .send(Frame::Cancel(Cancel {
            request_id,
            consumer_id: 5,
        }))
        .await;
    consumer.0.expect_error(ErrorCode::UnknownConsumer).await;
    let request_id = consumer.0.request_id();
    consumer
        .0
        .send(Frame::Ack(Ack {
            request_id,
            ids: vec![got[0].delivery_id],
        }))
        .await;
    consumer.0.expect_error(ErrorCode::UnknownDelivery).await;
    consumer.declare_ok("q", bound("t")).await;
    consumer.consume(5, "q", 10).await;
    admin.publish("t", "again").await;
    assert_eq!(body(&consumer.delivery().await), "again");
}

#[tokio::test]
async fn dead_letter_cycles_are_refused_at_declare() {
    let broker = Restartable::start(|_| {}).await;
    let mut c = broker.client().await;
    c.declare_ok(
        "a",
        QueueOptions {
            dead_letter: Some("b".into()),
            ..QueueOptions::default()
        },
    )
    .await;
    let answer = c
        .declare(
            "b",
            QueueOptions {
                dead_letter: Some("a".into()),
                ..QueueOptions::default()
            },
        )
        .await;
    match answer {
        Frame::Error(e) => {
            assert_eq!(e.error_code(), Some(ErrorCode::InvalidQueue));
            assert!(
                e.message.contains("a -> b -> a") || e.message.contains("b -> a -> b"),
                "{e:?}"
            );
        }
        other => panic!("expected InvalidQueue, got {other:?}"),
    }
}

#[tokio::test]
async fn a_name_too_long_for_its_default_dead_letter_queue_says_so() {
    let broker = Restartable::start(|_| {}).await;
    let mut c = broker.client().await;
    let name = "n".repeat(1022);
    match c.declare(&name, QueueOptions::default()).await {
        Frame::Error(e) => {
            assert_eq!(e.error_code(), Some(ErrorCode::InvalidQueue));
            assert!(e.message.contains("default dead-letter queue"), "{e:?}");
        }
        other => panic!("expected InvalidQueue, got {other:?}"),
    }
    c.declare_ok(
        &name,
        QueueOptions {
            dead_letter: Some("short.dlq".into()),
            ..QueueOptions::default()
        },
    )
    .await;
}

#[tokio::test]
async fn expired_messages_are_dead_lettered_never_early() {
    const TTL: u64 = 300;
    let broker = Restartable::start(|_| {}).await;
    let mut c = broker.client().await;
    c.declare_ok(
        "q",
        QueueOptions {
            ttl_ms: Some(TTL),
            dead_letter: Some("q.expired".into()),
            ..bound("t")
        },
    )
    .await;
    c.declare_ok("q.expired", QueueOptions::default()).await;
    // A queue without a dead-letter queue of its own just drops them.
    c.declare_ok(
        "plain",
        QueueOptions {
            ttl_ms: Some(TTL),
            ..bound("t")
        },
    )
    .await;
    let sent = Instant::now();
    c.publish("t", "old").await;
    let depth = c.info("q").await.depth;
    if sent.elapsed() < Duration::from_millis(TTL) {
        assert_eq!(depth, 1, "expired before its TTL");
    }
    let letters = c.wait_letters("q", 1).await;
    assert!(
        sent.elapsed() >= Duration::from_millis(TTL),
        "dead-lettered after {:?}, before the {TTL} ms TTL",
        sent.elapsed()
    );
    assert_eq!(letters[0].reason, "expired");
    assert_eq!(&letters[0].payload[..], b"old");
    assert_eq!(c.info("q").await.depth, 0);
    let deadline = Instant::now() + WAIT;
    while c.info("plain").await.depth > 0 {
        assert!(Instant::now() < deadline, "plain never expired");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(c.dead_letters("plain", None).await.0.len(), 0);
}

#[tokio::test]
async fn dead_letters_come_in_pages_no_larger_than_the_max_frame() {
    let broker = Restartable::start(|config| config.max_payload = 16 * 1024).await;
    let mut c = broker.client().await;
    let max_frame = 16 * 1024 + 64 * 1024;
    c.declare_ok(
        "q",
        QueueOptions {
            max_deliveries: Some(1),
            ..bound("t")
        },
    )
    .await;
    let payload = "x".repeat(15 * 1024);
    for _ in 0..12 {
        c.publish("t", &payload).await;
    }
    c.consume(1, "q", 12).await;
    for d in c.deliveries(12).await {
        c.nack(d.delivery_id).await;
    }
    // The moves finish in the background: read all pages until all 12 are there.
    let deadline = Instant::now() + WAIT;
    let (pages, letters) = loop {
        let mut from = None;
        let mut letters = Vec::new();
        let mut pages = 0;
        loop {
            let request_id = c.0.request_id();
            let frame = Frame::DeadLetters(DeadLetters {
                request_id,
                queue: "q".into(),
                limit: 0,
                from,
            });
            let answer = c.request(frame).await;
            let mut buf = bytes::BytesMut::new();
            answer.encode(&mut buf).unwrap();
            assert!(buf.len() - 4 <= max_frame, "a reply of {} bytes", buf.len());
            let Frame::DeadLettersReply(r) = answer else {
                panic!("expected DEAD_LETTERS_REPLY");
            };
            pages += 1;
            letters.extend(r.letters);
            match r.next {
                Some(next) => from = Some(next),
                None => break,
            }
        }
        if letters.len() == 12 || Instant::now() > deadline {
            break (pages, letters);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(letters.len(), 12);
    assert!(
        pages >= 3,
        "12 letters of 15 KiB need at least 3 pages of 80 KiB"
    );
    let ids: Vec<u64> = letters.iter().map(|l| l.id).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(ids, sorted, "oldest first, no letter twice");
}

#[tokio::test]
async fn credit_is_capped_by_the_broker() {
    let broker = Restartable::start(|config| config.max_credit = 2).await;
    let mut c = broker.client().await;
    c.declare_ok("q", bound("t")).await;
    for i in 0..5 {
        c.publish("t", &i.to_string()).await;
    }
    c.consume(1, "q", 100).await;
    c.deliveries(2).await;
    // Every ready message a window allows goes out in one pass: had the credit not
    // been clamped, all five would be in flight now.
    assert_eq!(
        c.info("q").await.in_flight,
        2,
        "credit 100 was clamped to 2"
    );
}

#[tokio::test]
async fn limits_count_headers_and_message_ids_are_capped() {
    let broker = Restartable::start(|_| {}).await;
    let mut c = broker.client().await;
    // 40 KiB of room: empty payloads with 12 KiB of headers (under the broker's
    // 16 KiB header limit) fill it in three.
    c.declare_ok(
        "q",
        QueueOptions {
            max_bytes: Some(40 * 1024),
            ..bound("t")
        },
    )
    .await;
    let header = Text::from("h".repeat(12 * 1024));
    let mut accepted = 0;
    for _ in 0..6 {
        let request_id = c.0.request_id();
        let frame = Frame::Publish(Publish {
            request_id: Some(request_id),
            confirm: true,
            headers: vec![(Text::from("big"), header.clone())],
            ..Publish::new("t", Bytes::new())
        });
        match c.request(frame).await {
            Frame::Confirm(conf) => accepted += conf.queues,
            other => panic!("expected CONFIRM, got {other:?}"),
        }
    }
    assert_eq!(accepted, 3, "headers count against max_bytes");
    let info = c.info("q").await;
    assert!(
        info.bytes <= 40 * 1024 && info.bytes > 36 * 1024,
        "{info:?}"
    );

    let request_id = c.0.request_id();
    c.0.send(Frame::Publish(Publish {
        request_id: Some(request_id),
        confirm: true,
        message_id: Some(Text::from("i".repeat(300))),
        ..Publish::new("t", Bytes::new())
    }))
    .await;
    let e = c.0.expect_error(ErrorCode::LimitExceeded).await;
    assert_eq!(e.request_id, request_id);
    assert_eq!(c.info("q").await.depth, 3, "nothing stored");
}

#[tokio::test]
async fn a_dead_letter_queue_gets_no_dead_letter_queue_of_its_own() {
    let broker = Restartable::start(|_| {}).await;
    let mut c = broker.client().await;
    c.declare_ok(
        "jobs",
        QueueOptions {
            max_deliveries: Some(1),
            ..bound("jobs")
        },
    )
    .await;
    c.publish("jobs", "poison").await;
    c.consume(1, "jobs", 1).await;
    let d = c.delivery().await;
    c.nack(d.delivery_id).await;
    c.wait_letters("jobs", 1).await;
    // `jobs.dlq` was created with the defaults (5 deliveries); a consumer of it that
    // keeps failing gets the letter again and again, attempts growing, and it is
    // never moved on into a `jobs.dlq.dlq`.
    c.consume(2, "jobs.dlq", 1).await;
    for attempt in 1..=8 {
        let d = c.delivery().await;
        assert_eq!(d.queue, "jobs.dlq");
        assert_eq!(d.attempt, attempt, "redelivered in the dead-letter queue");
        c.nack(d.delivery_id).await;
    }
    let d = c.delivery().await;
    assert_eq!((body(&d), d.attempt), ("poison", 9));
    let request_id = c.0.request_id();
    c.0.send(Frame::QueueInfoRequest(QueueInfoRequest {
        request_id,
        name: "jobs.dlq.dlq".into(),
    }))
    .await;
    c.0.expect_error(ErrorCode::QueueNotFound).await;
    assert_eq!(c.info("jobs.dlq").await.depth, 1);

    // A declared dead-letter queue of the dead-letter queue is used.
    c.declare_ok("jobs.dlq.dlq", QueueOptions::default()).await;
    c.nack(d.delivery_id).await;
    let letters = c.wait_letters("jobs.dlq", 1).await;
    assert_eq!(letters[0].payload, Bytes::from_static(b"poison"));
    assert_eq!(c.info("jobs.dlq.dlq").await.depth, 1);
    assert_eq!(c.info("jobs.dlq").await.depth, 0);
}
