//! One connection's select loop: reading frames, writing the buffer, taking
//! commands, heartbeats and the final flush.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tidings_protocol::{Frame, Ping};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tracing::{debug, warn};

use super::{HIGH_WATER, ReadState, SessionEnd, Task};

impl Task {
    /// Runs one connection until it fails or the client is dropped.
    pub(crate) async fn session<R, W>(
        &mut self,
        mut reader: R,
        mut writer: W,
        mut rbuf: BytesMut,
        heartbeat: Option<Duration>,
    ) -> SessionEnd
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        self.read = ReadState::Reading;
        self.stalled_this_session = false;
        if let Err(end) = self.decode_all(&mut rbuf) {
            return end;
        }
        let period = heartbeat
            .map(|hb| (hb / 2).max(Duration::from_millis(10)))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_read = Instant::now();
        let mut last_write = Instant::now();
        loop {
            self.encode_acks();
            if rbuf.capacity() - rbuf.len() < 4096 {
                rbuf.reserve(64 * 1024);
            }
            let take_commands = self.wbuf.len() < HIGH_WATER;
            if matches!(self.read, ReadState::Released) {
                // A held message was for a subscription that ended: go on with
                // the frames behind it.
                self.read = ReadState::Reading;
                if let Err(end) = self.decode_all(&mut rbuf) {
                    return end;
                }
            }
            let stalled = match &self.read {
                ReadState::Stalled { buffer, .. } => Some(buffer.clone()),
                ReadState::Reading | ReadState::Released => None,
            };
            let reading = stalled.is_none();
            tokio::select! {
                _ = async {
                    match &stalled {
                        Some(buffer) => buffer.space().await,
                        None => std::future::pending().await,
                    }
                }, if stalled.is_some() => {
                    self.retry_stalled();
                    if let Err(end) = self.decode_all(&mut rbuf) {
                        return end;
                    }
                },
                read = reader.read_buf(&mut rbuf), if reading => match read {
                    Ok(0) => return SessionEnd::Lost("the broker closed the connection".into()),
                    Ok(_) => {
                        last_read = Instant::now();
                        if let Err(end) = self.decode_all(&mut rbuf) {
                            return end;
                        }
                    }
                    Err(e) => return SessionEnd::Lost(format!("read failed: {e}")),
                },
                written = writer.write(&self.wbuf), if !self.wbuf.is_empty() => match written {
                    Ok(0) => return SessionEnd::Lost("the socket accepts no more bytes".into()),
                    Ok(n) => {
                        last_write = Instant::now();
                        self.wbuf.advance(n);
                        if self.wbuf.is_empty() {
                            if let Err(e) = writer.flush().await {
                                return SessionEnd::Lost(format!("flush failed: {e}"));
                            }
                            self.written_all();
                        }
                    }
                    Err(e) => return SessionEnd::Lost(format!("write failed: {e}")),
                },
                cmd = self.rx.recv(), if take_commands => {
                    // The task holds a sender itself, so the channel never ends here.
                    let Some(cmd) = cmd else { return SessionEnd::Closed };
                    self.command(cmd);
                    self.drain_commands();
                },
                _ = tick.tick() => {
                    self.sweep();
                    if let Some(hb) = heartbeat {
                        if !reading {
                            // Not reading is our choice (a full subscription), not
                            // a silent broker; keep the broker sure we are alive.
                            last_read = Instant::now();
                            if last_write.elapsed() > hb / 2 {
                                self.encode(&Frame::Ping(Ping));
                                last_write = Instant::now();
                            }
                        }
                        if last_read.elapsed() > hb * 3 {
                            return SessionEnd::Lost(format!(
                                "no data from the broker for {:?} (heartbeat {hb:?})",
                                last_read.elapsed()
                            ));
                        }
                        if last_read.elapsed() > hb && last_write.elapsed() > hb / 2 {
                            self.encode(&Frame::Ping(Ping));
                            last_write = Instant::now();
                        }
                    }
                },
                _ = self.close.cancelled() => {
                    self.drain_commands_all();
                    self.encode_acks();
                    let bounded = async {
                        writer.write_all(&self.wbuf).await?;
                        writer.flush().await?;
                        writer.shutdown().await
                    };
                    if let Err(error) | Ok(Err(error)) =
                        tokio::time::timeout(Duration::from_secs(1), bounded)
                            .await
                            .map_err(std::io::Error::other)
                    {
                        debug!(%error, "final flush failed");
                    }
                    self.wbuf.clear();
                    return SessionEnd::Closed;
                },
            }
        }
    }

    pub(super) fn written_all(&mut self) {
        self.held.clear();
        for flush in self.flushes.drain(..) {
            let _ = flush.send(true);
        }
    }

    /// Takes whatever else is queued, so it all goes out in one write.
    pub(super) fn drain_commands(&mut self) {
        while self.wbuf.len() < HIGH_WATER {
            match self.rx.try_recv() {
                Ok(cmd) => self.command(cmd),
                Err(_) => break,
            }
        }
    }

    pub(super) fn drain_commands_all(&mut self) {
        while let Ok(cmd) = self.rx.try_recv() {
            self.command(cmd);
        }
    }

    /// Handles every whole frame in `rbuf`, unless a full subscription stops it;
    /// then wakes the subscriptions that got messages.
    pub(super) fn decode_all(&mut self, rbuf: &mut BytesMut) -> Result<(), SessionEnd> {
        let result = self.decode_frames(rbuf);
        self.wake_subscriptions();
        result
    }

    pub(super) fn decode_frames(&mut self, rbuf: &mut BytesMut) -> Result<(), SessionEnd> {
        while matches!(self.read, ReadState::Reading) {
            match self.codec.decode(rbuf) {
                Ok(Some(frame)) => self.frame(frame)?,
                Ok(None) => return Ok(()),
                Err(e) if e.is_fatal() => {
                    return Err(SessionEnd::Lost(format!(
                        "invalid frame from the broker: {e}"
                    )));
                }
                Err(e) => warn!(error = %e, "skipped a frame from the broker"),
            }
        }
        Ok(())
    }
}
