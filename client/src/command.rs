//! `Command`: what handles ask the connection task to do, kept apart from wire
//! frames (the task decides ids, batching and what to restore after a reconnect).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tidings_protocol::{Frame, Publish, Text};
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use crate::consumer::ConsumerSink;
use crate::error::CallError;
use crate::message::Message;
use crate::sub_buffer::SubBuffer;

/// The answer channel of a call.
pub(crate) type Reply = oneshot::Sender<Result<tidings_protocol::Frame, CallError>>;

/// What handles ask the connection task to do. Kept apart from wire frames: the
/// task decides ids, batching and what to restore after a reconnect.
pub(crate) enum Command {
    /// Fire-and-forget publish; the permit holds its share of the byte budget until
    /// the frame is written.
    Publish {
        frame: Publish,
        permit: OwnedSemaphorePermit,
    },
    /// A frame the broker answers under request id `id`.
    Call {
        id: u32,
        frame: Frame,
        reply: Reply,
    },
    Subscribe {
        id: u32,
        sid: u32,
        pattern: Text,
        group: Option<Text>,
        buffer: Arc<SubBuffer>,
        stalls: Arc<AtomicU64>,
        reply: Reply,
    },
    Unsubscribe {
        sid: u32,
        reply: Option<Reply>,
    },
    /// A request: `frame` carries `id`, check-responders and a reply topic ending in
    /// `token`.
    Request {
        id: u32,
        token: u64,
        frame: Publish,
        reply: oneshot::Sender<Result<Message, CallError>>,
    },
    Consume {
        id: u32,
        cid: u32,
        queue: Text,
        prefetch: u32,
        limit: Option<u32>,
        sink: ConsumerSink,
        reply: Reply,
    },
    Cancel {
        cid: u32,
        reply: Option<Reply>,
    },
    Credit {
        cid: u32,
        credit: u32,
    },
    Ack {
        epoch: u64,
        delivery_id: u64,
    },
    Nack {
        epoch: u64,
        delivery_id: u64,
        delay_ms: Option<u64>,
    },
    /// Answered `true` once everything queued before it is written, `false` if the
    /// connection drops first.
    Flush {
        reply: oneshot::Sender<bool>,
    },
}
