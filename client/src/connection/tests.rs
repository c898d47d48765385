//! The connection logic over `tokio::io::duplex`, with the test playing the
//! broker's side of the wire through the real codec.

use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use tidings_protocol::{
    Confirm, ErrorCode, ErrorReply, Frame, FrameCodec, PROTOCOL_MINOR, PROTOCOL_VERSION, Ping,
    Publish, Text, Welcome,
};
use tokio::io::DuplexStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::Decoder;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::error::{CallError, ConnectError};
use crate::handle::{ConnState, Handle, Shared};
use crate::options::ClientBuilder;

const BOUND: Duration = Duration::from_secs(5);

fn welcome() -> Frame {
    Frame::Welcome(Welcome {
        minor: None,
        version: PROTOCOL_VERSION,
        server_version: Text::from("test"),
        max_frame_len: 1 << 20,
        max_payload: 1 << 16,
        heartbeat_ms: 0,
        max_credit: None,
    })
}

async fn next(server: &mut Framed<DuplexStream, FrameCodec>) -> Frame {
    tokio::time::timeout(BOUND, server.next())
        .await
        .expect("a frame within the bound")
        .expect("the stream is open")
        .expect("a valid frame")
}

#[tokio::test]
async fn handshake_sends_hello_and_learns_limits() {
    let (mut client_io, server_io) = tokio::io::duplex(4096);
    let mut server = Framed::new(server_io, FrameCodec::default());
    let opts = ClientBuilder::new("test").name("svc").token("t0k");
    let handshake =
        tokio::spawn(async move { handshake(&mut client_io, &opts, Some(PROTOCOL_MINOR)).await });
    let Frame::Hello(hello) = next(&mut server).await else {
        panic!("HELLO first");
    };
    assert_eq!(hello.version, PROTOCOL_VERSION);
    assert_eq!(hello.client_name, "svc");
    assert_eq!(hello.token.as_deref(), Some("t0k"));
    // WELCOME followed at once by a PING: the PING must stay in the leftover buffer.
    server.feed(welcome()).await.unwrap();
    server.send(Frame::Ping(Ping)).await.unwrap();
    let (welcome, mut rest) = handshake.await.unwrap().unwrap();
    assert_eq!(welcome.max_payload, 1 << 16);
    let mut rest_frames = Vec::new();
    let mut codec = FrameCodec::default();
    // The PING may or may not have been read along with the WELCOME.
    while let Some(f) = codec.decode(&mut rest).unwrap() {
        rest_frames.push(f);
    }
    assert!(rest_frames.iter().all(|f| matches!(f, Frame::Ping(_))));
}

