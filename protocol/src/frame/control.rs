//! Session frames: handshake, heartbeats, generic replies and statistics.

use crate::error::{ErrorCode, ProtocolError};
use crate::frame::{check_flags, request_only};
use crate::text::Text;
use crate::wire::{Reader, Writer};

/// HELLO: the first frame a client sends.
///
/// Body: `version:u16 client_name:str [token:str] [user:str] [minor:u16]`. Flag
/// `0x01` (`TOKEN`): a token follows; flag `0x02` (`USER`): a user name follows
/// (after the token, if any). With a user, the token field carries that user's
/// password or token; a client certificate may stand for both. Flag `0x10`
/// (`MINOR`): the client's minor version follows, last (absent: 1.0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The protocol version the client speaks ([`crate::PROTOCOL_VERSION`]).
    pub version: u16,
    /// A name for logs and stats; may be empty.
    pub client_name: Text,
    /// The secret: the shared token, or the user's password or token.
    pub token: Option<Text>,
    /// The user name, when the server has users.
    pub user: Option<Text>,
    /// The minor protocol version the client speaks ([`crate::PROTOCOL_MINOR`]);
    /// `None` for a 1.0 client.
    pub minor: Option<u16>,
}

impl Hello {
    /// Flag: a token follows the client name.
    pub const FLAG_TOKEN: u8 = 0x01;
    /// Flag: a user name follows (after the token, if any).
    pub const FLAG_USER: u8 = 0x02;
    /// Flag: the client's minor version follows (protocol 1.1), after the user.
    pub const FLAG_MINOR: u8 = 0x10;

    /// A HELLO for this client name, with no credentials and no minor version
    /// (a 1.0 session; set `minor` to [`crate::PROTOCOL_MINOR`] for 1.1).
    pub fn new(client_name: impl Into<Text>) -> Self {
        Self {
            version: crate::PROTOCOL_VERSION,
            client_name: client_name.into(),
            token: None,
            user: None,
            minor: None,
        }
    }

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u16(self.version);
        w.text("client_name", &self.client_name)?;
        let mut flags = 0;
        if let Some(token) = &self.token {
            w.text("token", token)?;
            flags |= Self::FLAG_TOKEN;
        }
        if let Some(user) = &self.user {
            w.text("user", user)?;
            flags |= Self::FLAG_USER;
        }
        if let Some(minor) = self.minor {
            w.u16(minor);
            flags |= Self::FLAG_MINOR;
        }
        Ok(flags)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags(
            "HELLO",
            flags,
            Self::FLAG_TOKEN | Self::FLAG_USER | Self::FLAG_MINOR,
        )?;
        Ok(Self {
            version: r.u16("version")?,
            client_name: r.text("client_name")?,
            token: if flags & Self::FLAG_TOKEN != 0 {
                Some(r.text("token")?)
            } else {
                None
            },
            user: if flags & Self::FLAG_USER != 0 {
                Some(r.text("user")?)
            } else {
                None
            },
            minor: if flags & Self::FLAG_MINOR != 0 {
                Some(r.u16("minor")?)
            } else {
                None
            },
        })
    }
}

/// WELCOME: the server accepts the handshake and states its limits.
///
/// Body: `version:u16 server_version:str max_frame_len:u32 max_payload:u32
/// heartbeat_ms:u32 [minor:u16] [max_credit:u32]`. Flag `0x01` (`MINOR`): the
/// session's minor version follows; a server sets it only when the HELLO carried
/// one. Flag `0x02` (`MAX_CREDIT`, protocol 1.1): the server's cap on a consumer's
/// credit follows, after `minor`; a server sends it only on 1.1 sessions, so a 1.0
/// client sees exactly the 1.0 layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The protocol version the session will use.
    pub version: u16,
    /// The server's software version, for logs.
    pub server_version: Text,
    /// Largest frame (the length prefix's value) the server accepts.
    pub max_frame_len: u32,
    /// Largest payload the server accepts in a PUBLISH.
    pub max_payload: u32,
    /// How often the server pings an idle connection, in milliseconds (0: never).
    pub heartbeat_ms: u32,
    /// The minor version the session uses, when the HELLO announced one; `None`
    /// means 1.0.
    pub minor: Option<u16>,
    /// The most credit (deliveries outstanding) the server grants one consumer: a
    /// CONSUME or CREDIT asking for more is clamped to it. Sent on 1.1 sessions
    /// only; `None` from a 1.0 session (or a server that does not say).
    pub max_credit: Option<u32>,
}

