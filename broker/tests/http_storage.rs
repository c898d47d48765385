//! A real storage failure seen from the HTTP side: the broker keeps its data on a
//! small tmpfs that this test mounts (root, as in CI; elsewhere it says why it
//! cannot run, and fails only when `TIDINGS_REQUIRE_TMPFS` is set), confirmed
//! publishes fill it until the store fails with ENOSPC, and then `/readyz` answers
//! 503 naming storage, `/healthz` still 200, and `tidings_storage_failed` is 1.

mod common;

use std::path::Path;
use std::process::Command;

use common::http::{get, wait_ready};
use common::{Client, start_with};
use prometheus_parse::{Scrape, Value};
use tidings_broker::HttpListen;
use tidings_protocol::{ErrorCode, Frame, Publish, QueueOptions};

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

fn storage_failed(scrape: &Scrape) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == "tidings_storage_failed")
        .expect("tidings_storage_failed in /metrics");
    match sample.value {
        Value::Gauge(v) | Value::Untyped(v) => v,
        ref other => panic!("not a gauge: {other:?}"),
    }
}

async fn scrape(addr: std::net::SocketAddr) -> Scrape {
    let response = get(addr, "/metrics").await;
    assert_eq!(response.status, 200);
    let text = response.text();
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("scrape parses")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_makes_readyz_fail_with_the_storage_reason_while_healthz_stays_ok() {
    let dir = tempfile::tempdir().unwrap();
    if !mount_tmpfs(dir.path(), "8m") {
        let required = std::env::var_os("TIDINGS_REQUIRE_TMPFS").is_some();
        eprintln!("cannot mount a tmpfs here (not root?): storage-failure HTTP test not run");
        assert!(
            !required,
            "TIDINGS_REQUIRE_TMPFS is set but mounting failed"
        );
        return;
    }
    let _mount = Mount(dir.path().to_owned());
    let data_dir = dir.path().to_owned();
    let broker = start_with(move |c| {
        c.data_dir = data_dir;
        c.http_listen = HttpListen(Some("127.0.0.1:0".parse().unwrap()));
    })
    .await;
    let http = broker.handle.http_addr().unwrap();
    wait_ready(http).await;
    assert_eq!(storage_failed(&scrape(http).await), 0.0);

    let mut c = Client::hello(broker.addr, "filler").await;
    c.declare(
        "fill",
        QueueOptions {
            bindings: vec!["fill".into()],
            ..Default::default()
        },
    )
    .await;
    // 512 KiB a message: 8 MiB is full within a few dozen.
    let mut failure = None;
    for _ in 0..100 {
        let request_id = c.request_id();
        let mut p = Publish::new("fill", vec![7u8; 512 << 10]);
        p.request_id = Some(request_id);
        p.confirm = true;
        c.send(Frame::Publish(p)).await;
        match c.recv().await {
            Some(Frame::Confirm(confirm)) => assert_eq!(confirm.request_id, request_id),
            Some(Frame::Error(e)) if e.code == ErrorCode::StorageFailure as u16 => {
                failure = Some(e.message.to_string());
                break;
            }
            other => panic!("expected CONFIRM or StorageFailure, got {other:?}"),
        }
    }
    let failure = failure.expect("the 8 MiB tmpfs filled up");
    assert!(
        failure.contains("No space left on device") || failure.contains("os error 28"),
        "the error names the cause: {failure}"
    );

    let ready = get(http, "/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    let body = ready.json();
    assert_eq!(body["ready"], false);
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains("storage failed"), "{reason}");
    let healthz = get(http, "/healthz").await;
    assert_eq!(healthz.status, 200, "{}", healthz.text());
    assert_eq!(healthz.json()["status"], "ok");
    assert_eq!(storage_failed(&scrape(http).await), 1.0);

    // Pub/sub still answers: the broker is alive, only not ready for durable work.
    c.send(Frame::Ping(tidings_protocol::Ping)).await;
    assert!(matches!(c.recv().await, Some(Frame::Pong(_))));
    drop(c);
    broker.handle.shutdown().await;
}
