//! Publish/subscribe frames: PUBLISH, SUBSCRIBE, UNSUBSCRIBE, MESSAGE.

use bytes::{Bytes, BytesMut};

use crate::error::ProtocolError;
use crate::frame::{Headers, check_flags, encode_frame, kind};
use crate::text::Text;
use crate::wire::{Reader, Writer};

/// PUBLISH: a message to a topic, routed to every matching subscription and queue.
///
/// Body: `[request_id:u32] topic:str [reply_to:str] [message_id:str] [delay_ms:u64]
/// headers payload`, where `headers` is `count:u16` × (`key:str value:str`) and the
/// payload is every remaining byte of the frame.
///
/// Flags: `0x01` a request id follows; `0x02` confirm (answer with CONFIRM once
/// durable; needs `0x01`); `0x04` no-responders check (answer ERROR
/// `NoResponders` if nothing is subscribed; needs `0x01`); `0x08` reply_to present;
/// `0x10` message_id present; `0x20` delay_ms present.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Publish {
    /// Id matching the CONFIRM or ERROR answer. Required when `confirm` or
    /// `check_responders` is set; if it is `None` then, id 0 goes on the wire (and
    /// decodes as `Some(0)`), which PROTOCOL.md reserves for errors not tied to a
    /// request, so set one.
    pub request_id: Option<u32>,
    /// Ask for a CONFIRM once the message is durable in every queue it was routed to.
    pub confirm: bool,
    /// Ask for an immediate `NoResponders` error if no subscription matches.
    pub check_responders: bool,
    /// The topic.
    pub topic: Text,
    /// Where responders should publish their answer.
    pub reply_to: Option<Text>,
    /// Publisher-chosen id for deduplication in queues.
    pub message_id: Option<Text>,
    /// Hold the message in queues for this many milliseconds before delivering it.
    pub delay_ms: Option<u64>,
    /// Key/value headers.
    pub headers: Headers,
    /// The opaque payload.
    pub payload: Bytes,
}

impl Publish {
    /// Flag: a request id follows.
    pub const FLAG_REQUEST_ID: u8 = 0x01;
    /// Flag: answer with CONFIRM when durable.
    pub const FLAG_CONFIRM: u8 = 0x02;
    /// Flag: answer with ERROR `NoResponders` when nothing is subscribed.
    pub const FLAG_CHECK_RESPONDERS: u8 = 0x04;
    /// Flag: reply_to present.
    pub const FLAG_REPLY_TO: u8 = 0x08;
    /// Flag: message_id present.
    pub const FLAG_MESSAGE_ID: u8 = 0x10;
    /// Flag: delay_ms present.
    pub const FLAG_DELAY: u8 = 0x20;
    const KNOWN: u8 = 0x3f;

