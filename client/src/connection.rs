//! The connection task: the one task that owns the socket. It performs the
//! handshake, turns [`Command`]s from handles into frames (coalesced into one buffer
//! and one write), routes incoming frames to subscriptions, consumers and waiting
//! calls, answers heartbeats, and reconnects, restoring subscriptions and consumers,
//! when the connection drops.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Waker;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tidings_protocol::{
    Ack, Cancel, Consume, Credit, ErrorCode, Frame, FrameCodec, Hello, Nack, PROTOCOL_VERSION,
    Ping, Pong, Publish, Subscribe, Text, Unsubscribe, Welcome,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::client::{ConnState, Handle};
use crate::consumer::Delivery;
use crate::error::{CallError, ConnectError, ServerError};
use crate::events::Event;
use crate::message::Message;
use crate::options::ClientBuilder;
use crate::sub_buffer::{Push, SubBuffer};

/// The subscription id of the client's private request inbox.
pub(crate) const INBOX_SID: u32 = 0;

/// Stop taking commands once this much is waiting to be written, so a slow socket
/// pushes back on publishers (through the byte budget) instead of growing a buffer.
const HIGH_WATER: usize = 256 * 1024;

/// Most ids in one ACK or NACK frame (8 bytes each, far below any frame limit).
const MAX_IDS_PER_FRAME: usize = 8192;

/// The answer channel of a call.
pub(crate) type Reply = oneshot::Sender<Result<tidings_protocol::Frame, CallError>>;

/// What handles ask the connection task to do. Kept apart from wire frames: the
/// task decides ids, batching and what to restore after a reconnect.
pub(crate) enum Command {
    /// Fire-and-forget publish; the permit holds its share of the byte budget until
    /// the frame is written.
    Publish {
        frame: Publish,
        permit: OwnedSemaphorePermit,
    },
    /// A frame the broker answers under request id `id`.
    Call {
        id: u32,
        frame: Frame,
        reply: Reply,
    },
    Subscribe {
        id: u32,
        sid: u32,
        pattern: Text,
        group: Option<Text>,
        buffer: Arc<SubBuffer>,
        stalls: Arc<AtomicU64>,
        reply: Reply,
    },
    Unsubscribe {
        sid: u32,
        reply: Option<Reply>,
    },
    /// A request: `frame` carries `id`, check-responders and a reply topic ending in
    /// `token`.
    Request {
        id: u32,
        token: u64,
        frame: Publish,
        reply: oneshot::Sender<Result<Message, CallError>>,
    },
    Consume {
        id: u32,
        cid: u32,
        queue: Text,
        prefetch: u32,
        tx: mpsc::Sender<Delivery>,
        reply: Reply,
    },
    Cancel {
        cid: u32,
        reply: Option<Reply>,
    },
    Credit {
        cid: u32,
        credit: u32,
    },
    Ack {
        epoch: u64,
        delivery_id: u64,
    },
    Nack {
        epoch: u64,
        delivery_id: u64,
        delay_ms: Option<u64>,
    },
    /// Answered `true` once everything queued before it is written, `false` if the
    /// connection drops first.
    Flush {
        reply: oneshot::Sender<bool>,
    },
}

/// A connected, handshaken socket.
pub(crate) struct Opened {
    stream: TcpStream,
    welcome: Welcome,
    rbuf: BytesMut,
}

impl Opened {
    pub(crate) fn max_payload(&self) -> usize {
        usize::try_from(self.welcome.max_payload).unwrap_or(usize::MAX)
    }
}

/// Dials the broker and performs the handshake, all under the connect timeout.
pub(crate) async fn open(opts: &ClientBuilder) -> Result<Opened, ConnectError> {
    let addr = opts.addr.clone();
    let attempt = async {
        let mut stream = TcpStream::connect(&addr)
            .await
            .map_err(|source| ConnectError::Io {
                addr: addr.clone(),
                source,
            })?;
        // Requests and acks are small; Nagle would add latency to every one of them.
        let _ = stream.set_nodelay(true);
        let (welcome, rbuf) = handshake(&mut stream, opts).await?;
        Ok(Opened {
            stream,
            welcome,
            rbuf,
        })
    };
    match tokio::time::timeout(opts.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::TimedOut {
            addr: opts.addr.clone(),
            after: opts.connect_timeout,
        }),
    }
}

