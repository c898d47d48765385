//! Property tests (10,000 cases each): round trip, arbitrary input, split streams,
//! oversized headers and malformed bodies.

use bytes::{BufMut, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use tidings_protocol::{ErrorCode, Frame, FrameCodec, HEADER_LEN, ProtocolError};
use tokio_util::codec::Decoder;

use crate::samples::{all, encode, ends_in_payload, known_flags};
use crate::strategies::frame;

const CASES: u32 = 10_000;

/// `BytesMut` grows its allocation geometrically (it may double a vector it has to
/// grow, and the buffer also holds bytes of the next chunk), so the decoder can
/// only promise a constant factor of its maximum frame; what matters is that the
/// bound does not depend on the length a peer announces.
const GROWTH_SLACK: usize = 4;

/// Every type byte this version knows.
fn known_kinds() -> Vec<u8> {
    (0..=u8::MAX)
        .filter(|k| Frame::name_of(*k).is_some())
        .collect()
}

/// One of the hand-built frames: cheaper than `frame()` where the frame is only
/// there to show the stream is still in step.
fn sample_frame() -> impl Strategy<Value = Frame> {
    proptest::sample::select(all().into_iter().map(|(_, f)| f).collect::<Vec<_>>())
}

/// Every type byte this version does not know.
fn unknown_kinds() -> Vec<u8> {
    (0..=u8::MAX)
        .filter(|k| Frame::name_of(*k).is_none())
        .collect()
}

/// Frames whose header is consistent but whose type, flags and body are random,
/// so that the parsers, not just the length check, see garbage.
fn framed_garbage() -> impl Strategy<Value = Vec<u8>> {
    let one = (
        prop_oneof![4 => proptest::sample::select(known_kinds()), 1 => any::<u8>()],
        prop_oneof![4 => Just(0u8), 1 => any::<u8>()],
        vec(any::<u8>(), 0..48),
    )
        .prop_map(|(kind, flags, body)| {
            let mut out = Vec::with_capacity(body.len() + HEADER_LEN);
            out.put_u32(u32::try_from(body.len() + 2).expect("small body"));
            out.put_u8(kind);
            out.put_u8(flags);
            out.extend_from_slice(&body);
            out
        });
    vec(one, 1..4).prop_map(|frames| frames.concat())
}

/// Arbitrary input: raw bytes, or a stream of random-bodied frames.
fn hostile_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![vec(any::<u8>(), 0..256), framed_garbage()]
}

/// Sorted cut points into a buffer of `len` bytes.
fn cuts(len: usize, at: &[Index]) -> Vec<usize> {
    let mut out: Vec<usize> = at.iter().map(|i| i.index(len + 1)).collect();
    out.sort_unstable();
    out
}

/// Decodes a stream delivered in pieces, the way `FramedRead` would.
fn decode_in_pieces(codec: &mut FrameCodec, bytes: &[u8], cut_at: &[usize]) -> Vec<Frame> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut start = 0;
    for end in cut_at.iter().copied().chain([bytes.len()]) {
        buf.extend_from_slice(&bytes[start..end]);
        start = end;
        while let Some(frame) = codec.decode(&mut buf).expect("valid stream") {
            out.push(frame);
        }
    }
    assert!(buf.is_empty(), "bytes left over");
    out
}

