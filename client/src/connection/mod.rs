//! The connection task: the one task that owns the socket. It performs the
//! handshake, turns [`Command`]s from handles into frames (coalesced into one buffer
//! and one write), routes incoming frames to subscriptions, consumers and waiting
//! calls, answers heartbeats, and reconnects, restoring subscriptions and consumers,
//! when the connection drops.

//!
//! - `dial.rs`: connect and handshake;
//! - `mod.rs` (here): the task's state, the reconnect loop and what is restored;
//! - `session.rs`: one connection's select loop (read, write, commands, heartbeat);
//! - `outbound.rs`: commands turned into frames in the write buffer;
//! - `inbound.rs`: frames from the broker routed to their waiters and streams.

mod dial;
mod inbound;
mod outbound;
mod session;

// Ids this client assigns (subscriptions, consumers, requests): a fast hash is
// enough, no peer picks the keys. SipHash of the request id was ~3 % of a process
// keeping 256 confirmed publishes in flight.
use foldhash::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Waker;
use std::time::Duration;

use bytes::BytesMut;
use tidings_protocol::{Consume, ErrorCode, Frame, FrameCodec, Subscribe, Text};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::command::{Command, Reply};
use crate::consumer::ConsumerSink;
use crate::error::{CallError, ServerError};
use crate::events::Event;
use crate::handle::{ConnState, Handle};
use crate::message::Message;
use crate::sub_buffer::SubBuffer;
use crate::subscriber::Interruption;

use crate::tls::Transport;
#[cfg(test)]
pub(crate) use dial::handshake;
pub(crate) use dial::{Opened, open};

/// The subscription id of the client's private request inbox.
pub(crate) const INBOX_SID: u32 = 0;

/// Stop taking commands once this much is waiting to be written, so a slow socket
/// pushes back on publishers (through the byte budget) instead of growing a buffer.
const HIGH_WATER: usize = 256 * 1024;

/// Most ids in one ACK or NACK frame (8 bytes each, far below any frame limit).
const MAX_IDS_PER_FRAME: usize = 8192;

/// Starts the connection task for an opened connection.
pub(crate) fn spawn(
    opened: Opened,
    handle: Handle,
    rx: mpsc::UnboundedReceiver<Command>,
    state_tx: watch::Sender<ConnState>,
    close: CancellationToken,
) {
    let span = tracing::info_span!("tidings_client", addr = %handle.shared.opts.addr);
    let task = Task::new(handle, rx, state_tx, close);
    tokio::spawn(task.run(opened).instrument(span));
}

/// Why a session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// The client was dropped; do not reconnect.
    Closed,
    /// The connection failed; reconnect if the policy allows.
    Lost(String),
    /// The broker sent an ERROR whose code closes the connection (slow consumer,
    /// shutting down, heartbeat timeout …); reconnect if the policy allows.
    CutOff(ServerError),
}

enum Pending {
    Call(Reply),
    /// On error the subscription is forgotten; `None` when restoring.
    Subscribe {
        sid: u32,
        reply: Option<Reply>,
    },
    Consume {
        cid: u32,
        reply: Option<Reply>,
    },
    Request(u64),
    /// Answers nobody waits for (acks, restores, unsubscribes from drop); errors
    /// are logged.
    Ignore(&'static str),
}

struct Sub {
    pattern: Text,
    group: Option<Text>,
    buffer: Arc<SubBuffer>,
    /// Times this subscription's full buffer held the connection back.
    stalls: Arc<AtomicU64>,
}

impl Drop for Sub {
    /// The subscription's stream ends once it has taken what is buffered.
    fn drop(&mut self) {
        self.buffer.end();
    }
}

struct ConsumerEntry {
    queue: Text,
    /// The whole credit window, including CREDIT top-ups, re-sent on reconnect.
    window: u32,
    /// Deliveries it may still get (CONSUME `limit`), re-sent on reconnect.
    remaining: Option<u32>,
    sink: ConsumerSink,
}

/// Whether the task reads frames from the socket.
enum ReadState {
    /// Reading and routing frames.
    Reading,
    /// A message found its subscription's buffer full: reading stops until that
    /// buffer has room and the message is in it (backpressure, never a drop).
    Stalled {
        sid: u32,
        message: Message,
        buffer: Arc<SubBuffer>,
    },
    /// The stalled subscription ended, and its message with it: the frames already
    /// read behind that message still wait to be routed.
    Released,
}

pub(crate) struct Task {
    handle: Handle,
    rx: mpsc::UnboundedReceiver<Command>,
    state_tx: watch::Sender<ConnState>,
    close: CancellationToken,
    codec: FrameCodec,
    subs: HashMap<u32, Sub>,
    consumers: HashMap<u32, ConsumerEntry>,
    pending: HashMap<u32, Pending>,
    requests: HashMap<u64, (u32, oneshot::Sender<Result<Message, CallError>>)>,
    inbox_wanted: bool,
    inbox_subscribed: bool,
    acks: Vec<u64>,
    nacks: Vec<(Option<u64>, Vec<u64>)>,
    wbuf: BytesMut,
    held: Vec<OwnedSemaphorePermit>,
    flushes: Vec<oneshot::Sender<bool>>,
    epoch: u64,
    /// Whether frames are read, or wait for a full subscription.
    read: ReadState,
    /// A full subscription held reading back during this connection: a drop
    /// without an ERROR is then most likely the broker's slow-consumer cut-off,
    /// whose ERROR could not reach a client that was not reading.
    stalled_this_session: bool,
    /// Restore requests (SUBSCRIBE, CONSUME) of this connection still unanswered.
    restoring: usize,
    /// Failed attempts before the current connection, while its
    /// [`Event::Reconnected`] waits for the restore to be answered.
    reconnected: Option<u32>,
    /// Subscriptions to wake once the current read is handled.
    wakers: Vec<Waker>,
}

impl Task {
    pub(crate) fn new(
        handle: Handle,
        rx: mpsc::UnboundedReceiver<Command>,
        state_tx: watch::Sender<ConnState>,
        close: CancellationToken,
    ) -> Self {
        let epoch = handle.shared.epoch.load(Ordering::Relaxed);
        Self {
            handle,
            rx,
            state_tx,
            close,
            codec: FrameCodec::default(),
            subs: HashMap::default(),
            consumers: HashMap::default(),
            pending: HashMap::default(),
            requests: HashMap::default(),
            inbox_wanted: false,
            inbox_subscribed: false,
            acks: Vec::new(),
            nacks: Vec::new(),
            wbuf: BytesMut::with_capacity(64 * 1024),
            held: Vec::new(),
            flushes: Vec::new(),
            epoch,
            read: ReadState::Reading,
            stalled_this_session: false,
            restoring: 0,
            reconnected: None,
            wakers: Vec::new(),
        }
    }