/// HELLO → WELCOME or ERROR. Returns the welcome and whatever was read past it.
pub(crate) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    opts: &ClientBuilder,
) -> Result<(Welcome, BytesMut), ConnectError> {
    let addr = &opts.addr;
    let hello = Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        client_name: Text::from(opts.name.as_str()),
        token: opts.token.as_deref().map(Text::from),
        user: None,
    });
    let mut wbuf = BytesMut::new();
    let protocol = |source| ConnectError::Protocol {
        addr: addr.clone(),
        source,
    };
    hello.encode(&mut wbuf).map_err(protocol)?;
    let io_err = |source| ConnectError::Io {
        addr: addr.clone(),
        source,
    };
    io.write_all(&wbuf).await.map_err(io_err)?;
    io.flush().await.map_err(io_err)?;
    let mut codec = FrameCodec::default();
    let mut rbuf = BytesMut::with_capacity(8 * 1024);
    loop {
        if let Some(frame) = codec.decode(&mut rbuf).map_err(protocol)? {
            return match frame {
                Frame::Welcome(welcome) => Ok((welcome, rbuf)),
                Frame::Error(e) => Err(ConnectError::Refused {
                    addr: addr.clone(),
                    error: ServerError::from(&e),
                }),
                other => Err(ConnectError::UnexpectedFrame {
                    addr: addr.clone(),
                    frame: other.name(),
                }),
            };
        }
        if io.read_buf(&mut rbuf).await.map_err(io_err)? == 0 {
            return Err(ConnectError::Closed { addr: addr.clone() });
        }
    }
}

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
    tx: mpsc::Sender<Delivery>,
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
    /// A message whose subscription's buffer was full: reading stops until it
    /// is buffered (backpressure, never a drop).
    stalled: Option<(u32, Message)>,
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
            subs: HashMap::new(),
            consumers: HashMap::new(),
            pending: HashMap::new(),
            requests: HashMap::new(),
            inbox_wanted: false,
            inbox_subscribed: false,
            acks: Vec::new(),
            nacks: Vec::new(),
            wbuf: BytesMut::with_capacity(64 * 1024),
            held: Vec::new(),
            flushes: Vec::new(),
            epoch,
            stalled: None,
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
                    let _ = self
                        .handle
                        .shared
                        .events
                        .send(Event::Reconnected { attempts: failures });
                }
                first = false;
                failures = 0;
                self.handle
                    .shared
                    .max_payload
                    .store(opened.max_payload(), Ordering::Relaxed);
                let heartbeat = match opened.welcome.heartbeat_ms {
                    0 => None,
                    ms => Some(Duration::from_millis(u64::from(ms))),
                };
                self.restore();
                let _ = self.state_tx.send(ConnState::Connected);
                let (reader, writer) = opened.stream.into_split();
                let end = self.session(reader, writer, opened.rbuf, heartbeat).await;
                let _ = self.state_tx.send(ConnState::Disconnected);
                self.on_disconnect();
                match end {
                    SessionEnd::Closed => break,
                    SessionEnd::Lost(reason) => {
                        warn!(%reason, "connection lost");
                        let _ = self
                            .handle
                            .shared
                            .events
                            .send(Event::Disconnected { reason });
                    }
                }
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
            self.send_tracked(request_id, &frame, Pending::Subscribe { sid, reply: None });
        }
        let consumers: Vec<(u32, Text, u32)> = self
            .consumers
            .iter()
            .map(|(cid, c)| (*cid, c.queue.clone(), c.window))
            .collect();
        for (cid, queue, credit) in consumers {
            let request_id = self.handle.shared.next_id();
            let frame = Frame::Consume(Consume {
                request_id,
                consumer_id: cid,
                queue,
                credit,
            });
            self.send_tracked(request_id, &frame, Pending::Consume { cid, reply: None });
        }
    }

    fn on_disconnect(&mut self) {
        for (_, pending) in self.pending.drain() {
            match pending {
                Pending::Call(reply) => {
                    let _ = reply.send(Err(CallError::ConnectionLost));
                }
                Pending::Subscribe {
                    sid,
                    reply: Some(reply),
                } => {
                    self.subs.remove(&sid);
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
    }

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
        self.stalled = None;
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
            let was_stalled = self.stalled.is_some();
            let stalled = self.stalled_buffer();
            if was_stalled && self.stalled.is_none() {
                // A held message was for a subscription that ended: go on with
                // the frames behind it.
                if let Err(end) = self.decode_all(&mut rbuf) {
                    return end;
                }
            }
            let reading = self.stalled.is_none();
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

    fn written_all(&mut self) {
        self.held.clear();
        for flush in self.flushes.drain(..) {
            let _ = flush.send(true);
        }
    }

    /// Takes whatever else is queued, so it all goes out in one write.
    fn drain_commands(&mut self) {
        while self.wbuf.len() < HIGH_WATER {
            match self.rx.try_recv() {
                Ok(cmd) => self.command(cmd),
                Err(_) => break,
            }
        }
    }

    fn drain_commands_all(&mut self) {
        while let Ok(cmd) = self.rx.try_recv() {
            self.command(cmd);
        }
    }

    /// Handles every whole frame in `rbuf`, unless a full subscription stops it;
    /// then wakes the subscriptions that got messages.
    fn decode_all(&mut self, rbuf: &mut BytesMut) -> Result<(), SessionEnd> {
        let result = self.decode_frames(rbuf);
        self.wake_subscriptions();
        result
    }

    fn decode_frames(&mut self, rbuf: &mut BytesMut) -> Result<(), SessionEnd> {
        while self.stalled.is_none() {
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

    /// Appends a frame to the write buffer. Only frames with fields too long for
    /// their length prefix fail; they are reported and left out.
    fn encode(&mut self, frame: &Frame) -> bool {
        match frame.encode(&mut self.wbuf) {
            Ok(()) => true,
            Err(error) => {
                warn!(%error, frame = frame.name(), "cannot encode frame");
                false
            }
        }
    }

    fn send_tracked(&mut self, request_id: u32, frame: &Frame, pending: Pending) {
        if self.encode(frame) {
            self.pending.insert(request_id, pending);
        } else {
            self.complete(
                request_id,
                pending,
                Err(CallError::Server(ServerError {
                    raw_code: ErrorCode::MalformedFrame as u16,
                    message: format!("{} frame cannot be encoded", frame.name()),
                })),
            );
        }
    }

    fn subscribe_inbox(&mut self) {
        self.inbox_wanted = true;
        if self.inbox_subscribed {
            return;
        }
        self.inbox_subscribed = true;
        let request_id = self.handle.shared.next_id();
        let pattern = Text::from(format!("{}.>", self.handle.shared.inbox));
        let frame = Frame::Subscribe(Subscribe {
            request_id,
            sid: INBOX_SID,
            pattern,
            group: None,
        });
        self.send_tracked(request_id, &frame, Pending::Ignore("SUBSCRIBE (inbox)"));
    }

    fn command(&mut self, cmd: Command) {
        // Acks gathered so far go out before any other frame, so that the wire keeps
        // the order the user acted in (an ack, then a cancel, must not be reordered
        // into a cancel that returns the delivery, then an unknown ack).
        if !matches!(cmd, Command::Ack { .. } | Command::Nack { .. }) {
            self.encode_acks();
        }
        match cmd {
            Command::Publish { frame, permit } => {
                if self.encode(&Frame::Publish(frame)) {
                    self.held.push(permit);
                }
            }
            Command::Call { id, frame, reply } => {
                self.send_tracked(id, &frame, Pending::Call(reply));
            }
            Command::Subscribe {
                id,
                sid,
                pattern,
                group,
                buffer,
                stalls,
                reply,
            } => {
                let frame = Frame::Subscribe(Subscribe {
                    request_id: id,
                    sid,
                    pattern: pattern.clone(),
                    group: group.clone(),
                });
                self.subs.insert(
                    sid,
                    Sub {
                        pattern,
                        group,
                        buffer,
                        stalls,
                    },
                );
                self.send_tracked(
                    id,
                    &frame,
                    Pending::Subscribe {
                        sid,
                        reply: Some(reply),
                    },
                );
            }
            Command::Unsubscribe { sid, reply } => {
                if self.subs.remove(&sid).is_some() {
                    self.send_unsubscribe(sid, reply);
                } else if let Some(reply) = reply {
                    let _ = reply.send(Ok(Frame::Ok(tidings_protocol::OkReply { request_id: 0 })));
                }
            }
            Command::Request {
                id,
                token,
                frame,
                reply,
            } => {
                self.subscribe_inbox();
                if self.encode(&Frame::Publish(frame)) {
                    self.pending.insert(id, Pending::Request(token));
                    self.requests.insert(token, (id, reply));
                }
            }
            Command::Consume {
                id,
                cid,
                queue,
                prefetch,
                tx,
                reply,
            } => {
                let frame = Frame::Consume(Consume {
                    request_id: id,
                    consumer_id: cid,
                    queue: queue.clone(),
                    credit: prefetch,
                });
                self.consumers.insert(
                    cid,
                    ConsumerEntry {
                        queue,
                        window: prefetch,
                        tx,
                    },
                );
                self.send_tracked(
                    id,
                    &frame,
                    Pending::Consume {
                        cid,
                        reply: Some(reply),
                    },
                );
            }
            Command::Cancel { cid, reply } => {
                if self.consumers.remove(&cid).is_some() {
                    let request_id = self.handle.shared.next_id();
                    let frame = Frame::Cancel(Cancel {
                        request_id,
                        consumer_id: cid,
                    });
                    let pending = match reply {
                        Some(reply) => Pending::Call(reply),
                        None => Pending::Ignore("CANCEL"),
                    };
                    self.send_tracked(request_id, &frame, pending);
                } else if let Some(reply) = reply {
                    let _ = reply.send(Ok(Frame::Ok(tidings_protocol::OkReply { request_id: 0 })));
                }
            }
            Command::Credit { cid, credit } => {
                if let Some(consumer) = self.consumers.get_mut(&cid) {
                    consumer.window = consumer.window.saturating_add(credit);
                    self.encode(&Frame::Credit(Credit {
                        consumer_id: cid,
                        credit,
                    }));
                }
            }
            Command::Ack { epoch, delivery_id } => {
                if epoch == self.epoch {
                    self.acks.push(delivery_id);
                }
            }
            Command::Nack {
                epoch,
                delivery_id,
                delay_ms,
            } => {
                if epoch == self.epoch {
                    self.push_nack(delivery_id, delay_ms);
                }
            }
            Command::Flush { reply } => {
                if self.wbuf.is_empty() {
                    let _ = reply.send(true);
                } else {
                    self.flushes.push(reply);
                }
            }
        }
    }

    fn push_nack(&mut self, delivery_id: u64, delay_ms: Option<u64>) {
        match self.nacks.iter_mut().find(|(d, _)| *d == delay_ms) {
            Some((_, ids)) => ids.push(delivery_id),
            None => self.nacks.push((delay_ms, vec![delivery_id])),
        }
    }

    fn send_unsubscribe(&mut self, sid: u32, reply: Option<Reply>) {
        let request_id = self.handle.shared.next_id();
        let frame = Frame::Unsubscribe(Unsubscribe { request_id, sid });
        let pending = match reply {
            Some(reply) => Pending::Call(reply),
            None => Pending::Ignore("UNSUBSCRIBE"),
        };
        self.send_tracked(request_id, &frame, pending);
    }

    /// Acks and nacks collected since the last write go out as one frame each.
    fn encode_acks(&mut self) {
        while !self.acks.is_empty() {
            let take = self.acks.len().min(MAX_IDS_PER_FRAME);
            let ids: Vec<u64> = self.acks.drain(..take).collect();
            let request_id = self.handle.shared.next_id();
            let frame = Frame::Ack(Ack { request_id, ids });
            self.send_tracked(request_id, &frame, Pending::Ignore("ACK"));
        }
        for (delay_ms, mut ids) in std::mem::take(&mut self.nacks) {
            while !ids.is_empty() {
                let take = ids.len().min(MAX_IDS_PER_FRAME);
                let chunk: Vec<u64> = ids.drain(..take).collect();
                let request_id = self.handle.shared.next_id();
                let frame = Frame::Nack(Nack {
                    request_id,
                    delay_ms,
                    ids: chunk,
                });
                self.send_tracked(request_id, &frame, Pending::Ignore("NACK"));
            }
        }
    }

    /// Forgets requests whose caller stopped waiting (timed out or dropped).
    fn sweep(&mut self) {
        let pending = &mut self.pending;
        self.requests.retain(|_, (id, reply)| {
            let keep = !reply.is_closed();
            if !keep {
                pending.remove(id);
            }
            keep
        });
    }

    fn frame(&mut self, frame: Frame) -> Result<(), SessionEnd> {
        match frame {
            Frame::Ping(_) => {
                self.encode(&Frame::Pong(Pong));
            }
            Frame::Pong(_) => {}
            Frame::Message(m) if m.sid == INBOX_SID => self.inbox_message(m),
            Frame::Message(m) => self.sub_message(m),
            Frame::Delivery(d) => self.delivery(d),
            Frame::Error(e) if !self.pending.contains_key(&e.request_id) => {
                let error = ServerError::from(&e);
                warn!(request_id = e.request_id, %error, "error from the broker");
                if e.error_code().is_some_and(ErrorCode::closes_connection) {
                    return Err(SessionEnd::Lost(error.to_string()));
                }
            }
            Frame::Error(e) => {
                if let Some(pending) = self.pending.remove(&e.request_id) {
                    self.complete(e.request_id, pending, Err(CallError::Server((&e).into())));
                }
            }
            other => match other.request_id() {
                Some(id) => match self.pending.remove(&id) {
                    Some(pending) => self.complete(id, pending, Ok(other)),
                    None => debug!(request_id = id, frame = other.name(), "unmatched answer"),
                },
                None => debug!(frame = other.name(), "ignoring unexpected frame"),
            },
        }
        Ok(())
    }

    fn complete(&mut self, id: u32, pending: Pending, result: Result<Frame, CallError>) {
        match pending {
            Pending::Call(reply) => {
                let _ = reply.send(result);
            }
            Pending::Subscribe { sid, reply } => {
                if let Err(error) = &result {
                    self.subs.remove(&sid);
                    if reply.is_none() {
                        warn!(sid, ?error, "could not restore subscription; ending it");
                    }
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Pending::Consume { cid, reply } => {
                if let Err(error) = &result {
                    self.consumers.remove(&cid);
                    if reply.is_none() {
                        warn!(cid, ?error, "could not restore consumer; ending it");
                    }
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Pending::Request(token) => match result {
                // Check-responders passed; the reply itself comes to the inbox.
                Ok(_) => {}
                Err(error) => {
                    if let Some((_, reply)) = self.requests.remove(&token) {
                        let _ = reply.send(Err(error));
                    }
                }
            },
            Pending::Ignore(what) => {
                if let Err(error) = result {
                    warn!(request_id = id, frame = what, ?error, "broker refused");
                }
            }
        }
    }

    fn inbox_message(&mut self, m: tidings_protocol::Message) {
        let token = m
            .topic
            .rsplit('.')
            .next()
            .and_then(|t| t.parse::<u64>().ok());
        let Some((id, reply)) = token.and_then(|t| self.requests.remove(&t)) else {
            debug!(topic = %m.topic, "reply for no waiting request (late or duplicate)");
            return;
        };
        self.pending.remove(&id);
        let _ = reply.send(Ok(Message::from_frame(m, &self.handle)));
    }

    fn sub_message(&mut self, m: tidings_protocol::Message) {
        let sid = m.sid;
        if !self.subs.contains_key(&sid) {
            // Raced with an unsubscribe; the broker stops soon.
            return;
        }
        self.push_to(sid, Message::from_frame(m, &self.handle));
    }

    /// Buffers a message for subscription `sid`; when its buffer is full, the
    /// message is held and reading stops until the subscription makes room.
    fn push_to(&mut self, sid: u32, m: Message) {
        let Some(sub) = self.subs.get(&sid) else {
            return;
        };
        match sub.buffer.push(m) {
            Push::Queued(Some(waker)) => self.wakers.push(waker),
            Push::Queued(None) => {}
            Push::Full(m) => {
                sub.stalls.fetch_add(1, Ordering::Relaxed);
                self.stalled = Some((sid, m));
            }
            Push::Gone => {
                self.subs.remove(&sid);
                self.send_unsubscribe(sid, None);
            }
        }
    }

    /// Retries the held message once its subscription made room.
    fn retry_stalled(&mut self) {
        if let Some((sid, m)) = self.stalled.take() {
            self.push_to(sid, m);
        }
        self.wake_subscriptions();
    }

    /// Wakes each subscription that got messages since the last call: once per
    /// read, not once per message.
    fn wake_subscriptions(&mut self) {
        for waker in self.wakers.drain(..) {
            waker.wake();
        }
    }

    /// The buffer of the subscription the held message waits for.
    fn stalled_buffer(&mut self) -> Option<Arc<SubBuffer>> {
        let sid = self.stalled.as_ref()?.0;
        match self.subs.get(&sid) {
            Some(sub) => Some(sub.buffer.clone()),
            None => {
                // Unsubscribed meanwhile: its message goes nowhere.
                self.stalled = None;
                None
            }
        }
    }

    fn delivery(&mut self, d: tidings_protocol::Delivery) {
        let delivery_id = d.delivery_id;
        let refused = match self.consumers.get(&d.consumer_id) {
            Some(consumer) => consumer
                .tx
                .try_send(Delivery::new(d, self.epoch, self.handle.clone()))
                .is_err(),
            None => true,
        };
        if refused {
            // Nobody can take it (consumer gone or its buffer full): hand it back
            // at once rather than let it sit until its ack timeout.
            self.push_nack(delivery_id, None);
        }
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
