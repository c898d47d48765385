//! Criterion: encode and decode a PUBLISH with a 128-byte payload (the size the
//! design targets), plus 1 KiB and 16 KiB to show how cost scales with payload.
//!
//! Run with `cargo bench -p tidings-protocol --bench codec`.

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use tidings_protocol::{Frame, FrameCodec, Publish};
use tokio_util::codec::{Decoder, Encoder};

fn publish(c: &mut Criterion) {
    let mut codec = FrameCodec::default();
    let mut group = c.benchmark_group("publish");
    for size in [128usize, 1024, 16 * 1024] {
        let mut frame = Publish::new("orders.eu.created", Bytes::from(vec![7u8; size]));
        frame.headers = vec![("content-type".into(), "application/json".into())];
        let frame = Frame::Publish(frame);
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("encode", size), &frame, |b, frame| {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            b.iter(|| {
                buf.clear();
                codec.encode(frame, &mut buf).expect("frame fits");
            });
        });
        let mut encoded = BytesMut::new();
        codec.encode(&frame, &mut encoded).expect("frame fits");
        group.bench_with_input(BenchmarkId::new("decode", size), &encoded, |b, encoded| {
            // The copy into a fresh read buffer is setup, not measured.
            b.iter_batched(
                || encoded.clone(),
                |mut buf| codec.decode(&mut buf).expect("valid").expect("complete"),
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

fn main() {
    // What `criterion_main!` expands to, written out so that no undocumented public
    // item is generated.
    let mut c = Criterion::default().configure_from_args();
    publish(&mut c);
    c.final_summary();
}
