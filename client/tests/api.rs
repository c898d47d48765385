//! The client API of protocol 1.1 against a real broker over TCP: confirms that
//! fail when nothing stores the message, confirms kept in flight, per-kind
//! timeouts, closing a consumer after its acks, acks awaited, limited consumers,
//! request/reply through a queue, and slow-consumer cut-offs reported.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::{TestBroker, within};
use futures::stream::{FuturesUnordered, StreamExt};
use tidings_client::{
    AckError, ClientBuilder, ConfirmOptions, Event, Interruption, Message, Overflow, PublishError,
    QueueConfig, QueueError, ReconnectPolicy,
};
use tidings_protocol::{Frame, FrameCodec, PROTOCOL_VERSION, Welcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};

#[tokio::test]
async fn a_producer_keeps_256_confirms_in_flight() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    within(client.declare_queue(QueueConfig::new("orders").bind("orders.>")))
        .await
        .unwrap();
    let mut in_flight: FuturesUnordered<tidings_client::PendingConfirm> = FuturesUnordered::new();
    let mut most = 0;
    let mut confirmed = 0;
    for n in 0..600u32 {
        if in_flight.len() == 256 {
            let c = within(in_flight.next()).await.unwrap().unwrap();
            assert_eq!(c.queues, 1);
            confirmed += 1;
        }
        let message = Message::new("orders.created", n.to_string()).id(format!("o-{n}"));
        in_flight.push(within(client.enqueue_confirmed(message)).await.unwrap());
        most = most.max(in_flight.len());
    }
    while let Some(c) = within(in_flight.next()).await {
        c.unwrap();
        confirmed += 1;
    }
    assert_eq!((most, confirmed), (256, 600));
    let info = within(client.queue_info("orders")).await.unwrap();
    assert_eq!(info.depth, 600, "every confirmed message is stored");

    // A pending confirm of an unbound topic fails like publish_confirmed.
    let pending = within(client.enqueue_confirmed(Message::new("nowhere", "x")))
        .await
        .unwrap();
    let err = within(pending).await.unwrap_err();
    assert!(matches!(err, PublishError::Unroutable { .. }), "{err}");
}

#[tokio::test]
async fn a_full_queue_is_an_error_unless_allowed() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let config = QueueConfig::new("tiny")
        .bind("tiny.>")
        .max_length(1)
        .overflow(Overflow::RejectPublish);
    within(client.declare_queue(config)).await.unwrap();
    within(client.publish_confirmed(Message::new("tiny.a", "1")))
        .await
        .unwrap();
    let err = within(client.publish_confirmed(Message::new("tiny.a", "2")))
        .await
        .unwrap_err();
    match &err {
        PublishError::QueueFull {
            topic,
            queues,
            rejected,
        } => assert_eq!((topic.as_str(), *queues, *rejected), ("tiny.a", 0, 1)),
        other => panic!("expected QueueFull, got {other}"),
    }
    assert!(err.to_string().contains("full"), "{err}");
    let c = within(client.publish_confirmed_with(
        Message::new("tiny.a", "3"),
        ConfirmOptions::new().allow_queue_full(),
    ))
    .await
    .unwrap();
    assert_eq!((c.queues, c.rejected), (0, 1));
}

/// A broker that completes the handshake and then never answers anything.
async fn silent_broker() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut codec = FrameCodec::default();
                let mut buf = BytesMut::new();
                loop {
                    if let Ok(Some(Frame::Hello(_))) = codec.decode(&mut buf) {
                        break;
                    }
                    if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
                let mut out = BytesMut::new();
                let welcome = Frame::Welcome(Welcome {
                    version: PROTOCOL_VERSION,
                    server_version: "silent".into(),
                    max_frame_len: 1 << 20,
                    max_payload: 1 << 16,
                    heartbeat_ms: 0,
                    minor: Some(1),
                    max_credit: Some(8),
                });
                codec.encode(welcome, &mut out).unwrap();
                stream.write_all(&out).await.unwrap();
                let mut sink = [0u8; 4096];
                while stream.read(&mut sink).await.unwrap_or(0) > 0 {}
            });
        }
    });
    addr
}

