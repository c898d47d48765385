//! The `tidings` binary against a real broker: pub/sub and req/reply round trips,
//! stats, and clear one-line errors with a non-zero exit.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{BOUND, TestBroker, within};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

fn tidings(addr: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidings"));
    cmd.env("TIDINGS_SERVER", addr)
        .env_remove("TIDINGS_TOKEN")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn run(addr: &str, args: &[&str]) -> std::process::Output {
    within(tidings(addr).args(args).output()).await.unwrap()
}

/// Runs `action` until `child` exits (it exits after its `--count`): a retry loop
/// because a CLI process cannot tell us when its subscription is in place.
async fn until_exit(child: &mut Child, mut action: impl AsyncFnMut()) {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "child did not exit");
        action().await;
        let _ = tokio::time::timeout(Duration::from_millis(100), child.wait()).await;
    }
}

#[tokio::test]
async fn pub_sub_round_trip() {
    let broker = TestBroker::start().await;
    let addr = broker.addr();
    let mut sub = tidings(&addr)
        .args(["sub", "orders.>", "--count", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    until_exit(&mut sub, async || {
        let out = run(&addr, &["pub", "orders.created", "hello world"]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await;
    let status = within(sub.wait()).await.unwrap();
    assert!(status.success());
    let mut lines = BufReader::new(sub.stdout.take().unwrap()).lines();
    let line = within(lines.next_line()).await.unwrap().unwrap();
    assert_eq!(line, "orders.created hello world");
}

#[tokio::test]
async fn pub_reads_stdin_and_sub_prints_binary_as_hex() {
    let broker = TestBroker::start().await;
    let addr = broker.addr();
    let client = broker.client().await;
    let mut sub = within(client.subscribe("bin")).await.unwrap();
    let mut child = tidings(&addr)
        .args(["pub", "bin", "--header", "k=v", "--count", "2"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&[0xff, 0x01]).await.unwrap();
    }
    assert!(within(child.wait()).await.unwrap().success());
    for _ in 0..2 {
        let m = within(futures::StreamExt::next(&mut sub)).await.unwrap();
        assert_eq!(&m.payload()[..], &[0xff, 0x01]);
        assert_eq!(m.header_value("k"), Some("v"));
    }
}

#[tokio::test]
async fn req_reply_round_trip() {
    let broker = TestBroker::start().await;
    let addr = broker.addr();
    let mut reply = tidings(&addr)
        .args(["reply", "echo", "--count", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut answer = None;
    until_exit(&mut reply, async || {
        let out = run(&addr, &["req", "echo", "ping", "--timeout", "2s"]).await;
        if out.status.success() {
            answer = Some(String::from_utf8(out.stdout).unwrap());
        } else {
            // Only "no responders" is expected before the responder is up.
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("no responders"), "{err}");
        }
    })
    .await;
    assert_eq!(answer.as_deref(), Some("ping\n"));
}

#[tokio::test]
async fn req_without_responders_fails_with_one_line() {
    let broker = TestBroker::start().await;
    let out = run(
        &broker.addr(),
        &["req", "nobody", "x", "--timeout", "500ms"],
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no responders"), "{err}");
}

#[tokio::test]
async fn stats_prints_a_table_and_json() {
    let broker = TestBroker::start().await;
    let out = run(&broker.addr(), &["stats"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty());
    let out = run(&broker.addr(), &["stats", "--json"]).await;
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json.as_object().is_some_and(|o| !o.is_empty()), "{json}");
}

#[tokio::test]
async fn errors_are_one_clear_line() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let out = run(&addr, &["pub", "x", "y"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&addr), "{err}");
    // Each cause once: not "…: connection refused: connection refused".
    assert_eq!(err.to_lowercase().matches("refused").count(), 1, "{err}");
    assert_eq!(err.matches(&addr).count(), 1, "{err}");

    let broker = TestBroker::start().await;
    let out = run(&broker.addr(), &["pub", "bad..topic", "y"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid topic"));
    let out = run(&broker.addr(), &["pub", "bad topic", "y"]).await;
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("invalid topic `bad topic`"), "{err}");
    assert_eq!(err.matches("whitespace").count(), 1, "{err}");
    let out = run(&broker.addr(), &["queue", "declare", "q", "--ttl", "5"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("time unit needed"));
}

/// `sub` says on stderr when messages may have been lost (here: the broker
/// restarted under it), and goes on with the restored subscription.
#[tokio::test]
async fn sub_warns_when_its_stream_is_interrupted() {
    let mut broker = TestBroker::start().await;
    let child = tidings(&broker.addr())
        .args(["sub", "alerts", "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    async fn subscribed(broker: &TestBroker) {
        let probe = broker.client().await;
        let deadline = tokio::time::Instant::now() + BOUND;
        while within(probe.stats())
            .await
            .unwrap()
            .get("subscriptions.current")
            != Some(1)
        {
            assert!(tokio::time::Instant::now() < deadline, "never subscribed");
            tokio::task::yield_now().await;
        }
    }
    subscribed(&broker).await;
    broker.stop().await;
    broker.start_again().await;
    subscribed(&broker).await;
    let publisher = broker.client().await;
    within(publisher.publish("alerts", "after")).await.unwrap();
    within(publisher.flush()).await.unwrap();
    let out = within(child.wait_with_output()).await.unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "alerts after\n");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("warning: the connection to the broker was lost"),
        "{err}"
    );
}
