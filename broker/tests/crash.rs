//! Crash test: the real `tidings-broker` binary is killed with SIGKILL at random
//! moments while several connections publish with confirms (some delayed) and a
//! worker takes deliveries and acks, nacks (with and without delay) or holds them,
//! so that dead-lettering (after `max_deliveries`), redrive and delayed messages are
//! in play at each kill; it is restarted on the same data dir, again and again. At
//! the end everything is redriven and drained: every confirmed message that was not
//! acked must come back at least once, and nothing that was never published may.
//! The seed is printed; `TIDINGS_CRASH_SEED=N` replays its choices.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tidings_protocol::{
    Ack, Consume, DeadLetters, Frame, FrameCodec, Hello, Nack, PROTOCOL_VERSION, Publish,
    QueueDeclare, QueueInfoRequest, QueueOptions, Redrive,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::codec::{Decoder, Encoder};

/// Kill/restart cycles.
const CYCLES: u64 = 20;
/// Publishing connections per cycle.
const PUBLISHERS: u64 = 3;
/// Publishes each connection keeps in flight.
const WINDOW: usize = 16;
/// Upper bound for any single wait, so a broken test fails instead of hanging.
const WAIT: Duration = Duration::from_secs(20);
/// Silence after which the final drain gives up on messages that have not come back
/// (longer than the queue's ack timeout, so redeliveries arrive within it).
const DRAIN_GAP: Duration = Duration::from_secs(5);

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Starts the binary on port 0 and reads the address it bound from its log.
/// Starts the broker on `data`. The task returned reads its log to the end (until the
/// broker dies) and says whether it replayed its queue log, as it does after every
/// kill that came before a checkpoint.
async fn spawn_broker(data: &Path) -> (Child, SocketAddr, JoinHandle<bool>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidings-broker"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("RUST_LOG", "info")
        .env_remove("TIDINGS_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the broker binary starts");
    let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
    let (addr, replayed) = within("the listening line", async {
        let mut log = String::new();
        loop {
            let mut line = String::new();
            let n = stderr.read_line(&mut line).await.expect("read log");
            assert!(n > 0, "broker exited before listening:\n{log}");
            log.push_str(&line);
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split_whitespace().next().expect("an address");
                let addr = addr.parse::<SocketAddr>().expect("a socket address");
                return (addr, log.contains(REPLAYED));
            }
        }
    })
    .await;
    // Keep draining the log so the broker never blocks on a full pipe.
    let log = tokio::spawn(async move {
        let mut rest = Vec::new();
        let _ = stderr.read_to_end(&mut rest).await;
        replayed || String::from_utf8_lossy(&rest).contains(REPLAYED)
    });
    (child, addr, log)
}

const REPLAYED: &str = "replayed the queue log";

