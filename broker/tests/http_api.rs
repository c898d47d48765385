//! The JSON API over real HTTP: every read endpoint against a broker with real
//! traffic, and the admin actions, refused without the right and working with it.

mod common;

use common::http::{get, post, request};
use common::{Client, TestBroker, start_with};
use serde_json::Value;
use tidings_broker::HttpListen;
use tidings_protocol::{ErrorCode, Frame, Publish, QueueOptions};

async fn broker(admin_token: Option<&str>) -> TestBroker {
    let token = admin_token.map(str::to_owned);
    start_with(move |c| {
        c.http_listen = HttpListen(Some("127.0.0.1:0".parse().unwrap()));
        c.http_admin_token = token;
    })
    .await
}

/// Declares `orders` (one delivery, then dead letter) and publishes three messages
/// with headers and ids; `worker` consumes them and nacks the first into the
/// dead-letter queue, keeping two unacked.
async fn traffic(broker: &TestBroker) -> Client {
    let mut worker = Client::hello(broker.addr, "worker").await;
    worker.subscribe(4, "audit.>", Some("auditors")).await;
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
    for i in 0..3 {
        let request_id = worker.request_id();
        let mut p = Publish::new("orders.created", format!("{{\"order\":{i}}}").into_bytes());
        p.request_id = Some(request_id);
        p.confirm = true;
        p.message_id = Some(format!("order-{i}").into());
        p.headers = vec![("content-type".into(), "application/json".into())];
        worker.send(Frame::Publish(p)).await;
        match worker.recv().await {
            Some(Frame::Confirm(c)) => assert_eq!(c.queues, 1),
            other => panic!("expected CONFIRM, got {other:?}"),
        }
    }
    let mut deliveries = worker.consume(1, "orders", 2).await;
    while deliveries.len() < 2 {
        deliveries.push(worker.delivery().await);
    }
    // Credit 2: the third message follows the nacked one.
    if worker
        .nack(vec![deliveries[0].delivery_id])
        .await
        .is_empty()
    {
        worker.delivery().await;
    }
    // The nacked message moves to orders.dlq in two steps (the copy, then the
    // original's removal), and the third delivery may come before the second step:
    // wait for it, so that every figure below is settled.
    let http = broker.handle.http_addr().unwrap();
    common::within("the dead-letter move to finish", async {
        while get(http, "/api/queues/orders").await.json()["depth"] != 2 {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    })
    .await;
    worker
}

fn names(list: &Value) -> Vec<&str> {
    list["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn read_endpoints_answer_over_http() {
    let broker = broker(None).await;
    let http = broker.handle.http_addr().unwrap();
    let _worker = traffic(&broker).await;

    let o = get(http, "/api/overview").await;
    assert_eq!(o.status, 200);
    assert!(
        o.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let o = o.json();
    assert_eq!(o["ready"], true);
    assert_eq!(o["storage"]["healthy"], true);
    assert_eq!(o["connections"]["current"], 1);
    assert_eq!(o["messages"]["in"], 3);
    assert_eq!(o["queues"]["count"], 2);
    assert_eq!(o["queues"]["in_flight"], 2);
    assert_eq!(o["queues"]["dead_letters"], 1);
    assert!(o["history"].is_array());

    let list = get(http, "/api/queues").await.json();
    assert_eq!(list["total"], 2);
    assert_eq!(names(&list), ["orders", "orders.dlq"]);
    let orders = &list["queues"][0];
    assert_eq!(orders["depth"], 2);
    assert_eq!(orders["in_flight"], 2);
    assert_eq!(orders["dead_letters"], 1);
    assert_eq!(orders["published"], 3);
    assert_eq!(orders["delivered"], 3);
    assert_eq!(orders["options"]["max_deliveries"], 1);
    assert_eq!(orders["options"]["dead_letter"], "orders.dlq");
    assert_eq!(orders["options"]["overflow"], "reject-publish");
    assert_eq!(orders["bindings"][0], "orders.>");
    let filtered = get(http, "/api/queues?filter=DLQ").await.json();
    assert_eq!(
        (filtered["matched"].as_u64(), names(&filtered)),
        (Some(1), vec!["orders.dlq"])
    );
    let paged = get(http, "/api/queues?offset=1&limit=1").await.json();
    assert_eq!(names(&paged), ["orders.dlq"]);
    let by_flight = get(http, "/api/queues?sort=in_flight").await.json();
    assert_eq!(names(&by_flight), ["orders", "orders.dlq"]);
    let ascending = get(http, "/api/queues?sort=in_flight&order=asc")
        .await
        .json();
    assert_eq!(names(&ascending), ["orders.dlq", "orders"]);
    let bad = get(http, "/api/queues?sort=colour").await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].as_str().unwrap().contains("colour"));

    let q = get(http, "/api/queues/orders").await.json();
    assert_eq!(q["name"], "orders");
    let consumers = q["consumer_list"].as_array().unwrap();
    assert_eq!(consumers.len(), 1);
    assert_eq!(consumers[0]["unacked"], 2);
    assert_eq!(consumers[0]["window"], 2);
    assert_eq!(consumers[0]["connection"]["client_name"], "worker");
    assert!(
        consumers[0]["connection"]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    let missing = get(http, "/api/queues/nothing.here").await;
    assert_eq!(missing.status, 404);
    assert!(
        missing.json()["error"]
            .as_str()
            .unwrap()
            .contains("nothing.here")
    );

    // Peeking: the two unacked messages, oldest first, paged, and nothing consumed.
    let page = get(http, "/api/queues/orders/messages?limit=1")
        .await
        .json();
    let first = &page["messages"][0];
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);
    assert_eq!(first["topic"], "orders.created");
    assert_eq!(first["payload_preview"], "{\"order\":1}");
    assert_eq!(first["payload_utf8"], true);
    assert_eq!(first["message_id"], "order-1");
    assert_eq!(first["headers"][0][0], "content-type");
    let next = page["next_from"].as_u64().unwrap();
    let rest = get(http, &format!("/api/queues/orders/messages?from={next}"))
        .await
        .json();
    assert_eq!(rest["messages"].as_array().unwrap().len(), 1);
    assert_eq!(rest["messages"][0]["payload_preview"], "{\"order\":2}");
    let after = get(http, "/api/queues/orders").await.json();
    assert_eq!(
        (after["depth"].as_u64(), after["in_flight"].as_u64()),
        (Some(2), Some(2))
    );

    let dead = get(http, "/api/queues/orders/dead-letters").await.json();
    assert_eq!(dead["read_from"], "orders.dlq");
    let letters = dead["messages"].as_array().unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["reason"], "max_deliveries");
    assert_eq!(letters[0]["attempts"], 1);
    assert_eq!(letters[0]["payload_preview"], "{\"order\":0}");

    let conns = get(http, "/api/connections").await.json();
    assert_eq!(conns["total"], 1);
    let c = &conns["connections"][0];
    assert_eq!(c["client_name"], "worker");
    assert_eq!(c["messages_in"], 3);
    assert_eq!(c["messages_out"], 3, "three deliveries");
    assert_eq!(c["subscription_count"], 1);
    assert_eq!(c["subscriptions"][0]["pattern"], "audit.>");
    assert!(c["pending_bytes"].is_u64());

    let subs = get(http, "/api/subscriptions").await.json();
    assert_eq!(subs["total"], 1);
    assert_eq!(subs["subscriptions"][0]["group"], "auditors");
    assert_eq!(subs["subscriptions"][0]["client_name"], "worker");

    assert_eq!(get(http, "/api/nope").await.status, 404);
    broker.handle.shutdown().await;
}

