//! TLS for the client (rustls through tokio-rustls): [`ClientTls`], the settings a
//! [`crate::ClientBuilder`] takes, and the dialing of `host:port` or
//! `tls://host:port` addresses into a [`Transport`] (plain TCP or TLS over it).

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::error::ConnectError;
use crate::options::ClientBuilder;

/// The scheme that asks for TLS in an address: `tls://broker.internal:7878`.
pub const TLS_SCHEME: &str = "tls://";

/// Where the trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    /// The operating system's store (rustls-native-certs).
    System,
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// PEM text of CA certificates.
    Pem(Vec<u8>),
}

/// Where a PEM item comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    File(PathBuf),
    Pem(Vec<u8>),
}

impl Source {
    fn read(&self, what: &str) -> Result<Vec<u8>, String> {
        match self {
            Source::Pem(pem) => Ok(pem.clone()),
            Source::File(path) => std::fs::read(path)
                .map_err(|e| format!("cannot read {what} {}: {e}", path.display())),
        }
    }
}

/// TLS settings of a client: which roots to trust, the name to verify the server
/// certificate against, and an optional client certificate (mutual TLS).
///
/// ```
/// use tidings_client::{ClientBuilder, ClientTls};
///
/// let builder = ClientBuilder::new("tls://broker.internal:7878").tls(
///     ClientTls::ca_file("/etc/tidings/ca.pem")
///         .client_cert_files("/etc/tidings/svc.pem", "/etc/tidings/svc.key"),
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    roots: Roots,
    server_name: Option<String>,
    client_cert: Option<(Source, Source)>,
}

impl Default for ClientTls {
    /// The system's roots, the host of the address as server name, no client
    /// certificate.
    fn default() -> Self {
        Self::system_roots()
    }
}

impl ClientTls {
    /// Trust the operating system's root certificates.
    ///
    /// ```
    /// let tls = tidings_client::ClientTls::system_roots();
    /// ```
    pub fn system_roots() -> Self {
        ClientTls {
            roots: Roots::System,
            server_name: None,
            client_cert: None,
        }
    }

    /// Trust only the CA certificates in this PEM file.
    ///
    /// ```
    /// let tls = tidings_client::ClientTls::ca_file("ca.pem");
    /// ```
    pub fn ca_file(path: impl Into<PathBuf>) -> Self {
        ClientTls {
            roots: Roots::File(path.into()),
            ..Self::system_roots()
        }
    }

    /// Trust only the CA certificates in this PEM text.
    ///
    /// ```
    /// let tls = tidings_client::ClientTls::ca_pem("-----BEGIN CERTIFICATE-----\n...");
    /// ```
    pub fn ca_pem(pem: impl Into<Vec<u8>>) -> Self {
        ClientTls {
            roots: Roots::Pem(pem.into()),
            ..Self::system_roots()
        }
    }

    /// The name the server's certificate must carry. Default: the host part of
    /// the address.
    ///
    /// ```
    /// let tls = tidings_client::ClientTls::ca_file("ca.pem").server_name("broker.internal");
    /// ```
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Present this certificate chain and key (PEM files) for mutual TLS.
    ///
    /// ```
    /// let tls = tidings_client::ClientTls::ca_file("ca.pem").client_cert_files("me.pem", "me.key");
    /// ```
    pub fn client_cert_files(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some((Source::File(cert.into()), Source::File(key.into())));
        self
    }

    /// Present this certificate chain and key (PEM text) for mutual TLS.
    ///
    /// ```
    /// let tls = tidings_client::ClientTls::system_roots().client_cert_pem("-----BEGIN CERTIFICATE-----", "-----BEGIN PRIVATE KEY-----");
    /// ```
    pub fn client_cert_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.client_cert = Some((Source::Pem(cert.into()), Source::Pem(key.into())));
        self
    }

    fn connector(&self) -> Result<TlsConnector, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.roots {
            Roots::System => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    // A system store may hold a certificate rustls cannot use; skip it.
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(
                        "no usable root certificates in the system store; give a CA file".into(),
                    );
                }
            }
            Roots::File(path) => add_pem_roots(&mut roots, &Source::File(path.clone()))?,
            Roots::Pem(pem) => add_pem_roots(&mut roots, &Source::Pem(pem.clone()))?,
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let pem = cert.read("client certificate")?;
                let chain = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("client certificate: {e}"))?;
                if chain.is_empty() {
                    return Err("client certificate: no CERTIFICATE in the PEM".into());
                }
                let pem = key.read("client key")?;
                let key =
                    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| format!("client key: {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("client certificate and key: {e}"))?
            }
        };
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

