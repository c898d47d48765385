//! Commands from handles turned into frames in the write buffer, with the
//! answers they expect recorded as pending.

use tidings_protocol::{
    Ack, Cancel, Consume, Credit, ErrorCode, Frame, Nack, Subscribe, Text, Unsubscribe,
};
use tracing::warn;

use crate::command::{Command, Reply};
use crate::error::{CallError, ServerError};

use super::{ConsumerEntry, INBOX_SID, MAX_IDS_PER_FRAME, Pending, Sub, Task};

impl Task {
    /// Appends a frame to the write buffer. Only frames with fields too long for
    /// their length prefix fail; they are reported and left out.
    pub(super) fn encode(&mut self, frame: &Frame) -> bool {
        match frame.encode(&mut self.wbuf) {
            Ok(()) => true,
            Err(error) => {
                warn!(%error, frame = frame.name(), "cannot encode frame");
                false
            }
        }
    }

    pub(super) fn send_tracked(&mut self, request_id: u32, frame: &Frame, pending: Pending) {
        if self.encode(frame) {
            self.pending.insert(request_id, pending);
        } else {
            self.complete(
                request_id,
                pending,
                Err(CallError::Server(ServerError {
                    raw_code: ErrorCode::MalformedFrame as u16,
                    message: format!("{} frame cannot be encoded", frame.name()),
                })),
            );
        }
    }

    pub(super) fn subscribe_inbox(&mut self) {
        self.inbox_wanted = true;
        if self.inbox_subscribed {
            return;
        }
        self.inbox_subscribed = true;
        let request_id = self.handle.shared.next_id();
        let pattern = Text::from(format!("{}.>", self.handle.shared.inbox));
        let frame = Frame::Subscribe(Subscribe {
            request_id,
            sid: INBOX_SID,
            pattern,
            group: None,
        });
        self.send_tracked(request_id, &frame, Pending::Ignore("SUBSCRIBE (inbox)"));
    }

    pub(super) fn command(&mut self, cmd: Command) {
        // Acks gathered so far go out before any other frame, so that the wire keeps
        // the order the user acted in (an ack, then a cancel, must not be reordered
        // into a cancel that returns the delivery, then an unknown ack).
        if !matches!(cmd, Command::Ack { .. } | Command::Nack { .. }) {
            self.encode_acks();
        }
        match cmd {
            Command::Publish { frame, permit } => {
                if self.encode(&Frame::Publish(frame)) {
                    self.held.push(permit);
                }
            }
            Command::Call { id, frame, reply } => {
                self.send_tracked(id, &frame, Pending::Call(reply));
            }
            Command::Subscribe {
                id,
                sid,
                pattern,
                group,
                buffer,
                stalls,
                reply,
            } => {
                let frame = Frame::Subscribe(Subscribe {
                    request_id: id,
                    sid,
                    pattern: pattern.clone(),
                    group: group.clone(),
                });
                self.subs.insert(
                    sid,
                    Sub {
                        pattern,
                        group,
                        buffer,
                        stalls,
                    },
                );
                self.send_tracked(
                    id,
                    &frame,
                    Pending::Subscribe {
                        sid,
                        reply: Some(reply),
                    },
                );
            }
            Command::Unsubscribe { sid, reply } => {
                if self.remove_sub(sid).is_some() {
                    self.send_unsubscribe(sid, reply);
                } else if let Some(reply) = reply {
                    let _ = reply.send(Ok(Frame::Ok(tidings_protocol::OkReply { request_id: 0 })));
                }
            }
            Command::Request {
                id,
                token,
                frame,
                reply,
            } => {
                self.subscribe_inbox();
                if self.encode(&Frame::Publish(frame)) {
                    self.pending.insert(id, Pending::Request(token));
                    self.requests.insert(token, (id, reply));
                }
            }
            Command::Consume {
                id,
                cid,
                queue,
                prefetch,
                limit,
                sink,
                reply,
            } => {
                // Never more than the broker grants (it would clamp it anyway).
                let prefetch = self.handle.shared.clamp_credit(prefetch);
                let frame = Frame::Consume(Consume {
                    limit,
                    request_id: id,
                    consumer_id: cid,
                    queue: queue.clone(),
                    credit: prefetch,
                });
                self.consumers.insert(
                    cid,
                    ConsumerEntry {
                        queue,
                        window: prefetch,
                        remaining: limit,
                        sink,
                    },
                );
                self.send_tracked(
                    id,
                    &frame,
                    Pending::Consume {
                        cid,
                        reply: Some(reply),
                    },
                );
            }
            Command::Cancel { cid, reply } => {
                // A caller waiting (`Consumer::close`) always gets a round trip, even
                // for a consumer the broker ended already: its answer (OK, or
                // UnknownConsumer) comes after every ack sent before it.
                if self.consumers.remove(&cid).is_some() || reply.is_some() {
                    let request_id = self.handle.shared.next_id();
                    let frame = Frame::Cancel(Cancel {
                        request_id,
                        consumer_id: cid,
                    });
                    let pending = match reply {
                        Some(reply) => Pending::Call(reply),
                        None => Pending::Ignore("CANCEL"),
                    };
                    self.send_tracked(request_id, &frame, pending);
                } else if let Some(reply) = reply {
                    let _ = reply.send(Ok(Frame::Ok(tidings_protocol::OkReply { request_id: 0 })));
                }
            }
            Command::Credit { cid, credit } => {
                if let Some(consumer) = self.consumers.get_mut(&cid) {
                    // Up to the broker's max credit: asking past it is a no-op
                    // there, and a CREDIT of 0 would be refused.
                    let window = self
                        .handle
                        .shared
                        .clamp_credit(consumer.window.saturating_add(credit));
                    let credit = window.saturating_sub(consumer.window);
                    consumer.window = window;
                    if credit > 0 {
                        self.encode(&Frame::Credit(Credit {
                            consumer_id: cid,
                            credit,
                        }));
                    }
                }
            }
            Command::Ack { epoch, delivery_id } => {
                if epoch == self.epoch {
                    self.acks.push(delivery_id);
                }
            }
            Command::Nack {
                epoch,
                delivery_id,
                delay_ms,
            } => {
                if epoch == self.epoch {
                    self.push_nack(delivery_id, delay_ms);
                }
            }
            Command::Flush { reply } => {
                if self.wbuf.is_empty() {
                    let _ = reply.send(true);
                } else {
                    self.flushes.push(reply);
                }
            }
        }
    }