#[tokio::test]
async fn admin_actions_are_refused_without_the_right() {
    let broker = broker(Some("s3cret")).await;
    let http = broker.handle.http_addr().unwrap();
    let _worker = traffic(&broker).await;
    let paths = [
        "/api/queues/orders/purge",
        "/api/queues/orders/redrive",
        "/api/queues/orders/delete",
        "/api/connections/1/close",
    ];
    for path in paths {
        let none = post(http, path, &[]).await;
        assert_eq!(none.status, 401, "{path}: {}", none.text());
        let wrong = post(http, path, &[("Authorization", "Bearer guess")]).await;
        assert_eq!(wrong.status, 401, "{path}");
        let cross = post(
            http,
            path,
            &[
                ("Authorization", "Bearer s3cret"),
                ("Origin", "http://evil.example"),
            ],
        )
        .await;
        assert_eq!(cross.status, 403, "{path}: another origin");
        let site = post(
            http,
            path,
            &[
                ("Authorization", "Bearer s3cret"),
                ("Sec-Fetch-Site", "cross-site"),
            ],
        )
        .await;
        assert_eq!(site.status, 403, "{path}: a cross-site fetch");
        assert_eq!(get(http, path).await.status, 405, "{path}: GET");
    }
    // Nothing happened.
    let q = get(http, "/api/queues/orders").await.json();
    assert_eq!(q["depth"], 2);
    assert_eq!(get(http, "/api/connections").await.json()["total"], 1);
    broker.handle.shutdown().await;

    let open = self::broker(None).await;
    let http = open.handle.http_addr().unwrap();
    let refused = post(
        http,
        "/api/queues/orders/purge",
        &[("Authorization", "Bearer x")],
    )
    .await;
    assert_eq!(refused.status, 403);
    assert!(
        refused.json()["error"]
            .as_str()
            .unwrap()
            .contains("--http-admin-token")
    );
    open.handle.shutdown().await;
}

