//! Durable queue frames: declare/delete/bind/unbind/info/list, dead letters and
//! redrive, and the CONFIRM of a publish. Consumer frames are in `consumer.rs`.

use bytes::Bytes;

use crate::error::ProtocolError;
use crate::frame::{Headers, check_flags, request_only};
use crate::text::Text;
use crate::wire::{Reader, Writer};

/// What a queue does when a publish would take it past its max length or max bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Overflow {
    /// Refuse the new message (wire value 0); the CONFIRM counts it as rejected.
    RejectPublish,
    /// Drop the oldest ready message to make room (wire value 1).
    DropHead,
}

impl Overflow {
    /// The wire byte.
    pub fn to_u8(self) -> u8 {
        match self {
            Overflow::RejectPublish => 0,
            Overflow::DropHead => 1,
        }
    }

    /// From the wire byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Overflow::RejectPublish),
            1 => Some(Overflow::DropHead),
            _ => None,
        }
    }

    /// The name used in docs and the CLI (`reject-publish`, `drop-head`).
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::RejectPublish => "reject-publish",
            Overflow::DropHead => "drop-head",
        }
    }
}

impl std::str::FromStr for Overflow {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reject-publish" => Ok(Overflow::RejectPublish),
            "drop-head" => Ok(Overflow::DropHead),
            other => Err(format!(
                "unknown overflow policy `{other}` (expected reject-publish or drop-head)"
            )),
        }
    }
}

/// A queue's options. `None` means "the server's default" (PROTOCOL.md lists them).
///
/// Layout: `bindings:(count:u16 × str) present:u16` followed by each present field,
/// in bit order: bit 0 `max_deliveries:u32`, 1 `ack_timeout_ms:u64`, 2
/// `backoff_ms:(count:u16 × u64)`, 3 `max_length:u64`, 4 `max_bytes:u64`, 5
/// `overflow:u8`, 6 `ttl_ms:u64`, 7 `dedup_window_ms:u64`, 8 `dead_letter:str`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueueOptions {
    /// Topic patterns whose messages the queue takes.
    pub bindings: Vec<Text>,
    /// Deliveries before a message is dead-lettered (default 5).
    pub max_deliveries: Option<u32>,
    /// Time a consumer has to ack a delivery before it is redelivered (default 30 s).
    pub ack_timeout_ms: Option<u64>,
    /// Delays before redelivery after the 1st, 2nd, … failed attempt; the last one
    /// repeats (default: none, redeliver at once).
    pub backoff_ms: Option<Vec<u64>>,
    /// Most messages the queue holds, ready, delayed and in flight together
    /// (default: unlimited).
    pub max_length: Option<u64>,
    /// Most bytes the queue holds, counted as [`QueueInfo::bytes`] (default:
    /// unlimited).
    pub max_bytes: Option<u64>,
    /// What happens past a limit (default reject-publish).
    pub overflow: Option<Overflow>,
    /// Messages older than this are not delivered: dead-lettered (reason
    /// `expired`) when the dead-letter queue exists, else dropped (default: never).
    pub ttl_ms: Option<u64>,
    /// How long a message id is remembered for deduplication (default 2 min).
    pub dedup_window_ms: Option<u64>,
    /// The dead-letter queue's name (default `<queue>.dlq`).
    pub dead_letter: Option<Text>,
}