    /// A plain fire-and-forget publish.
    pub fn new(topic: impl Into<Text>, payload: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            ..Self::default()
        }
    }

    /// Bytes of the encoded body that are not payload: request id, topic,
    /// reply_to, message_id, delay and headers with their prefixes. At most
    /// [`crate::MAX_ENVELOPE_LEN`] is accepted.
    pub fn envelope_len(&self) -> usize {
        let text = |t: &Option<Text>| t.as_ref().map_or(0, |t| 2 + t.len());
        let request_id = if self.request_id.is_some() || self.confirm || self.check_responders {
            4
        } else {
            0
        };
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| 4 + k.len() + v.len())
            .sum();
        request_id
            + 2
            + self.topic.len()
            + text(&self.reply_to)
            + text(&self.message_id)
            + if self.delay_ms.is_some() { 8 } else { 0 }
            + 2
            + headers
    }

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        let mut flags = 0;
        let needs_id = self.confirm || self.check_responders;
        if let Some(id) = self.request_id.or(needs_id.then_some(0)) {
            w.u32(id);
            flags |= Self::FLAG_REQUEST_ID;
        }
        if self.confirm {
            flags |= Self::FLAG_CONFIRM;
        }
        if self.check_responders {
            flags |= Self::FLAG_CHECK_RESPONDERS;
        }
        w.text("topic", &self.topic)?;
        if let Some(reply_to) = &self.reply_to {
            w.text("reply_to", reply_to)?;
            flags |= Self::FLAG_REPLY_TO;
        }
        if let Some(id) = &self.message_id {
            w.text("message_id", id)?;
            flags |= Self::FLAG_MESSAGE_ID;
        }
        if let Some(delay) = self.delay_ms {
            w.u64(delay);
            flags |= Self::FLAG_DELAY;
        }
        w.headers(&self.headers)?;
        w.raw(&self.payload);
        Ok(flags)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("PUBLISH", flags, Self::KNOWN)?;
        let has_id = flags & Self::FLAG_REQUEST_ID != 0;
        let confirm = flags & Self::FLAG_CONFIRM != 0;
        let check_responders = flags & Self::FLAG_CHECK_RESPONDERS != 0;
        if (confirm || check_responders) && !has_id {
            return Err(r.invalid("flags", u64::from(flags)));
        }
        let request_id = if has_id {
            Some(r.u32("request_id")?)
        } else {
            None
        };
        let topic = r.text("topic")?;
        let reply_to = if flags & Self::FLAG_REPLY_TO != 0 {
            Some(r.text("reply_to")?)
        } else {
            None
        };
        let message_id = if flags & Self::FLAG_MESSAGE_ID != 0 {
            Some(r.text("message_id")?)
        } else {
            None
        };
        let delay_ms = if flags & Self::FLAG_DELAY != 0 {
            Some(r.u64("delay_ms")?)
        } else {
            None
        };
        let headers = r.headers()?;
        let payload = r.rest();
        Ok(Self {
            request_id,
            confirm,
            check_responders,
            topic,
            reply_to,
            message_id,
            delay_ms,
            headers,
            payload,
        })
    }
}

/// SUBSCRIBE: receive every message published to topics matching `pattern`.
///
/// Body: `request_id:u32 sid:u32 pattern:str [group:str]`. Flag `0x01`: a group
/// follows; members of one group (same pattern and group name) share messages, each
/// going to one member. Answered with OK or ERROR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Matches the answer.
    pub request_id: u32,
    /// The client's id for this subscription, unique on its connection.
    pub sid: u32,
    /// Topic pattern with `*` and `>` wildcards.
    pub pattern: Text,
    /// Optional group name for load balancing.
    pub group: Option<Text>,
}

impl Subscribe {
    /// Flag: a group follows.
    pub const FLAG_GROUP: u8 = 0x01;

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.request_id);
        w.u32(self.sid);
        w.text("pattern", &self.pattern)?;
        if let Some(group) = &self.group {
            w.text("group", group)?;
            return Ok(Self::FLAG_GROUP);
        }
        Ok(0)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("SUBSCRIBE", flags, Self::FLAG_GROUP)?;
        Ok(Self {
            request_id: r.u32("request_id")?,
            sid: r.u32("sid")?,
            pattern: r.text("pattern")?,
            group: if flags & Self::FLAG_GROUP != 0 {
                Some(r.text("group")?)
            } else {
                None
            },
        })
    }
}

/// UNSUBSCRIBE: end a subscription.
///
/// Body: `request_id:u32 sid:u32`. No flags. Answered with OK or ERROR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Matches the answer.
    pub request_id: u32,
    /// The subscription to end.
    pub sid: u32,
}

impl Unsubscribe {
    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.request_id);
        w.u32(self.sid);
        Ok(0)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("UNSUBSCRIBE", flags, 0)?;
        Ok(Self {
            request_id: r.u32("request_id")?,
            sid: r.u32("sid")?,
        })
    }
}