#[tokio::test]
async fn admin_actions_work_with_the_token() {
    let broker = broker(Some("s3cret")).await;
    let http = broker.handle.http_addr().unwrap();
    let auth = [("Authorization", "Bearer s3cret")];
    let mut worker = traffic(&broker).await;
    // A second publisher adds ready messages for purge to remove.
    let mut publisher = Client::hello(broker.addr, "publisher").await;
    for _ in 0..4 {
        publisher
            .publish_confirmed("orders.created", &b"more"[..])
            .await;
    }
    let same_origin = [
        auth[0],
        ("Origin", &*format!("http://{http}")),
        ("Sec-Fetch-Site", "same-origin"),
    ];
    let purged = post(http, "/api/queues/orders/purge", &same_origin).await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert_eq!(
        purged.json()["purged"],
        4,
        "the ready ones; the two unacked stay"
    );
    let q = get(http, "/api/queues/orders").await.json();
    assert_eq!(
        (q["depth"].as_u64(), q["in_flight"].as_u64()),
        (Some(2), Some(2))
    );

    let redriven = post(http, "/api/queues/orders/redrive", &auth).await.json();
    assert_eq!(redriven["moved"], 1);
    let dlq = get(http, "/api/queues/orders.dlq").await.json();
    assert_eq!(dlq["depth"], 0);

    // Closing a connection: the worker is told why, its socket ends and its
    // deliveries come back.
    let conns = get(http, "/api/connections").await.json();
    let id = conns["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_name"] == "worker")
        .map(|c| c["id"].as_u64().unwrap())
        .unwrap();
    let closed = post(http, &format!("/api/connections/{id}/close"), &auth).await;
    assert_eq!(closed.status, 200, "{}", closed.text());
    let last = worker.drain_to_close().await;
    assert!(
        matches!(last.last(), Some(Frame::Error(e)) if e.code == ErrorCode::ClosedByOperator as u16),
        "the last frame before the close: {:?}",
        last.last()
    );
    let unknown = post(http, "/api/connections/999999/close", &auth).await;
    assert_eq!(unknown.status, 404);

    let deleted = post(http, "/api/queues/orders/delete", &auth).await;
    assert_eq!(deleted.status, 200);
    assert_eq!(get(http, "/api/queues/orders").await.status, 404);
    let again = request(http, "POST", "/api/queues/orders/delete", &auth).await;
    assert_eq!(again.status, 404);
    broker.handle.shutdown().await;
}

