//! One client connection: the handshake, the read loop (which owns its buffer and
//! decodes frames itself so that non-fatal protocol errors are answered and reading
//! goes on), heartbeats, and the orderly close.
//!
//! A connection is two tasks: this reader, which handles each frame in turn, and the
//! writer ([`OutboxReceiver::write_to`](crate::outbox::OutboxReceiver::write_to)),
//! which drains the connection's [`Outbox`]. Everything sent to the client, from
//! replies to fan-out, goes through the outbox.

mod authorize;
mod handshake;
mod limits;
mod queue_state;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tidings_protocol::{
    ErrorCode, ErrorReply, Frame, FrameCodec, Hello, PROTOCOL_MINOR, PROTOCOL_VERSION, Ping,
    ProtocolError, Welcome,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, debug, info};

use crate::connections::NewConnection;
use crate::outbox::{ConnId, Outbox, OutboxLimits, WriterEnd};
use crate::shared::Shared;
use session::Session;

/// Read-buffer space made available before each read.
const READ_CHUNK: usize = 64 * 1024;
/// Read-buffer space before the HELLO is accepted: small, so that thousands of
/// unauthenticated connections hold little (the pre-auth frame limit bounds the
/// rest).
const PRE_AUTH_READ_CHUNK: usize = 1024;
/// After the last frame is written, how long to keep reading (and discarding) so
/// the peer sees our final frame before a reset caused by its unread data.
const LINGER: Duration = Duration::from_millis(500);
/// HELLOs with unknown flags answered before the handshake gives up.
const MAX_HELLO_PROBES: usize = 8;
/// How long a closing connection may take to flush what is queued for it.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Tokens a connection watches.
#[derive(Clone)]
pub(crate) struct Signals {
    /// Graceful shutdown: stop reading, flush, close.
    pub(crate) shutdown: CancellationToken,
    /// Shutdown deadline passed: stop flushing, close now.
    pub(crate) kill: CancellationToken,
}

/// How the read loop ended.
enum Ending {
    /// The peer closed, the socket failed, or the writer gave up: nothing to send.
    Quiet,
    /// Send this ERROR frame, flush, close.
    Error(ErrorReply),
}

/// An accepted connection's two halves (TCP's own, or TLS split), and what the
/// accept learned about the peer.
pub(crate) struct Transport<R, W> {
    pub(crate) read: R,
    pub(crate) write: W,
    pub(crate) peer: Option<SocketAddr>,
    /// Names in the client certificate TLS verified (empty without mutual TLS).
    pub(crate) certificate_names: Vec<String>,
}

/// Serves one accepted connection until it closes. Spawned once per connection,
/// inside a span carrying the peer address and (after the handshake) client name.
pub(crate) async fn serve<R, W>(
    transport: Transport<R, W>,
    conn: ConnId,
    shared: Arc<Shared>,
    signals: Signals,
    tracker: TaskTracker,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let limits = OutboxLimits::with_stall(
        shared.config.max_pending_bytes,
        shared.config.slow_consumer_stall,
    );
    let (outbox, receiver) = Outbox::with_limits(conn, limits, shared.stats.clone());
    let mut writer = tracker.spawn(
        receiver
            .write_to(transport.write)
            .instrument(Span::current()),
    );
    // Until the HELLO is accepted only a small frame may come, and only a small
    // buffer is held for it.
    let mut reader = Reader {
        half: transport.read,
        buf: BytesMut::with_capacity(PRE_AUTH_READ_CHUNK),
        chunk: PRE_AUTH_READ_CHUNK,
        codec: FrameCodec::for_server(shared.config.security.pre_auth_max_frame),
        activity: false,
        peer: transport.peer,
        certificate_names: transport.certificate_names,
    };
    let mut session = Session {
        conn,
        principal: crate::auth::Principal::Unrestricted,
        subscriptions: 0,
        outbox: outbox.clone(),
        shared: shared.clone(),
        queues: queue_state::QueueState::default(),
        memo: Default::default(),
        scratch: BytesMut::new(),
        listed: None,
    };

    let ending = reader.run(&mut session, &signals).await;

    // Stop routing to this connection before flushing, so the queue only shrinks.
    shared.router.remove_connection(conn);
    queue_state::connection_closed(&mut session).await;
    let last = match ending {
        Ending::Quiet => None,
        Ending::Error(err) => {
            let code = err.error_code();
            debug!(code = code.map(ErrorCode::name), message = %err.message, "closing with error");
            if let Some(code) = code {
                shared.stats.error(code);
            }
            Some(Frame::Error(err))
        }
    };
    outbox.close(last);
    let flushed = tokio::select! {
        end = &mut writer => end.ok(),
        _ = signals.kill.cancelled() => None,
        _ = tokio::time::sleep(FLUSH_TIMEOUT) => None,
    };
    let flushed = match flushed {
        Some(end) => end,
        None => {
            outbox.abort();
            writer.await.unwrap_or(WriterEnd::Aborted)
        }
    };
    if flushed == WriterEnd::Flushed {
        reader.linger(&signals.kill).await;
    }
    debug!("connection closed");
}

