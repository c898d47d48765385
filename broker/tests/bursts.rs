//! Bursts without loss: publishers feeding a subscriber over its outbound
//! high-water mark are held back for a bounded time (`--slow-consumer-stall`), so a
//! subscriber that pauses briefly loses nothing, while one that stays behind is still
//! cut off as a slow consumer and nobody else is harmed.

mod common;

use std::time::Duration;

use common::{Client, TestBroker, start_with, within};
use tidings_protocol::{Frame, Ping, Pong};
use tokio::net::TcpSocket;

const MAX_PENDING: usize = 256 * 1024;
const PAYLOAD: usize = 4096;
/// 16 MiB in all: far more than the kernel's socket buffers hide from the broker.
const MESSAGES: u64 = 4096;

async fn broker(stall: Duration) -> TestBroker {
    start_with(|c| {
        c.max_pending_bytes = MAX_PENDING;
        c.slow_consumer_stall = stall;
    })
    .await
}

/// A subscriber on `topic` with a tiny receive buffer, so that what it does not
/// read piles up in the broker rather than in the kernel.
async fn small_window_subscriber(broker: &TestBroker, name: &str, topic: &str) -> Client {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = within("connect", socket.connect(broker.addr))
        .await
        .unwrap();
    let mut client = Client::from_stream(stream);
    client.handshake(name, None).await;
    client.subscribe(1, topic, None).await;
    client.subscribe(2, &format!("{topic}.end"), None).await;
    client
}

/// Publishes MESSAGES numbered payloads to `topic`, then one to `topic.end`.
fn spawn_publisher(mut publisher: Client, topic: &'static str) -> tokio::task::JoinHandle<Client> {
    tokio::spawn(async move {
        for seq in 0..MESSAGES {
            let mut payload = vec![0u8; PAYLOAD];
            payload[..8].copy_from_slice(&seq.to_be_bytes());
            publisher.publish(topic, payload).await;
        }
        publisher
            .publish(&format!("{topic}.end"), &b"end"[..])
            .await;
        publisher
    })
}

/// Reads until the end marker; every message must come once, in order.
async fn read_all(client: &mut Client) -> u64 {
    let mut received = 0u64;
    loop {
        let m = client.message().await;
        if m.sid == 2 {
            return received;
        }
        let seq = u64::from_be_bytes(m.payload[..8].try_into().unwrap());
        assert_eq!(seq, received, "messages in order, none lost");
        received += 1;
    }
}

async fn slow_consumers(broker: &TestBroker) -> Option<u64> {
    let mut observer = Client::hello(broker.addr, "observer").await;
    observer.stats().await.get("connections.slow_consumers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_pauses_briefly_loses_nothing() {
    let broker = broker(Duration::from_secs(5)).await;
    let mut sub = small_window_subscriber(&broker, "pausing", "burst").await;
    let publisher = Client::hello(broker.addr, "pub").await;
    let publishing = spawn_publisher(publisher, "burst");
    // The pause: 16 MiB arrive meanwhile, 64 times the outbound bound.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        within("the whole burst", read_all(&mut sub)).await,
        MESSAGES
    );
    within("the publisher", publishing).await.unwrap();
    assert_eq!(slow_consumers(&broker).await, Some(0));
}

/// The control for the test above: without the stall, the same pause overflows
/// the outbound bound and the subscriber is cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_stall_the_same_pause_is_a_slow_consumer() {
    let broker = broker(Duration::ZERO).await;
    let _sub = small_window_subscriber(&broker, "pausing", "burst").await;
    let publisher = Client::hello(broker.addr, "pub").await;
    within("the publisher", spawn_publisher(publisher, "burst"))
        .await
        .unwrap();
    assert_eq!(slow_consumers(&broker).await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_is_cut_off_and_nobody_else_is_harmed() {
    let broker = broker(Duration::from_millis(300)).await;
    let _stuck = small_window_subscriber(&broker, "stuck", "load").await;
    let mut fast = Client::hello(broker.addr, "fast").await;
    fast.subscribe(1, "load", None).await;
    fast.subscribe(2, "load.end", None).await;
    let fast_reader = tokio::spawn(async move { read_all(&mut fast).await });
    let publisher = Client::hello(broker.addr, "pub").await;
    let publishing = spawn_publisher(publisher, "load");

    // A connection with nothing to do with the load is answered meanwhile.
    let mut bystander = Client::hello(broker.addr, "bystander").await;
    for _ in 0..3 {
        bystander.send(Frame::Ping(Ping)).await;
        assert_eq!(bystander.recv().await, Some(Frame::Pong(Pong)));
    }

    // The publisher is held back at most once for the stuck subscriber, then goes
    // on: everything is published and the fast subscriber gets all of it.
    let mut publisher = within("the publisher", publishing).await.unwrap();
    assert_eq!(
        within("the fast subscriber", fast_reader).await.unwrap(),
        MESSAGES
    );
    let stats = publisher.stats().await;
    assert_eq!(
        stats.get("connections.slow_consumers"),
        Some(1),
        "the stuck one is cut off"
    );
    assert_eq!(stats.get("errors.slow_consumer"), Some(1));
    let peak = stats.get("outbound.pending_bytes_peak").unwrap();
    assert!(
        peak <= MAX_PENDING as u64,
        "a connection held {peak} bytes, over the bound of {MAX_PENDING}"
    );
}