/// A raw protocol connection that tolerates the server vanishing mid-frame.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    codec: FrameCodec,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Option<Conn> {
        let stream = TcpStream::connect(addr).await.ok()?;
        stream.set_nodelay(true).ok()?;
        let mut conn = Conn {
            stream,
            buf: BytesMut::new(),
            codec: FrameCodec::default(),
        };
        conn.send(&[Frame::Hello(Hello {
            minor: None,
            version: PROTOCOL_VERSION,
            client_name: "crash-test".into(),
            token: None,
            user: None,
        })])
        .await?;
        match conn.recv().await? {
            Frame::Welcome(_) => Some(conn),
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    async fn send(&mut self, frames: &[Frame]) -> Option<()> {
        let mut out = BytesMut::new();
        for f in frames {
            self.codec.encode(f, &mut out).expect("encodable");
        }
        self.stream.write_all(&out).await.ok()
    }

    /// The next frame; `None` once the broker is gone.
    async fn recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf).expect("valid frames") {
                return Some(frame);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

fn queue_options() -> QueueOptions {
    QueueOptions {
        bindings: vec!["crash.>".into()],
        // Low, so that nacks and crashes dead-letter messages during the test.
        max_deliveries: Some(3),
        ack_timeout_ms: Some(2_000),
        backoff_ms: Some(vec![5]),
        ..QueueOptions::default()
    }
}

async fn declare(addr: SocketAddr) {
    let mut c = within("connect", Conn::open(addr)).await.expect("connect");
    c.send(&[Frame::QueueDeclare(QueueDeclare {
        request_id: 1,
        name: "crash".into(),
        options: queue_options(),
    })])
    .await
    .expect("send declare");
    match within("declare", c.recv()).await {
        Some(Frame::Ok(ok)) => assert_eq!(ok.request_id, 1),
        other => panic!("declare failed: {other:?}"),
    }
}

/// Publishes with confirms until the connection dies, recording what was confirmed.
async fn publish_until_killed(
    addr: SocketAddr,
    cycle: u64,
    publisher: u64,
    confirmed: Arc<Mutex<HashSet<String>>>,
    published: Arc<Mutex<HashSet<String>>>,
    progress: Arc<Semaphore>,
) {
    let Some(mut c) = Conn::open(addr).await else {
        return;
    };
    let mut pending: HashMap<u32, String> = HashMap::new();
    let mut next = 0u32;
    loop {
        let mut frames = Vec::new();
        while pending.len() < WINDOW {
            next += 1;
            let id = format!("c{cycle}-p{publisher}-m{next}");
            published.lock().unwrap().insert(id.clone());
            frames.push(Frame::Publish(Publish {
                request_id: Some(next),
                confirm: true,
                // Every seventh is delayed: it is stored at once, delivered later.
                delay_ms: (next % 7 == 0).then_some(30),
                payload: Bytes::from(id.clone().into_bytes()),
                ..Publish::new(format!("crash.p{publisher}").as_str(), Bytes::new())
            }));
            pending.insert(next, id);
        }
        if c.send(&frames).await.is_none() {
            return;
        }
        match c.recv().await {
            Some(Frame::Confirm(confirm)) => {
                let id = pending
                    .remove(&confirm.request_id)
                    .expect("a confirm matches a publish in flight");
                assert_eq!(confirm.queues, 1, "{id} reached the queue");
                confirmed.lock().unwrap().insert(id);
                progress.add_permits(1);
            }
            Some(other) => panic!("unexpected frame while publishing: {other:?}"),
            None => return,
        }
    }
}

/// What the workers did, over all cycles.
#[derive(Default)]
struct Work {
    delivered: u64,
    acked: HashSet<String>,
    nacked: u64,
    from_dlq: u64,
}

/// Takes deliveries from the queue and its dead-letter queue and, by the seed, acks,
/// nacks (with or without delay) or holds each one, until the broker dies.
async fn work(addr: SocketAddr, seed: u64, done: Arc<Mutex<Work>>) {
    let Some(mut c) = Conn::open(addr).await else {
        return;
    };
    let mut rng = Rng(seed | 1);
    let consume = |request_id, consumer_id, queue: &str, credit| {
        Frame::Consume(Consume {
            limit: None,
            request_id,
            consumer_id,
            queue: queue.into(),
            credit,
        })
    };
    // The dead-letter queue may not exist yet: its ERROR is ignored.
    let frames = [consume(1, 1, "crash", 32), consume(2, 2, "crash.dlq", 8)];
    if c.send(&frames).await.is_none() {
        return;
    }
    let mut request = 10u32;
    while let Some(frame) = c.recv().await {
        let Frame::Delivery(d) = frame else {
            continue;
        };
        let id = String::from_utf8(d.payload.to_vec()).expect("utf-8 id");
        request += 1;
        let answer = {
            let mut w = done.lock().unwrap();
            w.delivered += 1;
            w.from_dlq += u64::from(d.queue.as_str() == "crash.dlq");
            match rng.next() % 100 {
                0..=39 => {
                    w.acked.insert(id);
                    Some(Frame::Ack(Ack {
                        request_id: request,
                        ids: vec![d.delivery_id],
                    }))
                }
                40..=74 => {
                    w.nacked += 1;
                    Some(Frame::Nack(Nack {
                        request_id: request,
                        delay_ms: (rng.next() % 2 == 0).then_some(20),
                        ids: vec![d.delivery_id],
                    }))
                }
                // Held: in flight when the broker dies.
                _ => None,
            }
        };
        if let Some(frame) = answer {
            if c.send(&[frame]).await.is_none() {
                return;
            }
        }
    }
}

/// Redrives every dead letter of `crash` after `after`; the moved count, if the
/// broker answered.
async fn redrive(addr: SocketAddr, after: Duration) -> Option<u64> {
    redrive_queue(addr, "crash", after).await
}

/// Redrives every dead letter of `queue` after `after`; the moved count, if the
/// broker answered.
async fn redrive_queue(addr: SocketAddr, queue: &str, after: Duration) -> Option<u64> {
    tokio::time::sleep(after).await;
    let mut c = Conn::open(addr).await?;
    c.send(&[Frame::Redrive(Redrive {
        request_id: 5,
        queue: queue.into(),
        limit: 0,
    })])
    .await?;
    loop {
        match c.recv().await? {
            Frame::RedriveReply(r) => return Some(r.moved),
            Frame::Error(_) => return None,
            _ => {}
        }
    }
}

/// A tiny xorshift generator: random kill moments without a dependency; the seed is
/// printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_repeated_sigkill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let seed = std::env::var("TIDINGS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() ^ u64::from(d.subsec_nanos()))
                .unwrap_or(1)
        })
        | 1;
    println!("crash test seed {seed} (replay its choices: TIDINGS_CRASH_SEED={seed})");
    let mut rng = Rng(seed);

    let confirmed = Arc::new(Mutex::new(HashSet::new()));
    let published = Arc::new(Mutex::new(HashSet::new()));
    let work_done = Arc::new(Mutex::new(Work::default()));
    let mut redriven = 0u64;

    let mut replays = 0;
    for cycle in 0..CYCLES {
        let (mut child, addr, log) = spawn_broker(&data).await;
        if cycle == 0 {
            declare(addr).await;
        }
        let progress = Arc::new(Semaphore::new(0));
        let mut tasks = Vec::new();
        for publisher in 0..PUBLISHERS {
            tasks.push(tokio::spawn(publish_until_killed(
                addr,
                cycle,
                publisher,
                confirmed.clone(),
                published.clone(),
                progress.clone(),
            )));
        }
        // A worker acks, nacks and holds deliveries; a redrive comes at a random
        // moment, so moves are under way at the kill.
        tasks.push(tokio::spawn(work(addr, rng.next(), work_done.clone())));
        let redrive_task = tokio::spawn(redrive(addr, Duration::from_millis(rng.next() % 60)));
        // Let a confirm arrive (so every cycle tests something), then kill at a
        // random moment 0–40 ms later; every fifth cycle 1.0–1.5 s later, past the
        // broker's first checkpoint (1 s), so that a replay starts mid-log.
        within("the first confirm of the cycle", progress.acquire())
            .await
            .expect("semaphore open")
            .forget();
        let after = if cycle % 5 == 4 { 1000 } else { 0 };
        let window = if cycle % 5 == 4 { 500 } else { 40 };
        tokio::time::sleep(Duration::from_millis(after + rng.next() % window)).await;
        child.start_kill().expect("SIGKILL the broker");
        within("the killed broker to exit", child.wait())
            .await
            .expect("wait for the broker");
        let replayed = within("the end of its log", log).await.expect("log task");
        replays += u64::from(replayed);
        for task in tasks {
            within("clients to notice the crash", task)
                .await
                .expect("client task");
        }
        redriven += within("the redrive", redrive_task)
            .await
            .expect("redrive task")
            .unwrap_or(0);
    }

    // Drain everything with acks and compare.
    let (mut child, addr, _log) = spawn_broker(&data).await;
    assert!(
        replays > 0,
        "no restart replayed the queue log: the test did not crash where it matters"
    );
    // Every dead letter back into the queue, then drain it with acks.
    // Dead-letter queues are not chained by default: `crash.dlq.dlq` is not created,
    // so letters the worker nacked there stay there. A broker that did chain them
    // would have moved some on: back into `crash.dlq` first, so the redrive of
    // `crash` takes them either way.
    let second = within(
        "the redrive of the second dead-letter queue",
        redrive_queue(addr, "crash.dlq", Duration::ZERO),
    )
    .await;
    let moved = within("the final redrive", redrive(addr, Duration::ZERO)).await;
    let mut c = within("connect", Conn::open(addr)).await.expect("connect");
    let depth = queue_depth(&mut c).await;
    let confirmed = confirmed.lock().unwrap().clone();
    let published = published.lock().unwrap().clone();
    let work_done = std::mem::take(&mut *work_done.lock().unwrap());
    assert!(
        work_done.delivered > 0 && !work_done.acked.is_empty() && work_done.nacked > 0,
        "the worker received, acked and nacked deliveries ({} delivered, seed {seed})",
        work_done.delivered
    );
    c.send(&[Frame::Consume(Consume {
        limit: None,
        request_id: 2,
        consumer_id: 7,
        queue: "crash".into(),
        credit: 256,
    })])
    .await
    .expect("consume");
    // Every confirmed message that was not acked must come back. Drain until each has
    // been seen, not just `depth` deliveries: a delivery may come twice (redelivered
    // after its ack timeout under load, or caught mid-move) and count twice. A message
    // that never comes stops the loop after `DRAIN_GAP` of silence.
    let expected: HashSet<String> = confirmed
        .iter()
        .filter(|id| !work_done.acked.contains(*id))
        .cloned()
        .collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut received = 0u64;
    let mut late = 0u64;
    let mut next_request = 10u32;
    while received < depth || !expected.iter().all(|id| seen.contains(id)) {
        let Ok(frame) = tokio::time::timeout(DRAIN_GAP, c.recv()).await else {
            break;
        };
        match frame {
            Some(Frame::Delivery(d)) => {
                received += 1;
                let id = String::from_utf8(d.payload.to_vec()).expect("utf-8 id");
                assert!(
                    published.contains(&id),
                    "{id} came back but was never published (seed {seed})"
                );
                // A message caught mid-move may come back twice (at-least-once).
                if received > depth && expected.contains(&id) && !seen.contains(&id) {
                    late += 1;
                }
                seen.insert(id);
                next_request += 1;
                c.send(&[Frame::Ack(Ack {
                    request_id: next_request,
                    ids: vec![d.delivery_id],
                })])
                .await
                .expect("ack");
            }
            Some(Frame::Ok(_)) => {}
            other => panic!("unexpected frame while draining: {other:?}"),
        }
    }
    println!(
        "{CYCLES} kills ({replays} restarts replayed the log): {} confirmed, {} deliveries \
         ({} from the dead-letter queue, {} acked, {} nacks), {redriven} redriven during \
         the cycles, {second:?} + {moved:?} at the end, depth {depth}, {received} drained \
         ({late} expected ones only after the first `depth`)",
        confirmed.len(),
        work_done.delivered,
        work_done.from_dlq,
        work_done.acked.len(),
        work_done.nacked,
    );
    let missing: Vec<&String> = confirmed
        .iter()
        .filter(|id| !seen.contains(*id) && !work_done.acked.contains(*id))
        .collect();
    if !missing.is_empty() {
        let whereabouts = locate(addr, &missing).await;
        panic!(
            "{} confirmed messages that were never acked are lost, e.g. {:?} \
             ({received} deliveries of depth {depth}; {whereabouts}) (seed {seed})",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        );
    }
    assert!(
        confirmed.len() as u64 >= CYCLES,
        "every cycle confirmed something"
    );
    child.start_kill().expect("stop the broker");
    let _ = child.wait().await;
}

