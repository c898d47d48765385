//! Every frame variant survives encode → decode, and every prefix of it is
//! "incomplete" rather than an error.

use bytes::BytesMut;
use tidings_protocol::{Frame, FrameCodec};
use tokio_util::codec::Decoder;

use crate::samples::{all, encode};

#[test]
fn samples_cover_every_frame_type() {
    let kinds: Vec<u8> = all().iter().map(|(_, f)| f.kind()).collect();
    for kind in 0..=u8::MAX {
        if let Some(name) = Frame::name_of(kind) {
            assert!(kinds.contains(&kind), "no sample for {name} (0x{kind:02x})");
        }
    }
}

#[test]
fn every_sample_round_trips() {
    let mut codec = FrameCodec::default();
    for (name, frame) in all() {
        let mut buf = encode(&frame);
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(
            len + 4,
            buf.len(),
            "{name}: length prefix counts type+flags+body"
        );
        assert_eq!(buf[4], frame.kind(), "{name}: type byte");
        let decoded = codec.decode(&mut buf).unwrap();
        assert_eq!(decoded.as_ref(), Some(&frame), "{name}");
        assert!(buf.is_empty(), "{name}: decoder consumed exactly one frame");
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
    }
}

#[test]
fn all_samples_back_to_back_decode_in_order() {
    let frames: Vec<Frame> = all().into_iter().map(|(_, f)| f).collect();
    let mut buf = BytesMut::new();
    for f in &frames {
        buf.extend_from_slice(&encode(f));
    }
    let mut codec = FrameCodec::default();
    let mut out = Vec::new();
    while let Some(f) = codec.decode(&mut buf).unwrap() {
        out.push(f);
    }
    assert_eq!(out, frames);
    assert!(buf.is_empty());
}

#[test]
fn decoded_payload_shares_the_read_buffer() {
    let frame = Frame::Publish(tidings_protocol::Publish::new("a.b", vec![9u8; 100]));
    let mut buf = encode(&frame);
    let base = buf.as_ptr() as usize;
    let end = base + buf.len();
    let Some(Frame::Publish(p)) = FrameCodec::default().decode(&mut buf).unwrap() else {
        panic!("expected a publish");
    };
    let at = p.payload.as_ptr() as usize;
    assert!(
        at >= base && at + p.payload.len() <= end,
        "payload was copied"
    );
    let topic_at = p.topic.as_bytes().as_ptr() as usize;
    assert!(topic_at >= base && topic_at < end, "topic was copied");
}

#[test]
fn every_prefix_of_every_frame_is_incomplete() {
    let mut codec = FrameCodec::default();
    for (name, frame) in all() {
        let bytes = encode(&frame);
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert_eq!(
                codec.decode(&mut buf),
                Ok(None),
                "{name} cut at {cut} of {}",
                bytes.len()
            );
            assert_eq!(
                &buf[..],
                &bytes[..cut],
                "{name} cut at {cut}: buffer changed"
            );
            if cut >= 4 {
                // Once the length is known the decoder reserves room for the whole frame.
                assert!(
                    buf.capacity() >= bytes.len(),
                    "{name} cut at {cut}: no reserve"
                );
            }
            buf.extend_from_slice(&bytes[cut..]);
            assert_eq!(
                codec.decode(&mut buf).unwrap().as_ref(),
                Some(&frame),
                "{name} completed after cut at {cut}"
            );
            assert!(buf.is_empty());
        }
    }
}

#[test]
fn frame_name_and_kind_agree() {
    for (name, frame) in all() {
        assert_eq!(Frame::name_of(frame.kind()), Some(frame.name()), "{name}");
    }
}

#[test]
fn request_ids_are_reported_for_matching() {
    for (name, frame) in all() {
        let expected = match &frame {
            Frame::Hello(_)
            | Frame::Welcome(_)
            | Frame::Ping(_)
            | Frame::Pong(_)
            | Frame::Message(_)
            | Frame::Credit(_)
            | Frame::Delivery(_)
            | Frame::ConsumerCancelled(_) => None,
            Frame::Publish(p) => p.request_id,
            // Every other frame carries its request id first in the body.
            _ => {
                let bytes = encode(&frame);
                Some(u32::from_be_bytes(bytes[6..10].try_into().unwrap()))
            }
        };
        assert_eq!(frame.request_id(), expected, "{name}");
    }
}
