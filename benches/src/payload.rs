//! The bench's message body: a sequence number and a send timestamp, padded to size.
//!
//! Every system carries the same bytes, so missing and duplicated messages and the
//! end-to-end latency are measured the same way for all of them.

use std::sync::OnceLock;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes taken by the header: sequence number and timestamp, both big-endian `u64`.
pub const HEADER_LEN: usize = 16;

/// Filler after the header; not zero so that no system can compress it away for free.
const PAD: u8 = 0xA5;

/// The process-wide time origin. Publishers and receivers live in the same process,
/// so a monotonic clock shared by both gives exact one-way latencies.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the bench's time origin.
pub fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Builds one payload of `size` bytes (at least [`HEADER_LEN`]) stamped with `now_ns()`.
pub fn encode(seq: u64, size: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(size.max(HEADER_LEN));
    buf.put_u64(seq);
    buf.put_u64(now_ns());
    buf.resize(size.max(HEADER_LEN), PAD);
    buf.freeze()
}

/// What a receiver reads back out of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The sequence number the sender gave the message.
    pub seq: u64,
    /// When it was sent, in nanoseconds since the time origin.
    pub sent_ns: u64,
}

/// Reads the header back; `None` when the payload is too short to be one of ours.
pub fn decode(payload: &[u8]) -> Option<Stamp> {
    let seq = u64::from_be_bytes(payload.get(0..8)?.try_into().ok()?);
    let sent_ns = u64::from_be_bytes(payload.get(8..16)?.try_into().ok()?);
    Some(Stamp { seq, sent_ns })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_sequence_and_size() {
        let p = encode(42, 128);
        assert_eq!(p.len(), 128);
        let stamp = decode(&p).expect("long enough");
        assert_eq!(stamp.seq, 42);
        assert!(stamp.sent_ns <= now_ns());
    }

    #[test]
    fn small_sizes_still_carry_the_header() {
        assert_eq!(encode(1, 3).len(), HEADER_LEN);
    }

    #[test]
    fn short_payloads_are_not_ours() {
        assert_eq!(decode(&[0u8; 15]), None);
        assert_eq!(decode(b""), None);
    }
}
