//! Durable queues through the client (and the CLI) against a real broker. These
//! need the broker's queue engine; run them with `cargo test -p tidings-client
//! --test queues`.

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use common::{TestBroker, within};
use futures::StreamExt;
use tidings_client::{ConfirmOptions, ErrorCode, Message, PublishError, QueueConfig};

#[tokio::test]
async fn declare_publish_confirmed_consume_ack() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    within(client.declare_queue(QueueConfig::new("billing").bind("orders.created")))
        .await
        .unwrap();
    // Declaring again with the same options is fine.
    within(client.declare_queue(QueueConfig::new("billing").bind("orders.created")))
        .await
        .unwrap();
    for i in 0..10 {
        let c = within(client.publish_confirmed(
            Message::new("orders.created", format!("{i}")).header("n", format!("{i}")),
        ))
        .await
        .unwrap();
        assert_eq!((c.queues, c.rejected, c.duplicate), (1, 0, false));
    }
    // No queue bound: an error by default, a success when allowed.
    let err = within(client.publish_confirmed(Message::new("orders.other", "x")))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::Unroutable { topic } if topic == "orders.other"),
        "{err}"
    );
    let c = within(client.publish_confirmed_with(
        Message::new("orders.other", "x"),
        ConfirmOptions::new().allow_unroutable(),
    ))
    .await
    .unwrap();
    assert_eq!(c.queues, 0);

    let info = within(client.queue_info("billing")).await.unwrap();
    assert_eq!(info.depth, 10);
    let list = within(client.list_queues()).await.unwrap();
    assert!(list.iter().any(|q| q.name == "billing"));

    let mut consumer = within(client.consume("billing", 4)).await.unwrap();
    for i in 0..10 {
        let d = within(consumer.next()).await.unwrap();
        assert_eq!(d.payload(), format!("{i}").as_bytes());
        assert_eq!(d.header_value("n"), Some(format!("{i}").as_str()));
        assert_eq!(
            (d.topic(), d.queue(), d.attempt()),
            ("orders.created", "billing", 1)
        );
        d.ack().await.unwrap();
    }
    within(client.flush()).await.unwrap();
    // The connection carries the acks before the info request, and the broker
    // handles a connection's frames in order: the acks have landed.
    let info = within(client.queue_info("billing")).await.unwrap();
    assert_eq!((info.depth, info.in_flight), (0, 0), "{info:?}");
}

#[tokio::test]
async fn nack_redelivers_with_a_higher_attempt() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    within(client.declare_queue(QueueConfig::new("retry").bind("work.>")))
        .await
        .unwrap();
    within(client.publish_confirmed(Message::new("work.a", "job")))
        .await
        .unwrap();
    let mut consumer = within(client.consume("retry", 1)).await.unwrap();
    let d = within(consumer.next()).await.unwrap();
    assert_eq!(d.attempt(), 1);
    d.nack_after(Duration::from_millis(10)).await.unwrap();
    let d = within(consumer.next()).await.unwrap();
    assert_eq!(d.attempt(), 2);
    d.nack().await.unwrap();
    let d = within(consumer.next()).await.unwrap();
    assert_eq!(d.attempt(), 3);
    d.ack().await.unwrap();
}

#[tokio::test]
async fn dead_letters_and_redrive() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    within(
        client.declare_queue(
            QueueConfig::new("poison")
                .bind("poison.>")
                .max_deliveries(2)
                .backoff([Duration::from_millis(1)]),
        ),
    )
    .await
    .unwrap();
    within(client.publish_confirmed(Message::new("poison.pill", "bad")))
        .await
        .unwrap();
    let mut consumer = within(client.consume("poison", 1)).await.unwrap();
    for attempt in 1..=2 {
        let d = within(consumer.next()).await.unwrap();
        assert_eq!(d.attempt(), attempt);
        d.nack().await.unwrap();
    }
    // The dead-letter queue is a queue: consuming it waits for the move to land.
    let mut dlq = within(client.consume("poison.dlq", 1)).await.unwrap();
    let dead = within(dlq.next()).await.unwrap();
    assert_eq!(&dead.payload()[..], b"bad");
    // Handing it back (cancel) leaves it in the dead-letter queue for inspection.
    within(dlq.close()).await.unwrap();
    let letters = within(client.dead_letters("poison", 0)).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(&letters[0].payload[..], b"bad");
    assert_eq!(within(client.redrive("poison")).await.unwrap(), 1);
    let d = within(consumer.next()).await.unwrap();
    assert_eq!(&d.payload()[..], b"bad");
    d.ack().await.unwrap();
}

