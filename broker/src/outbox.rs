//! `Outbox`, the outbound handle of one connection, and the writer task that drains
//! it: frames encoded as they are queued into one buffer bounded in bytes, which
//! the writer takes whole for each write.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use thiserror::Error;
use tidings_protocol::{ErrorCode, ErrorReply, Frame};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
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

/// A drained write buffer larger than this is not kept for reuse, so one burst does
/// not pin its peak in memory for the life of the connection.
const KEEP_CAPACITY: usize = 1024 * 1024;
/// What a fresh write buffer starts with.
const INITIAL_CAPACITY: usize = 16 * 1024;
/// After a slow consumer is cut off, how long the writer keeps trying to finish the
/// frame in progress and the ERROR frame before it closes regardless.
const SLOW_CONSUMER_GRACE: Duration = Duration::from_millis(250);
/// Where the subscription id sits in an encoded MESSAGE frame: after the length
/// (4 bytes), kind and flags (1 byte each); see PROTOCOL.md.
const MESSAGE_SID_OFFSET: usize = 6;

/// What senders append to and the writer takes whole.
struct Queue {
    /// Encoded frames, in order, not yet taken by the writer.
    buf: BytesMut,
    /// Bytes the writer took and has not finished writing; they still count
    /// against the bound.
    in_flight: usize,
    /// Write everything queued, then shut the socket down.
    closing: bool,
    /// The most this connection has had pending, as last reported to the stats.
    reported_peak: usize,
    /// Since when pending bytes have been above the high-water mark, if they are.
    over_since: Option<Instant>,
}

/// The outbox's bounds: a hard one in bytes, and a high-water mark past which
/// publishers feeding this connection are stalled for a bounded time.
///
/// Bursts without loss: once the bytes pending for a connection pass `high_water`,
/// each publisher whose message reached it waits (stops reading its own socket, so
/// TCP holds its client back) until the pending bytes are back under the mark. The
/// wait is bounded per burst: `stall` after the mark was crossed, a connection still
/// above it is cut off as a slow consumer, as it is when it passes `max_pending`.
/// A subscriber that pauses briefly loses nothing; one that stays behind is cut off
/// within `stall`, and its publishers go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Hard bound on pending bytes: a send beyond it cuts the connection off.
    pub max_pending: usize,
    /// Pending bytes past which publishers are stalled; at least `max_pending`
    /// disables stalls.
    pub high_water: usize,
    /// How long a connection may stay above `high_water` before it is cut off; zero
    /// disables stalls (only `max_pending` cuts off).
    pub stall: Duration,
}

impl OutboxLimits {
    /// Only the hard bound: never stalls a publisher.
    pub fn unstalled(max_pending: usize) -> OutboxLimits {
        OutboxLimits {
            max_pending,
            high_water: max_pending,
            stall: Duration::ZERO,
        }
    }

    /// The broker's policy: the high-water mark at half of `max_pending`.
    pub fn with_stall(max_pending: usize, stall: Duration) -> OutboxLimits {
        OutboxLimits {
            max_pending,
            high_water: max_pending / 2,
            stall,
        }
    }

    fn stalls(&self) -> bool {
        !self.stall.is_zero() && self.high_water < self.max_pending
    }
}

struct Shared {
    conn: ConnId,
    max_pending: usize,
    limits: OutboxLimits,
    /// True while pending bytes are above the high-water mark (publishers check it
    /// without the lock).
    pressured: AtomicBool,
    /// Notified when pending bytes fall back under the high-water mark.
    relieved: Notify,
    queue: Mutex<Queue>,
    /// Wakes the writer; senders notify only when the queue goes from empty to
    /// non-empty (or it holds frames whose wake-up is owed), so a burst costs one
    /// wake-up, not one per frame.
    wake: Notify,
    /// Frames were queued with [`Outbox::send_held`] and the writer not woken for
    /// them yet: [`Outbox::release`] owes it a wake-up.
    wake_owed: AtomicBool,
    closed: AtomicBool,
    /// Set when every [`Outbox`] is gone: nothing more can be queued.
    orphaned: AtomicBool,
    /// Set when the connection must stop at once (slow consumer, write error, or a
    /// graceful close that ran out of time). The reader watches it too.
    abort: CancellationToken,
    slow: AtomicBool,
    /// Set when the cut-off was for staying above the high-water mark too long,
    /// rather than for passing the hard bound.
    stayed_behind: AtomicBool,
    /// The session's minor protocol version (0 until the handshake says more):
    /// what frames built for many connections (fan-out, deliveries) may carry.
    minor: AtomicU16,
    stats: Arc<Stats>,
    /// MESSAGE and DELIVERY frames queued, for operators (the HTTP API).
    messages: AtomicU64,
}