impl Welcome {
    /// Flag: the session's minor version follows.
    pub const FLAG_MINOR: u8 = 0x01;
    /// Flag (1.1): the server's max credit follows, after `minor`.
    pub const FLAG_MAX_CREDIT: u8 = 0x02;

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u16(self.version);
        w.text("server_version", &self.server_version)?;
        w.u32(self.max_frame_len);
        w.u32(self.max_payload);
        w.u32(self.heartbeat_ms);
        let mut flags = 0;
        if let Some(minor) = self.minor {
            w.u16(minor);
            flags |= Self::FLAG_MINOR;
        }
        if let Some(max_credit) = self.max_credit {
            w.u32(max_credit);
            flags |= Self::FLAG_MAX_CREDIT;
        }
        Ok(flags)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("WELCOME", flags, Self::FLAG_MINOR | Self::FLAG_MAX_CREDIT)?;
        Ok(Self {
            version: r.u16("version")?,
            server_version: r.text("server_version")?,
            max_frame_len: r.u32("max_frame_len")?,
            max_payload: r.u32("max_payload")?,
            heartbeat_ms: r.u32("heartbeat_ms")?,
            minor: if flags & Self::FLAG_MINOR != 0 {
                Some(r.u16("minor")?)
            } else {
                None
            },
            max_credit: if flags & Self::FLAG_MAX_CREDIT != 0 {
                Some(r.u32("max_credit")?)
            } else {
                None
            },
        })
    }
}

macro_rules! empty_frame {
    ($( $(#[$doc:meta])* $name:ident, $frame:literal; )*) => {$(
        $(#[$doc])*
        ///
        /// Empty body, no flags.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name;

        impl $name {
            pub(crate) fn encode(&self, _w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
                Ok(0)
            }

            pub(crate) fn decode(flags: u8, _r: &mut Reader) -> Result<Self, ProtocolError> {
                check_flags($frame, flags, 0)?;
                Ok(Self)
            }
        }
    )*};
}

empty_frame! {
    /// PING: asks the peer to answer PONG.
    Ping, "PING";
    /// PONG: answers PING.
    Pong, "PONG";
}

request_only! {
    /// STATS: asks for the server's counters.
    Stats, "STATS";
    /// OK: the request with this id succeeded.
    OkReply, "OK";
}

/// ERROR: a request failed, or (with request id 0) the connection has a problem
/// that is not tied to one request. Codes that close the connection are followed by
/// the server closing it.
///
/// Body: `request_id:u32 code:u16 message:str`. No flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    /// The failed request, or 0.
    pub request_id: u32,
    /// The numeric code; see [`ErrorCode`]. Kept raw so that codes from newer servers
    /// survive the trip.
    pub code: u16,
    /// A human explanation naming the problem.
    pub message: Text,
}

/// Longest ERROR message the server sends, in bytes; a longer one is cut short
/// and marked (see [`ErrorReply::new`]) so the reply always fits its frame.
pub const MAX_ERROR_MESSAGE_LEN: usize = 4096;

impl ErrorReply {
    /// Builds an error reply. A message over [`MAX_ERROR_MESSAGE_LEN`] bytes is cut
    /// at a character boundary and ends in `… [truncated, N bytes in all]`, never
    /// dropped.
    ///
    /// ```
    /// use tidings_protocol::{ErrorCode, ErrorReply, MAX_ERROR_MESSAGE_LEN};
    /// let e = ErrorReply::new(1, ErrorCode::InvalidTopic, "x".repeat(100_000));
    /// assert!(e.message.len() <= MAX_ERROR_MESSAGE_LEN);
    /// assert!(e.message.ends_with("[truncated, 100000 bytes in all]"));
    /// ```
    pub fn new(request_id: u32, code: ErrorCode, message: impl Into<Text>) -> Self {
        let message: Text = message.into();
        let message = if message.len() > MAX_ERROR_MESSAGE_LEN {
            truncate_message(&message)
        } else {
            message
        };
        Self {
            request_id,
            code: code as u16,
            message,
        }
    }

    /// The code, if this version knows it.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_u16(self.code)
    }

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.request_id);
        w.u16(self.code);
        w.text("message", &self.message)?;
        Ok(0)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("ERROR", flags, 0)?;
        Ok(Self {
            request_id: r.u32("request_id")?,
            code: r.u16("code")?,
            message: r.text("message")?,
        })
    }
}

fn truncate_message(message: &str) -> Text {
    let marker = format!("… [truncated, {} bytes in all]", message.len());
    let mut cut = MAX_ERROR_MESSAGE_LEN - marker.len();
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    Text::from(format!("{}{marker}", &message[..cut]))
}

/// STATS_REPLY: named counters, in a stable order.
///
/// Body: `request_id:u32 count:u32 count × (name:str value:u64)`. No flags. Names
/// are dot-separated (`connections.current`, `queue.orders.depth`); a client should
/// ignore names it does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsReply {
    /// The STATS request this answers.
    pub request_id: u32,
    /// `(name, value)` pairs.
    pub entries: Vec<(Text, u64)>,
}

impl StatsReply {
    /// The value of a named counter.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.entries
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, v)| *v)
    }

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.request_id);
        w.count32("count", self.entries.len())?;
        for (name, value) in &self.entries {
            w.text("name", name)?;
            w.u64(*value);
        }
        Ok(0)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("STATS_REPLY", flags, 0)?;
        let request_id = r.u32("request_id")?;
        let count = r.u32("count")? as usize;
        let mut entries = Vec::with_capacity(r.capacity(count, 10));
        for _ in 0..count {
            let name = r.text("name")?;
            let value = r.u64("value")?;
            entries.push((name, value));
        }
        Ok(Self {
            request_id,
            entries,
        })
    }
}
