//! The client against a secured broker: TLS with `tls://` addresses and a CA
//! (certificates made by rcgen), mutual TLS with a client certificate, users with
//! passwords whose permissions refuse what is not granted while request/reply
//! works through each user's own inbox.

mod common;

use std::time::Duration;

use common::within;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tidings_broker::auth::users::TopicRulesEntry;
use tidings_broker::auth::{UserEntry, hash_password_with, test_params};
use tidings_broker::{Broker, BrokerHandle, Config};
use tidings_client::{
    ClientBuilder, ClientTls, ConnectError, ErrorCode, ReconnectPolicy, SubscribeError,
};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "client-test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf = |sans: Vec<String>, cn: &str| {
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca_cert.pem(),
        server: leaf(vec!["localhost".into()], "server"),
        client: leaf(vec![], "worker"),
    }
}

async fn start(adjust: impl FnOnce(&mut Config)) -> (BrokerHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_test(dir.path().join("data"));
    adjust(&mut config);
    let handle = Broker::start(config).await.expect("broker starts");
    (handle, dir)
}

fn write_tls(dir: &std::path::Path, pki: &Pki, config: &mut Config, mutual: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key, ca) = (dir.join("s.pem"), dir.join("s.key"), dir.join("ca.pem"));
    std::fs::write(&cert, &pki.server.0).unwrap();
    std::fs::write(&key, &pki.server.1).unwrap();
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    config.security.tls_cert = Some(cert);
    config.security.tls_key = Some(key);
    if mutual {
        config.security.tls_client_ca = Some(ca);
    }
}

fn builder(addr: String) -> ClientBuilder {
    ClientBuilder::new(addr)
        .reconnect(ReconnectPolicy::never())
        .connect_timeout(Duration::from_secs(5))
}

#[tokio::test]
async fn tls_address_with_a_ca() {
    let pki = pki();
    let tls_dir = tempfile::tempdir().unwrap();
    let (broker, _dir) = start(|c| write_tls(tls_dir.path(), &pki, c, false)).await;
    let addr = format!("tls://localhost:{}", broker.local_addr().port());
    let client = within(
        builder(addr.clone())
            .tls(ClientTls::ca_pem(pki.ca_pem.clone()))
            .connect(),
    )
    .await
    .expect("TLS connect");
    let mut sub = within(client.subscribe("tls.>")).await.unwrap();
    within(client.publish("tls.hello", "secret")).await.unwrap();
    let m = within(sub.next_message()).await.unwrap();
    assert_eq!(&m.payload()[..], b"secret");

    // Without the CA the server certificate is not trusted.
    let err = within(
        builder(addr)
            .tls(ClientTls::ca_pem(pki.client.0.clone()))
            .connect(),
    )
    .await
    .expect_err("an untrusted server is refused");
    assert!(matches!(err, ConnectError::Tls { .. }), "{err}");
    broker.shutdown().await;
}

#[tokio::test]
async fn mutual_tls_with_a_client_certificate() {
    let pki = pki();
    let tls_dir = tempfile::tempdir().unwrap();
    let (broker, _dir) = start(|c| write_tls(tls_dir.path(), &pki, c, true)).await;
    let addr = format!("localhost:{}", broker.local_addr().port());
    let tls = ClientTls::ca_pem(pki.ca_pem.clone())
        .client_cert_pem(pki.client.0.clone(), pki.client.1.clone());
    let client = within(builder(addr.clone()).tls(tls).connect())
        .await
        .expect("mTLS connect");
    within(client.flush()).await.unwrap();
    assert!(
        within(
            builder(addr)
                .tls(ClientTls::ca_pem(pki.ca_pem.clone()))
                .connect()
        )
        .await
        .is_err()
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn users_permissions_and_request_reply_through_own_inbox() {
    let hash = |pw: &str| Some(hash_password_with(pw, test_params()).unwrap());
    let rules = |allow: &[&str]| TopicRulesEntry {
        allow: allow.iter().map(|s| s.to_string()).collect(),
        deny: vec![],
    };
    let users = vec![
        UserEntry {
            name: "frontend".into(),
            password_hash: hash("front-pw"),
            publish: rules(&["svc.>"]),
            ..UserEntry::default()
        },
        UserEntry {
            name: "backend".into(),
            password_hash: hash("back-pw"),
            subscribe: rules(&["svc.>"]),
            publish: rules(&["_INBOX.>"]),
            ..UserEntry::default()
        },
    ];
    let (broker, _dir) = start(|c| {
        c.security.users = users;
        c.security.auth_failure_delay = Duration::from_millis(100);
    })
    .await;
    let addr = broker.local_addr().to_string();
    let backend = within(
        builder(addr.clone())
            .user("backend")
            .password("back-pw")
            .connect(),
    )
    .await
    .unwrap();
    let mut requests = within(backend.subscribe("svc.echo")).await.unwrap();
    tokio::spawn(async move {
        while let Some(m) = requests.next_message().await {
            let _ = m.respond(m.payload().clone()).await;
        }
    });

    let frontend = within(
        builder(addr.clone())
            .user("frontend")
            .password("front-pw")
            .connect(),
    )
    .await
    .unwrap();
    // Not granted: refused, and the connection stays usable.
    match within(frontend.subscribe("svc.>")).await {
        Err(SubscribeError::Server(e)) => assert_eq!(e.code(), Some(ErrorCode::PermissionDenied)),
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
    let reply = within(frontend.request("svc.echo", "ping"))
        .await
        .expect("request/reply works");
    assert_eq!(&reply.payload()[..], b"ping");

    let started = tokio::time::Instant::now();
    let err = within(builder(addr).user("frontend").password("wrong").connect())
        .await
        .expect_err("a wrong password is refused");
    match err {
        ConnectError::Refused { error, .. } => {
            assert_eq!(error.code(), Some(ErrorCode::AuthFailed))
        }
        other => panic!("expected AuthFailed, got {other}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(100));
    broker.shutdown().await;
}