impl Shared {
    // A panic while the lock is held cannot leave the buffer other than as a
    // sequence of whole frames plus, at worst, a truncated tail that `send`
    // removes itself; poisoning is ignored rather than spread.
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Marks the outbox orphaned when its last clone is dropped.
struct Senders(Arc<Shared>);

impl Drop for Senders {
    fn drop(&mut self) {
        self.0.orphaned.store(true, Ordering::Release);
        self.0.wake.notify_one();
    }
}

/// The outbound side of one connection: a cheap, cloneable handle through which any
/// part of the broker (the router, the durable-queue engine, the connection's own
/// replies) queues frames for that client.
///
/// Frames are encoded as they are queued, straight into the buffer the writer
/// takes whole for its next write: no per-frame channel operation or allocation,
/// and one wake-up of the writer per batch. A sender that queues a batch from
/// another thread (a queue's deliveries, a round's confirms) holds it with
/// [`Outbox::send_held`] and wakes the writer once with [`Outbox::release`], so the
/// writer does not start on the batch before it is all queued.
///
/// The queue is bounded in bytes (`--max-pending-bytes`): encoded frames count from
/// the moment they are queued until the write that carries them completes. A send
/// that would exceed the bound applies the slow-consumer policy: the connection is
/// sent ERROR `SlowConsumer` (best effort), closed, and counted in the stats; the
/// send and every later one return [`Closed`]. Sends never wait; a publisher that
/// should hold back for a connection over its high-water mark waits in
/// [`Outbox::stall`] (see [`OutboxLimits`]).
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
    _senders: Arc<Senders>,
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
        Outbox::with_limits(conn, OutboxLimits::unstalled(max_pending), stats)
    }

    /// Like [`Outbox::channel`], with a high-water mark and stall bound.
    pub fn with_limits(
        conn: ConnId,
        limits: OutboxLimits,
        stats: Arc<Stats>,
    ) -> (Outbox, OutboxReceiver) {
        let shared = Arc::new(Shared {
            conn,
            max_pending: limits.max_pending,
            limits,
            pressured: AtomicBool::new(false),
            relieved: Notify::new(),
            queue: Mutex::new(Queue {
                buf: BytesMut::with_capacity(INITIAL_CAPACITY),
                in_flight: 0,
                closing: false,
                reported_peak: 0,
                over_since: None,
            }),
            wake: Notify::new(),
            wake_owed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            orphaned: AtomicBool::new(false),
            abort: CancellationToken::new(),
            slow: AtomicBool::new(false),
            stayed_behind: AtomicBool::new(false),
            minor: AtomicU16::new(0),
            stats,
            messages: AtomicU64::new(0),
        });
        (
            Outbox {
                shared: shared.clone(),
                _senders: Arc::new(Senders(shared.clone())),
            },
            OutboxReceiver { shared },
        )
    }

    /// The connection this outbox writes to.
    pub fn conn_id(&self) -> ConnId {
        self.shared.conn
    }

    /// Records the minor protocol version the handshake agreed on.
    pub fn set_protocol_minor(&self, minor: u16) {
        self.shared.minor.store(minor, Ordering::Relaxed);
    }

    /// The session's minor protocol version: 0 for a 1.0 session, which must not
    /// be sent the fields 1.1 added.
    pub fn protocol_minor(&self) -> u16 {
        self.shared.minor.load(Ordering::Relaxed)
    }

    /// Queues a frame. Never waits. Fails when the connection is closed or closing,
    /// and applies the slow-consumer policy when the byte bound would be exceeded.
    pub fn send(&self, frame: Frame) -> Result<(), Closed> {
        self.send_frame(frame, true)
    }

    /// Queues a frame like [`Outbox::send`] but does not wake the writer for it:
    /// the caller queues a batch (a queue handing out deliveries) and then calls
    /// [`Outbox::release`] once. Otherwise the writer, woken by the first frame
    /// on another thread, takes and writes the batch a few frames at a time while
    /// the rest is still being queued: one `sendto` per ~16 deliveries, where one
    /// per batch will do. Returns whether this call made a wake-up owed (the
    /// first held frame since the last release): the caller must then call
    /// `release` once its batch is done.
    pub fn send_held(&self, frame: Frame) -> Result<bool, Closed> {
        self.send_frame(frame, false)?;
        Ok(!self.shared.wake_owed.swap(true, Ordering::AcqRel))
    }

    /// Wakes the writer for the frames queued with [`Outbox::send_held`] since the
    /// last release, if any.
    pub fn release(&self) {
        if self.shared.wake_owed.swap(false, Ordering::AcqRel) {
            self.shared.wake.notify_one();
        }
    }

    fn send_frame(&self, frame: Frame, wake: bool) -> Result<(), Closed> {
        if matches!(frame, Frame::Delivery(_) | Frame::Message(_)) {
            self.shared.messages.fetch_add(1, Ordering::Relaxed);
        }
        self.append(wake, |buf| {
            if let Err(err) = frame.encode(buf) {
                // Frames are built from decoded input within limits, so this is a
                // broker bug: report it; `encode` left the buffer as it was.
                tracing::error!(error = %err, frame = frame.name(), "cannot encode outbound frame");
            }
        })
    }

    /// Queues an already encoded MESSAGE frame (`encoded`, as written by
    /// [`Frame::encode`]) with its subscription id replaced by `sid`: fan-out encodes
    /// a message once and copies it to each subscriber.
    pub fn send_message(&self, encoded: &[u8], sid: u32) -> Result<(), Closed> {
        self.shared.messages.fetch_add(1, Ordering::Relaxed);
        self.append(true, |buf| {
            let start = buf.len();
            buf.extend_from_slice(encoded);
            if let Some(field) =
                buf.get_mut(start + MESSAGE_SID_OFFSET..start + MESSAGE_SID_OFFSET + 4)
            {
                field.copy_from_slice(&sid.to_be_bytes());
            }
        })
    }

    /// Encodes a frame into the queue; `wake`: notify the writer if the queue was
    /// empty or held frames are owed a wake-up (else the caller owes a
    /// [`Outbox::release`]).
    fn append(&self, wake: bool, encode: impl FnOnce(&mut BytesMut)) -> Result<(), Closed> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(Closed);
        }
        let mut queue = self.shared.queue();
        let start = queue.buf.len();
        encode(&mut queue.buf);
        let total = queue.buf.len() + queue.in_flight;
        if total > self.shared.max_pending {
            queue.buf.truncate(start);
            drop(queue);
            self.slow_consumer();
            return Err(Closed);
        }
        if total > queue.reported_peak {
            queue.reported_peak = total;
            self.shared.stats.pending(total);
        }
        if total > self.shared.limits.high_water && self.shared.limits.stalls() {
            let now = Instant::now();
            let since = *queue.over_since.get_or_insert(now);
            self.shared.pressured.store(true, Ordering::Release);
            if now.duration_since(since) > self.shared.limits.stall {
                // Behind for longer than a burst may last: cut off even when no
                // publisher waits for it (one that ignores the stall, say).
                drop(queue);
                self.shared.stayed_behind.store(true, Ordering::Release);
                self.slow_consumer();
                return Err(Closed);
            }
        }
        drop(queue);
        // A frame sent behind held ones pays their wake-up now: replies and
        // messages never wait for another sender's release.
        let owed = wake
            && start != 0
            && self.shared.wake_owed.load(Ordering::Relaxed)
            && self.shared.wake_owed.swap(false, Ordering::AcqRel);
        if (wake && start == 0) || owed {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// True while the bytes pending for this connection are above its high-water
    /// mark: publishers feeding it should [`Outbox::stall`].
    pub fn is_pressured(&self) -> bool {
        self.shared.pressured.load(Ordering::Acquire) && !self.is_closed()
    }

    /// Waits until this connection's pending bytes are back under the high-water
    /// mark, or it is closed. The wait ends at the latest `stall` after the mark
    /// was crossed; a connection still above it then is cut off as a slow consumer.
    /// Returns at once when the outbox is not pressured.
    pub async fn stall(&self) {
        loop {
            let relieved = self.shared.relieved.notified();
            tokio::pin!(relieved);
            // Registered before the state is read, so a relief in between is seen.
            relieved.as_mut().enable();
            if self.is_closed() {
                return;
            }
            let Some(since) = self.shared.queue().over_since else {
                return;
            };
            let deadline = since + self.shared.limits.stall;
            if Instant::now() >= deadline {
                self.shared.stayed_behind.store(true, Ordering::Release);
                self.slow_consumer();
                return;
            }
            tokio::select! {
                _ = &mut relieved => {}
                _ = self.shared.abort.cancelled() => return,
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
    }

    /// Bytes queued and not yet written.
    pub fn pending_bytes(&self) -> usize {
        let queue = self.shared.queue();
        queue.buf.len() + queue.in_flight
    }

    /// MESSAGE and DELIVERY frames offered to this connection so far (a frame the
    /// slow-consumer bound refused counts too).
    pub fn messages_queued(&self) -> u64 {
        self.shared.messages.load(Ordering::Relaxed)
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
        {
            let mut queue = self.shared.queue();
            if let Some(frame) = last {
                if let Err(err) = frame.encode(&mut queue.buf) {
                    tracing::error!(error = %err, frame = frame.name(), "cannot encode outbound frame");
                }
            }
            queue.closing = true;
        }
        self.shared.wake.notify_one();
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
        if self.shared.stayed_behind.load(Ordering::Acquire) {
            warn!(
                conn = %self.shared.conn,
                high_water_bytes = self.shared.limits.high_water,
                stall = ?self.shared.limits.stall,
                "slow consumer: above the outbound high-water mark for longer than the stall bound, disconnecting"
            );
        } else {
            warn!(
                conn = %self.shared.conn,
                max_pending_bytes = self.shared.max_pending,
                "slow consumer: outbound queue full, disconnecting"
            );
        }
        self.shared.abort.cancel();
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
    /// wake-up takes everything queued (already encoded, in one buffer) and writes
    /// it with as few syscalls as the socket allows.
    pub async fn write_to<W: AsyncWrite + Unpin>(self, mut out: W) -> WriterEnd {
        let mut buf = BytesMut::with_capacity(INITIAL_CAPACITY);
        let end = loop {
            let closing = {
                let mut queue = self.shared.queue();
                if queue.buf.is_empty() && !queue.closing {
                    None
                } else {
                    // The drained buffer (cleared) goes back for senders to fill.
                    buf.clear();
                    if buf.capacity() > KEEP_CAPACITY {
                        buf = BytesMut::with_capacity(INITIAL_CAPACITY);
                    }
                    std::mem::swap(&mut buf, &mut queue.buf);
                    queue.in_flight = buf.len();
                    Some(queue.closing)
                }
            };
            let Some(closing) = closing else {
                if self.shared.orphaned.load(Ordering::Acquire) && self.is_drained() {
                    // Every Outbox is gone, so nothing more can be queued.
                    break WriterEnd::Flushed;
                }
                tokio::select! {
                    biased;
                    _ = self.shared.abort.cancelled() => break WriterEnd::Aborted,
                    _ = self.shared.wake.notified() => {}
                }
                continue;
            };
            let ok = self.write_buf(&mut out, &mut buf).await;
            {
                let mut queue = self.shared.queue();
                queue.in_flight = 0;
                if queue.over_since.is_some() && queue.buf.len() <= self.shared.limits.high_water {
                    queue.over_since = None;
                    self.shared.pressured.store(false, Ordering::Release);
                    self.shared.relieved.notify_waiters();
                }
            }
            if !ok {
                break WriterEnd::Aborted;
            }
            if closing && self.is_drained() {
                let _ = out.shutdown().await;
                break WriterEnd::Flushed;
            }
        };
        if end == WriterEnd::Aborted && self.shared.slow.load(Ordering::Acquire) {
            self.finish_slow_consumer(&mut out, &mut buf).await;
        }
        self.shared.closed.store(true, Ordering::Release);
        // Whatever is still queued will never be written; free it and its charge.
        {
            let mut queue = self.shared.queue();
            queue.buf = BytesMut::new();
            queue.in_flight = 0;
            queue.over_since = None;
        }
        self.shared.pressured.store(false, Ordering::Release);
        self.shared.relieved.notify_waiters();
        // Wake the reader, whatever the reason the writer stopped.
        self.shared.abort.cancel();
        end
    }

    fn is_drained(&self) -> bool {
        self.shared.queue().buf.is_empty()
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
        let message = if self.shared.stayed_behind.load(Ordering::Acquire) {
            format!(
                "outbound queue stayed above {} bytes for more than {:?}; the connection was \
                 not reading fast enough",
                self.shared.limits.high_water, self.shared.limits.stall
            )
        } else {
            format!(
                "outbound queue exceeded {} bytes; the connection was not reading fast enough",
                self.shared.max_pending
            )
        };
        let error = Frame::Error(ErrorReply::new(0, ErrorCode::SlowConsumer, message));
        let _ = error.encode(buf);
        let _ = tokio::time::timeout(SLOW_CONSUMER_GRACE, async {
            if out.write_all(buf).await.is_ok() {
                let _ = out.shutdown().await;
            }
        })
        .await;
        buf.clear();
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
        let mut buf = BytesMut::new();
        let mut codec = FrameCodec::default();
        let mut got = Vec::new();
        while got.len() < 2 {
            let n = client.read(&mut raw).await.unwrap();
            buf.extend_from_slice(&raw[..n]);
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                got.push(frame);
            }
        }
        assert_eq!(got, [message(0), message(1)]);
        // Released: the next held frame owes a release again, and a plain send
        // behind it wakes the writer for both, with no release.
        assert_eq!(outbox.send_held(message(2)), Ok(true));
        outbox.send(message(3)).unwrap();
        let read_two = async {
            let mut got = Vec::new();
            while got.len() < 2 {
                let n = client.read(&mut raw).await.unwrap();
                buf.extend_from_slice(&raw[..n]);
                while let Some(frame) = codec.decode(&mut buf).unwrap() {
                    got.push(frame);
                }
            }
            got
        };
        let got = tokio::time::timeout(Duration::from_secs(5), read_two)
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
        assert_eq!(codec.decode(&mut rest).unwrap(), Some(message(4)));
        assert!(rest.is_empty());
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
}