#[tokio::test]
async fn handshake_refusal_is_typed() {
    let (mut client_io, server_io) = tokio::io::duplex(4096);
    let mut server = Framed::new(server_io, FrameCodec::default());
    let opts = ClientBuilder::new("test");
    let handshake =
        tokio::spawn(async move { handshake(&mut client_io, &opts, Some(PROTOCOL_MINOR)).await });
    next(&mut server).await;
    server
        .send(Frame::Error(ErrorReply::new(
            0,
            ErrorCode::AuthFailed,
            "bad token",
        )))
        .await
        .unwrap();
    match handshake.await.unwrap() {
        Err(ConnectError::Refused { error, .. }) => {
            assert_eq!(error.code(), Some(ErrorCode::AuthFailed));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn handshake_on_a_closed_socket_fails() {
    let (mut client_io, server_io) = tokio::io::duplex(4096);
    drop(server_io);
    let opts = ClientBuilder::new("test");
    assert!(
        handshake(&mut client_io, &opts, Some(PROTOCOL_MINOR))
            .await
            .is_err()
    );
}

/// A task running one session over a duplex pipe, and the handle to drive it.
fn session() -> (
    Handle,
    Framed<DuplexStream, FrameCodec>,
    CancellationToken,
    tokio::task::JoinHandle<SessionEnd>,
) {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let (state_tx, state_rx) = watch::channel(ConnState::Connected);
    let shared = Arc::new(Shared::new(ClientBuilder::new("test"), state_rx, 1 << 16));
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = Handle { tx, shared };
    let close = CancellationToken::new();
    let mut task = Task::new(handle.clone(), rx, state_tx, close.clone());
    let join = tokio::spawn(async move {
        let (reader, writer) = tokio::io::split(client_io);
        let end = task.session(reader, writer, BytesMut::new(), None).await;
        task.on_disconnect();
        end
    });
    (
        handle,
        Framed::new(server_io, FrameCodec::default()),
        close,
        join,
    )
}

#[tokio::test]
async fn answers_pings_and_keeps_publish_order() {
    let (handle, mut server, close, join) = session();
    for i in 0u32..200 {
        handle
            .publish_message(Message::new("t", i.to_be_bytes().to_vec()))
            .await
            .unwrap();
    }
    for i in 0u32..200 {
        let Frame::Publish(p) = next(&mut server).await else {
            panic!("publishes in order");
        };
        assert_eq!(&p.payload[..], &i.to_be_bytes());
    }
    server.send(Frame::Ping(Ping)).await.unwrap();
    assert!(matches!(next(&mut server).await, Frame::Pong(_)));
    close.cancel();
    assert!(matches!(join.await.unwrap(), SessionEnd::Closed));
}

#[tokio::test]
async fn answers_are_matched_by_request_id_in_any_order() {
    let (handle, mut server, _close, _join) = session();
    let call = |topic: &'static str| {
        let handle = handle.clone();
        tokio::spawn(async move {
            handle
                .call(BOUND, |id| {
                    Frame::Publish(Publish {
                        request_id: Some(id),
                        confirm: true,
                        ..Publish::new(topic, "x")
                    })
                })
                .await
        })
    };
    let first = call("a");
    let Frame::Publish(a) = next(&mut server).await else {
        panic!()
    };
    let second = call("b");
    let Frame::Publish(b) = next(&mut server).await else {
        panic!()
    };
    // Answer the second first.
    for (p, queues) in [(&b, 2), (&a, 1)] {
        server
            .send(Frame::Confirm(Confirm {
                request_id: p.request_id.unwrap(),
                queues,
                rejected: 0,
                duplicate: false,
            }))
            .await
            .unwrap();
    }
    let Ok(Frame::Confirm(ca)) = first.await.unwrap() else {
        panic!()
    };
    let Ok(Frame::Confirm(cb)) = second.await.unwrap() else {
        panic!()
    };
    assert_eq!((ca.queues, cb.queues), (1, 2));
}

#[tokio::test]
async fn a_dropped_connection_fails_pending_calls() {
    let (handle, mut server, _close, join) = session();
    let (reply_tx, reply_rx) = oneshot::channel();
    let id = handle.shared.next_id();
    handle
        .send(Command::Call {
            id,
            frame: Frame::Stats(tidings_protocol::Stats { request_id: id }),
            reply: reply_tx,
        })
        .unwrap();
    assert!(matches!(next(&mut server).await, Frame::Stats(_)));
    drop(server);
    assert!(matches!(join.await.unwrap(), SessionEnd::Lost(_)));
    let answer = tokio::time::timeout(BOUND, reply_rx).await.unwrap();
    assert!(matches!(answer, Ok(Err(CallError::ConnectionLost))));
}

#[tokio::test]
async fn acks_are_batched_into_one_frame() {
    let (handle, mut server, _close, _join) = session();
    let epoch = handle.shared.epoch.load(Ordering::Relaxed);
    // Queued before the (single-threaded) task runs, so it takes them in one
    // drain and they leave as one frame.
    for delivery_id in 1..=50u64 {
        handle.send(Command::Ack { epoch, delivery_id }).unwrap();
    }
    let Frame::Ack(ack) = next(&mut server).await else {
        panic!("an ACK frame")
    };
    assert_eq!(ack.ids, (1..=50).collect::<Vec<_>>());
    // Stale acks (an older connection's) never reach the wire.
    handle
        .send(Command::Ack {
            epoch: epoch - 1,
            delivery_id: 99,
        })
        .unwrap();
    handle
        .send(Command::Ack {
            epoch,
            delivery_id: 100,
        })
        .unwrap();
    let Frame::Ack(ack) = next(&mut server).await else {
        panic!()
    };
    assert_eq!(ack.ids, vec![100]);
}

#[tokio::test]
async fn acks_keep_their_place_before_later_commands() {
    let (handle, mut server, _close, _join) = session();
    let epoch = handle.shared.epoch.load(Ordering::Relaxed);
    handle
        .send(Command::Ack {
            epoch,
            delivery_id: 1,
        })
        .unwrap();
    let (reply, _rx) = oneshot::channel();
    let id = handle.shared.next_id();
    handle
        .send(Command::Call {
            id,
            frame: Frame::Stats(tidings_protocol::Stats { request_id: id }),
            reply,
        })
        .unwrap();
    assert!(matches!(next(&mut server).await, Frame::Ack(_)));
    assert!(matches!(next(&mut server).await, Frame::Stats(_)));
}

#[tokio::test]
async fn a_consumer_cancelled_by_the_broker_ends_with_its_reason() {
    let (handle, mut server, _close, _join) = session();
    let (tx, mut rx) = mpsc::channel(8);
    let ended = Arc::new(std::sync::OnceLock::new());
    let (reply, answer) = oneshot::channel();
    let id = handle.shared.next_id();
    handle
        .send(Command::Consume {
            id,
            cid: 7,
            queue: Text::from("jobs"),
            prefetch: 4,
            limit: None,
            sink: crate::consumer::ConsumerSink {
                tx,
                ended: ended.clone(),
            },
            reply,
        })
        .unwrap();
    let Frame::Consume(c) = next(&mut server).await else {
        panic!("a CONSUME")
    };
    assert_eq!((c.consumer_id, c.credit, c.limit), (7, 4, None));
    server
        .send(Frame::Ok(tidings_protocol::OkReply { request_id: id }))
        .await
        .unwrap();
    assert!(answer.await.unwrap().is_ok());
    server
        .send(Frame::Delivery(tidings_protocol::Delivery {
            consumer_id: 7,
            delivery_id: 1,
            attempt: 1,
            queue: Text::from("jobs"),
            topic: Text::from("jobs"),
            ..Default::default()
        }))
        .await
        .unwrap();
    server
        .send(Frame::ConsumerCancelled(
            tidings_protocol::ConsumerCancelled::new(
                7,
                tidings_protocol::CancelReason::QueueDeleted,
                "queue `jobs` was deleted",
            ),
        ))
        .await
        .unwrap();
    // What was delivered first is still handed out, then the stream ends, with
    // the reason recorded.
    let d = tokio::time::timeout(BOUND, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.id(), 1);
    assert!(
        tokio::time::timeout(BOUND, rx.recv())
            .await
            .unwrap()
            .is_none()
    );
    let reason = ended.get().expect("a reason");
    assert!(reason.queue_deleted(), "{reason}");
    assert!(reason.to_string().contains("jobs"), "{reason}");
}