#[tokio::test]
async fn each_kind_of_call_has_its_own_timeout_and_a_handle_can_override_it() {
    let addr = silent_broker().await;
    let client = within(
        ClientBuilder::new(addr)
            .request_timeout(Duration::from_millis(30))
            .confirm_timeout(Duration::from_millis(40))
            .subscribe_timeout(Duration::from_millis(50))
            .queue_timeout(Duration::from_millis(60))
            .connect(),
    )
    .await
    .unwrap();
    let err = within(client.request("svc", "?")).await.unwrap_err();
    assert!(
        err.to_string().contains("30ms"),
        "request timeout applies: {err}"
    );
    let err = within(client.publish_confirmed(Message::new("a", "b")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PublishError::TimedOut { after } if after == Duration::from_millis(40)),
        "{err}"
    );
    let err = within(client.subscribe("a.>")).await.unwrap_err();
    assert!(err.to_string().contains("50ms"), "{err}");
    let err = within(client.declare_queue(QueueConfig::new("q")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, QueueError::TimedOut { after } if after == Duration::from_millis(60)),
        "{err}"
    );
    let err = within(client.consume("q", 1)).await.unwrap_err();
    assert!(matches!(err, QueueError::TimedOut { .. }), "{err}");
    // One handle with its own bound, for every kind; the client keeps its own.
    let quick = client.with_timeout(Duration::from_millis(15));
    let err = within(quick.publish_confirmed(Message::new("a", "b")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PublishError::TimedOut { after } if after == Duration::from_millis(15)),
        "{err}"
    );
    let err = within(quick.stats()).await.unwrap_err();
    assert!(
        matches!(err, QueueError::TimedOut { after } if after == Duration::from_millis(15)),
        "{err}"
    );
    assert_eq!(client.default_request_timeout(), Duration::from_millis(30));
}

#[tokio::test]
async fn close_returns_after_the_broker_took_the_acks_and_the_cancel() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    within(client.declare_queue(QueueConfig::new("work").bind("work")))
        .await
        .unwrap();
    for i in 0..20 {
        within(client.publish_confirmed(Message::new("work", format!("{i}"))))
            .await
            .unwrap();
    }
    let mut consumer = within(client.consume("work", 8)).await.unwrap();
    for _ in 0..5 {
        let d = within(consumer.next()).await.unwrap();
        d.ack().await.unwrap();
    }
    within(consumer.close()).await.unwrap();
    // Right after close: the acks are applied, nothing is in flight any more, and
    // deleting the queue cannot race them.
    let info = within(client.queue_info("work")).await.unwrap();
    assert_eq!((info.depth, info.in_flight, info.acked), (15, 0, 5));
    assert_eq!(info.consumers, 0);
    within(client.delete_queue("work")).await.unwrap();
}

#[tokio::test]
async fn an_awaited_ack_is_applied_when_it_returns() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    within(client.declare_queue(QueueConfig::new("pay").bind("pay")))
        .await
        .unwrap();
    within(client.publish_confirmed(Message::new("pay", "1")))
        .await
        .unwrap();
    let mut consumer = within(client.consume("pay", 1)).await.unwrap();
    let d = within(consumer.next()).await.unwrap();
    within(d.ack_confirmed()).await.unwrap();
    let info = within(client.queue_info("pay")).await.unwrap();
    assert_eq!((info.depth, info.acked), (0, 1));
    // After close, an awaited ack of a delivery still held is refused, not lost
    // silently: the cancel handed it back.
    within(client.publish_confirmed(Message::new("pay", "2")))
        .await
        .unwrap();
    let d = within(consumer.next()).await.unwrap();
    within(consumer.close()).await.unwrap();
    let err = within(d.ack_confirmed()).await.unwrap_err();
    assert!(matches!(err, AckError::Refused(_)), "{err}");
}

