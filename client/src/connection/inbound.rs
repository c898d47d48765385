//! Frames from the broker routed to whoever waits for them: calls, requests,
//! subscriptions and consumers.

use std::sync::atomic::Ordering;

use tidings_protocol::{ErrorCode, Frame, Pong};
use tracing::{debug, info, warn};

use crate::consumer::Delivery;
use crate::error::{CallError, ConsumerError, ServerError};
use crate::message::Message;
use crate::sub_buffer::Push;

use super::{INBOX_SID, Pending, ReadState, SessionEnd, Task};

impl Task {
    pub(super) fn frame(&mut self, frame: Frame) -> Result<(), SessionEnd> {
        match frame {
            Frame::Ping(_) => {
                self.encode(&Frame::Pong(Pong));
            }
            Frame::Pong(_) => {}
            Frame::Message(m) if m.sid == INBOX_SID => self.inbox_message(m),
            Frame::Message(m) => self.sub_message(m),
            Frame::Delivery(d) => self.delivery(d),
            Frame::ConsumerCancelled(c) => {
                // The broker ended it: no more deliveries, its id is free. The stream
                // ends with the reason once it has handed out what it holds.
                if let Some(consumer) = self.consumers.remove(&c.consumer_id) {
                    info!(cid = c.consumer_id, reason = c.reason, message = %c.message, "consumer cancelled by the broker");
                    consumer.sink.end(ConsumerError::Cancelled {
                        queue: consumer.queue.to_string(),
                        reason: c.reason,
                        message: c.message.to_string(),
                    });
                }
            }
            Frame::Error(e) if !self.pending.contains_key(&e.request_id) => {
                let error = ServerError::from(&e);
                warn!(request_id = e.request_id, %error, "error from the broker");
                if e.error_code().is_some_and(ErrorCode::closes_connection) {
                    return Err(SessionEnd::CutOff(error));
                }
            }
            Frame::Error(e) => {
                if let Some(pending) = self.pending.remove(&e.request_id) {
                    self.complete(e.request_id, pending, Err(CallError::Server((&e).into())));
                }
            }
            other => match other.request_id() {
                Some(id) => match self.pending.remove(&id) {
                    Some(pending) => self.complete(id, pending, Ok(other)),
                    None => debug!(request_id = id, frame = other.name(), "unmatched answer"),
                },
                None => debug!(frame = other.name(), "ignoring unexpected frame"),
            },
        }
        Ok(())
    }

    pub(super) fn complete(&mut self, id: u32, pending: Pending, result: Result<Frame, CallError>) {
        match pending {
            Pending::Call(reply) => {
                let _ = reply.send(result);
            }
            Pending::Subscribe { sid, reply } => {
                if reply.is_none() {
                    self.restored_one();
                }
                if let Err(error) = &result {
                    self.remove_sub(sid);
                    if reply.is_none() {
                        warn!(sid, ?error, "could not restore subscription; ending it");
                    }
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Pending::Consume { cid, reply } => {
                if reply.is_none() {
                    self.restored_one();
                }
                if let Err(error) = &result {
                    let consumer = self.consumers.remove(&cid);
                    if reply.is_none() {
                        warn!(cid, ?error, "could not restore consumer; ending it");
                        if let (Some(consumer), CallError::Server(error)) = (consumer, error) {
                            consumer.sink.end(ConsumerError::NotRestored {
                                queue: consumer.queue.to_string(),
                                error: error.clone(),
                            });
                        }
                    }
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Pending::Request(token) => match result {
                // Check-responders passed; the reply itself comes to the inbox.
                Ok(_) => {}
                Err(error) => {
                    if let Some((_, reply)) = self.requests.remove(&token) {
                        let _ = reply.send(Err(error));
                    }
                }
            },
            Pending::Ignore(what) => {
                if let Err(error) = result {
                    warn!(request_id = id, frame = what, ?error, "broker refused");
                }
            }
        }
    }

    pub(super) fn inbox_message(&mut self, m: tidings_protocol::Message) {
        let token = m
            .topic
            .rsplit('.')
            .next()
            .and_then(|t| t.parse::<u64>().ok());
        let Some((id, reply)) = token.and_then(|t| self.requests.remove(&t)) else {
            debug!(topic = %m.topic, "reply for no waiting request (late or duplicate)");
            return;
        };
        self.pending.remove(&id);
        let _ = reply.send(Ok(Message::from_frame(m, &self.handle)));
    }

    pub(super) fn sub_message(&mut self, m: tidings_protocol::Message) {
        let sid = m.sid;
        if !self.subs.contains_key(&sid) {
            // Raced with an unsubscribe; the broker stops soon.
            return;
        }
        self.push_to(sid, Message::from_frame(m, &self.handle));
    }

    /// Buffers a message for subscription `sid`; when its buffer is full, the
    /// message is held and reading stops until the subscription makes room.
    pub(super) fn push_to(&mut self, sid: u32, m: Message) {
        let Some(sub) = self.subs.get(&sid) else {
            return;
        };
        match sub.buffer.push(m) {
            Push::Queued(Some(waker)) => self.wakers.push(waker),
            Push::Queued(None) => {}
            Push::Full(m) => {
                sub.stalls.fetch_add(1, Ordering::Relaxed);
                let buffer = sub.buffer.clone();
                self.stalled_this_session = true;
                self.read = ReadState::Stalled {
                    sid,
                    message: m,
                    buffer,
                };
            }
            Push::Gone => {
                self.remove_sub(sid);
                self.send_unsubscribe(sid, None);
            }
        }
    }

    /// Retries the held message once its subscription made room.
    pub(super) fn retry_stalled(&mut self) {
        if let ReadState::Stalled { sid, message, .. } =
            std::mem::replace(&mut self.read, ReadState::Reading)
        {
            self.push_to(sid, message);
        }
        self.wake_subscriptions();
    }

    /// Wakes each subscription that got messages since the last call: once per
    /// read, not once per message.
    pub(super) fn wake_subscriptions(&mut self) {
        for waker in self.wakers.drain(..) {
            waker.wake();
        }
    }

    pub(super) fn delivery(&mut self, d: tidings_protocol::Delivery) {
        let delivery_id = d.delivery_id;
        let refused = match self.consumers.get_mut(&d.consumer_id) {
            Some(consumer) => {
                // The broker counts every delivery against the limit, taken or not.
                if let Some(left) = &mut consumer.remaining {
                    *left = left.saturating_sub(1);
                }
                consumer
                    .sink
                    .tx
                    .try_send(Delivery::new(d, self.epoch, self.handle.clone()))
                    .is_err()
            }
            None => true,
        };
        if refused {
            // Nobody can take it (consumer gone or its buffer full): hand it back
            // at once rather than let it sit until its ack timeout.
            self.push_nack(delivery_id, None);
        }
    }
}
