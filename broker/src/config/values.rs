//! The values of settings that are more than a number: the HTTP listener's address
//! and TLS mode, the log format, and the size and duration syntax every flag,
//! environment variable and config-file entry uses.

use std::net::SocketAddr;
use std::time::Duration;

/// Where the HTTP listener listens: an address, or nowhere (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpListen(pub Option<SocketAddr>);

impl std::str::FromStr for HttpListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(HttpListen(None));
        }
        s.parse()
            .map(|addr| HttpListen(Some(addr)))
            .map_err(|_| format!("`{s}` is neither an address such as 127.0.0.1:8222 nor `off`"))
    }
}

impl std::fmt::Display for HttpListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("off"),
        }
    }
}

/// Whether the HTTP listener serves HTTPS (`--http-tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpTls {
    /// HTTPS when the client port has TLS.
    #[default]
    Auto,
    /// HTTPS; TLS must be configured.
    On,
    /// Plain HTTP, even when the client port has TLS.
    Off,
}

impl std::str::FromStr for HttpTls {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(HttpTls::Auto),
            "on" => Ok(HttpTls::On),
            "off" => Ok(HttpTls::Off),
            _ => Err(format!("unknown --http-tls `{s}` (use auto, on or off)")),
        }
    }
}

impl std::fmt::Display for HttpTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HttpTls::Auto => "auto",
            HttpTls::On => "on",
            HttpTls::Off => "off",
        })
    }
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("unknown log format `{s}` (use text or json)")),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Parses a byte size with the `bytesize` crate: a number with an optional unit,
/// binary (`KiB`, `MiB`, `GiB`) or decimal (`KB` = 1,000, `MB`, `GB`), as in
/// `65536`, `512KiB` or `1MiB`. The client CLI parses sizes the same way.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let size: bytesize::ByteSize = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 65536, 512KiB or 1MiB"))?;
    // bytesize saturates instead of failing on overflow.
    match usize::try_from(size.as_u64()) {
        Ok(n) if size.as_u64() != u64::MAX => Ok(n),
        _ => Err(format!("size `{s}` is too large")),
    }
}

/// Parses a duration with the `humantime` crate: numbers with units, as in `500ms`,
/// `2s`, `1m` or `1h 30m`. A bare number is refused, so that `5` cannot silently
/// mean seconds in one place and milliseconds in another; the client CLI parses
/// durations the same way.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("`{s}` is not a duration ({e})"))
}

pub(crate) fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}