#[tokio::test]
async fn a_limited_consumer_is_sent_no_more_than_its_limit() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let config = QueueConfig::new("jobs").bind("jobs").max_deliveries(2);
    within(client.declare_queue(config)).await.unwrap();
    for i in 0..3 {
        within(client.publish_confirmed(Message::new("jobs", format!("{i}"))))
            .await
            .unwrap();
    }
    // Nack the only delivery: without the limit the broker would redeliver it
    // at once into the consumer's buffer, using up its second attempt.
    let mut one = within(client.consume_limited("jobs", 4, 1)).await.unwrap();
    let d = within(one.next()).await.unwrap();
    assert_eq!(d.attempt(), 1);
    d.nack().await.unwrap();
    within(one.close()).await.unwrap();
    let info = within(client.queue_info("jobs")).await.unwrap();
    assert_eq!((info.depth, info.dead_lettered, info.delivered), (3, 0, 1));
    let mut all = within(client.consume("jobs", 4)).await.unwrap();
    let mut attempts = Vec::new();
    for _ in 0..3 {
        let d = within(all.next()).await.unwrap();
        attempts.push(d.attempt());
        d.ack().await.unwrap();
    }
    attempts.sort_unstable();
    assert_eq!(
        attempts,
        vec![1, 1, 2],
        "the nacked one had one attempt only"
    );
}

#[tokio::test]
async fn request_reply_through_a_queue_and_ids_reach_consumers_and_subscribers() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    within(client.declare_queue(QueueConfig::new("resize").bind("resize")))
        .await
        .unwrap();
    let mut subscriber = within(client.subscribe("resize")).await.unwrap();
    let mut replies = within(client.subscribe("replies.me")).await.unwrap();
    let job = Message::new("resize", "img-7")
        .id("job-7")
        .reply_to("replies.me");
    within(client.publish_confirmed(job)).await.unwrap();
    let seen = within(subscriber.next()).await.unwrap();
    assert_eq!(seen.message_id(), Some("job-7"));

    let mut worker = within(client.consume("resize", 1)).await.unwrap();
    let d = within(worker.next()).await.unwrap();
    assert_eq!(d.message_id(), Some("job-7"));
    assert_eq!(d.reply_to_topic(), Some("replies.me"));
    within(d.respond("done")).await.unwrap();
    within(d.ack_confirmed()).await.unwrap();
    let reply = within(replies.next()).await.unwrap();
    assert_eq!(&reply.payload()[..], b"done");
}

#[tokio::test]
async fn queue_config_reads_back_the_declared_options() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let declared = QueueConfig::new("billing")
        .bind("orders.>")
        .max_deliveries(7)
        .ttl(Duration::from_secs(60));
    within(client.declare_queue(declared)).await.unwrap();
    let config = within(client.queue_config("billing")).await.unwrap();
    assert_eq!(config.name(), "billing");
    assert_eq!(config.options().max_deliveries, Some(7));
    assert_eq!(config.options().ttl_ms, Some(60_000));
    assert_eq!(config.options().ack_timeout_ms, Some(30_000));
    // What came back declares again as a match.
    within(client.declare_queue(config)).await.unwrap();
}