async fn queue_depth(c: &mut Conn) -> u64 {
    c.send(&[Frame::QueueInfoRequest(QueueInfoRequest {
        request_id: 3,
        name: "crash".into(),
    })])
    .await
    .expect("info");
    match within("queue info", c.recv()).await {
        Some(Frame::QueueInfo(reply)) => reply.info.depth,
        other => panic!("expected QUEUE_INFO_REPLY, got {other:?}"),
    }
}

/// Where the `missing` messages are, as far as the broker says: the dead letters of
/// `crash` that hold them and both queues' QUEUE_INFO, for the failure message.
async fn locate(addr: SocketAddr, missing: &[&String]) -> String {
    let Some(mut c) = within("connect", Conn::open(addr)).await else {
        return "the broker did not answer".into();
    };
    let mut dead = Vec::new();
    let mut letters = 0u64;
    let mut from = None;
    for request_id in 100u32..1100 {
        c.send(&[Frame::DeadLetters(DeadLetters {
            request_id,
            queue: "crash".into(),
            limit: 0,
            from,
        })])
        .await
        .expect("dead letters");
        match within("dead letters", c.recv()).await {
            Some(Frame::DeadLettersReply(r)) => {
                letters += r.letters.len() as u64;
                for l in &r.letters {
                    let id = String::from_utf8_lossy(&l.payload).into_owned();
                    if missing.iter().any(|m| **m == id) {
                        dead.push(format!(
                            "{id} dead at {} ({}, {} attempts)",
                            l.id, l.reason, l.attempts
                        ));
                    }
                }
                match r.next {
                    Some(next) if !r.letters.is_empty() => from = Some(next),
                    _ => break,
                }
            }
            other => {
                dead.push(format!("DEAD_LETTERS answered {other:?}"));
                break;
            }
        }
    }
    let mut infos = Vec::new();
    for (request_id, name) in [
        (2000, "crash"),
        (2001, "crash.dlq"),
        (2002, "crash.dlq.dlq"),
    ] {
        c.send(&[Frame::QueueInfoRequest(QueueInfoRequest {
            request_id,
            name: name.into(),
        })])
        .await
        .expect("info");
        infos.push(format!(
            "{name}: {:?}",
            within("queue info", c.recv()).await
        ));
    }
    format!(
        "{letters} dead letters, the missing among them: {dead:?}; {}",
        infos.join("; ")
    )
}