/// MESSAGE: a published message delivered to one subscription.
///
/// Body: `sid:u32 topic:str [reply_to:str] [message_id:str] headers payload`
/// (payload = the rest). Flag `0x01`: reply_to present; `0x02` (protocol 1.1):
/// message_id present.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// The subscription this message is for.
    pub sid: u32,
    /// The topic it was published to.
    pub topic: Text,
    /// Where to send a response, if the publisher asked for one.
    pub reply_to: Option<Text>,
    /// The publisher's message id, if it set one. Sent only on 1.1 sessions.
    pub message_id: Option<Text>,
    /// Key/value headers.
    pub headers: Headers,
    /// The payload, shared with every other copy of this message.
    pub payload: Bytes,
}

impl Message {
    /// Flag: reply_to present.
    pub const FLAG_REPLY_TO: u8 = 0x01;
    /// Flag: message_id present (protocol 1.1).
    pub const FLAG_MESSAGE_ID: u8 = 0x02;

    /// Appends this message as a whole MESSAGE frame to `dst`, byte for byte what
    /// [`Frame::encode`](crate::Frame::encode) writes for `Frame::Message`, without
    /// building a [`Frame`](crate::Frame) (which would take a copy of every field's
    /// handle). With `with_id` false the message id is left out: the form a protocol
    /// 1.0 session reads.
    ///
    /// ```
    /// use bytes::{Bytes, BytesMut};
    /// use tidings_protocol::{Frame, Message};
    ///
    /// let m = Message {
    ///     sid: 7,
    ///     topic: "orders.new".into(),
    ///     reply_to: None,
    ///     message_id: Some("order-1".into()),
    ///     headers: vec![("content-type".into(), "text/plain".into())],
    ///     payload: Bytes::from_static(b"hello"),
    /// };
    /// let (mut direct, mut framed) = (BytesMut::new(), BytesMut::new());
    /// m.encode_frame(&mut direct, true).unwrap();
    /// Frame::Message(m.clone()).encode(&mut framed).unwrap();
    /// assert_eq!(direct, framed);
    ///
    /// // Without the id: what a 1.0 session is sent.
    /// let (mut v1_0, mut framed) = (BytesMut::new(), BytesMut::new());
    /// m.encode_frame(&mut v1_0, false).unwrap();
    /// Frame::Message(Message { message_id: None, ..m }).encode(&mut framed).unwrap();
    /// assert_eq!(v1_0, framed);
    /// ```
    pub fn encode_frame(&self, dst: &mut BytesMut, with_id: bool) -> Result<(), ProtocolError> {
        encode_frame(dst, kind::Message, "MESSAGE", |w| {
            self.encode_fields(w, with_id)
        })
    }

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        self.encode_fields(w, true)
    }

    fn encode_fields(&self, w: &mut Writer<'_>, with_id: bool) -> Result<u8, ProtocolError> {
        w.u32(self.sid);
        w.text("topic", &self.topic)?;
        let mut flags = 0;
        if let Some(reply_to) = &self.reply_to {
            w.text("reply_to", reply_to)?;
            flags |= Self::FLAG_REPLY_TO;
        }
        if let Some(id) = self.message_id.as_ref().filter(|_| with_id) {
            w.text("message_id", id)?;
            flags |= Self::FLAG_MESSAGE_ID;
        }
        w.headers(&self.headers)?;
        w.raw(&self.payload);
        Ok(flags)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags(
            "MESSAGE",
            flags,
            Self::FLAG_REPLY_TO | Self::FLAG_MESSAGE_ID,
        )?;
        let sid = r.u32("sid")?;
        let topic = r.text("topic")?;
        let reply_to = if flags & Self::FLAG_REPLY_TO != 0 {
            Some(r.text("reply_to")?)
        } else {
            None
        };
        let message_id = if flags & Self::FLAG_MESSAGE_ID != 0 {
            Some(r.text("message_id")?)
        } else {
            None
        };
        let headers = r.headers()?;
        let payload = r.rest();
        Ok(Self {
            sid,
            topic,
            reply_to,
            message_id,
            headers,
            payload,
        })
    }
}
