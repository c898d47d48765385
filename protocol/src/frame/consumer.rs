//! Consumer frames: CONSUME, CANCEL, CREDIT, CONSUMER_CANCELLED, DELIVERY, ACK and
//! NACK — a consumer's life on a queue, apart from the queue's management frames.

use bytes::{Bytes, BytesMut};

use crate::error::ProtocolError;
use crate::frame::{Headers, check_flags, encode_frame, kind};
use crate::text::Text;
use crate::wire::{Reader, Writer};

/// CONSUME: start a consumer on a queue with an initial credit (prefetch).
///
/// Body: `request_id:u32 consumer_id:u32 queue:str credit:u32 [limit:u32]`. The
/// server sends at most `credit` DELIVERY frames that are not yet acked or nacked;
/// each ack or nack gives the credit back. Flag `0x01` (`LIMIT`, protocol 1.1): the
/// server sends this consumer at most `limit` deliveries in all, then none, whatever
/// its credit; the consumer stays until CANCEL, so its deliveries can still be
/// acked. Answered with OK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consume {
    /// Matches the answer.
    pub request_id: u32,
    /// The client's id for this consumer, unique on its connection.
    pub consumer_id: u32,
    /// The queue.
    pub queue: Text,
    /// Deliveries that may be outstanding at once.
    pub credit: u32,
    /// The most deliveries this consumer gets in all (protocol 1.1).
    pub limit: Option<u32>,
}

impl Consume {
    /// Flag: `limit` follows the credit.
    pub const FLAG_LIMIT: u8 = 0x01;

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.request_id);
        w.u32(self.consumer_id);
        w.text("queue", &self.queue)?;
        w.u32(self.credit);
        if let Some(limit) = self.limit {
            w.u32(limit);
            return Ok(Self::FLAG_LIMIT);
        }
        Ok(0)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("CONSUME", flags, Self::FLAG_LIMIT)?;
        Ok(Self {
            request_id: r.u32("request_id")?,
            consumer_id: r.u32("consumer_id")?,
            queue: r.text("queue")?,
            credit: r.u32("credit")?,
            limit: if flags & Self::FLAG_LIMIT != 0 {
                Some(r.u32("limit")?)
            } else {
                None
            },
        })
    }
}

/// CANCEL: stop a consumer; its unacked deliveries return to the queue.
///
/// Body: `request_id:u32 consumer_id:u32`. No flags. Answered with OK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancel {
    /// Matches the answer.
    pub request_id: u32,
    /// The consumer.
    pub consumer_id: u32,
}

impl Cancel {
    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.request_id);
        w.u32(self.consumer_id);
        Ok(0)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("CANCEL", flags, 0)?;
        Ok(Self {
            request_id: r.u32("request_id")?,
            consumer_id: r.u32("consumer_id")?,
        })
    }
}

/// CREDIT: raise a consumer's credit (prefetch window) by `credit`.
///
/// Body: `consumer_id:u32 credit:u32`. No flags. No answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credit {
    /// The consumer.
    pub consumer_id: u32,
    /// Credit to add.
    pub credit: u32,
}

impl Credit {
    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.consumer_id);
        w.u32(self.credit);
        Ok(0)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("CREDIT", flags, 0)?;
        Ok(Self {
            consumer_id: r.u32("consumer_id")?,
            credit: r.u32("credit")?,
        })
    }
}

/// Why the server ended a consumer on its own (CONSUMER_CANCELLED `reason`).
///
/// The wire value is kept raw in [`ConsumerCancelled::reason`] so that reasons added
/// by newer servers survive the trip; this enum names the ones this version knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CancelReason {
    /// The consumer's queue was deleted (wire value 1).
    QueueDeleted = 1,
    /// The server is shutting down (wire value 2).
    ShuttingDown = 2,
}

impl CancelReason {
    /// The reason for a wire value, if this version defines it.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(CancelReason::QueueDeleted),
            2 => Some(CancelReason::ShuttingDown),
            _ => None,
        }
    }

    /// The name used in docs and logs (`queue-deleted`, `shutting-down`).
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::QueueDeleted => "queue-deleted",
            CancelReason::ShuttingDown => "shutting-down",
        }
    }
}

