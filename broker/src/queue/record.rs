//! `Message`: a queued message in memory, and the byte layout it is stored with.
//!
//! Layout (big-endian): `version:u8=1 published_ms:u64 deliveries:u32 flags:u8
//! topic:str [message_id:str] [reason:str attempts:u32] [origin:str] [reply_to:str]
//! headers:(count:u16 × key:str value:str) payload` where `str` is `len:u16 bytes`,
//! flag `0x01` marks a message id, `0x02` a dead letter, `0x08` a dead letter's
//! origin queue and `0x04` a reply topic, and the payload is every remaining byte.
//! Records written before reply topics or origins were stored simply lack the flag.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tidings_protocol::{Headers, Publish, Text};

const VERSION: u8 = 1;
const FLAG_MESSAGE_ID: u8 = 0x01;
const FLAG_REASON: u8 = 0x02;
const FLAG_REPLY_TO: u8 = 0x04;
const FLAG_ORIGIN: u8 = 0x08;

/// Bytes a message costs beyond its topic, message id, headers and payload: its
/// bookkeeping in memory and its record framing in the store. Counted in every
/// limit and window, so that a flood of empty messages is bounded too.
pub const MESSAGE_OVERHEAD: u64 = 96;
/// Bytes each header costs beyond its key and value.
const HEADER_OVERHEAD: u64 = 32;

/// A message held by a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub topic: Text,
    pub headers: Headers,
    pub payload: Bytes,
    pub message_id: Option<Text>,
    /// Where the publisher wants answers (request/reply through a queue).
    pub reply_to: Option<Text>,
    /// Wall-clock milliseconds when it was first stored (TTL counts from here).
    pub published_ms: u64,
    /// Deliveries made so far; the next delivery's attempt number is this plus one.
    pub deliveries: u32,
    /// Why it was dead-lettered and after how many deliveries, for messages in a
    /// dead-letter queue (their own `deliveries` count starts again from zero).
    /// Boxed: few messages are dead letters, and every message is moved around
    /// the queue's windows (B-tree nodes shift their entries) and into deliveries.
    pub dead: Option<Box<DeadInfo>>,
}

/// Where a dead letter came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadInfo {
    /// `max_deliveries`, …
    pub reason: Text,
    /// Deliveries made before it was dead-lettered.
    pub attempts: u32,
    /// The queue it was dead-lettered from, so that a dead-letter queue shared by
    /// several queues lists and redrives each one's letters apart. `None` only for
    /// letters written before origins were recorded.
    pub origin: Option<Text>,
}

