//! `/metrics`, `/healthz` and `/readyz` over real HTTP against a broker carrying
//! real traffic: the scrape is parsed by a Prometheus text-format parser and its
//! values are checked against what the test sent.

mod common;

use common::http::{get, wait_ready};
use common::{Client, start_with, within};
use prometheus_parse::{Scrape, Value};
use tidings_broker::HttpListen;
use tidings_protocol::{Frame, Publish, QueueOptions};

fn http_on_port_0(config: &mut tidings_broker::Config) {
    config.http_listen = HttpListen(Some("127.0.0.1:0".parse().unwrap()));
}

async fn scrape(addr: std::net::SocketAddr) -> Scrape {
    let response = get(addr, "/metrics").await;
    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{:?}",
        response.headers
    );
    let text = response.text();
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("scrape parses")
}

/// The value of the one sample named `metric` whose labels include `labels`.
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one sample {metric}{labels:?}, found {found:?}"
    );
    match &found[0].value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{metric} is not a number: {other:?}"),
    }
}

fn histogram_count(scrape: &Scrape, metric: &str) -> f64 {
    let buckets = scrape
        .samples
        .iter()
        .find(|s| s.metric == metric)
        .unwrap_or_else(|| panic!("no histogram {metric}"));
    match &buckets.value {
        Value::Histogram(b) => b
            .iter()
            .find(|c| c.less_than.is_infinite())
            .map(|c| c.count)
            .expect("+Inf bucket"),
        other => panic!("{metric} is not a histogram: {other:?}"),
    }
}