/// A subscriber that stops reading is cut off by the broker (its outbound bound
/// is small here); the subscription marks the place with
/// `Interruption::SlowConsumer`, `events()` reports it, and the subscription
/// goes on after the reconnect.
#[tokio::test]
async fn a_slow_consumer_cut_off_is_reported_on_the_subscription_and_events() {
    let broker = TestBroker::start_with(|c| c.max_pending_bytes = 256 * 1024).await;
    let slow = within(
        broker
            .builder()
            .subscription_capacity(1)
            .subscription_max_bytes(1)
            .reconnect(ReconnectPolicy::exponential(
                Duration::from_millis(10),
                Duration::from_millis(50),
            ))
            .connect(),
    )
    .await
    .unwrap();
    let mut events = slow.events();
    let mut sub = within(slow.subscribe("flood")).await.unwrap();
    let publisher = broker.client().await;
    // Publish until the broker has cut the subscriber off (socket buffers
    // included, a few megabytes), without ever reading from the subscription.
    let payload = vec![7u8; 64 * 1024];
    let mut cut = false;
    for _ in 0..2000 {
        for _ in 0..16 {
            within(publisher.publish("flood", payload.clone()))
                .await
                .unwrap();
        }
        within(publisher.flush()).await.unwrap();
        let stats = within(publisher.stats()).await.unwrap();
        if stats.get("connections.slow_consumers").unwrap_or(0) > 0 {
            cut = true;
            break;
        }
    }
    assert!(cut, "the broker never cut the subscriber off");
    let gap = loop {
        match within(sub.try_next()).await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the subscription ended"),
            Err(gap) => break gap,
        }
    };
    assert!(
        matches!(gap, Interruption::SlowConsumer { .. }),
        "expected a slow-consumer gap, got {gap}"
    );
    loop {
        match within(events.next()).await.unwrap() {
            Event::SlowConsumer { .. } => break,
            Event::Closed => panic!("closed before reporting"),
            _ => {}
        }
    }
    loop {
        if let Event::Reconnected { .. } = within(events.next()).await.unwrap() {
            break;
        }
    }
    within(publisher.publish("flood", "after")).await.unwrap();
    loop {
        let m = within(sub.try_next()).await.unwrap().unwrap();
        if &m.payload()[..] == b"after" {
            break;
        }
    }
}

#[tokio::test]
async fn an_oversized_envelope_is_refused_before_it_is_sent() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let headers = (0..3).fold(Message::new("t", "x"), |m, i| {
        m.header(format!("h{i}"), "v".repeat(30_000))
    });
    let err = within(client.publish_message(headers)).await.unwrap_err();
    assert!(
        matches!(err, PublishError::EnvelopeTooLarge { max, .. } if max == tidings_protocol::MAX_ENVELOPE_LEN),
        "{err}"
    );
}

/// A 1.0 broker refuses the 1.1 HELLO (an unknown flag before the handshake is
/// `HandshakeRequired` there, and closes); the client dials again with a 1.0
/// HELLO and works.
#[tokio::test]
async fn a_1_0_broker_is_dialled_again_with_a_1_0_hello() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        let mut hellos = Vec::new();
        for _ in 0..2 {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            let hello = loop {
                if let Some(Frame::Hello(h)) = codec.decode(&mut buf).unwrap() {
                    break h;
                }
                assert!(stream.read_buf(&mut buf).await.unwrap() > 0);
            };
            let mut out = BytesMut::new();
            let answer = if hello.minor.is_some() {
                Frame::Error(tidings_protocol::ErrorReply::new(
                    0,
                    tidings_protocol::ErrorCode::HandshakeRequired,
                    "UNKNOWN_FLAGS on HELLO before HELLO",
                ))
            } else {
                Frame::Welcome(Welcome {
                    version: PROTOCOL_VERSION,
                    server_version: "1.0".into(),
                    max_frame_len: 1 << 20,
                    max_payload: 1 << 16,
                    heartbeat_ms: 0,
                    minor: None,
                    max_credit: None,
                })
            };
            codec.encode(answer, &mut out).unwrap();
            stream.write_all(&out).await.unwrap();
            hellos.push(hello.minor);
            if hello.minor.is_none() {
                // Keep the session open until the client goes.
                let mut sink = [0u8; 1024];
                while stream.read(&mut sink).await.unwrap_or(0) > 0 {}
            }
        }
        hellos
    });
    let client = within(ClientBuilder::new(addr).connect()).await.unwrap();
    assert!(client.is_connected());
    assert_eq!(client.max_credit(), None, "a 1.0 broker announces no cap");
    drop(client);
    assert_eq!(within(server).await.unwrap(), vec![Some(1), None]);
}