    pub(super) fn push_nack(&mut self, delivery_id: u64, delay_ms: Option<u64>) {
        match self.nacks.iter_mut().find(|(d, _)| *d == delay_ms) {
            Some((_, ids)) => ids.push(delivery_id),
            None => self.nacks.push((delay_ms, vec![delivery_id])),
        }
    }

    pub(super) fn send_unsubscribe(&mut self, sid: u32, reply: Option<Reply>) {
        let request_id = self.handle.shared.next_id();
        let frame = Frame::Unsubscribe(Unsubscribe { request_id, sid });
        let pending = match reply {
            Some(reply) => Pending::Call(reply),
            None => Pending::Ignore("UNSUBSCRIBE"),
        };
        self.send_tracked(request_id, &frame, pending);
    }

    /// Acks and nacks collected since the last write go out as one frame each.
    pub(super) fn encode_acks(&mut self) {
        while !self.acks.is_empty() {
            let take = self.acks.len().min(MAX_IDS_PER_FRAME);
            let ids: Vec<u64> = self.acks.drain(..take).collect();
            let request_id = self.handle.shared.next_id();
            let frame = Frame::Ack(Ack { request_id, ids });
            self.send_tracked(request_id, &frame, Pending::Ignore("ACK"));
        }
        for (delay_ms, mut ids) in std::mem::take(&mut self.nacks) {
            while !ids.is_empty() {
                let take = ids.len().min(MAX_IDS_PER_FRAME);
                let chunk: Vec<u64> = ids.drain(..take).collect();
                let request_id = self.handle.shared.next_id();
                let frame = Frame::Nack(Nack {
                    request_id,
                    delay_ms,
                    ids: chunk,
                });
                self.send_tracked(request_id, &frame, Pending::Ignore("NACK"));
            }
        }
    }

    /// Forgets requests whose caller stopped waiting (timed out or dropped).
    pub(super) fn sweep(&mut self) {
        let pending = &mut self.pending;
        self.requests.retain(|_, (id, reply)| {
            let keep = !reply.is_closed();
            if !keep {
                pending.remove(id);
            }
            keep
        });
    }
}
