//! TLS on the listener, with certificates made by rcgen in each test: a round trip
//! over TLS, mutual TLS refusing a missing, foreign-CA or expired client
//! certificate, a client certificate naming a user, plaintext against the TLS port
//! closed early, and a certificate reload taking effect without dropping
//! established connections.

mod common;

use bytes::BytesMut;
use common::certs::{self, BrokerFiles, Ca};
use common::{WAIT, within};
use tidings_broker::auth::UserEntry;
use tidings_protocol::{ErrorCode, Frame, FrameCodec, Hello, Publish, Subscribe};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};

/// Frames over any stream (TLS here).
struct Framed<S> {
    io: S,
    buf: BytesMut,
    codec: FrameCodec,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    fn new(io: S) -> Self {
        Framed {
            io,
            buf: BytesMut::new(),
            codec: FrameCodec::default(),
        }
    }

    async fn send(&mut self, frame: Frame) {
        let mut out = BytesMut::new();
        self.codec.encode(frame, &mut out).unwrap();
        within("write", self.io.write_all(&out)).await.unwrap();
        within("flush", self.io.flush()).await.unwrap();
    }

    /// The next frame; `None` at end of stream or on a TLS/socket error.
    async fn recv(&mut self) -> Option<Frame> {
        within("a frame", async {
            loop {
                if let Some(f) = self.codec.decode(&mut self.buf).unwrap() {
                    return Some(f);
                }
                match self.io.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
    }

    async fn hello(&mut self, user: Option<&str>) -> Option<Frame> {
        let mut hello = Hello::new("tls-test");
        hello.user = user.map(Into::into);
        self.send(Frame::Hello(hello)).await;
        self.recv().await
    }
}

async fn tls_broker(
    files: &BrokerFiles,
    mutual: bool,
    users: Vec<UserEntry>,
) -> common::TestBroker {
    let (cert, key, ca) = (
        files.cert.clone(),
        files.key.clone(),
        files.client_ca.clone(),
    );
    common::start_with(move |c| {
        c.security.tls_cert = Some(cert);
        c.security.tls_key = Some(key);
        if mutual {
            c.security.tls_client_ca = Some(ca);
        }
        c.security.users = users;
    })
    .await
}

#[tokio::test]
async fn round_trip_over_tls() {
    let ca = Ca::new("test CA");
    let files = BrokerFiles::write(&ca.server(), &ca);
    let broker = tls_broker(&files, false, vec![]).await;
    let connector = certs::connector(&ca, None);

    let mut sub = Framed::new(certs::dial(&connector, broker.addr).await.unwrap());
    assert!(matches!(sub.hello(None).await, Some(Frame::Welcome(_))));
    sub.send(Frame::Subscribe(Subscribe {
        request_id: 1,
        sid: 1,
        pattern: "secure.>".into(),
        group: None,
    }))
    .await;
    assert!(matches!(sub.recv().await, Some(Frame::Ok(_))));

    let mut publisher = Framed::new(certs::dial(&connector, broker.addr).await.unwrap());
    assert!(matches!(
        publisher.hello(None).await,
        Some(Frame::Welcome(_))
    ));
    publisher
        .send(Frame::Publish(Publish::new(
            "secure.hello",
            &b"over tls"[..],
        )))
        .await;
    match sub.recv().await {
        Some(Frame::Message(m)) => {
            assert_eq!(m.topic, "secure.hello");
            assert_eq!(&m.payload[..], b"over tls");
        }
        other => panic!("expected MESSAGE, got {other:?}"),
    }
    broker.handle.shutdown().await;
}

/// The TLS handshake itself must fail, or the first read after it must see the
/// connection closed without a WELCOME (TLS 1.3 reports a refused client
/// certificate only after the client's handshake has finished).
async fn expect_refused(connector: &tokio_rustls::TlsConnector, addr: std::net::SocketAddr) {
    match certs::dial(connector, addr).await {
        Err(_) => {}
        Ok(stream) => {
            let mut framed = Framed::new(stream);
            let mut hello = Hello::new("refused");
            hello.user = None;
            let mut out = BytesMut::new();
            framed.codec.encode(Frame::Hello(hello), &mut out).unwrap();
            // The write may fail already; either way no WELCOME may come.
            let _ = framed.io.write_all(&out).await;
            let _ = framed.io.flush().await;
            assert_eq!(framed.recv().await, None, "expected the server to refuse");
        }
    }
}

#[tokio::test]
async fn mutual_tls_refuses_missing_foreign_and_expired_certificates() {
    let ca = Ca::new("test CA");
    let other_ca = Ca::new("someone else's CA");
    let files = BrokerFiles::write(&ca.server(), &ca);
    let broker = tls_broker(&files, true, vec![]).await;

    expect_refused(&certs::connector(&ca, None), broker.addr).await;
    let foreign = other_ca.client("svc");
    expect_refused(&certs::connector(&ca, Some(&foreign)), broker.addr).await;
    let expired = ca.expired_client("svc");
    expect_refused(&certs::connector(&ca, Some(&expired)), broker.addr).await;

    // A good certificate still gets in.
    let good = ca.client("svc");
    let mut ok = Framed::new(
        certs::dial(&certs::connector(&ca, Some(&good)), broker.addr)
            .await
            .unwrap(),
    );
    assert!(matches!(ok.hello(None).await, Some(Frame::Welcome(_))));
    broker.handle.shutdown().await;
}

#[tokio::test]
async fn client_certificate_names_a_user() {
    let ca = Ca::new("test CA");
    let files = BrokerFiles::write(&ca.server(), &ca);
    let users = vec![UserEntry {
        name: "svc".into(),
        certificate: true,
        publish: tidings_broker::auth::users::TopicRulesEntry {
            allow: vec!["svc.>".into()],
            deny: vec![],
        },
        ..UserEntry::default()
    }];
    let broker = tls_broker(&files, true, users).await;

    // The certificate's common name is the user: no password needed.
    let leaf = ca.client("svc");
    let connector = certs::connector(&ca, Some(&leaf));
    let mut c = Framed::new(certs::dial(&connector, broker.addr).await.unwrap());
    assert!(matches!(
        c.hello(Some("svc")).await,
        Some(Frame::Welcome(_))
    ));
    let mut publish = Publish::new("other.topic", &b"x"[..]);
    publish.request_id = Some(7);
    publish.confirm = true;
    c.send(Frame::Publish(publish)).await;
    match c.recv().await {
        Some(Frame::Error(e)) => {
            assert_eq!(e.error_code(), Some(ErrorCode::PermissionDenied));
            assert_eq!(e.request_id, 7);
        }
        other => panic!("expected PermissionDenied, got {other:?}"),
    }

    // A certificate for another name does not log in as `svc`.
    let leaf = ca.client("intruder");
    let connector = certs::connector(&ca, Some(&leaf));
    let mut c = Framed::new(certs::dial(&connector, broker.addr).await.unwrap());
    match c.hello(Some("svc")).await {
        Some(Frame::Error(e)) => assert_eq!(e.error_code(), Some(ErrorCode::AuthFailed)),
        other => panic!("expected AuthFailed, got {other:?}"),
    }
    broker.handle.shutdown().await;
}

#[tokio::test]
async fn plaintext_against_the_tls_port_is_closed() {
    let ca = Ca::new("test CA");
    let files = BrokerFiles::write(&ca.server(), &ca);
    let broker = tls_broker(&files, false, vec![]).await;
    let mut c = common::Client::connect(broker.addr).await;
    // A plaintext HELLO, then a length prefix announcing 1 GiB: the TLS layer
    // refuses the first bytes, nothing waits for or buffers the gigabyte.
    c.send(Frame::Hello(Hello::new("plain"))).await;
    let _ = c.stream.write_all(&[0x40, 0, 0, 0, 0x10, 0]).await;
    let started = tokio::time::Instant::now();
    let mut sink = [0u8; 1024];
    loop {
        match within("close", c.stream.read(&mut sink)).await {
            Ok(0) | Err(_) => break,
            // A TLS alert may come first.
            Ok(_) => {}
        }
    }
    assert!(started.elapsed() < WAIT);
    broker.handle.shutdown().await;
}

#[tokio::test]
async fn reload_swaps_certificates_without_dropping_connections() {
    let ca = Ca::new("first CA");
    let files = BrokerFiles::write(&ca.server(), &ca);
    let broker = tls_broker(&files, false, vec![]).await;
    let mut established = Framed::new(
        certs::dial(&certs::connector(&ca, None), broker.addr)
            .await
            .unwrap(),
    );
    assert!(matches!(
        established.hello(None).await,
        Some(Frame::Welcome(_))
    ));

    // New certificate from a new CA, written over the old files, then reloaded.
    let new_ca = Ca::new("second CA");
    let new_server = new_ca.server();
    std::fs::write(&files.cert, &new_server.cert_pem).unwrap();
    std::fs::write(&files.key, &new_server.key_pem).unwrap();
    broker.handle.tls().unwrap().reload().unwrap();

    assert!(
        certs::dial(&certs::connector(&ca, None), broker.addr)
            .await
            .is_err()
    );
    let mut fresh = Framed::new(
        certs::dial(&certs::connector(&new_ca, None), broker.addr)
            .await
            .unwrap(),
    );
    assert!(matches!(fresh.hello(None).await, Some(Frame::Welcome(_))));

    // The connection from before the reload still works.
    established.send(Frame::Ping(tidings_protocol::Ping)).await;
    assert!(matches!(established.recv().await, Some(Frame::Pong(_))));

    // A broken reload keeps the working configuration.
    std::fs::write(&files.key, "not a key").unwrap();
    assert!(broker.handle.tls().unwrap().reload().is_err());
    assert!(
        certs::dial(&certs::connector(&new_ca, None), broker.addr)
            .await
            .is_ok()
    );
    broker.handle.shutdown().await;
}

#[tokio::test]
async fn sighup_reloads_the_binarys_certificates() {
    use std::process::Stdio;
    use tokio::io::AsyncBufReadExt;

    let ca = Ca::new("first CA");
    let files = BrokerFiles::write(&ca.server(), &ca);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tidings-broker"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(files.dir.path().join("data"))
        .arg("--tls-cert")
        .arg(&files.cert)
        .arg("--tls-key")
        .arg(&files.key)
        .env("RUST_LOG", "info")
        .env_remove("TIDINGS_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the broker binary starts");
    let mut log = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut next_line_with = async |needle: &str| -> String {
        loop {
            let line = within("a log line", log.next_line())
                .await
                .unwrap()
                .expect("the broker is running");
            if line.contains(needle) {
                return line;
            }
        }
    };
    let line = next_line_with("listening on ").await;
    let addr: std::net::SocketAddr = line
        .split("listening on ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mut before = Framed::new(
        certs::dial(&certs::connector(&ca, None), addr)
            .await
            .unwrap(),
    );
    assert!(matches!(before.hello(None).await, Some(Frame::Welcome(_))));

    let new_ca = Ca::new("second CA");
    let new_server = new_ca.server();
    std::fs::write(&files.cert, &new_server.cert_pem).unwrap();
    std::fs::write(&files.key, &new_server.key_pem).unwrap();
    let pid = i32::try_from(child.id().unwrap()).unwrap();
    // SAFETY: kill only sends a signal to the child we started.
    #[allow(unsafe_code)]
    unsafe {
        assert_eq!(libc::kill(pid, libc::SIGHUP), 0);
    }
    next_line_with("TLS certificate and key reloaded").await;
    let mut after = Framed::new(
        certs::dial(&certs::connector(&new_ca, None), addr)
            .await
            .unwrap(),
    );
    assert!(matches!(after.hello(None).await, Some(Frame::Welcome(_))));
    before.send(Frame::Ping(tidings_protocol::Ping)).await;
    assert!(matches!(before.recv().await, Some(Frame::Pong(_))));
    child.kill().await.unwrap();
}

#[tokio::test]
async fn tls_against_the_plaintext_port_is_refused_at_once() {
    let ca = Ca::new("test CA");
    let broker = common::start().await;
    // The ClientHello's first bytes read as a length prefix of hundreds of
    // megabytes: over the pre-auth limit, so the broker closes before buffering.
    let result = within(
        "a refused handshake",
        certs::dial(&certs::connector(&ca, None), broker.addr),
    )
    .await;
    assert!(result.is_err());
    broker.handle.shutdown().await;
}