impl QueueOptions {
    const KNOWN: u16 = 0x01ff;

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<(), ProtocolError> {
        w.text_list("bindings", &self.bindings)?;
        let fields = [
            self.max_deliveries.is_some(),
            self.ack_timeout_ms.is_some(),
            self.backoff_ms.is_some(),
            self.max_length.is_some(),
            self.max_bytes.is_some(),
            self.overflow.is_some(),
            self.ttl_ms.is_some(),
            self.dedup_window_ms.is_some(),
            self.dead_letter.is_some(),
        ];
        let present = fields
            .iter()
            .enumerate()
            .fold(0u16, |acc, (bit, on)| acc | (u16::from(*on) << bit));
        w.u16(present);
        if let Some(v) = self.max_deliveries {
            w.u32(v);
        }
        if let Some(v) = self.ack_timeout_ms {
            w.u64(v);
        }
        if let Some(list) = &self.backoff_ms {
            w.count16("backoff_ms", list.len())?;
            for v in list {
                w.u64(*v);
            }
        }
        for v in [self.max_length, self.max_bytes].into_iter().flatten() {
            w.u64(v);
        }
        if let Some(v) = self.overflow {
            w.u8(v.to_u8());
        }
        for v in [self.ttl_ms, self.dedup_window_ms].into_iter().flatten() {
            w.u64(v);
        }
        if let Some(v) = &self.dead_letter {
            w.text("dead_letter", v)?;
        }
        Ok(())
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Self, ProtocolError> {
        let bindings = r.text_list("bindings")?;
        let present = r.u16("present")?;
        if present & !Self::KNOWN != 0 {
            return Err(r.invalid("present", u64::from(present)));
        }
        let has = |bit: u16| present & (1 << bit) != 0;
        let mut o = QueueOptions {
            bindings,
            ..Default::default()
        };
        if has(0) {
            o.max_deliveries = Some(r.u32("max_deliveries")?);
        }
        if has(1) {
            o.ack_timeout_ms = Some(r.u64("ack_timeout_ms")?);
        }
        if has(2) {
            let count = usize::from(r.u16("backoff_ms")?);
            let mut list = Vec::with_capacity(r.capacity(count, 8));
            for _ in 0..count {
                list.push(r.u64("backoff_ms")?);
            }
            o.backoff_ms = Some(list);
        }
        if has(3) {
            o.max_length = Some(r.u64("max_length")?);
        }
        if has(4) {
            o.max_bytes = Some(r.u64("max_bytes")?);
        }
        if has(5) {
            let v = r.u8("overflow")?;
            o.overflow =
                Some(Overflow::from_u8(v).ok_or_else(|| r.invalid("overflow", u64::from(v)))?);
        }
        if has(6) {
            o.ttl_ms = Some(r.u64("ttl_ms")?);
        }
        if has(7) {
            o.dedup_window_ms = Some(r.u64("dedup_window_ms")?);
        }
        if has(8) {
            o.dead_letter = Some(r.text("dead_letter")?);
        }
        Ok(o)
    }
}

/// QUEUE_DECLARE: create a queue, or check that an existing one has these options.
///
/// Body: `request_id:u32 name:str options`. No flags. Answered with OK, or ERROR
/// `QueueOptionsMismatch` naming the first option that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDeclare {
    /// Matches the answer.
    pub request_id: u32,
    /// Queue name: a valid topic (dot-separated tokens, no wildcards).
    pub name: Text,
    /// The options.
    pub options: QueueOptions,
}

impl QueueDeclare {
    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.request_id);
        w.text("name", &self.name)?;
        self.options.encode(w)?;
        Ok(0)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("QUEUE_DECLARE", flags, 0)?;
        Ok(Self {
            request_id: r.u32("request_id")?,
            name: r.text("name")?,
            options: QueueOptions::decode(r)?,
        })
    }
}

macro_rules! name_frame {
    ($( $(#[$doc:meta])* $name:ident, $frame:literal, $field:ident; )*) => {$(
        $(#[$doc])*
        ///
        #[doc = concat!("Body: `request_id:u32 ", stringify!($field), ":str`. No flags.")]
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name {
            /// Matches the answer.
            pub request_id: u32,
            /// The queue.
            pub $field: Text,
        }

        impl $name {
            pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
                w.u32(self.request_id);
                w.text(stringify!($field), &self.$field)?;
                Ok(0)
            }

            pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
                check_flags($frame, flags, 0)?;
                Ok(Self { request_id: r.u32("request_id")?, $field: r.text(stringify!($field))? })
            }
        }
    )*};
}

name_frame! {
    /// QUEUE_DELETE: delete a queue and all its messages. Answered with OK.
    QueueDelete, "QUEUE_DELETE", name;
    /// QUEUE_INFO: ask for one queue's figures. Answered with QUEUE_INFO_REPLY.
    QueueInfoRequest, "QUEUE_INFO", name;
}

