//! The outbox and its writer over an in-memory duplex socket.

use super::*;
use tidings_protocol::{FrameCodec, Message, Ping};
use tokio::io::AsyncReadExt;
use tokio_util::codec::Decoder;

fn message(n: usize) -> Frame {
    Frame::Message(Message {
        sid: 1,
        topic: "t".into(),
        payload: vec![7u8; n].into(),
        ..Message::default()
    })
}

#[tokio::test]
async fn queued_frames_are_written_in_order_then_closed() {
    let stats = Arc::new(Stats::default());
    let (outbox, rx) = Outbox::channel(ConnId(1), 1 << 20, stats);
    let (client, server) = tokio::io::duplex(1 << 20);
    for i in 0..100 {
        outbox.send(message(i)).unwrap();
    }
    outbox.close(Some(Frame::Ping(Ping)));
    assert_eq!(outbox.send(message(1)), Err(Closed));
    assert_eq!(rx.write_to(server).await, WriterEnd::Flushed);
    assert_eq!(outbox.pending_bytes(), 0);
    let mut client = client;
    let mut raw = Vec::new();
    client.read_to_end(&mut raw).await.unwrap();
    let mut buf = BytesMut::from(&raw[..]);
    let mut codec = FrameCodec::default();
    for i in 0..100 {
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(message(i)));
    }
    assert_eq!(codec.decode(&mut buf).unwrap(), Some(Frame::Ping(Ping)));
    assert!(buf.is_empty());
}

#[tokio::test(start_paused = true)]
async fn held_frames_wait_for_their_release_and_leave_together() {
    let stats = Arc::new(Stats::default());
    let (outbox, rx) = Outbox::channel(ConnId(1), 1 << 20, stats);
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let writer = tokio::spawn(rx.write_to(server));
    // Let the writer find the queue empty and wait (a writer that wakes for
    // any reason takes whatever is queued, held or not).
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        outbox.send_held(message(0)),
        Ok(true),
        "the first owes a release"
    );
    assert_eq!(outbox.send_held(message(1)), Ok(false));
    // The writer was not woken: nothing arrives, however long the client waits
    // (paused time runs ahead once every task is idle).
    let mut raw = vec![0u8; 1 << 16];
    let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut raw)).await;
    assert!(
        read.is_err(),
        "held frames were written before their release"
    );
    outbox.release();
    let mut frames = FrameReader::default();
    let got = frames.read(&mut client, 2).await;
    assert_eq!(got, [message(0), message(1)]);
    // Released: the next held frame owes a release again, and a plain send
    // behind it wakes the writer for both, with no release.
    assert_eq!(outbox.send_held(message(2)), Ok(true));
    outbox.send(message(3)).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), frames.read(&mut client, 2))
        .await
        .expect("a plain send behind a held frame woke the writer");
    assert_eq!(got, [message(2), message(3)]);
    // The plain send paid the debt: a release now has nothing to wake for,
    // and the next held frame owes one again.
    outbox.release();
    assert_eq!(outbox.send_held(message(4)), Ok(true));
    outbox.close(None);
    assert_eq!(writer.await.unwrap(), WriterEnd::Flushed);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    let mut rest = BytesMut::from(&rest[..]);
    let mut codec = FrameCodec::default();
    assert_eq!(codec.decode(&mut rest).unwrap(), Some(message(4)));
    assert!(rest.is_empty());
}

/// Decodes frames from the client end of a duplex as they arrive.
#[derive(Default)]
struct FrameReader {
    buf: BytesMut,
    codec: FrameCodec,
}

impl FrameReader {
    /// Reads until `n` whole frames have arrived.
    async fn read(&mut self, client: &mut tokio::io::DuplexStream, n: usize) -> Vec<Frame> {
        let mut raw = vec![0u8; 1 << 16];
        let mut got = Vec::new();
        while got.len() < n {
            let read = client.read(&mut raw).await.unwrap();
            self.buf.extend_from_slice(&raw[..read]);
            while let Some(frame) = self.codec.decode(&mut self.buf).unwrap() {
                got.push(frame);
            }
        }
        got
    }
}

#[tokio::test]
async fn a_message_encoded_once_is_sent_with_each_sid() {
    let stats = Arc::new(Stats::default());
    let (outbox, rx) = Outbox::channel(ConnId(3), 1 << 20, stats);
    let mut encoded = BytesMut::new();
    message(5).encode(&mut encoded).unwrap();
    for sid in [9, 0x0102_0304] {
        outbox.send_message(&encoded, sid).unwrap();
    }
    outbox.close(None);
    let (client, server) = tokio::io::duplex(1 << 20);
    assert_eq!(rx.write_to(server).await, WriterEnd::Flushed);
    let mut client = client;
    let mut raw = Vec::new();
    client.read_to_end(&mut raw).await.unwrap();
    let mut buf = BytesMut::from(&raw[..]);
    let mut codec = FrameCodec::default();
    for sid in [9, 0x0102_0304] {
        let Some(Frame::Message(m)) = codec.decode(&mut buf).unwrap() else {
            panic!("expected a MESSAGE");
        };
        assert_eq!(m.sid, sid);
        assert_eq!(m.payload.len(), 5);
    }
    assert!(buf.is_empty());
}