/// Re-frames `bytes` (a whole encoded frame) around a new body and type/flags.
fn reframe(kind: u8, flags: u8, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u32(u32::try_from(body.len() + 2).expect("small body"));
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_slice(body);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn decode_inverts_encode(f in frame()) {
        let mut buf = encode(&f);
        let decoded = FrameCodec::default().decode(&mut buf);
        prop_assert_eq!(decoded, Ok(Some(f)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn hostile_input_never_panics_or_overallocates(
        input in hostile_input(),
        max in 2usize..300,
        at in vec(any::<Index>(), 0..6),
    ) {
        let mut codec = FrameCodec::new(max);
        let bound = GROWTH_SLACK * (max + HEADER_LEN) + input.len();
        let mut buf = BytesMut::new();
        let mut start = 0;
        'feed: for end in cuts(input.len(), &at).into_iter().chain([input.len()]) {
            buf.extend_from_slice(&input[start..end]);
            start = end;
            loop {
                let before = buf.clone();
                let capacity = buf.capacity();
                let result = codec.decode(&mut buf);
                prop_assert!(buf.capacity() <= bound, "capacity {} > {}", buf.capacity(), bound);
                if buf.capacity() > capacity {
                    // Growth the decoder caused is bounded by the maximum frame alone.
                    prop_assert!(buf.capacity() <= GROWTH_SLACK * (max + HEADER_LEN));
                }
                match result {
                    Ok(None) => {
                        prop_assert_eq!(&buf, &before);
                        break;
                    }
                    Ok(Some(f)) => {
                        // Decoding is canonical: the frame re-encodes to the bytes it came from.
                        let consumed = before.len() - buf.len();
                        prop_assert_eq!(&encode(&f)[..], &before[..consumed]);
                    }
                    Err(e) if e.is_fatal() => {
                        prop_assert!(e.code().closes_connection());
                        break 'feed;
                    }
                    Err(e) => {
                        // A skipped frame is consumed whole, so the stream stays in step.
                        prop_assert!(!e.code().closes_connection());
                        let len = u32::from_be_bytes(before[..4].try_into().unwrap()) as usize;
                        prop_assert_eq!(before.len() - buf.len(), 4 + len);
                    }
                }
            }
        }
    }

    #[test]
    fn split_stream_decodes_to_the_same_frames(
        frames in vec(frame(), 1..4),
        at in vec(any::<Index>(), 0..8),
    ) {
        let mut bytes = BytesMut::new();
        for f in &frames {
            bytes.extend_from_slice(&encode(f));
        }
        let decoded = decode_in_pieces(&mut FrameCodec::default(), &bytes, &cuts(bytes.len(), &at));
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn oversized_frames_fail_from_the_header_alone(
        max in 2usize..(1 << 20),
        excess in 1u64..=u64::from(u32::MAX),
        tail in vec(any::<u8>(), 0..16),
    ) {
        let len = u32::try_from((max as u64 + excess).min(u64::from(u32::MAX))).unwrap();
        let mut buf = BytesMut::with_capacity(4 + tail.len());
        buf.put_u32(len);
        buf.put_slice(&tail);
        let before = buf.clone();
        let capacity = buf.capacity();
        let err = FrameCodec::new(max).decode(&mut buf).unwrap_err();
        prop_assert_eq!(&err, &ProtocolError::FrameTooLarge { len: len as usize, max });
        prop_assert!(err.is_fatal());
        prop_assert_eq!(err.code(), ErrorCode::FrameTooLarge);
        // Nothing was consumed and nothing was reserved for the announced length.
        prop_assert_eq!(&buf, &before);
        prop_assert_eq!(buf.capacity(), capacity);
    }

    #[test]
    fn unknown_frame_type_is_skipped(
        f in frame(),
        kind in proptest::sample::select(unknown_kinds()),
        next in sample_frame(),
    ) {
        let mut buf = encode(&f);
        buf[4] = kind;
        buf.extend_from_slice(&encode(&next));
        let mut codec = FrameCodec::default();
        let err = codec.decode(&mut buf).unwrap_err();
        prop_assert_eq!(&err, &ProtocolError::UnknownFrameType { kind });
        prop_assert!(!err.is_fatal());
        prop_assert_eq!(err.code(), ErrorCode::UnknownFrameType);
        prop_assert_eq!(codec.decode(&mut buf), Ok(Some(next)));
    }

    #[test]
    fn unknown_flags_are_skipped(f in frame(), pick in any::<Index>(), next in sample_frame()) {
        let unknown: Vec<u8> =
            (0..8).map(|bit| 1u8 << bit).filter(|b| known_flags(f.kind()) & b == 0).collect();
        let flag = *pick.get(&unknown);
        let mut buf = encode(&f);
        buf[5] |= flag;
        buf.extend_from_slice(&encode(&next));
        let mut codec = FrameCodec::default();
        let err = codec.decode(&mut buf).unwrap_err();
        prop_assert_eq!(&err, &ProtocolError::UnknownFlags { frame: f.name(), flags: flag });
        prop_assert!(!err.is_fatal());
        prop_assert_eq!(err.code(), ErrorCode::UnknownFlags);
        prop_assert_eq!(codec.decode(&mut buf), Ok(Some(next)));
    }

    #[test]
    fn cut_bodies_are_truncated_fields(f in frame(), cut in any::<Index>()) {
        let bytes = encode(&f);
        let body = &bytes[HEADER_LEN..];
        if body.is_empty() {
            // PING and PONG: nothing to cut.
            return Ok(());
        }
        let fixed_len = body.len() - ends_in_payload(&f).unwrap_or(0);
        let cut = cut.index(body.len());
        let mut buf = reframe(bytes[4], bytes[5], &body[..cut]);
        let result = FrameCodec::default().decode(&mut buf);
        if cut >= fixed_len {
            // Only payload was cut: a valid, shorter message.
            let decoded = result.unwrap().unwrap();
            prop_assert_eq!(ends_in_payload(&decoded), Some(cut - fixed_len));
        } else {
            let err = result.unwrap_err();
            prop_assert!(err.is_fatal());
            prop_assert_eq!(err.code(), ErrorCode::MalformedFrame);
            match err {
                ProtocolError::UnexpectedEof { frame, offset, need, have, .. } => {
                    prop_assert_eq!(frame, f.name());
                    prop_assert_eq!(offset + have, cut);
                    prop_assert!(need > have);
                }
                other => prop_assert!(false, "expected UnexpectedEof, got {other:?}"),
            }
        }
        prop_assert!(buf.is_empty(), "a malformed frame is still consumed whole");
    }

    #[test]
    fn extra_bytes_are_trailing_or_payload(f in frame(), extra in vec(any::<u8>(), 1..8)) {
        let bytes = encode(&f);
        let mut body = bytes[HEADER_LEN..].to_vec();
        body.extend_from_slice(&extra);
        let mut buf = reframe(bytes[4], bytes[5], &body);
        let result = FrameCodec::default().decode(&mut buf);
        match ends_in_payload(&f) {
            Some(len) => {
                let decoded = result.unwrap().unwrap();
                prop_assert_eq!(ends_in_payload(&decoded), Some(len + extra.len()));
            }
            None => {
                let err = result.unwrap_err();
                prop_assert_eq!(
                    &err,
                    &ProtocolError::TrailingBytes { frame: f.name(), count: extra.len() }
                );
                prop_assert!(err.is_fatal());
            }
        }
    }
}