#[tokio::test]
async fn metrics_count_the_traffic_sent() {
    let broker = start_with(http_on_port_0).await;
    let http = broker.handle.http_addr().expect("HTTP listener on");
    let mut worker = Client::hello(broker.addr, "worker").await;
    let mut listener = Client::hello(broker.addr, "listener").await;
    listener.subscribe(1, "news.>", None).await;

    worker
        .declare(
            "orders",
            QueueOptions {
                bindings: vec!["orders.>".into()],
                max_deliveries: Some(1),
                ..Default::default()
            },
        )
        .await;
    for i in 0..5u8 {
        assert_eq!(
            worker
                .publish_confirmed("orders.created", vec![i; 10])
                .await,
            1
        );
    }
    for _ in 0..3 {
        worker.publish("news.today", &b"hello"[..]).await;
    }
    for _ in 0..3 {
        listener.message().await;
    }
    let mut ids: Vec<u64> = worker
        .consume(7, "orders", 10)
        .await
        .iter()
        .map(|d| d.delivery_id)
        .collect();
    while ids.len() < 5 {
        ids.push(worker.delivery().await.delivery_id);
    }
    assert!(worker.ack(ids[..3].to_vec()).await.is_empty());
    // max_deliveries 1: a nack dead-letters the message.
    assert!(worker.nack(vec![ids[3]]).await.is_empty());
    // An invalid topic is answered with an error, counted by code.
    let mut bad = Publish::new("news..bad", &b"x"[..]);
    bad.request_id = Some(99);
    worker.send(Frame::Publish(bad)).await;
    worker
        .expect_error(tidings_protocol::ErrorCode::InvalidTopic)
        .await;

    let q = [("queue", "orders")];
    // A dead letter moves in two steps: its copy in the dead-letter queue is
    // written before the nack is answered, and the source queue counts it once
    // that copy is durable, a moment later. Wait for that, then check the rest.
    let s = within("the dead letter counted", async {
        loop {
            let s = scrape(http).await;
            if value(&s, "tidings_queue_dead_lettered_messages_total", &q) >= 1.0 {
                return s;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(value(&s, "tidings_connections", &[]), 2.0);
    assert_eq!(value(&s, "tidings_connections_opened_total", &[]), 2.0);
    // 5 confirmed + 3 plain + 1 refused publish.
    assert_eq!(value(&s, "tidings_messages_received_total", &[]), 9.0);
    // 3 messages to the subscriber (deliveries are counted per queue).
    assert_eq!(value(&s, "tidings_messages_sent_total", &[]), 3.0);
    assert!(value(&s, "tidings_received_bytes_total", &[]) > 5.0 * 10.0);
    assert!(value(&s, "tidings_sent_bytes_total", &[]) > 0.0);
    assert_eq!(value(&s, "tidings_subscriptions", &[]), 1.0);
    assert_eq!(
        value(&s, "tidings_errors_total", &[("code", "invalid_topic")]),
        1.0
    );
    assert_eq!(
        value(&s, "tidings_errors_total", &[("code", "slow_consumer")]),
        0.0
    );
    assert_eq!(
        value(&s, "tidings_queues", &[]),
        2.0,
        "orders and orders.dlq"
    );
    assert_eq!(value(&s, "tidings_queue_published_messages_total", &q), 5.0);
    assert_eq!(value(&s, "tidings_queue_delivered_messages_total", &q), 5.0);
    assert_eq!(value(&s, "tidings_queue_acked_messages_total", &q), 3.0);
    assert_eq!(
        value(&s, "tidings_queue_dead_lettered_messages_total", &q),
        1.0
    );
    assert_eq!(
        value(&s, "tidings_queue_redelivered_messages_total", &q),
        0.0
    );
    assert_eq!(value(&s, "tidings_queue_in_flight_messages", &q), 1.0);
    assert_eq!(value(&s, "tidings_queue_messages", &q), 1.0);
    // The one unacked message, counted as max_bytes counts it: the fixed
    // overhead, the topic and the 10-byte payload.
    let counted = tidings_broker::queue::MESSAGE_OVERHEAD + "orders.created".len() as u64 + 10;
    assert_eq!(value(&s, "tidings_queue_bytes", &q), counted as f64);
    assert_eq!(value(&s, "tidings_queue_consumers", &q), 1.0);
    assert_eq!(
        value(&s, "tidings_queue_messages", &[("queue", "orders.dlq")]),
        1.0
    );
    assert_eq!(value(&s, "tidings_metrics_queues_omitted", &[]), 0.0);
    // Every confirmed publish waited for an fdatasync (the default policy).
    assert!(histogram_count(&s, "tidings_storage_fsync_duration_seconds") >= 1.0);
    assert!(histogram_count(&s, "tidings_storage_commit_batch_messages") >= 1.0);
    // The 5 confirmed publishes (the dead letter's copy may still be on its way).
    assert!(value(&s, "tidings_storage_commit_batch_messages_sum", &[]) >= 5.0);
    assert_eq!(value(&s, "tidings_storage_failed", &[]), 0.0);
    assert!(value(&s, "tidings_storage_log_segments", &[]) >= 1.0);
    assert!(value(&s, "tidings_storage_log_bytes", &[]) > 0.0);
    assert!(value(&s, "tidings_process_resident_memory_bytes", &[]) > 1e6);
    assert!(value(&s, "tidings_process_open_fds", &[]) > 3.0);
    assert_eq!(value(&s, "tidings_build_info", &[]), 1.0);
    broker.handle.shutdown().await;
}

#[tokio::test]
async fn queue_series_are_capped() {
    let broker = start_with(|c| {
        http_on_port_0(c);
        c.metrics_max_queues = 2;
    })
    .await;
    let http = broker.handle.http_addr().unwrap();
    let mut c = Client::hello(broker.addr, "declarer").await;
    for name in ["a", "b", "c", "d"] {
        c.declare(
            name,
            QueueOptions {
                bindings: vec![format!("{name}.>").into()],
                ..Default::default()
            },
        )
        .await;
    }
    c.publish_confirmed("c.x", &b"1"[..]).await;
    c.publish_confirmed("d.x", &b"2"[..]).await;
    c.publish_confirmed("d.y", &b"3"[..]).await;
    let s = scrape(http).await;
    let depth: Vec<_> = s
        .samples
        .iter()
        .filter(|x| x.metric == "tidings_queue_messages")
        .map(|x| x.labels.get("queue").unwrap().to_owned())
        .collect();
    assert_eq!(depth.len(), 3, "{depth:?}");
    assert_eq!(value(&s, "tidings_queue_messages", &[("queue", "a")]), 0.0);
    assert_eq!(
        value(&s, "tidings_queue_messages", &[("queue", "_other")]),
        3.0
    );
    assert_eq!(
        value(
            &s,
            "tidings_queue_published_messages_total",
            &[("queue", "_other")]
        ),
        3.0
    );
    assert_eq!(value(&s, "tidings_metrics_queues_omitted", &[]), 2.0);
    broker.handle.shutdown().await;
}

#[tokio::test]
async fn health_and_readiness_follow_the_broker_life() {
    let broker = start_with(|c| {
        http_on_port_0(c);
        // Long enough that only the unread subscriber below holds up the drain.
        c.shutdown_timeout = std::time::Duration::from_secs(30);
    })
    .await;
    let http = broker.handle.http_addr().unwrap();
    let health = get(http, "/healthz").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
    assert_eq!(wait_ready(http).await["ready"], true);

    // A subscriber that reads nothing, with more queued for it than the socket
    // buffers hold: its flush cannot finish, so the broker stays draining.
    let mut stuck = Client::hello(broker.addr, "stuck").await;
    stuck.subscribe(1, "flood", None).await;
    let mut publisher = Client::hello(broker.addr, "publisher").await;
    let payload = vec![7u8; 512 * 1024];
    for _ in 0..96 {
        publisher.publish("flood", payload.clone()).await;
    }
    // The last publish was routed once a later request on the same connection is
    // answered.
    publisher.subscribe(2, "sync", None).await;

    broker.handle.begin_shutdown();
    let draining = within("readiness to turn false", async {
        loop {
            let r = get(http, "/readyz").await;
            if r.status == 503 {
                return r;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let body = draining.json();
    assert_eq!(body["ready"], false);
    assert!(
        body["reason"].as_str().unwrap().contains("draining"),
        "{body}"
    );
    // Liveness is unaffected.
    assert_eq!(get(http, "/healthz").await.status, 200);
    let overview = get(http, "/api/overview").await.json();
    assert_eq!(overview["draining"], true);

    drop(stuck);
    drop(publisher);
    within("shutdown", broker.handle.shutdown()).await;
    assert!(
        tokio::net::TcpStream::connect(http).await.is_err(),
        "the HTTP listener stops with the broker"
    );
}

/// A message published while its consumer's window is full of unacked deliveries
/// carries its delivery mark in its own round (`premark` in queue/durable.rs), so it
/// costs the one sync of that round and not a second one for a mark of its own
/// before it may be delivered, as it did when only a message a consumer had free
/// credit for was marked.
#[tokio::test]
async fn a_message_behind_a_full_consumer_window_costs_one_sync() {
    let broker = start_with(http_on_port_0).await;
    let http = broker.handle.http_addr().unwrap();
    wait_ready(http).await;
    let mut producer = Client::hello(broker.addr, "producer").await;
    for name in ["window", "last"] {
        let options = QueueOptions {
            bindings: vec![name.into()],
            ..Default::default()
        };
        producer.declare(name, options).await;
    }
    let mut consumer = Client::hello(broker.addr, "consumer").await;
    assert!(consumer.consume(1, "window", 2).await.is_empty());
    for i in 0..2u8 {
        producer.publish_confirmed("window", vec![i]).await;
        consumer.delivery().await;
    }
    // The window is full (2 unacked), and the marks asked for so far are durable
    // once a later round is: rounds are durable in order.
    producer.publish_confirmed("last", vec![0]).await;
    let before = histogram_count(
        &scrape(http).await,
        "tidings_storage_fsync_duration_seconds",
    );
    for i in 0..3u8 {
        assert_eq!(producer.publish_confirmed("window", vec![10 + i]).await, 1);
    }
    // Whatever these three publishes' commits queued (a mark of their own, once) is
    // in this round or an earlier one.
    producer.publish_confirmed("last", vec![1]).await;
    let after = histogram_count(
        &scrape(http).await,
        "tidings_storage_fsync_duration_seconds",
    );
    assert_eq!(
        after - before,
        4.0,
        "one sync per confirmed publish, none for delivery marks"
    );
    drop(consumer);
    broker.handle.shutdown().await;
}