fn add_pem_roots(roots: &mut rustls::RootCertStore, source: &Source) -> Result<(), String> {
    let pem = source.read("CA file")?;
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("CA certificates: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("CA certificate not usable: {e}"))?;
        added += 1;
    }
    if added == 0 {
        return Err("CA certificates: no CERTIFICATE in the PEM".into());
    }
    Ok(())
}

/// The connection under the protocol: plain TCP or TLS over TCP.
#[derive(Debug)]
pub(crate) enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Splits `addr` into the `host:port` to dial and whether the scheme asks for TLS.
pub(crate) fn parse_addr(addr: &str) -> (&str, bool) {
    if let Some(rest) = addr.strip_prefix(TLS_SCHEME) {
        (rest, true)
    } else if let Some(rest) = addr.strip_prefix("tcp://") {
        (rest, false)
    } else {
        (addr, false)
    }
}

/// Dials `opts.addr`: TCP, then TLS when the address says `tls://` or TLS
/// settings were given.
pub(crate) async fn dial(opts: &ClientBuilder) -> Result<Transport, ConnectError> {
    let (host_port, scheme_tls) = parse_addr(&opts.addr);
    let tls_error = |message: String| ConnectError::Tls {
        addr: opts.addr.clone(),
        message,
    };
    // Settings are checked before dialing, so a bad CA file fails fast.
    let tls = match (&opts.tls, scheme_tls) {
        (Some(tls), _) => Some(tls.clone()),
        (None, true) => Some(ClientTls::system_roots()),
        (None, false) => None,
    };
    let connector = tls
        .as_ref()
        .map(ClientTls::connector)
        .transpose()
        .map_err(tls_error)?;
    let stream = TcpStream::connect(host_port)
        .await
        .map_err(|error| ConnectError::Io {
            addr: opts.addr.clone(),
            error,
        })?;
    // Requests and acks are small; Nagle would add latency to every one of them.
    let _ = stream.set_nodelay(true);
    let (Some(tls), Some(connector)) = (tls, connector) else {
        return Ok(Transport::Plain(stream));
    };
    let name = match &tls.server_name {
        Some(name) => name.clone(),
        None => host_of(host_port).to_owned(),
    };
    let server_name = ServerName::try_from(name.clone())
        .map_err(|e| tls_error(format!("`{name}` is not a valid server name: {e}")))?;
    let stream = connector
        .connect(server_name, stream)
        .await
        .map_err(|e| tls_error(format!("TLS handshake failed: {e}")))?;
    Ok(Transport::Tls(Box::new(stream)))
}

/// The host of `host:port` (without the brackets of an IPv6 literal).
fn host_of(host_port: &str) -> &str {
    let host = match host_port.rfind(':') {
        Some(i) if !host_port[i + 1..].contains(']') => &host_port[..i],
        _ => host_port,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("tls://h:1"), ("h:1", true));
        assert_eq!(parse_addr("tcp://h:1"), ("h:1", false));
        assert_eq!(parse_addr("h:1"), ("h:1", false));
        assert_eq!(host_of("broker.internal:7878"), "broker.internal");
        assert_eq!(host_of("[::1]:7878"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }

    #[test]
    fn bad_ca_is_an_error() {
        let err = ClientTls::ca_pem("not pem").connector().err().unwrap();
        assert!(err.contains("no CERTIFICATE"), "{err}");
        let err = ClientTls::ca_file("/nonexistent/ca.pem")
            .connector()
            .err()
            .unwrap();
        assert!(err.contains("cannot read"), "{err}");
    }
}
