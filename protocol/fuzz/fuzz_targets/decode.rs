//! Fuzz target: raw bytes into `FrameCodec`, delivered in fuzzer-chosen pieces.
//!
//! The first input byte picks the maximum frame length and the piece size, the
//! rest is the stream. Besides "no panic", it checks what the codec promises:
//! `Ok(None)` leaves the buffer alone, the buffer never grows past a constant
//! factor of the maximum frame, a decoded frame re-encodes to the exact bytes it
//! came from, and a non-fatal error consumes exactly one frame.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tidings_protocol::{FrameCodec, HEADER_LEN};
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let max = 2 + usize::from(control & 0x0f) * 64;
    let piece = 1 + usize::from(control >> 4) * 4;
    let mut codec = FrameCodec::new(max);
    let bound = 4 * (max + HEADER_LEN) + stream.len();
    let mut buf = BytesMut::new();
    for chunk in stream.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.clone();
            let result = codec.decode(&mut buf);
            assert!(buf.capacity() <= bound, "buffer grew to {}", buf.capacity());
            match result {
                Ok(None) => {
                    assert_eq!(buf, before, "Ok(None) must not consume");
                    break;
                }
                Ok(Some(frame)) => {
                    let consumed = before.len() - buf.len();
                    let mut again = BytesMut::new();
                    codec
                        .encode(&frame, &mut again)
                        .expect("a decoded frame re-encodes");
                    assert_eq!(&again[..], &before[..consumed], "decoding is canonical");
                }
                Err(e) if e.is_fatal() => return,
                Err(_) => {
                    let len = u32::from_be_bytes([before[0], before[1], before[2], before[3]]);
                    assert_eq!(before.len() - buf.len(), 4 + len as usize);
                }
            }
        }
    }
});