#[tokio::test]
async fn duplicates_are_confirmed_but_stored_once() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    within(
        client.declare_queue(
            QueueConfig::new("dedup")
                .bind("pay.>")
                .dedup_window(Duration::from_secs(60)),
        ),
    )
    .await
    .unwrap();
    let first = within(client.publish_confirmed(Message::new("pay.in", "1").id("p-1")))
        .await
        .unwrap();
    let second = within(client.publish_confirmed(Message::new("pay.in", "1").id("p-1")))
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(within(client.queue_info("dedup")).await.unwrap().depth, 1);
}

#[tokio::test]
async fn bind_unbind_delete_and_typed_errors() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    within(client.declare_queue(QueueConfig::new("q")))
        .await
        .unwrap();
    within(client.bind("q", "a.*")).await.unwrap();
    let c = within(client.publish_confirmed(Message::new("a.b", "x")))
        .await
        .unwrap();
    assert_eq!(c.queues, 1);
    within(client.unbind("q", "a.*")).await.unwrap();
    let err = within(client.publish_confirmed(Message::new("a.b", "x")))
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Unroutable { .. }), "{err}");
    within(client.delete_queue("q")).await.unwrap();
    let err = within(client.queue_info("q")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::QueueNotFound), "{err}");
    let err = within(client.consume("q", 1)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::QueueNotFound), "{err}");
}

#[tokio::test]
async fn no_confirmed_message_is_lost_across_a_broker_restart() {
    let mut broker = TestBroker::start().await;
    let client = broker.client().await;
    within(client.declare_queue(QueueConfig::new("durable").bind("events.>")))
        .await
        .unwrap();
    let mut consumer = within(client.consume("durable", 8)).await.unwrap();
    let mut confirmed = HashSet::new();
    for i in 0..50 {
        within(client.publish_confirmed(Message::new("events.x", format!("{i}"))))
            .await
            .unwrap();
        confirmed.insert(format!("{i}"));
    }
    // Ack a few before the restart; the rest must come back after it.
    let mut acked = HashSet::new();
    for _ in 0..5 {
        let d = within(consumer.next()).await.unwrap();
        acked.insert(String::from_utf8(d.payload().to_vec()).unwrap());
        d.ack().await.unwrap();
    }
    within(client.flush()).await.unwrap();
    // Make sure the acks have been applied before the broker stops.
    within(client.queue_info("durable")).await.unwrap();

    broker.stop().await;
    broker.start_again().await;

    // The same consumer resumes (restored on reconnect); stale deliveries from the
    // old connection refuse their acks, and their messages come again.
    let mut seen = acked.clone();
    while seen.len() < confirmed.len() {
        let d = within(consumer.next()).await.unwrap();
        let payload = String::from_utf8(d.payload().to_vec()).unwrap();
        if d.ack().await.is_ok() {
            seen.insert(payload);
        }
    }
    assert_eq!(seen, confirmed);
}

fn tidings(addr: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tidings"));
    cmd.env("TIDINGS_SERVER", addr)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn cli_queue_declare_pub_confirm_consume() {
    let broker = TestBroker::start().await;
    let addr = broker.addr();
    let out = within(
        tidings(&addr)
            .args([
                "queue",
                "declare",
                "cliq",
                "--bind",
                "cli.>",
                "--max-deliveries",
                "3",
            ])
            .args([
                "--ack-timeout",
                "30s",
                "--backoff",
                "100ms,1s",
                "--overflow",
                "reject-publish",
            ])
            .output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = within(
        tidings(&addr)
            .args(["pub", "cli.created", "payload-1", "--confirm"])
            .output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "confirmed: queues=1 rejected=0 duplicate=false\n"
    );

    let out = within(tidings(&addr).args(["queue", "ls"]).output())
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("cliq"));

    let out = within(
        tidings(&addr)
            .args(["consume", "cliq", "--count", "1"])
            .output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "cli.created payload-1 (attempt 1)\n"
    );

    let out = within(tidings(&addr).args(["queue", "info", "cliq"]).output())
        .await
        .unwrap();
    assert!(out.status.success());
    let out = within(tidings(&addr).args(["queue", "rm", "cliq"]).output())
        .await
        .unwrap();
    assert!(out.status.success());
}

#[tokio::test]
async fn deliver_at_holds_the_message_until_its_time() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    within(client.declare_queue(QueueConfig::new("later").bind("later.>")))
        .await
        .unwrap();
    let hold = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let at = std::time::SystemTime::now() + hold;
    within(client.publish_confirmed(Message::new("later.job", "due").deliver_at(at)))
        .await
        .unwrap();
    let mut consumer = within(client.consume("later", 1)).await.unwrap();
    let d = within(consumer.next()).await.unwrap();
    assert_eq!(&d.payload()[..], b"due");
    // The wire carries whole milliseconds, so allow for one lost to truncation.
    assert!(
        started.elapsed() + Duration::from_millis(2) >= hold,
        "delivered after {:?}, before its time",
        started.elapsed()
    );
    d.ack().await.unwrap();
}

