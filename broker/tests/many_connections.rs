//! 10,000 authenticated connections against the real broker binary (its own
//! process: client and broker sockets together would not fit the 20,000
//! descriptors a process may have here), each subscribed to its own topic and to a
//! shared one: one publish to the shared topic reaches all 10,000. The broker's
//! resident memory per idle authenticated connection is measured from /proc and
//! printed (target: at most 30 KiB).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use tidings_protocol::{Frame, FrameCodec, Hello, Publish, Subscribe};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_util::codec::Decoder;

const CONNECTIONS: usize = 10_000;
const TOKEN: &str = "member-token-0123456789";
const WAIT: Duration = Duration::from_secs(120);
/// Connections being set up at once.
const PARALLEL: usize = 200;

fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

async fn spawn_broker(dir: &Path) -> (Child, SocketAddr) {
    let config = dir.join("tidings.toml");
    std::fs::write(
        &config,
        format!(
            "max-connections = {}\n\n[[users]]\nname = \"member\"\ntoken = \"{TOKEN}\"\n\
             publish = {{ allow = [\"shared.>\"] }}\n\
             subscribe = {{ allow = [\"own.>\", \"shared.>\"] }}\n",
            CONNECTIONS + 100
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidings-broker"))
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("RUST_LOG", "warn,tidings_broker=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the broker binary starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let addr = tokio::time::timeout(WAIT, async {
        loop {
            let mut line = String::new();
            assert!(
                stderr.read_line(&mut line).await.unwrap() > 0,
                "broker exited"
            );
            if let Some(rest) = line.split("listening on ").nth(1) {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        }
    })
    .await
    .expect("the broker listens");
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = stderr.read_to_end(&mut sink).await;
    });
    (child, addr)
}

/// Reads frames until `want` returns true for one, with a small buffer.
async fn read_until(s: &mut TcpStream, mut want: impl FnMut(&Frame) -> bool) {
    let mut buf = BytesMut::with_capacity(512);
    let mut codec = FrameCodec::default();
    loop {
        while let Some(frame) = codec.decode(&mut buf).unwrap() {
            if let Frame::Error(e) = &frame {
                panic!("broker refused: {e:?}");
            }
            if want(&frame) {
                return;
            }
        }
        assert!(
            s.read_buf(&mut buf).await.unwrap() > 0,
            "broker closed the connection"
        );
    }
}

async fn member(addr: SocketAddr, i: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut hello = Hello::new(format!("member-{i}"));
    hello.token = Some(TOKEN.into());
    let mut out = BytesMut::new();
    Frame::Hello(hello).encode(&mut out).unwrap();
    for (sid, pattern) in [(1, format!("own.{i}")), (2, "shared.all".to_owned())] {
        Frame::Subscribe(Subscribe {
            request_id: sid,
            sid,
            pattern: pattern.into(),
            group: None,
        })
        .encode(&mut out)
        .unwrap();
    }
    s.write_all(&out).await.unwrap();
    read_until(&mut s, |f| matches!(f, Frame::Ok(ok) if ok.request_id == 2)).await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_authenticated_connections_get_one_shared_publish() {
    common::raise_fd_limit(CONNECTIONS as u64 + 200);
    let dir = tempfile::tempdir().unwrap();
    let (child, addr) = spawn_broker(dir.path()).await;
    let pid = child.id().unwrap();

    let mut publisher = member(addr, CONNECTIONS).await;
    let before = rss_of(pid);
    let members: Vec<TcpStream> = tokio::time::timeout(
        WAIT,
        futures::stream::iter(0..CONNECTIONS)
            .map(|i| member(addr, i))
            .buffer_unordered(PARALLEL)
            .collect(),
    )
    .await
    .expect("10,000 connections set up in time");
    let after = rss_of(pid);
    let per_connection = after.saturating_sub(before) / CONNECTIONS as u64;
    println!(
        "broker RSS: {} MiB before, {} MiB with {CONNECTIONS} idle authenticated connections \
         (2 subscriptions each): {:.1} KiB per connection",
        before >> 20,
        after >> 20,
        per_connection as f64 / 1024.0
    );

    let mut out = BytesMut::new();
    Frame::Publish(Publish::new("shared.all", &b"to everyone"[..]))
        .encode(&mut out)
        .unwrap();
    publisher.write_all(&out).await.unwrap();
    let received = tokio::time::timeout(
        WAIT,
        futures::stream::iter(members)
            .map(|mut s| async move {
                read_until(&mut s, |f| {
                    matches!(f, Frame::Message(m) if m.sid == 2 && &m.payload[..] == b"to everyone")
                })
                .await;
            })
            .buffer_unordered(1000)
            .count(),
    )
    .await
    .expect("the shared publish reaches everyone in time");
    assert_eq!(received, CONNECTIONS);
    // The memory a connection may cost: far above the 30 KiB target only if
    // something per connection is unbounded.
    assert!(
        per_connection < 100 * 1024,
        "{per_connection} bytes per connection"
    );
    drop(child);
}
