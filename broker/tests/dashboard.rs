//! The dashboard in a real browser: headless Chromium loads the page from a live
//! broker carrying traffic, and the DOM it renders must list the test's queue
//! with a non-zero publish rate. A screenshot is written beside the test's
//! temporary files, or to `$TIDINGS_SCREENSHOT` when set (the README's picture is
//! made that way).
//!
//! Chromium comes from Debian's `chromium` package (`.ci/run` installs it). Set
//! `TIDINGS_CHROMIUM` to use another binary. Without a browser the test skips
//! loudly, except under CI (`CI` set), where it fails.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::http::get;
use common::{Client, start_with, within};
use tidings_broker::HttpListen;
use tidings_protocol::{Ack, Frame, Nack, QueueOptions};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// Queues beside the test's own, so the page shows it can cope with many.
const BULK_QUEUES: usize = 1_000;

fn find_chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TIDINGS_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome", "chrome"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Runs Chromium headless on `url` with `extra` flags; returns its stdout.
async fn chromium(binary: &Path, profile: &Path, url: &str, extra: &[&str]) -> String {
    let mut cmd = Command::new(binary);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1440,1100",
        // Virtual time runs the page's timers (its refresh loop) without waiting
        // for the wall clock; network fetches hold it back until they finish.
        "--virtual-time-budget=7000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium finishes within 90 s")
        .expect("chromium starts");
    assert!(
        out.status.success(),
        "chromium failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Publishes to `topic` with confirms until `stop`.
async fn publish_until(
    addr: SocketAddr,
    topic: &'static str,
    every: Duration,
    stop: CancellationToken,
) {
    let mut c = Client::hello(addr, &format!("publisher-{topic}")).await;
    let mut n = 0u64;
    while !stop.is_cancelled() {
        let payload = format!(
            "{{\"order\":{n},\"item\":\"widget\",\"qty\":{}}}",
            n % 7 + 1
        );
        c.publish_confirmed(topic, payload.into_bytes()).await;
        n += 1;
        tokio::time::sleep(every).await;
    }
}

/// Consumes `queue`, acking (or nacking every `nack_every`-th) until `stop`. Acks
/// are pipelined: their OKs are read along with the deliveries.
async fn consume_until(
    addr: SocketAddr,
    name: &str,
    queue: &str,
    nack_every: u64,
    stop: CancellationToken,
) {
    let mut c = Client::hello(addr, name).await;
    let mut n = 0u64;
    let early = c.consume(1, queue, 64).await;
    let mut settle = async |c: &mut Client, d: tidings_protocol::Delivery| {
        n += 1;
        let request_id = c.request_id();
        let frame = if nack_every > 0 && n % nack_every == 0 {
            Frame::Nack(Nack {
                request_id,
                delay_ms: None,
                ids: vec![d.delivery_id],
            })
        } else {
            Frame::Ack(Ack {
                request_id,
                ids: vec![d.delivery_id],
            })
        };
        c.send(frame).await;
    };
    for d in early {
        settle(&mut c, d).await;
    }
    loop {
        let frame = tokio::select! {
            () = stop.cancelled() => return,
            f = c.recv() => f,
        };
        match frame {
            Some(Frame::Delivery(d)) => settle(&mut c, d).await,
            Some(Frame::Ok(_)) => {}
            other => panic!("consumer got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_lists_the_queue_with_its_rate_in_a_real_browser() {
    let Some(binary) = find_chromium() else {
        let msg =
            "Chromium not found (install Debian's `chromium` package or set TIDINGS_CHROMIUM)";
        if std::env::var_os("CI").is_some() {
            panic!("{msg}; CI must run the dashboard test");
        }
        eprintln!("\n!!!!!!!!\n!!!!!!!! SKIPPING the dashboard browser test: {msg}\n!!!!!!!!\n");
        return;
    };
    let broker = start_with(|c| {
        c.http_listen = HttpListen(Some("127.0.0.1:0".parse().unwrap()));
    })
    .await;
    let http = broker.handle.http_addr().unwrap();
    let mut admin = Client::hello(broker.addr, "ops-setup").await;
    for (name, binding, max_deliveries) in [
        ("orders", "orders.>", 5),
        ("payments", "payments.>", 5),
        ("emails", "emails.>", 1),
    ] {
        admin
            .declare(
                name,
                QueueOptions {
                    bindings: vec![binding.into()],
                    max_deliveries: Some(max_deliveries),
                    ..Default::default()
                },
            )
            .await;
    }
    for i in 0..BULK_QUEUES {
        admin
            .declare(
                &format!("tenant.{i:04}"),
                QueueOptions {
                    bindings: vec![format!("tenant.{i:04}.>").into()],
                    ..Default::default()
                },
            )
            .await;
    }
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(publish_until(
        broker.addr,
        "orders.created",
        Duration::from_millis(5),
        stop.clone(),
    ));
    tasks.spawn(publish_until(
        broker.addr,
        "payments.settled",
        Duration::from_millis(20),
        stop.clone(),
    ));
    tasks.spawn(publish_until(
        broker.addr,
        "emails.welcome",
        Duration::from_millis(40),
        stop.clone(),
    ));
    tasks.spawn(async move {
        let mut c = Client::hello(broker.addr, "tenant-feeder").await;
        for i in 0..200 {
            c.publish_confirmed(&format!("tenant.{:04}.event", i % 40), &b"{}"[..])
                .await;
        }
    });
    tasks.spawn(consume_until(
        broker.addr,
        "fulfilment-worker",
        "orders",
        0,
        stop.clone(),
    ));
    tasks.spawn(consume_until(
        broker.addr,
        "mailer",
        "emails",
        3,
        stop.clone(),
    ));

    // Wait (bounded) until the broker itself reports a publish rate for the queue,
    // and for a few rate samples so the chart has a line.
    within("a publish rate and rate history", async {
        loop {
            let q = get(http, "/api/queues/orders").await.json();
            let o = get(http, "/api/overview").await.json();
            let history = o["history"].as_array().map_or(0, Vec::len);
            if q["rates"]["publish"].as_u64().unwrap_or(0) > 0 && history >= 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if std::env::var_os("TIDINGS_SCREENSHOT").is_some() {
        // A fuller chart for the README's picture.
        tokio::time::sleep(Duration::from_secs(40)).await;
    }

    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{http}/");
    let dom = chromium(&binary, profile.path(), &url, &["--dump-dom"]).await;
    let row_start = dom
        .find("data-queue=\"orders\"")
        .unwrap_or_else(|| panic!("the orders queue is not listed in the page:\n{dom}"));
    let row = &dom[row_start..];
    let row = &row[..row.find("</tr>").expect("row ends")];
    let rate: u64 = row
        .split("data-publish-rate=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no publish rate on the row: {row}"));
    assert!(rate > 0, "orders is listed with publish rate 0: {row}");
    assert!(
        dom.contains("<span class=\"badge ok\" id=\"ready-badge\">Ready</span>"),
        "the ready badge shows Ready"
    );
    // 1,003 queues (1,004 once emails.dlq exists), one page of 50 rows.
    let rows = dom.matches("data-queue=\"").count();
    assert_eq!(rows, 50, "one page of queues");
    let pager = dom.split("id=\"queue-pager\"").nth(1).unwrap_or("");
    let pager = &pager[..pager.len().min(200)];
    assert!(
        pager.contains("1–50 of 1,003 queues") || pager.contains("1–50 of 1,004 queues"),
        "the pager counts every queue: {pager}"
    );
    assert!(dom.contains("<polyline"), "the rate chart is drawn");

    // A link to a queue opens its drawer: its consumer's connection and its peeked
    // messages and dead letters are shown.
    let drawer_profile = tempfile::tempdir().unwrap();
    let dom = chromium(
        &binary,
        drawer_profile.path(),
        &format!("{url}#queue=emails"),
        &["--dump-dom"],
    )
    .await;
    let drawer = dom
        .split("id=\"drawer\"")
        .nth(1)
        .expect("the drawer is in the page");
    assert!(!drawer.starts_with(" hidden"), "the drawer is open");
    assert!(
        drawer.contains("mailer #"),
        "the consumer's connection is named: {drawer}"
    );
    assert!(
        drawer.contains("emails.welcome"),
        "a peeked message shows its topic"
    );
    assert!(
        drawer.contains("max_deliveries after 1 attempts"),
        "a dead letter says why it died"
    );

    // The connections tab lists the clients with their names.
    let conn_profile = tempfile::tempdir().unwrap();
    let dom = chromium(
        &binary,
        conn_profile.path(),
        &format!("{url}#connections"),
        &["--dump-dom"],
    )
    .await;
    let rows = dom
        .split("id=\"conn-rows\"")
        .nth(1)
        .expect("the connections table");
    let rows = &rows[..rows.find("</tbody>").expect("table ends")];
    for client in ["fulfilment-worker", "mailer", "publisher-orders.created"] {
        assert!(rows.contains(client), "{client} is listed: {rows}");
    }

    let shot = std::env::var_os("TIDINGS_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png"));
    let screenshot_profile = tempfile::tempdir().unwrap();
    chromium(
        &binary,
        screenshot_profile.path(),
        &url,
        &[&format!("--screenshot={}", shot.display())],
    )
    .await;
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "a screenshot was written to {} ({size} bytes)",
        shot.display()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
    if std::env::var_os("TIDINGS_SCREENSHOT").is_some() {
        let queue_shot = shot.with_file_name("dashboard-queue.png");
        let profile = tempfile::tempdir().unwrap();
        let flag = format!("--screenshot={}", queue_shot.display());
        chromium(
            &binary,
            profile.path(),
            &format!("{url}#queue=emails"),
            &[&flag],
        )
        .await;
        eprintln!("queue drawer screenshot: {}", queue_shot.display());
        let conn_shot = shot.with_file_name("dashboard-connections.png");
        let profile = tempfile::tempdir().unwrap();
        let flag = format!("--screenshot={}", conn_shot.display());
        chromium(
            &binary,
            profile.path(),
            &format!("{url}#connections"),
            &[&flag],
        )
        .await;
        eprintln!("connections screenshot: {}", conn_shot.display());
    }

    stop.cancel();
    while tasks.join_next().await.is_some() {}
    broker.handle.shutdown().await;
}
