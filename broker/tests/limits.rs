//! Limits that protect the broker: slow consumers, the handshake timeout,
//! heartbeats, the connection limit, and many connections at once.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Client, start, start_with, within};
use tidings_protocol::{ErrorCode, Frame, FrameCodec, Ping, Pong};
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio_util::codec::Decoder;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_cut_off_while_fast_one_gets_everything() {
    const MAX_PENDING: usize = 1024 * 1024;
    const PAYLOAD: usize = 4096;
    const BATCH: u64 = 64;
    // Kernel buffers hide the first few megabytes from the broker; this is far more.
    const LIMIT: u64 = 16 * 1024;
    let broker = start_with(|c| c.max_pending_bytes = MAX_PENDING).await;

    // The slow subscriber reads nothing; a small receive buffer makes it fill sooner.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = within("connect", socket.connect(broker.addr))
        .await
        .unwrap();
    let mut slow = Client::from_stream(stream);
    slow.handshake("slow", None).await;
    slow.subscribe(1, "load", None).await;

    let mut fast = Client::hello(broker.addr, "fast").await;
    fast.subscribe(1, "load", None).await;
    fast.subscribe(2, "load.end", None).await;
    // The fast reader reports progress so the publisher never runs more than two
    // batches ahead of it: its outbox stays far below the bound, the slow one's
    // does not.
    let (progress_tx, mut progress_rx) = watch::channel(0u64);
    let fast_reader = tokio::spawn(async move {
        let mut received = 0u64;
        loop {
            let m = fast.message().await;
            if m.sid == 2 {
                return received;
            }
            assert_eq!(
                u64::from_be_bytes(m.payload[..8].try_into().unwrap()),
                received
            );
            received += 1;
            if received % BATCH == 0 {
                progress_tx.send_replace(received);
            }
        }
    });

    let mut publisher = Client::hello(broker.addr, "pub").await;
    let mut published = 0u64;
    let mut cut_off = false;
    while published < LIMIT {
        for _ in 0..BATCH {
            let mut payload = vec![0u8; PAYLOAD];
            payload[..8].copy_from_slice(&published.to_be_bytes());
            publisher.publish("load", payload).await;
            published += 1;
        }
        let stats = publisher.stats().await;
        if stats.get("connections.slow_consumers") == Some(1) {
            cut_off = true;
            break;
        }
        let behind = published.saturating_sub(2 * BATCH);
        within(
            "the fast subscriber",
            progress_rx.wait_for(|n| *n >= behind),
        )
        .await
        .unwrap();
    }
    assert!(cut_off, "the slow consumer was never disconnected");
    publisher.publish("load.end", &b"end"[..]).await;
    let received = within("the fast subscriber", fast_reader).await.unwrap();
    assert_eq!(received, published, "the fast subscriber got every message");

    // The slow connection is closed: reading finds the end of the stream. What it
    // got before is whole frames, and an ERROR among them can only be SlowConsumer.
    let mut raw = Vec::new();
    let _ = within(
        "the slow connection to close",
        slow.stream.read_to_end(&mut raw),
    )
    .await;
    let mut buf = bytes::BytesMut::from(&raw[..]);
    let mut codec = FrameCodec::default();
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        if let Frame::Error(e) = frame {
            assert_eq!(e.error_code(), Some(ErrorCode::SlowConsumer));
        }
    }

    let stats = publisher.stats().await;
    assert_eq!(stats.get("connections.slow_consumers"), Some(1));
    assert_eq!(stats.get("errors.slow_consumer"), Some(1));
    let peak = stats.get("outbound.pending_bytes_peak").unwrap();
    assert!(
        peak <= MAX_PENDING as u64,
        "a connection held {peak} bytes, over the bound of {MAX_PENDING}"
    );
    assert!(peak > 0);
}

