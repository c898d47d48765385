//! `Outbox`, the outbound handle of one connection: frames encoded as they are
//! queued into one buffer bounded in bytes, which the connection's writer task
//! (`writer.rs`) takes whole for each write.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use thiserror::Error;
use tidings_protocol::{Delivery, ErrorCode, Frame};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::stats::Stats;

mod writer;

pub use writer::WriterEnd;

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

/// What a fresh write buffer starts with.
const INITIAL_CAPACITY: usize = 16 * 1024;
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
        Ok(self.owe_wake())
    }

    /// Records that held frames await a release; true if none did before (this
    /// caller owes the [`Outbox::release`]).
    fn owe_wake(&self) -> bool {
        !self.shared.wake_owed.swap(true, Ordering::AcqRel)
    }

    /// Wakes the writer for the frames queued with [`Outbox::send_held`] since the
    /// last release, if any.
    pub fn release(&self) {
        if self.shared.wake_owed.swap(false, Ordering::AcqRel) {
            self.shared.wake.notify_one();
        }
    }

    /// Queues a DELIVERY encoded straight from `delivery`, in the form this
    /// connection's protocol version reads (1.0 sessions do not know its `reply_to`
    /// and `message_id`): no [`Frame`] is built around it.
    pub fn send_delivery(&self, delivery: &Delivery) -> Result<(), Closed> {
        self.append_delivery(delivery, true)
    }

    /// [`Outbox::send_delivery`], held like [`Outbox::send_held`].
    pub fn send_delivery_held(&self, delivery: &Delivery) -> Result<bool, Closed> {
        self.append_delivery(delivery, false)?;
        Ok(self.owe_wake())
    }

    fn append_delivery(&self, delivery: &Delivery, wake: bool) -> Result<(), Closed> {
        self.shared.messages.fetch_add(1, Ordering::Relaxed);
        let v1_1 = self.protocol_minor() >= 1;
        self.append(wake, |buf| {
            if let Err(err) = delivery.encode_frame(buf, v1_1) {
                // Deliveries are built from stored messages within limits, so this
                // is a broker bug: report it; `encode_frame` left the buffer as it was.
                tracing::error!(error = %err, "cannot encode DELIVERY");
            }
        })
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

    /// The capacity of the buffer senders append to (for tests of what the writer
    /// keeps).
    #[cfg(test)]
    fn queued_capacity(&self) -> usize {
        self.shared.queue().buf.capacity()
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

#[cfg(test)]
mod tests;