/// CONSUMER_CANCELLED: the server ended a consumer; no more deliveries come for it
/// and its id is free for a new CONSUME.
///
/// Body: `consumer_id:u32 reason:u8 message:str`. No flags. No answer. Clients
/// MUST accept reasons they do not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerCancelled {
    /// The consumer that ended.
    pub consumer_id: u32,
    /// Why, raw; see [`CancelReason`].
    pub reason: u8,
    /// A human explanation (for logs, not for parsing).
    pub message: Text,
}

impl ConsumerCancelled {
    /// Builds the frame from a known reason.
    pub fn new(consumer_id: u32, reason: CancelReason, message: impl Into<Text>) -> Self {
        Self {
            consumer_id,
            reason: reason as u8,
            message: message.into(),
        }
    }

    /// The reason, if this version knows it.
    pub fn cancel_reason(&self) -> Option<CancelReason> {
        CancelReason::from_u8(self.reason)
    }

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.consumer_id);
        w.u8(self.reason);
        w.text("message", &self.message)?;
        Ok(0)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("CONSUMER_CANCELLED", flags, 0)?;
        Ok(Self {
            consumer_id: r.u32("consumer_id")?,
            reason: r.u8("reason")?,
            message: r.text("message")?,
        })
    }
}

/// DELIVERY: a queued message handed to one consumer.
///
/// Body: `consumer_id:u32 delivery_id:u64 attempt:u32 queue:str topic:str
/// [reply_to:str] [message_id:str] headers payload` (payload = the rest). Flags
/// (protocol 1.1, sent only on 1.1 sessions): `0x01` reply_to present, `0x02`
/// message_id present.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Delivery {
    /// The consumer it is for.
    pub consumer_id: u32,
    /// Names this delivery in ACK and NACK; unique per connection.
    pub delivery_id: u64,
    /// 1 on first delivery, 2 on the first redelivery, and so on.
    pub attempt: u32,
    /// The queue it came from.
    pub queue: Text,
    /// The topic it was published to.
    pub topic: Text,
    /// Where to send a response, if the publisher set one.
    pub reply_to: Option<Text>,
    /// The publisher's message id (the one used for deduplication), if it set one.
    pub message_id: Option<Text>,
    /// Key/value headers.
    pub headers: Headers,
    /// The payload.
    pub payload: Bytes,
}

impl Delivery {
    /// Flag: reply_to present (protocol 1.1).
    pub const FLAG_REPLY_TO: u8 = 0x01;
    /// Flag: message_id present (protocol 1.1).
    pub const FLAG_MESSAGE_ID: u8 = 0x02;

