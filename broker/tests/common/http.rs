//! A minimal HTTP/1.1 client for the broker's HTTP listener: one request per
//! connection (`Connection: close`), body read to the end.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::within;

/// A response: status, lower-cased headers, body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("UTF-8 body")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

pub async fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[]).await
}

pub async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    request(addr, "POST", path, headers).await
}

pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Response {
    within(&format!("{method} {path}"), async {
        let mut stream = TcpStream::connect(addr).await.expect("connect to HTTP");
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if method == "POST" {
            req.push_str("Content-Length: 0\r\n");
        }
        req.push_str("\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .expect("send request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read response");
        parse(&raw)
    })
    .await
}

/// GET `path` over an established stream (HTTPS, say); `None` when the stream
/// fails or closes without an HTTP response (a TLS alert, say).
pub async fn get_on<S>(mut stream: S, path: &str) -> Option<Response>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    within(&format!("GET {path}"), async {
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.ok()?;
        stream.flush().await.ok()?;
        let mut raw = Vec::new();
        // A TLS peer that closes without close_notify still sent a whole response.
        let _ = stream.read_to_end(&mut raw).await;
        raw.starts_with(b"HTTP/").then(|| parse(&raw))
    })
    .await
}

fn parse(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response has a header");
    let head = std::str::from_utf8(&raw[..split]).expect("ASCII header");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size = usize::from_str_radix(
            std::str::from_utf8(&body[..line_end])
                .expect("hex size")
                .trim(),
            16,
        )
        .expect("chunk size");
        body = &body[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// Polls `/readyz` until it answers 200 (the broker opens its store and starts
/// accepting a moment after it is bound); returns the body.
pub async fn wait_ready(addr: SocketAddr) -> serde_json::Value {
    within("readiness", async {
        loop {
            let r = get(addr, "/readyz").await;
            if r.status == 200 {
                return r.json();
            }
            assert_eq!(r.status, 503, "{}", r.text());
            assert!(
                r.json()["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("not listening"),
                "{}",
                r.text()
            );
            tokio::task::yield_now().await;
        }
    })
    .await
}