impl Message {
    /// Bytes counted against a queue's `max_bytes`, its memory windows, and reported
    /// as its `bytes`: topic, message id, headers and payload, plus
    /// [`MESSAGE_OVERHEAD`] and a little per header.
    pub fn size(&self) -> u64 {
        let headers: u64 = self
            .headers
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64 + HEADER_OVERHEAD)
            .sum();
        MESSAGE_OVERHEAD
            + self.topic.len() as u64
            + self.message_id.as_ref().map_or(0, |m| m.len() as u64)
            + self.reply_to.as_ref().map_or(0, |r| r.len() as u64)
            + headers
            + self.payload.len() as u64
    }

    /// A fresh message from a publish, copied into one buffer of its own size, so a
    /// message that stays queued for long does not keep alive the whole read buffer
    /// of the connection it arrived on (the decoder's fields share that buffer).
    pub fn from_publish(p: &Publish, now: u64) -> Message {
        let total = p.topic.len()
            + p.message_id.as_ref().map_or(0, Text::len)
            + p.reply_to.as_ref().map_or(0, Text::len)
            + p.headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + p.payload.len();
        let mut buf = BytesMut::with_capacity(total);
        buf.put_slice(p.topic.as_bytes());
        if let Some(id) = &p.message_id {
            buf.put_slice(id.as_bytes());
        }
        if let Some(r) = &p.reply_to {
            buf.put_slice(r.as_bytes());
        }
        for (k, v) in &p.headers {
            buf.put_slice(k.as_bytes());
            buf.put_slice(v.as_bytes());
        }
        buf.put_slice(&p.payload);
        let mut all = buf.freeze();
        // Each piece was valid UTF-8 where it came from, so the copy is too.
        let mut text = |len: usize| Text::from_utf8(all.split_to(len)).unwrap_or_default();
        let topic = text(p.topic.len());
        let message_id = p.message_id.as_ref().map(|id| text(id.len()));
        let reply_to = p.reply_to.as_ref().map(|r| text(r.len()));
        let headers = p
            .headers
            .iter()
            .map(|(k, v)| (text(k.len()), text(v.len())))
            .collect();
        Message {
            topic,
            headers,
            payload: all,
            message_id,
            reply_to,
            published_ms: now,
            deliveries: 0,
            dead: None,
        }
    }

    /// Encodes the stored form. Strings longer than 65,535 bytes cannot come off the
    /// wire, so truncating the length prefix cannot happen; they are cut defensively.
    /// The stored form as a new buffer.
    pub fn encode_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Bytes [`Message::encode_into`] appends.
    pub fn encoded_len(&self) -> usize {
        let headers_len: usize = self
            .headers
            .iter()
            .map(|(k, v)| 4 + k.len() + v.len())
            .sum();
        16 + 2
            + self.topic.len()
            + self.message_id.as_ref().map_or(0, |m| m.len() + 2)
            + self.dead.as_ref().map_or(0, |d| {
                d.reason.len() + 6 + d.origin.as_ref().map_or(0, |o| o.len() + 2)
            })
            + self.reply_to.as_ref().map_or(0, |r| r.len() + 2)
            + 2
            + headers_len
            + self.payload.len()
    }

    /// Appends the stored form to `out` (a chunk of messages is built this way, with
    /// one copy of each payload).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.push(VERSION);
        out.extend_from_slice(&self.published_ms.to_be_bytes());
        out.extend_from_slice(&self.deliveries.to_be_bytes());
        let mut flags = 0;
        if self.message_id.is_some() {
            flags |= FLAG_MESSAGE_ID;
        }
        if let Some(dead) = &self.dead {
            flags |= FLAG_REASON;
            if dead.origin.is_some() {
                flags |= FLAG_ORIGIN;
            }
        }
        if self.reply_to.is_some() {
            flags |= FLAG_REPLY_TO;
        }
        out.push(flags);
        put_str(out, &self.topic);
        if let Some(id) = &self.message_id {
            put_str(out, id);
        }
        if let Some(dead) = &self.dead {
            put_str(out, &dead.reason);
            out.extend_from_slice(&dead.attempts.to_be_bytes());
            if let Some(origin) = &dead.origin {
                put_str(out, origin);
            }
        }
        if let Some(reply_to) = &self.reply_to {
            put_str(out, reply_to);
        }
        let count = u16::try_from(self.headers.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for (k, v) in self.headers.iter().take(usize::from(count)) {
            put_str(out, k);
            put_str(out, v);
        }
        out.extend_from_slice(&self.payload);
    }

    /// Decodes the stored form; `None` if the bytes are not a record this version wrote.
    pub fn decode(mut buf: Bytes) -> Option<Self> {
        if buf.remaining() < 14 || buf.get_u8() != VERSION {
            return None;
        }
        let published_ms = buf.get_u64();
        let deliveries = buf.get_u32();
        let flags = buf.get_u8();
        let topic = get_str(&mut buf)?;
        let message_id = if flags & FLAG_MESSAGE_ID != 0 {
            Some(get_str(&mut buf)?)
        } else {
            None
        };
        let dead = if flags & FLAG_REASON != 0 {
            let reason = get_str(&mut buf)?;
            if buf.remaining() < 4 {
                return None;
            }
            let attempts = buf.get_u32();
            let origin = if flags & FLAG_ORIGIN != 0 {
                Some(get_str(&mut buf)?)
            } else {
                None
            };
            Some(Box::new(DeadInfo {
                reason,
                attempts,
                origin,
            }))
        } else {
            None
        };
        let reply_to = if flags & FLAG_REPLY_TO != 0 {
            Some(get_str(&mut buf)?)
        } else {
            None
        };
        if buf.remaining() < 2 {
            return None;
        }
        let count = buf.get_u16();
        let mut headers = Vec::with_capacity(usize::from(count).min(buf.remaining() / 4));
        for _ in 0..count {
            let k = get_str(&mut buf)?;
            let v = get_str(&mut buf)?;
            headers.push((k, v));
        }
        Some(Self {
            topic,
            headers,
            payload: buf,
            message_id,
            reply_to,
            published_ms,
            deliveries,
            dead,
        })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

fn get_str(buf: &mut Bytes) -> Option<Text> {
    if buf.remaining() < 2 {
        return None;
    }
    let len = usize::from(buf.get_u16());
    if buf.remaining() < len {
        return None;
    }
    Text::from_utf8(buf.split_to(len)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_truncation() {
        let m = Message {
            reply_to: Some(Text::from("_INBOX.a.1")),
            topic: Text::from("orders.created"),
            headers: vec![(Text::from("content-type"), Text::from("json"))],
            payload: Bytes::from_static(b"{\"id\":7}"),
            message_id: Some(Text::from("m-1")),
            published_ms: 1_700_000_000_000,
            deliveries: 3,
            dead: Some(Box::new(DeadInfo {
                reason: Text::from("max_deliveries"),
                attempts: 5,
                origin: Some(Text::from("orders")),
            })),
        };
        let bytes = Bytes::from(m.encode_vec());
        assert_eq!(Message::decode(bytes.clone()), Some(m));
        // Every cut inside the fixed part and strings fails; cuts in the payload
        // decode to a shorter payload, which is why the store keeps whole records.
        for cut in 0..bytes.len() - 8 {
            assert_eq!(Message::decode(bytes.slice(..cut)), None, "cut at {cut}");
        }
    }

    #[test]
    fn from_publish_copies_into_a_buffer_of_its_own() {
        let mut p = Publish::new("a.b", vec![7u8; 10]);
        p.message_id = Some(Text::from("id"));
        p.headers = vec![(Text::from("k"), Text::from("vv"))];
        let m = Message::from_publish(&p, 5);
        assert_eq!((m.topic.as_str(), m.payload.len()), ("a.b", 10));
        assert_eq!(m.message_id.as_deref(), Some("id"));
        assert_eq!(m.headers[0].1.as_str(), "vv");
        assert_ne!(m.payload.as_ptr(), p.payload.as_ptr());
        assert_eq!(
            m.size(),
            MESSAGE_OVERHEAD + 3 + 2 + (3 + HEADER_OVERHEAD) + 10
        );
    }
}