#[tokio::test]
async fn overflow_is_a_slow_consumer() {
    let stats = Arc::new(Stats::default());
    let (outbox, rx) = Outbox::channel(ConnId(2), 4096, stats.clone());
    // A peer that never reads: a tiny pipe fills at once.
    let (mut client, server) = tokio::io::duplex(64);
    let writer = tokio::spawn(rx.write_to(server));
    let mut result = Ok(());
    for _ in 0..1000 {
        result = outbox.send(message(100));
        if result.is_err() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(result, Err(Closed));
    assert!(outbox.is_closed());
    assert_eq!(writer.await.unwrap(), WriterEnd::Aborted);
    assert_eq!(stats.errors(ErrorCode::SlowConsumer), 1);
    assert_eq!(outbox.pending_bytes(), 0);
    // What did reach the peer is whole frames.
    let mut got = BytesMut::new();
    client.read_buf(&mut got).await.unwrap();
    let mut codec = FrameCodec::default();
    while let Ok(Some(_)) = codec.decode(&mut got) {}
}

#[tokio::test]
async fn a_stall_ends_when_the_reader_catches_up_or_cuts_off_at_the_bound() {
    let limits = OutboxLimits {
        max_pending: 1 << 20,
        high_water: 4096,
        stall: Duration::from_millis(200),
    };
    // Catches up: the peer reads everything, the pressure goes, the stall ends
    // (a generous bound, so that a busy machine cannot make it a cut-off).
    let patient = OutboxLimits {
        stall: Duration::from_secs(30),
        ..limits
    };
    let (outbox, rx) = Outbox::with_limits(ConnId(4), patient, Arc::new(Stats::default()));
    let (mut client, server) = tokio::io::duplex(1024);
    let writer = tokio::spawn(rx.write_to(server));
    for _ in 0..20 {
        outbox.send(message(1000)).unwrap();
    }
    assert!(outbox.is_pressured());
    let reader = tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink).await;
        sink.len()
    });
    outbox.stall().await;
    assert!(!outbox.is_closed(), "caught up within the bound");
    assert!(!outbox.is_pressured());
    outbox.close(None);
    assert_eq!(writer.await.unwrap(), WriterEnd::Flushed);
    assert!(reader.await.unwrap() > 20_000);

    // Never reads: the stall ends at the bound with a slow-consumer cut-off.
    let stats = Arc::new(Stats::default());
    let (outbox, rx) = Outbox::with_limits(ConnId(5), limits, stats.clone());
    let (_client, server) = tokio::io::duplex(1024);
    let writer = tokio::spawn(rx.write_to(server));
    for _ in 0..20 {
        outbox.send(message(1000)).unwrap();
    }
    outbox.stall().await;
    assert!(outbox.is_closed(), "cut off at the bound");
    assert_eq!(stats.errors(ErrorCode::SlowConsumer), 1);
    assert_eq!(writer.await.unwrap(), WriterEnd::Aborted);

    // Without a stall bound nothing is ever pressured.
    let (outbox, _rx) = Outbox::with_limits(
        ConnId(6),
        OutboxLimits::unstalled(1 << 20),
        Arc::new(Stats::default()),
    );
    for _ in 0..20 {
        outbox.send(message(1000)).unwrap();
    }
    assert!(!outbox.is_pressured());
}

/// A burst grows the write buffers well past `KEEP_CAPACITY`; once the connection
/// goes idle both are given back, so an idle connection does not pin its peak.
#[tokio::test(start_paused = true)]
async fn a_burst_s_buffers_are_given_back_when_the_connection_goes_idle() {
    const BURST: usize = 8 * 1024 * 1024;
    let stats = Arc::new(Stats::default());
    let (outbox, rx) = Outbox::channel(ConnId(1), 64 << 20, stats);
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let writer = tokio::spawn(rx.write_to(server));
    let frame_len = {
        let mut b = BytesMut::new();
        message(60_000).encode(&mut b).unwrap();
        b.len()
    };
    let frames = BURST / frame_len + 1;
    for _ in 0..frames {
        outbox.send(message(60_000)).unwrap();
    }
    assert!(
        outbox.queued_capacity() >= BURST,
        "the burst grew the buffer"
    );
    // Read it all; then both buffers have been through the writer, and it waits
    // idle (paused time moves on only once every task waits).
    let mut drained = 0;
    let mut chunk = vec![0u8; 1 << 20];
    while drained < frames * frame_len {
        drained += client.read(&mut chunk).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(
        outbox.queued_capacity() <= writer::KEEP_CAPACITY,
        "idle: the senders' buffer is small again ({} bytes)",
        outbox.queued_capacity()
    );
    // The writer's own buffer comes back to the senders with the next write.
    outbox.send(message(10)).unwrap();
    let mut small = vec![0u8; 1024];
    let _ = client.read(&mut small).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(
        outbox.queued_capacity() <= writer::KEEP_CAPACITY,
        "the writer's buffer was given back too ({} bytes)",
        outbox.queued_capacity()
    );
    outbox.close(None);
    assert_eq!(writer.await.unwrap(), WriterEnd::Flushed);
}
