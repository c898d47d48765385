//! Before authentication only a small frame is read: 1,000 unauthenticated
//! connections announcing huge frames (half of them 1 GiB, half just under the
//! authenticated maximum and then streaming body bytes) are all closed, the
//! process's peak RSS stays under 256 MiB, and an authenticated client keeps
//! publishing to a subscriber meanwhile without losing a message.
//!
//! Without the pre-auth limit the second half alone would make the broker buffer
//! 500 × 768 KiB = 375 MiB of frame bodies.

mod common;

use std::time::Duration;

use common::{Client, within};
use tidings_protocol::{Frame, Publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ATTACKERS: usize = 1_000;
const BODY: usize = 768 * 1024;
const TOKEN: &str = "pre-auth-test-token";

/// Peak resident set size of this process, from /proc (kB → bytes).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

async fn attack(addr: std::net::SocketAddr, i: usize) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let len: u32 = if i % 2 == 0 { 1 << 30 } else { 1024 * 1024 };
    let mut header = len.to_be_bytes().to_vec();
    header.extend_from_slice(&[0x10, 0]); // PUBLISH, no flags
    let _ = s.write_all(&header).await;
    if i % 2 == 1 {
        // Stream a body; the broker stops reading long before, and the writes
        // fail once it has closed.
        static CHUNK: [u8; 16 * 1024] = [0x61; 16 * 1024];
        for _ in 0..BODY / CHUNK.len() {
            if s.write_all(&CHUNK).await.is_err() {
                break;
            }
        }
    }
    // Closed: end of stream (after the FrameTooLarge error) or a reset.
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_floods_are_closed_with_bounded_memory() {
    common::raise_fd_limit(2 * ATTACKERS as u64 + 100);
    let broker = common::start_with(|c| {
        c.auth_token = Some(TOKEN.into());
        c.max_connections = 2 * ATTACKERS;
    })
    .await;
    let mut sub = Client::connect(broker.addr).await;
    sub.handshake("sub", Some(TOKEN)).await;
    sub.subscribe(1, "live.>", None).await;
    let mut publisher = Client::connect(broker.addr).await;
    publisher.handshake("pub", Some(TOKEN)).await;

    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|i| tokio::spawn(attack(broker.addr, i)))
        .collect();
    // Publish all the while the flood goes on, and after it.
    let mut published = 0u32;
    let mut received = 0u32;
    let mut pending = attackers;
    while !pending.is_empty() || published < 100 {
        publisher
            .send(Frame::Publish(Publish::new(
                "live.tick",
                published.to_be_bytes().to_vec(),
            )))
            .await;
        published += 1;
        let m = sub.message().await;
        assert_eq!(&m.payload[..], &(received).to_be_bytes());
        received += 1;
        pending.retain(|h| !h.is_finished());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(published, received);
    let peak = peak_rss();
    println!(
        "peak RSS with {ATTACKERS} pre-auth attackers: {} MiB, {published} messages meanwhile",
        peak >> 20
    );
    assert!(peak < 256 << 20, "peak RSS {} MiB", peak >> 20);

    // The broker counted them as oversized frames, and lets go of each once its
    // task has finished closing (shortly after the attacker saw the close; the
    // count is only observable by asking, so ask until it settles).
    let stats = within("the attackers' connections to be released", async {
        loop {
            let stats = sub.stats().await;
            if stats.get("connections.current") == Some(2) {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(stats.get("errors.frame_too_large").unwrap_or(0) >= ATTACKERS as u64 / 2);
    broker.handle.shutdown().await;
}