    /// Sessions and reconnects until the client is dropped or the policy gives up.
    async fn run(mut self, opened: Opened) {
        let opts = self.handle.shared.opts.clone();
        let mut next = Some(opened);
        let mut failures: u32 = 0;
        let mut first = true;
        loop {
            if let Some(opened) = next.take() {
                if !first {
                    self.epoch += 1;
                    self.handle
                        .shared
                        .epoch
                        .store(self.epoch, Ordering::Relaxed);
                    info!(attempts = failures, "reconnected");
                    // Announced once the broker has answered the restore, so that
                    // a publish made on seeing the event reaches the subscriptions.
                    self.reconnected = Some(failures);
                }
                first = false;
                failures = 0;
                self.handle
                    .shared
                    .max_payload
                    .store(opened.max_payload(), Ordering::Relaxed);
                self.handle
                    .shared
                    .max_credit
                    .store(opened.max_credit(), Ordering::Relaxed);
                self.codec = FrameCodec::new(opened.max_frame_len());
                let heartbeat = match opened.welcome.heartbeat_ms {
                    0 => None,
                    ms => Some(Duration::from_millis(u64::from(ms))),
                };
                self.restore();
                if self.restoring == 0 {
                    self.announce_reconnect();
                }
                let _ = self.state_tx.send(ConnState::Connected);
                // Plain TCP splits without a lock; TLS needs tokio's split.
                let end = match opened.stream {
                    Transport::Plain(stream) => {
                        let (reader, writer) = stream.into_split();
                        self.session(reader, writer, opened.rbuf, heartbeat).await
                    }
                    Transport::Tls(stream) => {
                        let (reader, writer) = tokio::io::split(*stream);
                        self.session(reader, writer, opened.rbuf, heartbeat).await
                    }
                };
                let _ = self.state_tx.send(ConnState::Disconnected);
                self.on_disconnect();
                let (gap, reason) = match end {
                    SessionEnd::Closed => break,
                    SessionEnd::CutOff(error) if error.code() == Some(ErrorCode::SlowConsumer) => {
                        warn!(%error, "cut off by the broker as a slow consumer");
                        let message = error.message.clone();
                        let _ = self.handle.shared.events.send(Event::SlowConsumer {
                            message: message.clone(),
                        });
                        (Interruption::SlowConsumer { message }, error.to_string())
                    }
                    SessionEnd::CutOff(error) => {
                        let reason = error.to_string();
                        (
                            Interruption::Disconnected {
                                reason: reason.clone(),
                            },
                            reason,
                        )
                    }
                    SessionEnd::Lost(reason) if self.stalled_this_session => {
                        let message = format!(
                            "the connection dropped ({reason}) after a full subscription held \
                             reading back; the broker most likely cut this client off"
                        );
                        warn!(%message, "probably cut off as a slow consumer");
                        let _ = self.handle.shared.events.send(Event::SlowConsumer {
                            message: message.clone(),
                        });
                        (Interruption::SlowConsumer { message }, reason)
                    }
                    SessionEnd::Lost(reason) => (
                        Interruption::Disconnected {
                            reason: reason.clone(),
                        },
                        reason,
                    ),
                };
                warn!(%reason, "connection lost");
                // Every subscription marks where messages may have been lost.
                for sub in self.subs.values() {
                    sub.buffer.push_gap(gap.clone());
                }
                let _ = self
                    .handle
                    .shared
                    .events
                    .send(Event::Disconnected { reason });
            }
            if opts.reconnect.exhausted(failures) {
                warn!(failures, "giving up reconnecting");
                break;
            }
            let delay = opts.reconnect.delay(failures) + jitter(opts.reconnect.delay(failures));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.close.cancelled() => break,
            }
            let attempt = tokio::select! {
                r = open(&opts) => r,
                _ = self.close.cancelled() => break,
            };
            match attempt {
                Ok(opened) => next = Some(opened),
                Err(error) => {
                    failures += 1;
                    debug!(%error, failures, "reconnect attempt failed");
                }
            }
        }
        self.shut();
    }

