//! Criterion: encode and decode a 128-byte PUBLISH.

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tidings_protocol::{Frame, FrameCodec, Publish};
use tokio_util::codec::{Decoder, Encoder};

fn publish_128(c: &mut Criterion) {
    let frame = Frame::Publish(Publish::new(
        "orders.eu.created",
        Bytes::from(vec![7u8; 128]),
    ));
    let mut codec = FrameCodec::default();
    let mut group = c.benchmark_group("publish_128");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode", |b| {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        b.iter(|| {
            buf.clear();
            codec.encode(&frame, &mut buf).expect("frame fits");
        });
    });
    let mut encoded = BytesMut::new();
    codec.encode(&frame, &mut encoded).expect("frame fits");
    let encoded = encoded.freeze();
    group.bench_function("decode", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&encoded[..]);
            codec.decode(&mut buf).expect("valid").expect("complete")
        });
    });
    group.finish();
}

criterion_group!(benches, publish_128);
criterion_main!(benches);
