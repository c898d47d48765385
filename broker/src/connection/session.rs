//! `Session`: an established connection's state, and the handling of each frame a
//! client may send once the handshake is done.

use std::sync::Arc;

use bytes::BytesMut;

use tidings_protocol::{
    Direction, ErrorCode, ErrorReply, Frame, MAX_ENVELOPE_LEN, Message, OkReply, Pattern, Pong,
    Publish, StatsReply, Subscribe, Topic, Unsubscribe,
};
use tracing::debug;

use super::queue_state::{self, PendingConfirm, QueueState};
use crate::Limits;
use crate::auth::{Denied, Principal};
use crate::connections::Registered;
use crate::outbox::{ConnId, Outbox};
use crate::router::{Route, RouteMemo, RouterError};
use crate::shared::Shared;

/// What a frame still waits for after [`Session::dispatch`].
pub(crate) enum Rest {
    /// A publish that reached a subscriber over its high-water mark: its publisher
    /// is held (bounded by `--slow-consumer-stall`), then its confirm queued if the
    /// confirm queue was full.
    Stall {
        route: Arc<Route>,
        confirm: Option<PendingConfirm>,
    },
    /// A durable publish on a connection whose confirm queue is full
    /// (`--max-pending-requests` outstanding).
    Confirm(PendingConfirm),
    /// A queue command that waits for the store.
    Queue(Frame),
}

/// One established connection: who it is, where its replies go, and its queue
/// state.
pub(crate) struct Session {
    pub(crate) conn: ConnId,
    /// Who the client is and what it may do (set by the handshake).
    pub(crate) principal: Principal,
    /// Subscriptions this connection holds (for `--max-subscriptions`).
    pub(crate) subscriptions: usize,
    pub(crate) outbox: Outbox,
    pub(crate) shared: Arc<Shared>,
    pub(crate) queues: QueueState,
    /// This connection's last published topic and its route.
    pub(crate) memo: RouteMemo,
    /// Where a published message is encoded once before it is copied to each
    /// subscriber.
    pub(crate) scratch: BytesMut,
    /// This connection's entry in the registry operators see, from the handshake on.
    pub(crate) listed: Option<Registered>,
}

impl Session {
    /// Queues a reply. A failure means the connection is closing, which the read
    /// loop notices on its own.
    pub(crate) fn reply(&self, mut frame: Frame) {
        fit_to_frame(&mut frame, self.shared.config.max_frame_len());
        let _ = self.outbox.send(frame);
    }

    /// Queues an ERROR reply for a semantic problem (the connection stays open) and
    /// counts it.
    pub(crate) fn reply_error(&self, request_id: u32, code: ErrorCode, message: impl Into<String>) {
        let message = message.into();
        debug!(conn = %self.conn, code = code.name(), %message, "request refused");
        self.shared.stats.error(code);
        self.reply(Frame::Error(ErrorReply::new(request_id, code, message)));
    }

    /// Refuses a publish with an ERROR reply; nothing is left to await.
    fn refuse(&self, request_id: u32, code: ErrorCode, message: impl Into<String>) -> Option<Rest> {
        self.reply_error(request_id, code, message);
        None
    }

    /// Answers a refused operation with PermissionDenied; the connection stays open.
    pub(crate) fn permission_denied(&self, request_id: u32, denied: &Denied) {
        self.reply_error(request_id, ErrorCode::PermissionDenied, denied.to_string());
    }

    /// Handles one frame from an established connection. Nearly every frame is
    /// handled here, synchronously; what must still be awaited (a bounded stall, a
    /// full confirm queue, a queue command that waits for the store) comes back as a
    /// [`Rest`] for [`Session::finish`]. Frames are large, and an `async fn` taking
    /// one by value copies it into its future: such copies were about an eighth of
    /// the broker's samples in a `fanin` profile.
    pub(crate) fn dispatch(&mut self, frame: Frame) -> Option<Rest> {
        match frame {
            Frame::Publish(p) => return self.publish(p),
            Frame::Subscribe(s) => self.subscribe(s),
            Frame::Unsubscribe(u) => self.unsubscribe(u),
            Frame::Ping(_) => self.reply(Frame::Pong(Pong)),
            // Any inbound bytes count as liveness; the read loop saw them already.
            Frame::Pong(_) => {}
            Frame::Stats(s) => {
                let mut entries = self.shared.stats.snapshot();
                entries.extend(queue_state::stats(self));
                self.reply(Frame::StatsReply(StatsReply {
                    request_id: s.request_id,
                    entries,
                }));
            }
            Frame::Hello(_) => {
                self.reply_error(0, ErrorCode::UnexpectedFrame, "HELLO after the handshake")
            }
            Frame::QueueDeclare(_)
            | Frame::QueueDelete(_)
            | Frame::QueueBind(_)
            | Frame::QueueUnbind(_)
            | Frame::QueueInfoRequest(_)
            | Frame::QueueList(_)
            | Frame::DeadLetters(_)
            | Frame::Redrive(_)
            | Frame::Consume(_)
            | Frame::Cancel(_)
            | Frame::Credit(_)
            | Frame::Ack(_)
            | Frame::Nack(_) => return queue_state::handle(self, frame).map(Rest::Queue),
            other => {
                debug_assert_eq!(other.direction(), Direction::ServerToClient);
                self.reply_error(
                    0,
                    ErrorCode::UnexpectedFrame,
                    format!("{} is sent only by the server", other.name()),
                );
            }
        }
        None
    }