struct Reader<R> {
    half: R,
    buf: BytesMut,
    /// Space made available before each read.
    chunk: usize,
    codec: FrameCodec,
    /// Bytes arrived since the last heartbeat tick.
    activity: bool,
    peer: Option<SocketAddr>,
    certificate_names: Vec<String>,
}

/// How far [`Reader::dispatch_buffered`] got through the frames already read.
enum Dispatched {
    /// Every whole frame in the buffer is handled.
    All,
    /// This frame's work must still be awaited, before the rest are handled.
    Waiting(session::Rest),
    /// A fatal protocol error: the connection ends so.
    Fatal(Ending),
}

enum Read {
    Frame(Frame),
    /// A non-fatal protocol error; the frame was skipped.
    Skipped(ProtocolError),
    Closed,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// Decodes and handles the frames already in the buffer, without waiting for
    /// anything: up to the first whose work must be awaited.
    fn dispatch_buffered(&mut self, session: &mut Session) -> Dispatched {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(frame)) => {
                    if let Some(rest) = session.dispatch(frame) {
                        return Dispatched::Waiting(rest);
                    }
                }
                Ok(None) => return Dispatched::All,
                Err(err) if !err.is_fatal() => session.reply_error(
                    self.codec.failed_request_id().unwrap_or(0),
                    err.code(),
                    err.to_string(),
                ),
                Err(err) => {
                    let request_id = self.codec.failed_request_id().unwrap_or(0);
                    return Dispatched::Fatal(close_for(request_id, err.code(), err.to_string()));
                }
            }
        }
    }

    /// The next frame, or the end of the stream. Cancel safe: partial frames stay
    /// in `buf`, and `read_buf` either reads or does not.
    async fn next(&mut self, stats: &crate::stats::Stats) -> Result<Read, ProtocolError> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(frame)) => return Ok(Read::Frame(frame)),
                Ok(None) => {}
                Err(err) if !err.is_fatal() => return Ok(Read::Skipped(err)),
                Err(err) => return Err(err),
            }
            if !self.fill(stats).await {
                return Ok(Read::Closed);
            }
        }
    }

    /// Reads once more into `buf`; false when the peer has gone. Cancel safe, like
    /// `read_buf`.
    async fn fill(&mut self, stats: &crate::stats::Stats) -> bool {
        if self.buf.capacity() - self.buf.len() < self.chunk / 4 {
            self.buf.reserve(self.chunk);
        }
        match self.half.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                stats.bytes_in(n);
                self.activity = true;
                true
            }
        }
    }

    async fn run(&mut self, session: &mut Session, signals: &Signals) -> Ending {
        let shared = session.shared.clone();
        let stats = &shared.stats;
        let config = &shared.config;

        // Handshake: HELLO first, within the timeout.
        let hello: Hello = tokio::select! {
            biased;
            _ = signals.shutdown.cancelled() => return shutting_down(),
            _ = session.outbox.aborted() => return Ending::Quiet,
            _ = tokio::time::sleep(config.handshake_timeout) => {
                return close(ErrorCode::HandshakeTimeout, format!("no HELLO within {:?}", config.handshake_timeout));
            }
            hello = self.handshake(stats, &session.outbox) => match hello {
                Ok(hello) => hello,
                Err(ending) => return ending,
            },
        };
        if hello.version != PROTOCOL_VERSION {
            return close(
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {} is not supported; this server speaks {PROTOCOL_VERSION}",
                    hello.version
                ),
            );
        }
        let arrived = Instant::now();
        session.principal = match handshake::authenticate(
            &shared,
            &hello,
            self.peer,
            &self.certificate_names,
            arrived,
            signals,
        )
        .await
        {
            Ok(principal) => principal,
            Err(ending) => return ending,
        };
        // Authenticated: frames up to the full size from now on.
        self.codec = FrameCodec::for_server(config.max_frame_len());
        self.chunk = READ_CHUNK;
        Span::current().record("client", hello.client_name.as_str());
        if let Some(user) = session.principal.user_name() {
            Span::current().record("user", user);
        }
        // The session speaks the lower of the two minor versions; a HELLO without
        // one is a 1.0 client, which is sent nothing 1.0 does not define.
        let minor = hello.minor.map(|m| m.min(PROTOCOL_MINOR));
        session.outbox.set_protocol_minor(minor.unwrap_or(0));
        debug!(minor = minor.unwrap_or(0), "handshake complete");
        session.queues = queue_state::QueueState::new(&shared.queues, &session.outbox);
        let closed_by_operator = CancellationToken::new();
        session.listed = Some(
            shared.connections.register(NewConnection {
                id: session.conn.0,
                // Unknown only when the socket could not say (the accept logged it).
                peer: self
                    .peer
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                client_name: hello.client_name.to_string(),
                user: session.principal.user_name().map(str::to_owned),
                queue_session: session.queues.session_id(),
                outbox: session.outbox.clone(),
                close: closed_by_operator.clone(),
            }),
        );
        session.reply(Frame::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            server_version: env!("CARGO_PKG_VERSION").into(),
            max_frame_len: u32::try_from(config.max_frame_len()).unwrap_or(u32::MAX),
            max_payload: u32::try_from(config.max_payload).unwrap_or(u32::MAX),
            heartbeat_ms: u32::try_from(config.heartbeat.as_millis()).unwrap_or(u32::MAX),
            minor,
            // A 1.1 addition: a 1.0 client gets the 1.0 layout.
            max_credit: minor
                .filter(|m| *m >= 1)
                .map(|_| shared.queues.engine.max_credit()),
        }));

        // Established: frames until the peer leaves, an error closes, or shutdown.
        let heartbeat_on = !config.heartbeat.is_zero();
        let period = if heartbeat_on {
            config.heartbeat
        } else {
            Duration::from_secs(3600)
        };
        let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut unanswered = 0u32;
        self.activity = false;
        loop {
            // Every frame already in the buffer is handled before the next select:
            // one pass of the select per read, not per frame. Frames are decoded
            // and dispatched in place, never carried through the select's output.
            // The queue writes of one read wake the store thread once, at its end
            // (or before a frame that must wait): so a read's publishes share a round.
            loop {
                let step = {
                    let _wakes = shared.queues.engine.defer_store_wakes();
                    self.dispatch_buffered(session)
                };
                match step {
                    Dispatched::All => break,
                    Dispatched::Waiting(rest) => session.finish(rest).await,
                    Dispatched::Fatal(ending) => return ending,
                }
            }
            let open = tokio::select! {
                biased;
                _ = signals.shutdown.cancelled() => return shutting_down(),
                _ = session.outbox.aborted() => return Ending::Quiet,
                // Flush what is queued, then tell the client why it ends.
                _ = closed_by_operator.cancelled() => {
                    info!("closed by an operator over HTTP");
                    return close(ErrorCode::ClosedByOperator, "closed by an operator");
                }
                _ = ticker.tick(), if heartbeat_on => {
                    if std::mem::take(&mut self.activity) {
                        unanswered = 0;
                    } else if unanswered >= config.missed_heartbeats {
                        info!(missed = unanswered, "heartbeat timeout");
                        return close(ErrorCode::HeartbeatTimeout, format!("no answer to {unanswered} heartbeats"));
                    } else {
                        unanswered += 1;
                        session.reply(Frame::Ping(Ping));
                    }
                    continue;
                }
                open = self.fill(stats) => open,
            };
            if !open {
                return Ending::Quiet;
            }
        }
    }

    /// Reads until the HELLO. Anything else first closes the connection, except a
    /// HELLO with flags this server does not know: it is answered `UnknownFlags`
    /// and the client may send another HELLO (so that newer fields can be probed),
    /// a few times, within the handshake timeout.
    async fn handshake(
        &mut self,
        stats: &crate::stats::Stats,
        outbox: &Outbox,
    ) -> Result<Hello, Ending> {
        for _ in 0..MAX_HELLO_PROBES {
            match self.next(stats).await {
                Ok(Read::Frame(Frame::Hello(hello))) => return Ok(hello),
                Ok(Read::Frame(other)) => {
                    return Err(close(
                        ErrorCode::HandshakeRequired,
                        format!("{} before HELLO; the handshake comes first", other.name()),
                    ));
                }
                Ok(Read::Skipped(err @ ProtocolError::UnknownFlags { frame: "HELLO", .. })) => {
                    stats.error(err.code());
                    let _ = outbox.send(Frame::Error(ErrorReply::new(
                        0,
                        err.code(),
                        err.to_string(),
                    )));
                }
                Ok(Read::Skipped(err)) => {
                    return Err(close(
                        ErrorCode::HandshakeRequired,
                        format!("{err} before HELLO"),
                    ));
                }
                Ok(Read::Closed) => return Err(Ending::Quiet),
                Err(err) => return Err(close(err.code(), err.to_string())),
            }
        }
        Err(close(
            ErrorCode::HandshakeRequired,
            format!("{MAX_HELLO_PROBES} HELLOs with unknown flags; no usable HELLO"),
        ))
    }

    /// After the final frame went out: read and discard until the peer closes or a
    /// short while passes, so closing with unread input does not reset the
    /// connection before the peer has read our last frame.
    async fn linger(&mut self, kill: &CancellationToken) {
        let deadline = tokio::time::sleep(LINGER);
        tokio::pin!(deadline);
        loop {
            self.buf.clear();
            if self.buf.capacity() < 4096 {
                self.buf.reserve(4096);
            }
            tokio::select! {
                _ = &mut deadline => return,
                _ = kill.cancelled() => return,
                r = self.half.read_buf(&mut self.buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
            }
        }
    }
}

fn close(code: ErrorCode, message: impl Into<String>) -> Ending {
    close_for(0, code, message)
}

/// Closing because of the frame with this request id (0 if none).
fn close_for(request_id: u32, code: ErrorCode, message: impl Into<String>) -> Ending {
    let message: String = message.into();
    Ending::Error(ErrorReply::new(request_id, code, message))
}

fn shutting_down() -> Ending {
    close(ErrorCode::ShuttingDown, "the server is shutting down")
}
