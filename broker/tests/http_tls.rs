//! TLS on the HTTP listener: with --tls-cert/--tls-key it serves HTTPS with the
//! client port's certificate (`--http-tls auto`), refuses plaintext HTTP, follows
//! a certificate reload, and serves plain HTTP again with `--http-tls off`.

mod common;

use common::certs::{self, BrokerFiles, Ca};
use common::http::{get, get_on};
use tidings_broker::{HttpListen, HttpTls};
use tokio::net::TcpStream;

async fn broker(files: &BrokerFiles, http_tls: HttpTls) -> common::TestBroker {
    let (cert, key) = (files.cert.clone(), files.key.clone());
    common::start_with(move |c| {
        c.security.tls_cert = Some(cert);
        c.security.tls_key = Some(key);
        c.http_listen = HttpListen(Some("127.0.0.1:0".parse().unwrap()));
        c.http_tls = http_tls;
    })
    .await
}

/// GET `path` over HTTPS trusting `ca`; `None` when the handshake fails.
async fn https_get(
    ca: &Ca,
    addr: std::net::SocketAddr,
    path: &str,
) -> Option<common::http::Response> {
    let stream = certs::dial(&certs::connector(ca, None), addr).await.ok()?;
    get_on(stream, path).await
}

#[tokio::test]
async fn https_with_the_client_ports_certificate_and_no_plaintext() {
    let ca = Ca::new("http CA");
    let files = BrokerFiles::write(&ca.server(), &ca);
    let broker = broker(&files, HttpTls::Auto).await;
    let http = broker.handle.http_addr().unwrap();

    let healthz = https_get(&ca, http, "/healthz")
        .await
        .expect("HTTPS answers");
    assert_eq!(healthz.status, 200, "{}", healthz.text());
    assert_eq!(healthz.json()["status"], "ok");

    // Plain HTTP to the HTTPS port gets no HTTP response: the bytes are not a
    // ClientHello, so the handshake fails (a TLS alert at most) and it is closed.
    let plain = TcpStream::connect(http).await.unwrap();
    let answer = get_on(plain, "/healthz").await;
    assert!(answer.is_none(), "plaintext got {answer:?}");
    // A client that does not trust the certificate is refused too.
    let other = Ca::new("other CA");
    assert!(https_get(&other, http, "/healthz").await.is_none());
    broker.handle.shutdown().await;
}

#[tokio::test]
async fn a_certificate_reload_reaches_the_http_listener() {
    let ca = Ca::new("first CA");
    let files = BrokerFiles::write(&ca.server(), &ca);
    let broker = broker(&files, HttpTls::Auto).await;
    let http = broker.handle.http_addr().unwrap();
    assert_eq!(https_get(&ca, http, "/healthz").await.unwrap().status, 200);

    // What SIGHUP does: new files, reloaded.
    let new_ca = Ca::new("second CA");
    let server = new_ca.server();
    std::fs::write(&files.cert, &server.cert_pem).unwrap();
    std::fs::write(&files.key, &server.key_pem).unwrap();
    broker.handle.tls().unwrap().reload().unwrap();

    assert!(https_get(&ca, http, "/healthz").await.is_none());
    assert_eq!(
        https_get(&new_ca, http, "/healthz").await.unwrap().status,
        200
    );
    broker.handle.shutdown().await;
}

#[tokio::test]
async fn http_tls_off_serves_plain_http_beside_a_tls_client_port() {
    let ca = Ca::new("http CA");
    let files = BrokerFiles::write(&ca.server(), &ca);
    let broker = broker(&files, HttpTls::Off).await;
    let http = broker.handle.http_addr().unwrap();
    assert_eq!(get(http, "/healthz").await.status, 200);
    assert!(https_get(&ca, http, "/healthz").await.is_none());
    broker.handle.shutdown().await;
}

#[test]
fn http_tls_on_needs_a_certificate() {
    let err = tidings_broker::Config::load_from(["tidings-broker", "--http-tls", "on"])
        .expect_err("refused without --tls-cert");
    assert!(err.to_string().contains("http_tls"), "{err}");
    assert!(tidings_broker::Config::load_from(["tidings-broker", "--http-tls", "maybe"]).is_err());
}