    /// Finishes a frame that [`Session::dispatch`] could not.
    pub(crate) async fn finish(&mut self, rest: Rest) {
        match rest {
            Rest::Stall { route, confirm } => {
                while let Some(behind) = route.pressured(self.conn) {
                    behind.stall().await;
                }
                if let Some(pending) = confirm {
                    queue_state::wait_confirm(self, pending).await;
                }
            }
            Rest::Confirm(pending) => queue_state::wait_confirm(self, pending).await,
            Rest::Queue(frame) => queue_state::handle_stored(self, frame).await,
        }
    }

    fn publish(&mut self, p: Publish) -> Option<Rest> {
        let stats = &self.shared.stats;
        stats.message_in();
        if let Some(listed) = &self.listed {
            listed.entry().message_in();
        }
        let request_id = p.request_id.unwrap_or(0);
        // The memo holds only a topic that was valid: the same topic again (the
        // common case) needs no second check.
        // It was also allowed: a denied publish never reaches the memo.
        if !self.memo.is_last(&p.topic) {
            if let Err(err) = Topic::validate(&p.topic) {
                return self.refuse(
                    request_id,
                    ErrorCode::InvalidTopic,
                    format!("topic `{}`: {err}", p.topic),
                );
            }
            if let Err(denied) = self.principal.check_publish(&p.topic) {
                self.permission_denied(request_id, &denied);
                return None;
            }
        }
        if let Err(message) = super::limits::check_publish(&self.shared.config.limits, &p) {
            return self.refuse(request_id, ErrorCode::LimitExceeded, message);
        }
        if let Some(reply_to) = &p.reply_to {
            if let Err(err) = Topic::validate(reply_to) {
                return self.refuse(
                    request_id,
                    ErrorCode::InvalidTopic,
                    format!("reply_to `{reply_to}`: {err}"),
                );
            }
        }
        let max = self.shared.config.max_payload;
        if p.payload.len() > max {
            return self.refuse(
                request_id,
                ErrorCode::PayloadTooLarge,
                format!(
                    "payload of {} bytes exceeds the maximum of {max} bytes",
                    p.payload.len()
                ),
            );
        }
        let envelope = p.envelope_len();
        if envelope > MAX_ENVELOPE_LEN {
            return self.refuse(
                request_id,
                ErrorCode::EnvelopeTooLarge,
                format!(
                    "topic, reply_to, message_id and headers take {envelope} bytes; at most {MAX_ENVELOPE_LEN} are allowed"
                ),
            );
        }
        let route = self.shared.router.route_memo(&p.topic, &mut self.memo);
        if p.check_responders && route.is_empty() {
            return self.refuse(
                request_id,
                ErrorCode::NoResponders,
                format!("no subscription matches `{}`", p.topic),
            );
        }
        // The queues first, while the publish is whole; the subscribers then take
        // its fields without a copy of their handles.
        let pending = queue_state::publish(self, &p);
        if !route.is_empty() {
            let message = Message {
                message_id: p.message_id,
                sid: 0,
                topic: p.topic,
                reply_to: p.reply_to,
                headers: p.headers,
                payload: p.payload,
            };
            let sent = route.deliver_with(&message, &mut self.scratch);
            self.shared.stats.messages_out(sent);
        }
        let confirm = pending.and_then(|pending| queue_state::queue_confirm(self, pending));
        // Bursts without loss: hold this publisher (its socket goes unread) while
        // a subscriber it feeds is over its high-water mark, bounded per burst
        // by --slow-consumer-stall (see `OutboxLimits`).
        if route.pressured(self.conn).is_some() {
            return Some(Rest::Stall { route, confirm });
        }
        confirm.map(Rest::Confirm)
    }