#[tokio::test]
async fn idle_socket_is_closed_after_handshake_timeout() {
    let broker = start_with(|c| c.handshake_timeout = Duration::from_millis(200)).await;
    let mut c = Client::connect(broker.addr).await;
    c.expect_error(ErrorCode::HandshakeTimeout).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn silent_peer_is_closed_after_missed_heartbeats() {
    let broker = start_with(|c| {
        c.heartbeat = Duration::from_millis(50);
        c.missed_heartbeats = 2;
    })
    .await;
    // Answering pings keeps a connection alive well past the silent one's end.
    let mut polite = Client::hello(broker.addr, "polite").await;
    let polite = tokio::spawn(async move {
        for _ in 0..8 {
            assert_eq!(polite.recv().await, Some(Frame::Ping(Ping)));
            polite.send(Frame::Pong(Pong)).await;
        }
        polite.stats().await;
    });
    let mut silent = Client::hello(broker.addr, "silent").await;
    assert_eq!(silent.recv().await, Some(Frame::Ping(Ping)));
    assert_eq!(silent.recv().await, Some(Frame::Ping(Ping)));
    silent.expect_error(ErrorCode::HeartbeatTimeout).await;
    silent.expect_closed().await;
    within("the polite client", polite).await.unwrap();
}

#[tokio::test]
async fn one_past_the_connection_limit_is_refused() {
    let broker = start_with(|c| c.max_connections = 3).await;
    let mut open = Vec::new();
    for i in 0..3 {
        open.push(Client::hello(broker.addr, &format!("c{i}")).await);
    }
    let mut extra = Client::connect(broker.addr).await;
    let err = extra.expect_error(ErrorCode::TooManyConnections).await;
    assert!(
        err.message.contains('3'),
        "message names the limit: {}",
        err.message
    );
    extra.expect_closed().await;
    // The admitted connections are unaffected.
    for c in &mut open {
        let stats = c.stats().await;
        assert_eq!(stats.get("connections.current"), Some(3));
        assert_eq!(stats.get("connections.rejected"), Some(1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_subscribe_and_receive() {
    const N: usize = 1000;
    let broker = start().await;
    let addr = broker.addr;
    let ready = Arc::new(tokio::sync::Barrier::new(N + 1));
    let mut tasks = Vec::with_capacity(N);
    for i in 0..N {
        let ready = ready.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::hello(addr, &format!("c{i}")).await;
            c.subscribe(1, &format!("conn.{i}"), None).await;
            c.subscribe(2, "conn.all", None).await;
            ready.wait().await;
            let mut got = [false; 2];
            for _ in 0..2 {
                let m = c.message().await;
                match m.sid {
                    1 => assert_eq!(m.payload, format!("to {i}").into_bytes()),
                    2 => assert_eq!(&m.payload[..], b"to all"),
                    other => panic!("unexpected sid {other}"),
                }
                got[m.sid as usize - 1] = true;
            }
            assert_eq!(got, [true, true]);
        }));
    }
    within("all subscriptions", ready.wait()).await;
    let mut publisher = Client::hello(addr, "pub").await;
    assert_eq!(
        publisher.stats().await.get("subscriptions.current"),
        Some(2 * N as u64)
    );
    for i in 0..N {
        publisher
            .publish(&format!("conn.{i}"), format!("to {i}").into_bytes())
            .await;
    }
    publisher.publish("conn.all", &b"to all"[..]).await;
    for t in tasks {
        within("a connection", t).await.unwrap();
    }
}

/// Past `--max-pending-requests` unconfirmed durable publishes the connection stops
/// reading until one is confirmed; none of the held publishes is lost or answered
/// out of order, and a subscriber on the same topic still gets every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_past_max_pending_requests_wait_and_are_all_confirmed_in_order() {
    use tidings_protocol::{Publish, QueueOptions};
    const COUNT: u32 = 200;
    let broker = start_with(|c| c.limits.max_pending_requests = 2).await;
    let mut subscriber = Client::hello(broker.addr, "subscriber").await;
    subscriber.subscribe(1, "orders", None).await;
    let mut c = Client::hello(broker.addr, "publisher").await;
    c.declare(
        "orders",
        QueueOptions {
            bindings: vec!["orders".into()],
            ..QueueOptions::default()
        },
    )
    .await;
    // All of them in one go: the broker reads far more than two before the first
    // round is durable, so most wait for room in the confirm queue.
    let mut ids = Vec::new();
    for i in 0..COUNT {
        let request_id = c.request_id();
        ids.push(request_id);
        let mut p = Publish::new("orders", format!("order {i}"));
        p.request_id = Some(request_id);
        p.confirm = true;
        c.send(Frame::Publish(p)).await;
    }
    for expected in ids {
        match c.recv().await {
            Some(Frame::Confirm(confirm)) => {
                assert_eq!(confirm.request_id, expected, "confirms in publish order");
                assert_eq!(confirm.queues, 1);
            }
            other => panic!("expected CONFIRM {expected}, got {other:?}"),
        }
    }
    for i in 0..COUNT {
        let m = subscriber.message().await;
        assert_eq!(m.payload, format!("order {i}").as_bytes());
    }
}
