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

/// A drained write buffer larger than this is not kept for reuse, so one burst does
/// not pin its peak in memory for the life of the connection.
const KEEP_CAPACITY: usize = 1024 * 1024;

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
