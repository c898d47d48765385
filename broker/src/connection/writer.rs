//! `Outbox`, the outbound handle of one connection, and the writer task that drains
//! it: a queue bounded in bytes, coalesced into one buffer per write syscall.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use thiserror::Error;
use tidings_protocol::{ErrorCode, ErrorReply, Frame};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::stats::Stats;

/// Identifies a connection for the lifetime of the broker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The connection is closed or closing; the frame was not queued.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("connection closed")]
pub struct Closed;

/// Stop encoding more frames into one write buffer past this size, so a burst is
/// written in pieces rather than staged whole.
const WRITE_SOFT_LIMIT: usize = 256 * 1024;
/// Frames taken off the queue per wake-up.
const BATCH: usize = 256;
/// After a slow consumer is cut off, how long the writer keeps trying to finish the
/// frame in progress and the ERROR frame before it closes regardless.
const SLOW_CONSUMER_GRACE: Duration = Duration::from_millis(250);

// Frames are moved, not boxed: a box would cost an allocation per frame sent, and
// the data-less `Close` is sent once per connection.
#[allow(clippy::large_enum_variant)]
enum Item {
    Frame(Frame, usize),
    /// Write everything queued before this, then close the socket.
    Close,
}

struct Shared {
    conn: ConnId,
    max_pending: usize,
    pending: AtomicUsize,
    closed: AtomicBool,
    /// Set when the connection must stop at once (slow consumer, write error, or a
    /// graceful close that ran out of time). The reader watches it too.
    abort: CancellationToken,
    slow: AtomicBool,
    stats: Arc<Stats>,
}

/// The outbound side of one connection: a cheap, cloneable handle through which any
/// part of the broker (the router, the durable-queue engine, the connection's own
/// replies) queues frames for that client.
///
/// The queue is bounded in bytes (`--max-pending-bytes`): frames count from the
/// moment they are queued until the write that carries them completes. A send that
/// would exceed the bound applies the slow-consumer policy: the connection is sent
/// ERROR `SlowConsumer` (best effort), closed, and counted in the stats; the send
/// and every later one return [`Closed`]. Sends never wait, so a publisher never
/// stalls on a slow subscriber.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Item>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("conn", &self.shared.conn)
            .field("pending", &self.pending_bytes())
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// The receiving end of an [`Outbox`], consumed by [`OutboxReceiver::write_to`]
/// (the connection's writer task; tests and benches may drive it over any
/// `AsyncWrite`).
pub struct OutboxReceiver {
    rx: mpsc::UnboundedReceiver<Item>,
    shared: Arc<Shared>,
}

impl Outbox {
    /// A new outbox for connection `conn` holding at most `max_pending` bytes, and
    /// the receiver the connection's writer drains.
    pub fn channel(
        conn: ConnId,
        max_pending: usize,
        stats: Arc<Stats>,
    ) -> (Outbox, OutboxReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            conn,
            max_pending,
            pending: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            abort: CancellationToken::new(),
            slow: AtomicBool::new(false),
            stats,
        });
        (
            Outbox {
                tx,
                shared: shared.clone(),
            },
            OutboxReceiver { rx, shared },
        )
    }

    /// The connection this outbox writes to.
    pub fn conn_id(&self) -> ConnId {
        self.shared.conn
    }

    /// Queues a frame. Never waits. Fails when the connection is closed or closing,
    /// and applies the slow-consumer policy when the byte bound would be exceeded.
    pub fn send(&self, frame: Frame) -> Result<(), Closed> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(Closed);
        }
        let cost = frame_cost(&frame);
        let before = self.shared.pending.fetch_add(cost, Ordering::AcqRel);
        let total = before + cost;
        if total > self.shared.max_pending {
            self.shared.pending.fetch_sub(cost, Ordering::AcqRel);
            self.slow_consumer();
            return Err(Closed);
        }
        self.shared.stats.pending(total);
        if self.tx.send(Item::Frame(frame, cost)).is_err() {
            self.shared.pending.fetch_sub(cost, Ordering::AcqRel);
            return Err(Closed);
        }
        Ok(())
    }

    /// Bytes queued and not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.shared.pending.load(Ordering::Acquire)
    }

    /// True once the connection is closing: sends fail from then on.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Resolves when the connection must stop at once (slow consumer, write failure
    /// or a timed-out close).
    pub async fn aborted(&self) {
        self.shared.abort.cancelled().await;
    }

    /// Closes gracefully: `last` (usually an ERROR frame) is queued past the byte
    /// bound, everything queued before is written, then the socket is shut down.
    /// Later sends fail.
    pub(crate) fn close(&self, last: Option<Frame>) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(frame) = last {
            let cost = frame_cost(&frame);
            self.shared.pending.fetch_add(cost, Ordering::AcqRel);
            if self.tx.send(Item::Frame(frame, cost)).is_err() {
                self.shared.pending.fetch_sub(cost, Ordering::AcqRel);
            }
        }
        let _ = self.tx.send(Item::Close);
    }

    /// Stops the connection at once, without flushing.
    pub(crate) fn abort(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.abort.cancel();
    }

    fn slow_consumer(&self) {
        if self.shared.slow.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shared.closed.store(true, Ordering::Release);
        self.shared.stats.slow_consumer();
        self.shared.stats.error(ErrorCode::SlowConsumer);
        warn!(
            conn = %self.shared.conn,
            max_pending_bytes = self.shared.max_pending,
            "slow consumer: outbound queue full, disconnecting"
        );
        self.shared.abort.cancel();
    }
}