macro_rules! binding_frame {
    ($( $(#[$doc:meta])* $name:ident, $frame:literal; )*) => {$(
        $(#[$doc])*
        ///
        /// Body: `request_id:u32 name:str pattern:str`. No flags. Answered with OK.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name {
            /// Matches the answer.
            pub request_id: u32,
            /// The queue.
            pub name: Text,
            /// The topic pattern.
            pub pattern: Text,
        }

        impl $name {
            pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
                w.u32(self.request_id);
                w.text("name", &self.name)?;
                w.text("pattern", &self.pattern)?;
                Ok(0)
            }

            pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
                check_flags($frame, flags, 0)?;
                Ok(Self {
                    request_id: r.u32("request_id")?,
                    name: r.text("name")?,
                    pattern: r.text("pattern")?,
                })
            }
        }
    )*};
}

binding_frame! {
    /// QUEUE_BIND: add a binding pattern to a queue (idempotent).
    QueueBind, "QUEUE_BIND";
    /// QUEUE_UNBIND: remove a binding pattern from a queue.
    QueueUnbind, "QUEUE_UNBIND";
}

request_only! {
    /// QUEUE_LIST: ask for every queue's figures. Answered with QUEUE_LIST_REPLY.
    QueueList, "QUEUE_LIST";
}

macro_rules! limit_frame {
    ($( $(#[$doc:meta])* $name:ident, $frame:literal; )*) => {$(
        $(#[$doc])*
        ///
        /// Body: `request_id:u32 queue:str limit:u32` (limit 0: no limit). No flags.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name {
            /// Matches the answer.
            pub request_id: u32,
            /// The queue whose dead letters are meant (not the dead-letter queue).
            pub queue: Text,
            /// At most this many (0: all).
            pub limit: u32,
        }

        impl $name {
            pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
                w.u32(self.request_id);
                w.text("queue", &self.queue)?;
                w.u32(self.limit);
                Ok(0)
            }

            pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
                check_flags($frame, flags, 0)?;
                Ok(Self {
                    request_id: r.u32("request_id")?,
                    queue: r.text("queue")?,
                    limit: r.u32("limit")?,
                })
            }
        }
    )*};
}

/// DEAD_LETTERS: list a queue's dead letters, oldest first, one page at a time.
///
/// Body: `request_id:u32 queue:str limit:u32 [from:u64]` (limit 0: as many as fit).
/// Flag `0x01`: `from` present — list from this position on (the `next` of the
/// previous DEAD_LETTERS_REPLY); without it the list starts at the oldest.
/// Answered with DEAD_LETTERS_REPLY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetters {
    /// Matches the answer.
    pub request_id: u32,
    /// The queue whose dead letters are meant (not the dead-letter queue).
    pub queue: Text,
    /// At most this many (0: as many as the server sends in one reply).
    pub limit: u32,
    /// Continue from this position (a previous reply's `next`).
    pub from: Option<u64>,
}

impl DeadLetters {
    /// Flag: `from` present.
    pub const FLAG_FROM: u8 = 0x01;

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.request_id);
        w.text("queue", &self.queue)?;
        w.u32(self.limit);
        Ok(match self.from {
            Some(from) => {
                w.u64(from);
                Self::FLAG_FROM
            }
            None => 0,
        })
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("DEAD_LETTERS", flags, Self::FLAG_FROM)?;
        Ok(Self {
            request_id: r.u32("request_id")?,
            queue: r.text("queue")?,
            limit: r.u32("limit")?,
            from: if flags & Self::FLAG_FROM != 0 {
                Some(r.u64("from")?)
            } else {
                None
            },
        })
    }
}

limit_frame! {
    /// REDRIVE: move dead letters back into their queue as fresh messages.
    /// Answered with REDRIVE_REPLY.
    Redrive, "REDRIVE";
}

/// CONFIRM: a publish that asked for it is durable in every queue that took it.
///
/// Body: `request_id:u32 queues:u32 rejected:u32`. Flag `0x01`: duplicate (the
/// message id was seen within a queue's dedup window; stored once).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Confirm {
    /// The PUBLISH this confirms.
    pub request_id: u32,
    /// Queues that hold the message (duplicates count as holding it).
    pub queues: u32,
    /// Queues that refused it because they were full (overflow reject-publish).
    pub rejected: u32,
    /// The message id had been seen before in at least one queue.
    pub duplicate: bool,
}

impl Confirm {
    /// Flag: duplicate.
    pub const FLAG_DUPLICATE: u8 = 0x01;

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.request_id);
        w.u32(self.queues);
        w.u32(self.rejected);
        Ok(if self.duplicate {
            Self::FLAG_DUPLICATE
        } else {
            0
        })
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("CONFIRM", flags, Self::FLAG_DUPLICATE)?;
        Ok(Self {
            request_id: r.u32("request_id")?,
            queues: r.u32("queues")?,
            rejected: r.u32("rejected")?,
            duplicate: flags & Self::FLAG_DUPLICATE != 0,
        })
    }
}