#[tokio::test]
async fn http_connections_are_capped() {
    let broker = broker(None).await;
    let http = broker.handle.http_addr().unwrap();
    // 256 idle connections take every place.
    let mut idle = Vec::new();
    for _ in 0..256 {
        idle.push(tokio::net::TcpStream::connect(http).await.unwrap());
    }
    let waiting = tokio::spawn(async move { get(http, "/healthz").await.status });
    // Not served while the cap is full (if the cap did not hold, it would be
    // answered at once; a slow machine can only make this pass, never fail).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a request past the cap was served");
    // One place frees up: the waiting request is served.
    drop(idle.pop());
    assert_eq!(
        common::within("the request past the cap", waiting)
            .await
            .unwrap(),
        200
    );
    drop(idle);
    broker.handle.shutdown().await;
}

#[tokio::test]
async fn users_run_the_queue_actions_their_rights_allow() {
    use base64::Engine as _;
    use tidings_broker::auth::users::QueueRuleEntry;
    use tidings_broker::auth::{QueueRight, UserEntry};

    let users = vec![
        UserEntry {
            name: "ops".into(),
            token: Some("ops-token-0000000001".into()),
            queues: vec![QueueRuleEntry {
                pattern: "jobs.*".into(),
                allow: vec![QueueRight::Manage, QueueRight::Consume],
                deny: vec![],
            }],
            ..UserEntry::default()
        },
        UserEntry {
            name: "root".into(),
            token: Some("root-token-000000002".into()),
            queues: vec![QueueRuleEntry {
                pattern: ">".into(),
                allow: vec![QueueRight::Manage],
                deny: vec![],
            }],
            ..UserEntry::default()
        },
    ];
    let broker = start_with(move |c| {
        c.http_listen = HttpListen(Some("127.0.0.1:0".parse().unwrap()));
        c.security.users = users;
    })
    .await;
    let http = broker.handle.http_addr().unwrap();
    let mut root = Client::connect(broker.addr).await;
    root.handshake("root", Some("root-token-000000002")).await;
    for name in ["jobs.a", "other.b"] {
        root.declare(name, QueueOptions::default()).await;
    }
    let basic = |user: &str, secret: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"))
        )
    };
    let ops = basic("ops", "ops-token-0000000001");
    let as_ops = [("Authorization", ops.as_str())];

    let allowed = post(http, "/api/queues/jobs.a/purge", &as_ops).await;
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    let other = post(http, "/api/queues/other.b/purge", &as_ops).await;
    assert_eq!(other.status, 403, "{}", other.text());
    let redrive = post(http, "/api/queues/jobs.a/redrive", &as_ops).await;
    assert_eq!(
        redrive.status,
        403,
        "no dead_letters right: {}",
        redrive.text()
    );
    let close = post(http, "/api/connections/1/close", &as_ops).await;
    assert_eq!(close.status, 403, "{}", close.text());
    let wrong = basic("ops", "not-the-token-000000");
    let wrong = post(
        http,
        "/api/queues/jobs.a/purge",
        &[("Authorization", wrong.as_str())],
    )
    .await;
    assert_eq!(wrong.status, 401);
    let garbage = post(
        http,
        "/api/queues/jobs.a/purge",
        &[("Authorization", "Basic !!!")],
    )
    .await;
    assert_eq!(garbage.status, 401);
    // No admin token is configured: a bearer token opens nothing.
    let bearer = post(
        http,
        "/api/queues/jobs.a/purge",
        &[("Authorization", "Bearer root-token-000000002")],
    )
    .await;
    assert_eq!(bearer.status, 403);
    let deleted = post(http, "/api/queues/jobs.a/delete", &as_ops).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    assert_eq!(get(http, "/api/queues/jobs.a").await.status, 404);
    // The registry knows who each connection is.
    let conns = get(http, "/api/connections").await.json();
    assert_eq!(conns["connections"][0]["user"], "root");
    broker.handle.shutdown().await;
}
