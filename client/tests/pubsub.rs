//! Publish/subscribe against a real broker: fan-out, wildcards, groups, headers,
//! unsubscribe, flush, many tasks sharing one client, validation errors.

mod common;

use std::collections::HashSet;

use common::{TestBroker, within};
use futures::{FutureExt, StreamExt};
use tidings_client::{Message, PublishError, SubscribeError};

#[tokio::test]
async fn publish_reaches_matching_subscriptions_only() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut all = within(client.subscribe("orders.>")).await.unwrap();
    let mut created = within(client.subscribe("orders.*.created")).await.unwrap();
    let mut other = within(client.subscribe("payments.>")).await.unwrap();

    within(client.publish("orders.eu.created", "one"))
        .await
        .unwrap();
    within(client.publish("orders.eu.cancelled", "two"))
        .await
        .unwrap();
    within(client.flush()).await.unwrap();

    let m = within(all.next()).await.unwrap();
    assert_eq!(
        (m.topic(), &m.payload()[..]),
        ("orders.eu.created", &b"one"[..])
    );
    let m = within(all.next()).await.unwrap();
    assert_eq!(
        (m.topic(), &m.payload()[..]),
        ("orders.eu.cancelled", &b"two"[..])
    );
    let m = within(created.next()).await.unwrap();
    assert_eq!(m.topic(), "orders.eu.created");

    // A marker published after both proves nothing else was routed to `created`
    // or `other` in between (per-connection order is kept).
    within(client.publish("payments.done", "marker"))
        .await
        .unwrap();
    let m = within(other.next()).await.unwrap();
    assert_eq!(m.topic(), "payments.done");
    assert!(created.next_message().now_or_never().is_none());
}

#[tokio::test]
async fn headers_and_reply_to_travel_with_the_message() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut sub = within(client.subscribe("audit.>")).await.unwrap();
    within(
        client.publish_message(
            Message::new("audit.login", "alice")
                .header("content-type", "text/plain")
                .header("traceparent", "00-abc-def-01")
                .reply_to("audit.replies"),
        ),
    )
    .await
    .unwrap();
    let m = within(sub.next()).await.unwrap();
    assert_eq!(m.header_value("content-type"), Some("text/plain"));
    assert_eq!(m.headers().count(), 2);
    assert_eq!(m.reply_to_topic(), Some("audit.replies"));
    assert_eq!(&m.payload()[..], b"alice");
}

#[tokio::test]
async fn groups_share_messages_between_members() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut a = within(client.subscribe_group("jobs.*", "workers"))
        .await
        .unwrap();
    let mut b = within(client.subscribe_group("jobs.*", "workers"))
        .await
        .unwrap();
    let mut watcher = within(client.subscribe("jobs.*")).await.unwrap();
    for i in 0..20 {
        within(client.publish("jobs.run", format!("{i}")))
            .await
            .unwrap();
    }
    // The watcher sees all 20; the group members see 20 between them.
    for _ in 0..20 {
        within(watcher.next()).await.unwrap();
    }
    let mut got = HashSet::new();
    while got.len() < 20 {
        tokio::select! {
            Some(m) = a.next() => { assert!(got.insert(m.payload().clone())); }
            Some(m) = b.next() => { assert!(got.insert(m.payload().clone())); }
            _ = tokio::time::sleep(common::BOUND) => panic!("group lost messages: {}", got.len()),
        }
    }
}

#[tokio::test]
async fn unsubscribe_and_drop_end_subscriptions() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let sub = within(client.subscribe("news.>")).await.unwrap();
    within(sub.unsubscribe()).await.unwrap();
    let dropped = within(client.subscribe("news.>")).await.unwrap();
    drop(dropped);
    let mut live = within(client.subscribe("news.>")).await.unwrap();
    within(client.publish("news.today", "x")).await.unwrap();
    assert_eq!(within(live.next()).await.unwrap().topic(), "news.today");
    // The broker's count shows only the live subscription remains.
    let stats = within(client.stats()).await.unwrap();
    assert_eq!(
        stats.get("subscriptions.current"),
        Some(1),
        "stats: {stats:?}"
    );
}

#[tokio::test]
async fn many_tasks_share_one_client() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut sub = within(client.subscribe("load.>")).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let client = client.clone();
            tokio::spawn(async move {
                for i in 0..250 {
                    client
                        .publish(format!("load.t{t}"), format!("{t}-{i}"))
                        .await
                        .unwrap();
                }
                client.flush().await.unwrap();
            })
        })
        .collect();
    for t in tasks {
        within(t).await.unwrap();
    }
    let mut seen = HashSet::new();
    while seen.len() < 2000 {
        let m = within(sub.next()).await.unwrap();
        assert!(
            seen.insert(m.payload().clone()),
            "duplicate {:?}",
            m.payload()
        );
    }
    assert_eq!(sub.dropped(), 0);
}

#[tokio::test]
async fn per_task_order_is_kept() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut sub = within(client.subscribe("seq")).await.unwrap();
    for i in 0u32..1000 {
        client
            .publish("seq", i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    for i in 0u32..1000 {
        let m = within(sub.next()).await.unwrap();
        assert_eq!(&m.payload()[..], &i.to_be_bytes());
    }
}

#[tokio::test]
async fn invalid_topics_and_patterns_fail_locally() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    assert!(matches!(
        client.publish("orders.*", "x").await,
        Err(PublishError::InvalidTopic { .. })
    ));
    assert!(matches!(
        client.publish("orders..created", "x").await,
        Err(PublishError::InvalidTopic { .. })
    ));
    assert!(matches!(
        client.subscribe("orders.>.x").await,
        Err(SubscribeError::InvalidPattern { .. })
    ));
}

#[tokio::test]
async fn payloads_over_the_broker_limit_are_refused_locally() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let max = client.max_payload();
    assert!(max > 0);
    let err = client.publish("big", vec![0u8; max + 1]).await.unwrap_err();
    assert!(matches!(err, PublishError::PayloadTooLarge { size, .. } if size == max + 1));
    // A payload at the limit goes through.
    let mut sub = within(client.subscribe("big")).await.unwrap();
    within(client.publish("big", vec![7u8; max])).await.unwrap();
    assert_eq!(within(sub.next()).await.unwrap().payload().len(), max);
}

#[tokio::test]
async fn a_full_subscription_holds_the_connection_back_and_loses_nothing() {
    let broker = TestBroker::start().await;
    let client = within(broker.builder().subscription_capacity(4).connect())
        .await
        .unwrap();
    let mut slow = within(client.subscribe("firehose")).await.unwrap();
    // Far more than the buffer holds, published before the subscription is polled.
    for i in 0u32..200 {
        within(client.publish("firehose", i.to_be_bytes().to_vec()))
            .await
            .unwrap();
    }
    within(client.flush()).await.unwrap();
    for i in 0u32..200 {
        let m = within(slow.next()).await.unwrap();
        assert_eq!(&m.payload()[..], &i.to_be_bytes());
    }
    assert_eq!(slow.dropped(), 0);
    assert!(slow.stalls() > 0, "a buffer of 4 never filled");
}

#[tokio::test]
async fn stats_come_back() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let stats = within(client.stats()).await.unwrap();
    assert!(!stats.entries.is_empty());
}
