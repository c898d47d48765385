//! `FrameCodec` under tokio-util's `FramedRead`, the way the broker and client
//! drive it: frames split across reads, and the behaviour after a non-fatal error
//! that the codec's docs warn about.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use futures::StreamExt;
use futures::executor::block_on;
use tidings_protocol::{Frame, FrameCodec, Ping, Pong, ProtocolError, Publish};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::codec::{Encoder, FramedRead};

/// A reader that hands out at most 7 bytes per read, so frames arrive in pieces.
struct Trickle<'a>(&'a [u8]);

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.0.len().min(7).min(buf.remaining());
        buf.put_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Poll::Ready(Ok(()))
    }
}

fn stream(frames: &[Frame]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for f in frames {
        FrameCodec::default().encode(f, &mut buf).unwrap();
    }
    buf.to_vec()
}

#[test]
fn framed_read_yields_every_frame() {
    let frames = vec![
        Frame::Ping(Ping),
        Frame::Publish(Publish::new("a.b", vec![1u8; 10_000])),
        Frame::Pong(Pong),
    ];
    let bytes = stream(&frames);
    let reader = Trickle(&bytes);
    let got: Vec<Frame> = block_on(
        FramedRead::new(reader, FrameCodec::default())
            .map(|r| r.unwrap())
            .collect(),
    );
    assert_eq!(got, frames);
}

#[test]
fn framed_read_pauses_once_after_a_non_fatal_error() {
    let mut bytes = vec![0, 0, 0, 2, 0x7f, 0];
    bytes.extend(stream(&[Frame::Ping(Ping)]));
    let mut framed = FramedRead::new(&bytes[..], FrameCodec::default());
    block_on(async {
        assert_eq!(
            framed.next().await,
            Some(Err(ProtocolError::UnknownFrameType { kind: 0x7f }))
        );
        // The quirk: one `None` that is not the end of the stream...
        assert_eq!(framed.next().await, None);
        // ...and reading goes on with the next frame.
        assert_eq!(framed.next().await, Some(Ok(Frame::Ping(Ping))));
        assert_eq!(framed.next().await, None);
    });
}