/// One queue's figures.
///
/// Layout: `name:str bindings:(count:u16 × str) depth:u64 bytes:u64 in_flight:u64
/// delayed:u64 consumers:u32 dead_lettered:u64 published:u64 delivered:u64
/// acked:u64 publish_rate:u64 deliver_rate:u64 ack_rate:u64`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueueInfo {
    /// Queue name.
    pub name: Text,
    /// Binding patterns.
    pub bindings: Vec<Text>,
    /// Messages stored and not acked (ready, delayed and in flight).
    pub depth: u64,
    /// Size of those messages as the limits count it: topic, message id, headers
    /// and payload plus a per-message overhead (PROTOCOL.md, QUEUE_INFO_REPLY).
    pub bytes: u64,
    /// Delivered and awaiting ack.
    pub in_flight: u64,
    /// Waiting for a delay or backoff to pass.
    pub delayed: u64,
    /// Attached consumers.
    pub consumers: u32,
    /// Messages moved to the dead-letter queue since the broker started.
    pub dead_lettered: u64,
    /// Messages stored since the broker started.
    pub published: u64,
    /// Deliveries since the broker started.
    pub delivered: u64,
    /// Acks since the broker started.
    pub acked: u64,
    /// Messages stored per second, over the last few seconds.
    pub publish_rate: u64,
    /// Deliveries per second, over the last few seconds.
    pub deliver_rate: u64,
    /// Acks per second, over the last few seconds.
    pub ack_rate: u64,
}

impl QueueInfo {
    fn encode(&self, w: &mut Writer<'_>) -> Result<(), ProtocolError> {
        w.text("name", &self.name)?;
        w.text_list("bindings", &self.bindings)?;
        for v in [self.depth, self.bytes, self.in_flight, self.delayed] {
            w.u64(v);
        }
        w.u32(self.consumers);
        for v in [
            self.dead_lettered,
            self.published,
            self.delivered,
            self.acked,
            self.publish_rate,
            self.deliver_rate,
            self.ack_rate,
        ] {
            w.u64(v);
        }
        Ok(())
    }

    fn decode(r: &mut Reader) -> Result<Self, ProtocolError> {
        Ok(Self {
            name: r.text("name")?,
            bindings: r.text_list("bindings")?,
            depth: r.u64("depth")?,
            bytes: r.u64("bytes")?,
            in_flight: r.u64("in_flight")?,
            delayed: r.u64("delayed")?,
            consumers: r.u32("consumers")?,
            dead_lettered: r.u64("dead_lettered")?,
            published: r.u64("published")?,
            delivered: r.u64("delivered")?,
            acked: r.u64("acked")?,
            publish_rate: r.u64("publish_rate")?,
            deliver_rate: r.u64("deliver_rate")?,
            ack_rate: r.u64("ack_rate")?,
        })
    }
}

/// QUEUE_INFO_REPLY: one queue's figures.
///
/// Body: `request_id:u32 info [options]`. Flag `0x01` (`OPTIONS`, protocol 1.1,
/// sent only on 1.1 sessions): the queue's options follow, laid out as in
/// QUEUE_DECLARE with every default filled in, so that they can be declared again
/// as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfoReply {
    /// The QUEUE_INFO this answers.
    pub request_id: u32,
    /// The figures.
    pub info: QueueInfo,
    /// The queue's options, defaults filled in (an option still `None` is
    /// unlimited or off: `max_length`, `max_bytes`, `ttl_ms`). Boxed so that it
    /// does not make every [`crate::Frame`] larger.
    pub options: Option<Box<QueueOptions>>,
}

impl QueueInfoReply {
    /// Flag: the queue's options follow the figures.
    pub const FLAG_OPTIONS: u8 = 0x01;

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.request_id);
        self.info.encode(w)?;
        if let Some(options) = &self.options {
            options.encode(w)?;
            return Ok(Self::FLAG_OPTIONS);
        }
        Ok(0)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("QUEUE_INFO_REPLY", flags, Self::FLAG_OPTIONS)?;
        Ok(Self {
            request_id: r.u32("request_id")?,
            info: QueueInfo::decode(r)?,
            options: if flags & Self::FLAG_OPTIONS != 0 {
                Some(Box::new(QueueOptions::decode(r)?))
            } else {
                None
            },
        })
    }
}