    /// Appends this delivery as a whole DELIVERY frame to `dst`, byte for byte what
    /// [`Frame::encode`](crate::Frame::encode) writes for `Frame::Delivery`, without
    /// building a [`Frame`](crate::Frame). With `v1_1` false, `reply_to` and
    /// `message_id` are left out: the form a protocol 1.0 session reads.
    ///
    /// ```
    /// use bytes::{Bytes, BytesMut};
    /// use tidings_protocol::{Delivery, Frame};
    ///
    /// let d = Delivery {
    ///     consumer_id: 1,
    ///     delivery_id: 42,
    ///     attempt: 1,
    ///     queue: "orders".into(),
    ///     topic: "orders.new".into(),
    ///     reply_to: Some("inbox.7".into()),
    ///     message_id: Some("order-1".into()),
    ///     headers: vec![],
    ///     payload: Bytes::from_static(b"hello"),
    /// };
    /// let (mut direct, mut framed) = (BytesMut::new(), BytesMut::new());
    /// d.encode_frame(&mut direct, true).unwrap();
    /// Frame::Delivery(d.clone()).encode(&mut framed).unwrap();
    /// assert_eq!(direct, framed);
    ///
    /// let (mut v1_0, mut framed) = (BytesMut::new(), BytesMut::new());
    /// d.encode_frame(&mut v1_0, false).unwrap();
    /// let plain = Delivery { reply_to: None, message_id: None, ..d };
    /// Frame::Delivery(plain).encode(&mut framed).unwrap();
    /// assert_eq!(v1_0, framed);
    /// ```
    pub fn encode_frame(&self, dst: &mut BytesMut, v1_1: bool) -> Result<(), ProtocolError> {
        encode_frame(dst, kind::Delivery, "DELIVERY", |w| {
            self.encode_fields(w, v1_1)
        })
    }

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        self.encode_fields(w, true)
    }

    fn encode_fields(&self, w: &mut Writer<'_>, v1_1: bool) -> Result<u8, ProtocolError> {
        w.u32(self.consumer_id);
        w.u64(self.delivery_id);
        w.u32(self.attempt);
        w.text("queue", &self.queue)?;
        w.text("topic", &self.topic)?;
        let mut flags = 0;
        if let Some(reply_to) = self.reply_to.as_ref().filter(|_| v1_1) {
            w.text("reply_to", reply_to)?;
            flags |= Self::FLAG_REPLY_TO;
        }
        if let Some(id) = self.message_id.as_ref().filter(|_| v1_1) {
            w.text("message_id", id)?;
            flags |= Self::FLAG_MESSAGE_ID;
        }
        w.headers(&self.headers)?;
        w.raw(&self.payload);
        Ok(flags)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags(
            "DELIVERY",
            flags,
            Self::FLAG_REPLY_TO | Self::FLAG_MESSAGE_ID,
        )?;
        Ok(Self {
            consumer_id: r.u32("consumer_id")?,
            delivery_id: r.u64("delivery_id")?,
            attempt: r.u32("attempt")?,
            queue: r.text("queue")?,
            topic: r.text("topic")?,
            reply_to: if flags & Self::FLAG_REPLY_TO != 0 {
                Some(r.text("reply_to")?)
            } else {
                None
            },
            message_id: if flags & Self::FLAG_MESSAGE_ID != 0 {
                Some(r.text("message_id")?)
            } else {
                None
            },
            headers: r.headers()?,
            payload: r.rest(),
        })
    }
}

fn encode_ids(w: &mut Writer<'_>, ids: &[u64]) -> Result<(), ProtocolError> {
    w.count32("ids", ids.len())?;
    for id in ids {
        w.u64(*id);
    }
    Ok(())
}

fn decode_ids(r: &mut Reader) -> Result<Vec<u64>, ProtocolError> {
    let count = r.u32("ids")? as usize;
    let mut ids = Vec::with_capacity(r.capacity(count, 8));
    for _ in 0..count {
        ids.push(r.u64("ids")?);
    }
    Ok(ids)
}

/// ACK: these deliveries are done; remove them from their queues.
///
/// Body: `request_id:u32 count:u32 count × delivery_id:u64`. No flags. Answered
/// with OK, or ERROR `UnknownDelivery` listing the ids that were not outstanding
/// (the others are still acked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Matches the answer.
    pub request_id: u32,
    /// Delivery ids.
    pub ids: Vec<u64>,
}

impl Ack {
    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.request_id);
        encode_ids(w, &self.ids)?;
        Ok(0)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("ACK", flags, 0)?;
        Ok(Self {
            request_id: r.u32("request_id")?,
            ids: decode_ids(r)?,
        })
    }
}

/// NACK: return these deliveries to their queue, at once or after a delay.
///
/// Body: `request_id:u32 [delay_ms:u64] count:u32 count × delivery_id:u64`. Flag
/// `0x01`: delay_ms present (otherwise the queue's backoff applies). Answered like
/// ACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// Matches the answer.
    pub request_id: u32,
    /// Redeliver no sooner than this; `None` uses the queue's backoff list.
    pub delay_ms: Option<u64>,
    /// Delivery ids.
    pub ids: Vec<u64>,
}

impl Nack {
    /// Flag: delay_ms present.
    pub const FLAG_DELAY: u8 = 0x01;

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.request_id);
        let mut flags = 0;
        if let Some(d) = self.delay_ms {
            w.u64(d);
            flags |= Self::FLAG_DELAY;
        }
        encode_ids(w, &self.ids)?;
        Ok(flags)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("NACK", flags, Self::FLAG_DELAY)?;
        let request_id = r.u32("request_id")?;
        let delay_ms = if flags & Self::FLAG_DELAY != 0 {
            Some(r.u64("delay_ms")?)
        } else {
            None
        };
        Ok(Self {
            request_id,
            delay_ms,
            ids: decode_ids(r)?,
        })
    }
}
