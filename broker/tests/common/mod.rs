//! Test support: a broker on 127.0.0.1:0 with a temporary data dir, and a small
//! raw-protocol client speaking through the real codec over TCP.

#![allow(dead_code)] // each test file uses a different part of this module

pub mod certs;
pub mod http;
mod queue_client;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tidings_broker::{Broker, BrokerHandle, Config};
use tidings_protocol::{
    ErrorCode, ErrorReply, Frame, FrameCodec, Hello, Message, PROTOCOL_VERSION, Publish, Stats,
    StatsReply, Subscribe, Unsubscribe,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

/// Upper bound for any single wait in a test: a broken test fails, never hangs.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestBroker {
    pub handle: BrokerHandle,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

pub async fn start() -> TestBroker {
    start_with(|_| {}).await
}

pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestBroker {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::for_test(dir.path());
    adjust(&mut config);
    let handle = Broker::start(config).await.expect("broker starts");
    TestBroker {
        addr: handle.local_addr(),
        handle,
        _dir: dir,
    }
}

pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A raw protocol client.
pub struct Client {
    pub stream: TcpStream,
    buf: BytesMut,
    codec: FrameCodec,
    next_request: u32,
}

impl Client {
    /// Connects without a handshake.
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = within("connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        Client::from_stream(stream)
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
            codec: FrameCodec::default(),
            next_request: 1,
        }
    }

    /// Connects and completes the handshake.
    pub async fn hello(addr: SocketAddr, name: &str) -> Client {
        let mut c = Client::connect(addr).await;
        c.handshake(name, None).await;
        c
    }

    pub async fn handshake(&mut self, name: &str, token: Option<&str>) {
        self.handshake_minor(name, token, None).await;
    }

    /// Connects and completes a handshake announcing this minor version.
    pub async fn hello_minor(addr: SocketAddr, name: &str, minor: Option<u16>) -> Client {
        let mut c = Client::connect(addr).await;
        c.handshake_minor(name, None, minor).await;
        c
    }

    /// HELLO with this minor version (`None`: a 1.0 client). From the WELCOME on,
    /// frames are decoded with the announced `max_frame_len` as their limit, so
    /// every test also checks that no server frame exceeds it.
    pub async fn handshake_minor(
        &mut self,
        name: &str,
        token: Option<&str>,
        minor: Option<u16>,
    ) -> tidings_protocol::Welcome {
        self.send(Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            client_name: name.into(),
            token: token.map(Into::into),
            minor,
            user: None,
        }))
        .await;
        match self.recv().await {
            Some(Frame::Welcome(w)) => {
                assert_eq!(w.version, PROTOCOL_VERSION);
                self.codec = FrameCodec::new(w.max_frame_len as usize);
                w
            }
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    pub fn request_id(&mut self) -> u32 {
        self.next_request += 1;
        self.next_request
    }

    pub async fn send(&mut self, frame: Frame) {
        let mut out = BytesMut::new();
        self.codec.encode(frame, &mut out).expect("encode");
        self.send_raw(&out).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        within("write", self.stream.write_all(bytes))
            .await
            .expect("write");
    }

    /// The next frame, or `None` at end of stream (or a reset).
    pub async fn recv(&mut self) -> Option<Frame> {
        within("a frame", self.recv_inner()).await
    }

    async fn recv_inner(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self
                .codec
                .decode(&mut self.buf)
                .expect("server sent a valid frame")
            {
                return Some(frame);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => {
                    assert!(self.buf.is_empty(), "stream ended inside a frame");
                    return None;
                }
                Ok(_) => {}
            }
        }
    }

    /// The next MESSAGE, failing on anything else.
    pub async fn message(&mut self) -> Message {
        match self.recv().await {
            Some(Frame::Message(m)) => m,
            other => panic!("expected MESSAGE, got {other:?}"),
        }
    }

    /// The next frame must be this ERROR.
    pub async fn expect_error(&mut self, code: ErrorCode) -> ErrorReply {
        match self.recv().await {
            Some(Frame::Error(e)) => {
                assert_eq!(e.error_code(), Some(code), "wrong code: {e:?}");
                assert!(!e.message.is_empty());
                e
            }
            other => panic!("expected ERROR {code:?}, got {other:?}"),
        }
    }

    /// The stream ends (after any frames the caller does not care about).
    pub async fn expect_closed(&mut self) {
        assert_eq!(self.recv().await, None, "expected the server to close");
    }

    pub async fn expect_ok(&mut self, request_id: u32) {
        match self.recv().await {
            Some(Frame::Ok(ok)) => assert_eq!(ok.request_id, request_id),
            other => panic!("expected OK {request_id}, got {other:?}"),
        }
    }

    pub async fn subscribe(&mut self, sid: u32, pattern: &str, group: Option<&str>) {
        let request_id = self.request_id();
        self.send(Frame::Subscribe(Subscribe {
            request_id,
            sid,
            pattern: pattern.into(),
            group: group.map(Into::into),
        }))
        .await;
        self.expect_ok(request_id).await;
    }

    pub async fn unsubscribe(&mut self, sid: u32) {
        let request_id = self.request_id();
        self.send(Frame::Unsubscribe(Unsubscribe { request_id, sid }))
            .await;
        self.expect_ok(request_id).await;
    }

    pub async fn publish(&mut self, topic: &str, payload: impl Into<Bytes>) {
        self.send(Frame::Publish(Publish::new(topic, payload)))
            .await;
    }

    /// Asks for stats and returns them; frames before the reply must not exist.
    pub async fn stats(&mut self) -> StatsReply {
        let request_id = self.request_id();
        self.send(Frame::Stats(Stats { request_id })).await;
        match self.recv().await {
            Some(Frame::StatsReply(s)) => {
                assert_eq!(s.request_id, request_id);
                s
            }
            other => panic!("expected STATS_REPLY, got {other:?}"),
        }
    }

    /// Reads and discards until the server closes; returns the frames seen.
    pub async fn drain_to_close(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(f) = self.recv().await {
            frames.push(f);
        }
        frames
    }
}

/// Lifts the soft descriptor limit to the hard one, for tests that hold thousands
/// of sockets; fails when the hard limit is below `need`.
pub fn raise_fd_limit(need: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    #[allow(unsafe_code)]
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(
        limit.rlim_cur >= need,
        "need {need} descriptors, the hard limit is {}",
        limit.rlim_cur
    );
}