/// `consume --count 1 --nack` uses exactly one delivery attempt: with
/// max_deliveries 2 the message is still in the queue afterwards, on its second
/// attempt, not dead-lettered.
#[tokio::test]
async fn cli_consume_count_uses_only_the_attempts_it_prints() {
    let broker = TestBroker::start().await;
    let addr = broker.addr();
    let client = broker.client().await;
    within(client.declare_queue(QueueConfig::new("once").bind("once").max_deliveries(2)))
        .await
        .unwrap();
    for i in 0..3 {
        within(client.publish_confirmed(Message::new("once", format!("m{i}"))))
            .await
            .unwrap();
    }
    let out = within(
        tidings(&addr)
            .args(["consume", "once", "--count", "1", "--nack"])
            .output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "once m0 (attempt 1)\n"
    );
    let info = within(client.queue_info("once")).await.unwrap();
    assert_eq!(
        (info.depth, info.dead_lettered, info.delivered),
        (3, 0, 1),
        "one delivery, nothing abandoned: {info:?}"
    );
    let out = within(
        tidings(&addr)
            .args(["consume", "once", "--count", "3"])
            .output(),
    )
    .await
    .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.contains("m0 (attempt 2)"), "{text}");
    let info = within(client.queue_info("once")).await.unwrap();
    assert_eq!((info.depth, info.dead_lettered), (0, 0));
}

/// `pub --confirm` to a topic no queue is bound to fails and says why, unless
/// `--allow-unroutable`.
#[tokio::test]
async fn cli_pub_confirm_to_an_unbound_topic_fails_unless_allowed() {
    let broker = TestBroker::start().await;
    let addr = broker.addr();
    let out = within(
        tidings(&addr)
            .args(["pub", "no.queue.here", "x", "--confirm"])
            .output(),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("no queue is bound to `no.queue.here`"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = within(
        tidings(&addr)
            .args([
                "pub",
                "no.queue.here",
                "x",
                "--confirm",
                "--allow-unroutable",
            ])
            .output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "confirmed: queues=0 rejected=0 duplicate=false\n"
    );
}

#[tokio::test]
async fn a_consumer_of_a_deleted_queue_ends_with_a_typed_error_over_tcp() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    within(client.declare_queue(QueueConfig::new("doomed").bind("doomed.>")))
        .await
        .unwrap();
    within(client.publish_confirmed(Message::new("doomed.one", "1")))
        .await
        .unwrap();
    let mut consumer = within(client.consume("doomed", 8)).await.unwrap();
    let first = within(consumer.try_next())
        .await
        .unwrap()
        .expect("a delivery");
    assert_eq!(first.payload().as_ref(), b"1");
    // Another connection deletes the queue: the broker cancels the consumer
    // (CONSUMER_CANCELLED) and its stream ends with a typed error.
    let admin = broker.client().await;
    within(admin.delete_queue("doomed")).await.unwrap();
    let ended = within(consumer.try_next()).await.unwrap_err();
    assert!(ended.queue_deleted(), "{ended}");
    // The consumer id is free again on a queue of the same name.
    within(client.declare_queue(QueueConfig::new("doomed").bind("doomed.>")))
        .await
        .unwrap();
    let again = within(client.consume("doomed", 8)).await;
    assert!(again.is_ok(), "{:?}", again.err());
}

#[tokio::test]
async fn the_client_learns_the_brokers_max_credit_and_never_asks_for_more() {
    let broker = TestBroker::start_with(|config| config.max_credit = 3).await;
    let client = broker.client().await;
    assert_eq!(client.max_credit(), Some(3), "announced in WELCOME");
    within(client.declare_queue(QueueConfig::new("capped").bind("capped.>")))
        .await
        .unwrap();
    for i in 0..6 {
        within(client.publish_confirmed(Message::new("capped.x", format!("{i}"))))
            .await
            .unwrap();
    }
    let mut consumer = within(client.consume("capped", 100)).await.unwrap();
    let mut held = Vec::new();
    for i in 0..3 {
        let d = within(consumer.next()).await.unwrap();
        assert_eq!(d.payload(), format!("{i}").as_bytes());
        held.push(d);
    }
    // Past the cap a CREDIT would change nothing; the client does not send it.
    consumer.add_credit(50).unwrap();
    let info = within(client.queue_info("capped")).await.unwrap();
    assert_eq!(info.in_flight, 3, "prefetch 100 was clamped to 3");
    // An ack frees one place of the window of 3, not of 100 or 150.
    within(held.remove(0).ack()).await.unwrap();
    let d = within(consumer.next()).await.unwrap();
    assert_eq!(d.payload().as_ref(), b"3");
    let info = within(client.queue_info("capped")).await.unwrap();
    assert_eq!((info.in_flight, info.depth), (3, 5));
    consumer.close().await.unwrap();
}