    /// Final state: every waiter fails, every later command is refused.
    fn shut(&mut self) {
        let _ = self.state_tx.send(ConnState::Closed);
        let _ = self.handle.shared.events.send(Event::Closed);
        self.on_disconnect();
        self.subs.clear();
        self.read = ReadState::Reading;
        self.consumers.clear();
        self.rx.close();
        // Dropping queued commands drops their reply senders: callers see the loss.
        while self.rx.try_recv().is_ok() {}
        info!("client closed");
    }

    /// Re-sends the inbox, subscriptions and consumers after a (re)connect, with
    /// the same ids, so the streams the user holds keep flowing.
    fn restore(&mut self) {
        if self.inbox_wanted {
            self.subscribe_inbox();
        }
        let subs: Vec<(u32, Text, Option<Text>)> = self
            .subs
            .iter()
            .map(|(sid, s)| (*sid, s.pattern.clone(), s.group.clone()))
            .collect();
        for (sid, pattern, group) in subs {
            let request_id = self.handle.shared.next_id();
            let frame = Frame::Subscribe(Subscribe {
                request_id,
                sid,
                pattern,
                group,
            });
            self.restoring += 1;
            self.send_tracked(request_id, &frame, Pending::Subscribe { sid, reply: None });
        }
        // The broker reconnected to may grant less credit than the one before.
        let shared = self.handle.shared.clone();
        let consumers: Vec<(u32, Text, u32, Option<u32>)> = self
            .consumers
            .iter_mut()
            .map(|(cid, c)| {
                c.window = shared.clamp_credit(c.window);
                (*cid, c.queue.clone(), c.window, c.remaining)
            })
            .collect();
        for (cid, queue, credit, limit) in consumers {
            let request_id = self.handle.shared.next_id();
            let frame = Frame::Consume(Consume {
                limit,
                request_id,
                consumer_id: cid,
                queue,
                credit,
            });
            self.restoring += 1;
            self.send_tracked(request_id, &frame, Pending::Consume { cid, reply: None });
        }
    }

    /// One restore request was answered; the last one announces the reconnect.
    fn restored_one(&mut self) {
        self.restoring = self.restoring.saturating_sub(1);
        if self.restoring == 0 {
            self.announce_reconnect();
        }
    }

    fn announce_reconnect(&mut self) {
        if let Some(attempts) = self.reconnected.take() {
            let _ = self
                .handle
                .shared
                .events
                .send(Event::Reconnected { attempts });
        }
    }

    /// Forgets a subscription (its stream ends once drained); a message held for
    /// it goes nowhere, and reading resumes.
    fn remove_sub(&mut self, sid: u32) -> Option<Sub> {
        if matches!(self.read, ReadState::Stalled { sid: held, .. } if held == sid) {
            self.read = ReadState::Released;
        }
        self.subs.remove(&sid)
    }

    fn on_disconnect(&mut self) {
        for (_, pending) in std::mem::take(&mut self.pending) {
            match pending {
                Pending::Call(reply) => {
                    let _ = reply.send(Err(CallError::ConnectionLost));
                }
                Pending::Subscribe {
                    sid,
                    reply: Some(reply),
                } => {
                    self.remove_sub(sid);
                    let _ = reply.send(Err(CallError::ConnectionLost));
                }
                Pending::Consume {
                    cid,
                    reply: Some(reply),
                } => {
                    self.consumers.remove(&cid);
                    let _ = reply.send(Err(CallError::ConnectionLost));
                }
                _ => {}
            }
        }
        for (_, (_, reply)) in self.requests.drain() {
            let _ = reply.send(Err(CallError::ConnectionLost));
        }
        for flush in self.flushes.drain(..) {
            let _ = flush.send(false);
        }
        // Frames not yet written may be cut mid-frame: never replay them on a new
        // connection. Publishes are at-most-once; confirms and calls failed above.
        self.wbuf.clear();
        self.held.clear();
        self.acks.clear();
        self.nacks.clear();
        self.inbox_subscribed = false;
        self.restoring = 0;
        self.reconnected = None;
    }
}

/// Up to a quarter of `delay`, so that many clients do not retry in lockstep.
fn jitter(delay: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(delay.subsec_nanos());
    let quarter = u64::try_from(delay.as_micros() / 4)
        .unwrap_or(u64::MAX)
        .max(1);
    Duration::from_micros(hasher.finish() % quarter)
}

#[cfg(test)]
mod tests;
