//! The writer task of one connection: [`OutboxReceiver::write_to`] drains the
//! outbox's buffer into the socket, one write per wake-up, and finishes a slow
//! consumer's stream with its ERROR frame.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tidings_protocol::{ErrorCode, ErrorReply, Frame};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::{INITIAL_CAPACITY, OutboxReceiver};

/// After a slow consumer is cut off, how long the writer keeps trying to finish the
/// frame in progress and the ERROR frame before it closes regardless.
const SLOW_CONSUMER_GRACE: Duration = Duration::from_millis(250);

/// A drained write buffer up to this size is always kept for reuse. A larger one is
/// given up when the connection goes idle, or after `UNDERUSED_WRITES` writes in a
/// row that filled less than a quarter of it: one burst does not pin its peak in
/// memory, while a steady stream keeps buffers its size. (Giving up every buffer
/// past 1 MiB at once made a subscriber fed at a million messages a second grow a
/// new one from 16 KiB for nearly each write, a page fault per 4 KiB it was sent:
/// ~6 % of the broker's time under `fanin`.)
pub(super) const KEEP_CAPACITY: usize = 1024 * 1024;
/// See [`KEEP_CAPACITY`].
const UNDERUSED_WRITES: u32 = 8;

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
        // Writes in a row that used less than a quarter of their buffer.
        let mut underused = 0;
        let end = loop {
            let closing = {
                let mut queue = self.shared.queue();
                if queue.buf.is_empty() && !queue.closing {
                    if queue.buf.capacity() > KEEP_CAPACITY {
                        queue.buf = BytesMut::with_capacity(INITIAL_CAPACITY);
                    }
                    None
                } else {
                    // The drained buffer (cleared) goes back for senders to fill.
                    buf.clear();
                    if buf.capacity() > KEEP_CAPACITY && underused >= UNDERUSED_WRITES {
                        buf = BytesMut::with_capacity(INITIAL_CAPACITY);
                        underused = 0;
                    }
                    std::mem::swap(&mut buf, &mut queue.buf);
                    queue.in_flight = buf.len();
                    Some(queue.closing)
                }
            };
            let Some(closing) = closing else {
                // Idle: what a burst grew is given back.
                if buf.capacity() > KEEP_CAPACITY {
                    buf = BytesMut::with_capacity(INITIAL_CAPACITY);
                }
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
            if buf.len() < buf.capacity() / 4 {
                underused += 1;
            } else {
                underused = 0;
            }
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
    /// unwritten rest stays in `buf`. A whole write leaves `buf` empty with all its
    /// capacity (it is written from an offset, not advanced, so it can be reused
    /// from its start).
    async fn write_buf<W: AsyncWrite + Unpin>(&self, out: &mut W, buf: &mut BytesMut) -> bool {
        let mut at = 0;
        let ok = loop {
            if at == buf.len() {
                break true;
            }
            let written = tokio::select! {
                biased;
                _ = self.shared.abort.cancelled() => break false,
                // `write` either writes some bytes or none, so cancelling it is safe.
                r = out.write(&buf[at..]) => r,
            };
            match written {
                Ok(0) => break false,
                Ok(n) => {
                    at += n;
                    self.shared.stats.bytes_out(n);
                }
                Err(err) => {
                    debug!(conn = %self.shared.conn, error = %err, "write failed");
                    break false;
                }
            }
        };
        if ok {
            buf.clear();
        } else {
            let _ = buf.split_to(at);
        }
        ok
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
