//! Graceful shutdown: of the real binary on SIGTERM, and of an in-process broker.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Client, start, within};
use tidings_protocol::{ErrorCode, Frame};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn binary_exits_zero_on_sigterm_with_a_clean_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidings-broker"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "info")
        .env_remove("TIDINGS_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the broker binary starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let addr = within("the listening line", async {
        loop {
            let mut line = String::new();
            assert!(
                stderr.read_line(&mut line).await.unwrap() > 0,
                "exited early: {log}"
            );
            log.push_str(&line);
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap();
                return addr.parse::<std::net::SocketAddr>().unwrap();
            }
        }
    })
    .await;
    assert!(
        log.contains("version="),
        "startup log names the version: {log}"
    );
    assert!(
        log.contains("data_dir="),
        "startup log names the data dir: {log}"
    );

    // A connected subscriber is told the server is going away, after what was
    // queued for it.
    let mut sub = Client::hello(addr, "sub").await;
    sub.subscribe(1, "t", None).await;
    let mut publisher = Client::hello(addr, "pub").await;
    publisher.publish("t", &b"before"[..]).await;
    assert_eq!(&sub.message().await.payload[..], b"before");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    sub.expect_error(ErrorCode::ShuttingDown).await;
    sub.expect_closed().await;
    publisher.expect_error(ErrorCode::ShuttingDown).await;
    drop(publisher);

    let exit = within("the broker to exit", child.wait()).await.unwrap();
    let mut rest = String::new();
    within("the log", stderr.read_to_string(&mut rest))
        .await
        .unwrap();
    log.push_str(&rest);
    assert_eq!(exit.code(), Some(0), "log:\n{log}");
    assert!(log.contains("shutdown complete"), "log:\n{log}");
    for bad in ["ERROR", "WARN", "panicked"] {
        assert!(!log.contains(bad), "unexpected {bad} in log:\n{log}");
    }
}

#[tokio::test]
async fn print_config_shows_effective_settings() {
    let out = Command::new(env!("CARGO_BIN_EXE_tidings-broker"))
        .args(["--print-config", "--max-payload", "2MiB"])
        .env("TIDINGS_HEARTBEAT", "250ms")
        .env_remove("TIDINGS_CONFIG")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("max-payload = 2097152"), "{text}");
    assert!(text.contains("heartbeat = \"250ms\""), "{text}");
    assert!(text.contains("listen = \"127.0.0.1:7878\""), "{text}");
}

#[tokio::test]
async fn help_documents_every_flag_with_its_default() {
    let out = Command::new(env!("CARGO_BIN_EXE_tidings-broker"))
        .arg("--help")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--data-dir",
        "--max-payload",
        "--max-connections",
        "--max-pending-bytes",
        "--heartbeat",
        "--missed-heartbeats",
        "--auth-token",
        "--handshake-timeout",
        "--shutdown-timeout",
        "--config",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    for default in [
        "127.0.0.1:7878",
        "./tidings-data",
        "1MiB",
        "64MiB",
        "2s",
        "TIDINGS_LISTEN",
    ] {
        assert!(help.contains(default), "--help lacks {default}:\n{help}");
    }
}

#[tokio::test]
async fn in_process_shutdown_flushes_and_closes_clients() {
    let broker = start().await;
    let mut sub = Client::hello(broker.addr, "sub").await;
    sub.subscribe(1, "t", None).await;
    let mut publisher = Client::hello(broker.addr, "pub").await;
    for i in 0..50u32 {
        publisher.publish("t", i.to_be_bytes().to_vec()).await;
    }
    // The publisher's stats reply proves its publishes were all routed.
    publisher.stats().await;
    let addr = broker.addr;
    within("shutdown", broker.handle.shutdown()).await;
    // Everything queued before shutdown arrives, then the goodbye, then the end.
    for i in 0..50u32 {
        assert_eq!(&sub.message().await.payload[..], &i.to_be_bytes());
    }
    match sub.recv().await {
        Some(Frame::Error(e)) => assert_eq!(e.error_code(), Some(ErrorCode::ShuttingDown)),
        other => panic!("expected ERROR ShuttingDown, got {other:?}"),
    }
    sub.expect_closed().await;
    // Nothing listens any more.
    let refused =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await;
    assert!(
        matches!(refused, Ok(Err(_))),
        "still accepting after shutdown"
    );
}