/// QUEUE_LIST_REPLY: every queue's figures, by name.
///
/// Body: `request_id:u32 count:u32 count × info`. No flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueListReply {
    /// The QUEUE_LIST this answers.
    pub request_id: u32,
    /// One entry per queue.
    pub queues: Vec<QueueInfo>,
}

impl QueueListReply {
    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.request_id);
        w.count32("count", self.queues.len())?;
        for q in &self.queues {
            q.encode(w)?;
        }
        Ok(0)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("QUEUE_LIST_REPLY", flags, 0)?;
        let request_id = r.u32("request_id")?;
        let count = r.u32("count")? as usize;
        let mut queues = Vec::with_capacity(r.capacity(count, 96));
        for _ in 0..count {
            queues.push(QueueInfo::decode(r)?);
        }
        Ok(Self { request_id, queues })
    }
}

/// A message that exhausted its deliveries (or was otherwise dead-lettered).
///
/// Layout: `id:u64 topic:str attempts:u32 reason:str headers payload:(len:u32 bytes)`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeadLetter {
    /// Its position in the dead-letter queue.
    pub id: u64,
    /// Original topic.
    pub topic: Text,
    /// Deliveries made before it was dead-lettered.
    pub attempts: u32,
    /// Why (`max_deliveries`, `expired`).
    pub reason: Text,
    /// Original headers.
    pub headers: Headers,
    /// Original payload.
    pub payload: Bytes,
}

/// DEAD_LETTERS_REPLY: one page of a queue's dead letters, oldest first.
///
/// Body: `request_id:u32 count:u32 count × dead_letter [next:u64]`. Flag `0x01`:
/// `next` present — there may be more letters; ask again with `from = next`. The
/// server fills a reply up to its `max_frame_len` at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLettersReply {
    /// The DEAD_LETTERS this answers.
    pub request_id: u32,
    /// The letters.
    pub letters: Vec<DeadLetter>,
    /// Where the next page starts, when there may be more.
    pub next: Option<u64>,
}

impl DeadLettersReply {
    /// Flag: `next` present.
    pub const FLAG_MORE: u8 = 0x01;

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.request_id);
        w.count32("count", self.letters.len())?;
        for l in &self.letters {
            w.u64(l.id);
            w.text("topic", &l.topic)?;
            w.u32(l.attempts);
            w.text("reason", &l.reason)?;
            w.headers(&l.headers)?;
            w.bytes("payload", &l.payload)?;
        }
        Ok(match self.next {
            Some(next) => {
                w.u64(next);
                Self::FLAG_MORE
            }
            None => 0,
        })
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("DEAD_LETTERS_REPLY", flags, Self::FLAG_MORE)?;
        let request_id = r.u32("request_id")?;
        let count = r.u32("count")? as usize;
        let mut letters = Vec::with_capacity(r.capacity(count, 22));
        for _ in 0..count {
            letters.push(DeadLetter {
                id: r.u64("id")?,
                topic: r.text("topic")?,
                attempts: r.u32("attempts")?,
                reason: r.text("reason")?,
                headers: r.headers()?,
                payload: r.bytes("payload")?,
            });
        }
        let next = if flags & Self::FLAG_MORE != 0 {
            Some(r.u64("next")?)
        } else {
            None
        };
        Ok(Self {
            request_id,
            letters,
            next,
        })
    }
}

/// REDRIVE_REPLY: how many dead letters went back to their queue.
///
/// Body: `request_id:u32 moved:u64`. No flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedriveReply {
    /// The REDRIVE this answers.
    pub request_id: u32,
    /// Messages moved.
    pub moved: u64,
}

impl RedriveReply {
    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
        w.u32(self.request_id);
        w.u64(self.moved);
        Ok(0)
    }

    pub(crate) fn decode(flags: u8, r: &mut Reader) -> Result<Self, ProtocolError> {
        check_flags("REDRIVE_REPLY", flags, 0)?;
        Ok(Self {
            request_id: r.u32("request_id")?,
            moved: r.u64("moved")?,
        })
    }
}