    fn subscribe(&mut self, s: Subscribe) {
        let pattern = match Pattern::new(s.pattern.as_str()) {
            Ok(p) => p,
            Err(err) => {
                return self.reply_error(
                    s.request_id,
                    ErrorCode::InvalidPattern,
                    format!("pattern `{}`: {err}", s.pattern),
                );
            }
        };
        if let Some(group) = &s.group {
            if group.is_empty() || group.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return self.reply_error(
                    s.request_id,
                    ErrorCode::InvalidArgument,
                    format!("group name `{group}` must be non-empty without whitespace"),
                );
            }
        }
        if let Err(denied) = self.principal.check_subscribe(&pattern) {
            return self.permission_denied(s.request_id, &denied);
        }
        let max = self.shared.config.limits.max_subscriptions;
        if self.subscriptions >= max {
            return self.reply_error(
                s.request_id,
                ErrorCode::LimitExceeded,
                Limits::exceeded("max-subscriptions", max, "subscriptions on this connection"),
            );
        }
        match self
            .shared
            .router
            .subscribe(&self.outbox, s.sid, pattern, s.group.as_deref())
        {
            Ok(()) => {
                self.subscriptions += 1;
                if let Some(listed) = &self.listed {
                    listed
                        .entry()
                        .subscribed(s.sid, s.pattern.as_str(), s.group.as_deref());
                }
                self.reply(Frame::Ok(OkReply {
                    request_id: s.request_id,
                }));
            }
            Err(err) => self.router_error(s.request_id, err),
        }
    }

    fn unsubscribe(&mut self, u: Unsubscribe) {
        match self.shared.router.unsubscribe(self.conn, u.sid) {
            Ok(()) => {
                self.subscriptions = self.subscriptions.saturating_sub(1);
                if let Some(listed) = &self.listed {
                    listed.entry().unsubscribed(u.sid);
                }
                self.reply(Frame::Ok(OkReply {
                    request_id: u.request_id,
                }));
            }
            Err(err) => self.router_error(u.request_id, err),
        }
    }

    fn router_error(&self, request_id: u32, err: RouterError) {
        let code = match err {
            RouterError::DuplicateSubscription { .. } => ErrorCode::DuplicateSubscription,
            RouterError::UnknownSubscription { .. } => ErrorCode::UnknownSubscription,
        };
        self.reply_error(request_id, code, err.to_string());
    }
}

/// Drops entries from the end of a list reply (DEAD_LETTERS_REPLY,
/// QUEUE_LIST_REPLY, STATS_REPLY) until the frame is no longer than `max`, the
/// largest frame announced in WELCOME: no frame the server sends may exceed it.
/// Other frames are left alone; they fit by construction (PROTOCOL.md, section 5).
pub(crate) fn fit_to_frame(frame: &mut Frame, max: usize) {
    if !matches!(
        frame,
        Frame::DeadLettersReply(_) | Frame::QueueListReply(_) | Frame::StatsReply(_)
    ) {
        return;
    }
    loop {
        let mut buf = BytesMut::new();
        if frame.encode(&mut buf).is_err() {
            return;
        }
        let len = buf.len() - 4;
        if len <= max {
            return;
        }
        // Keep the share of entries that fits at the current average size, and at
        // least one fewer than now, so that this ends.
        let keep = |n: usize| (n * max / len).min(n.saturating_sub(1));
        match frame {
            Frame::DeadLettersReply(r) => r.letters.truncate(keep(r.letters.len())),
            Frame::QueueListReply(r) => r.queues.truncate(keep(r.queues.len())),
            Frame::StatsReply(r) => r.entries.truncate(keep(r.entries.len())),
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use tidings_protocol::{QueueInfo, QueueListReply, Text};

    use super::*;

    #[test]
    fn list_replies_are_cut_to_the_max_frame() {
        let queues: Vec<QueueInfo> = (0..1000)
            .map(|i| QueueInfo {
                name: Text::from(format!("queue.{i}")),
                ..QueueInfo::default()
            })
            .collect();
        for max in [200, 4096, 50_000] {
            let mut frame = Frame::QueueListReply(QueueListReply {
                request_id: 1,
                queues: queues.clone(),
            });
            fit_to_frame(&mut frame, max);
            let mut buf = BytesMut::new();
            frame.encode(&mut buf).unwrap();
            assert!(buf.len() - 4 <= max, "{} > {max}", buf.len() - 4);
            let Frame::QueueListReply(reply) = frame else {
                unreachable!()
            };
            assert!(!reply.queues.is_empty() || max < 300);
            assert_eq!(reply.queues[..], queues[..reply.queues.len()], "a prefix");
        }
        // Small enough already: untouched.
        let mut frame = Frame::QueueListReply(QueueListReply {
            request_id: 1,
            queues: queues.clone(),
        });
        fit_to_frame(&mut frame, usize::MAX);
        assert!(matches!(frame, Frame::QueueListReply(r) if r.queues.len() == 1000));
    }
}