/// How many bytes a frame is charged against the pending bound: its payload and
/// strings plus a fixed allowance for lengths and fields. Close to the encoded size
/// for MESSAGE and DELIVERY, which is where the bytes are.
pub(crate) fn frame_cost(frame: &Frame) -> usize {
    // What a queued frame occupies besides its variable parts: the frame itself
    // (its size in the queue) and room for its wire lengths, so that a flood of tiny
    // messages is bounded in memory too, not only in wire bytes.
    const FIXED: usize = std::mem::size_of::<Frame>() + 32;
    let headers =
        |h: &tidings_protocol::Headers| h.iter().map(|(k, v)| 4 + k.len() + v.len()).sum::<usize>();
    FIXED
        + match frame {
            Frame::Message(m) => {
                m.topic.len()
                    + m.reply_to.as_ref().map_or(0, |r| r.len())
                    + headers(&m.headers)
                    + m.payload.len()
            }
            Frame::Delivery(d) => {
                d.queue.len() + d.topic.len() + headers(&d.headers) + d.payload.len()
            }
            Frame::Error(e) => e.message.len(),
            Frame::StatsReply(s) => s.entries.iter().map(|(n, _)| n.len() + 10).sum(),
            Frame::DeadLettersReply(d) => d
                .letters
                .iter()
                .map(|l| 64 + l.topic.len() + headers(&l.headers) + l.payload.len())
                .sum(),
            Frame::QueueListReply(q) => q.queues.len() * 256,
            _ => 64,
        }
}

/// How a writer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterEnd {
    /// Everything queued up to the close was written and the socket shut down.
    Flushed,
    /// Stopped early: slow consumer, abort, or a write error.
    Aborted,
}

impl OutboxReceiver {
    /// Drains the queue into `out` until the outbox is closed or aborted: each
    /// wake-up takes everything queued (up to a soft limit), encodes it into one
    /// buffer and writes it with as few syscalls as the socket allows.
    pub async fn write_to<W: AsyncWrite + Unpin>(mut self, mut out: W) -> WriterEnd {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let mut batch = Vec::with_capacity(BATCH);
        let end = loop {
            let n = tokio::select! {
                biased;
                _ = self.shared.abort.cancelled() => break WriterEnd::Aborted,
                n = self.rx.recv_many(&mut batch, BATCH) => n,
            };
            if n == 0 {
                // Every Outbox is gone, so nothing more can be queued.
                break WriterEnd::Flushed;
            }
            let mut charged = 0;
            let mut closing = false;
            loop {
                for item in batch.drain(..) {
                    match item {
                        Item::Frame(frame, cost) => {
                            charged += cost;
                            if let Err(err) = frame.encode(&mut buf) {
                                // Frames are built from decoded input within limits, so
                                // this is a broker bug: report it, keep the stream sane.
                                tracing::error!(error = %err, frame = frame.name(), "cannot encode outbound frame");
                            }
                        }
                        Item::Close => closing = true,
                    }
                }
                if closing || buf.len() >= WRITE_SOFT_LIMIT {
                    break;
                }
                // Take whatever else is already queued, without waiting.
                while batch.len() < BATCH {
                    match self.rx.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                if batch.is_empty() {
                    break;
                }
            }
            let ok = self.write_buf(&mut out, &mut buf).await;
            self.release(charged);
            if !ok {
                break WriterEnd::Aborted;
            }
            if closing {
                let _ = out.shutdown().await;
                break WriterEnd::Flushed;
            }
        };
        if end == WriterEnd::Aborted && self.shared.slow.load(Ordering::Acquire) {
            self.finish_slow_consumer(&mut out, &mut buf).await;
        }
        self.shared.closed.store(true, Ordering::Release);
        // Whatever is still queued will never be written; free it and its charge.
        self.rx.close();
        let mut rest = 0;
        while let Ok(item) = self.rx.try_recv() {
            if let Item::Frame(_, cost) = item {
                rest += cost;
            }
        }
        self.release(rest);
        // Wake the reader, whatever the reason the writer stopped.
        self.shared.abort.cancel();
        end
    }

    /// Writes `buf` whole, unless the connection is aborted first; on abort the
    /// unwritten rest stays in `buf`.
    async fn write_buf<W: AsyncWrite + Unpin>(&self, out: &mut W, buf: &mut BytesMut) -> bool {
        use bytes::Buf;
        while !buf.is_empty() {
            let written = tokio::select! {
                biased;
                _ = self.shared.abort.cancelled() => return false,
                // `write` either writes some bytes or none, so cancelling it is safe.
                r = out.write(buf) => r,
            };
            match written {
                Ok(0) => return false,
                Ok(n) => {
                    buf.advance(n);
                    self.shared.stats.bytes_out(n);
                }
                Err(err) => {
                    debug!(conn = %self.shared.conn, error = %err, "write failed");
                    return false;
                }
            }
        }
        buf.clear();
        true
    }

    /// Best effort after a slow-consumer abort: finish the frame in progress (so the
    /// stream stays well-framed), then the ERROR frame, within a short grace.
    async fn finish_slow_consumer<W: AsyncWrite + Unpin>(&self, out: &mut W, buf: &mut BytesMut) {
        let error = Frame::Error(ErrorReply::new(
            0,
            ErrorCode::SlowConsumer,
            format!(
                "outbound queue exceeded {} bytes; the connection was not reading fast enough",
                self.shared.max_pending
            ),
        ));
        let _ = error.encode(buf);
        let _ = tokio::time::timeout(SLOW_CONSUMER_GRACE, async {
            if out.write_all(buf).await.is_ok() {
                let _ = out.shutdown().await;
            }
        })
        .await;
        buf.clear();
    }

    fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.shared.pending.fetch_sub(bytes, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
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
}
