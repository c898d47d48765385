//! A connection's durable-queue state and the frames that use it (QUEUE_*,
//! DEAD_LETTERS, REDRIVE, CONSUME, CANCEL, CREDIT, ACK, NACK), plus the queue side
//! of PUBLISH: where a connection meets the durable queues ([`crate::queue`]).
//!
//! - [`QueueState`]: one per connection, created after the handshake; deliveries
//!   reach the client through the connection's [`Outbox`].
//! - [`handle`] serves queue commands (and [`handle_stored`] those that wait for
//!   the store); [`publish`] receives every valid PUBLISH and [`queue_confirm`]
//!   hands its confirm to the connection's confirm task; [`stats`] adds queue
//!   figures to STATS; [`connection_closed`] releases a departed connection's
//!   deliveries.

use std::sync::Arc;
use std::time::Duration;

use tidings_protocol::{
    Confirm, ConsumerCancelled, DeadLettersReply, Delivery, ErrorCode, ErrorReply, Frame, OkReply,
    Publish, QueueInfoReply, QueueListReply, RedriveReply, Text,
};
use tokio::sync::mpsc;

use super::session::Session;
use crate::outbox::Outbox;
use crate::queue::{
    DEAD_LETTERS_REPLY_OVERHEAD, DeliverySink, Durable, Held, PublishOutcome, Published, QueueError,
};
use crate::shared::BrokerQueues;

/// Hands DELIVERY frames to a connection's outbox.
struct OutboxSink(Outbox);

impl DeliverySink for OutboxSink {
    fn deliver(&self, delivery: Delivery) -> bool {
        self.0.send_delivery(&delivery).is_ok()
    }

    fn deliver_held(&self, delivery: Delivery) -> Held {
        match self.0.send_delivery_held(&delivery) {
            Ok(true) => Held::Owed,
            Ok(false) => Held::Queued,
            Err(_) => Held::Gone,
        }
    }

    fn release(&self) {
        self.0.release();
    }

    fn cancelled(&self, notice: ConsumerCancelled) {
        let _ = self.0.send(Frame::ConsumerCancelled(notice));
    }
}

/// A publish waiting for durability, in the connection's confirm queue.
pub(crate) struct PendingConfirm {
    stored: Durable,
    request_id: u32,
    confirm: bool,
}

/// Per-connection queue state (consumers, outstanding deliveries, publishes waiting
/// for their confirm). Empty until the handshake completes.
#[derive(Default)]
pub(crate) struct QueueState {
    inner: Option<crate::queue::ConsumerSession>,
    /// Feeds the connection's confirm task, started by the first publish that has to
    /// wait for storage.
    confirms: Option<mpsc::Sender<PendingConfirm>>,
}

impl std::fmt::Debug for QueueState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueState")
            .field("open", &self.inner.is_some())
            .finish()
    }
}

impl QueueState {
    /// The queue state of a connection that just completed its handshake.
    pub(crate) fn new(queues: &BrokerQueues, outbox: &Outbox) -> QueueState {
        QueueState {
            inner: Some(queues.engine.session(Arc::new(OutboxSink(outbox.clone())))),
            confirms: None,
        }
    }

    /// Its queue session's id, as the engine reports consumers (0: none).
    pub(crate) fn session_id(&self) -> u64 {
        self.inner.as_ref().map_or(0, |s| s.id())
    }
}

/// Serves one queue command from the connection's client. The commands that wait
/// for the store (declare, delete, bind, unbind, the dead-letter listing, redrive)
/// are checked here and handed back for [`handle_stored`]; every other one is
/// answered at once, so the read loop awaits nothing for an ACK.
pub(crate) fn handle(session: &mut Session, frame: Frame) -> Option<Frame> {
    let request_id = frame.request_id().unwrap_or(0);
    if let Err(denied) = super::authorize::queue_command(&session.principal, &frame) {
        session.permission_denied(request_id, &denied);
        return None;
    }
    if let Some(queues) = session.queues.inner.as_ref()
        && let Err(message) = super::limits::check_queue_command(
            &session.shared.config.limits,
            &session.shared.queues.engine,
            queues,
            &frame,
        )
    {
        session.reply_error(request_id, ErrorCode::LimitExceeded, message);
        return None;
    }
    let engine = &session.shared.queues.engine;
    let queues = session.queues.inner.as_ref()?;
    let result: Result<Frame, QueueError> = match frame {
        Frame::QueueDeclare(_)
        | Frame::QueueDelete(_)
        | Frame::QueueBind(_)
        | Frame::QueueUnbind(_)
        | Frame::DeadLetters(_)
        | Frame::Redrive(_) => return Some(frame),
        // Options only for 1.1 sessions: a 1.0 client would read them as
        // trailing bytes.
        Frame::QueueInfoRequest(f) if session.outbox.protocol_minor() >= 1 => {
            engine.info_with_options(&f.name).map(|(info, options)| {
                Frame::QueueInfo(QueueInfoReply {
                    request_id: f.request_id,
                    info,
                    options: Some(Box::new(options)),
                })
            })
        }
        Frame::QueueInfoRequest(f) => engine.info(&f.name).map(|info| {
            Frame::QueueInfo(QueueInfoReply {
                request_id: f.request_id,
                info,
                options: None,
            })
        }),
        Frame::QueueList(f) => {
            // A user sees only the queues it has some right on.
            let mut queues = engine.list();
            queues.retain(|q| session.principal.sees_queue(&q.name));
            Ok(Frame::QueueListReply(QueueListReply {
                request_id: f.request_id,
                queues,
            }))
        }
        Frame::Consume(f) => queues
            .consume_limited(f.consumer_id, &f.queue, f.credit, f.limit)
            .map(|_granted| ok(request_id)),
        Frame::Cancel(f) => queues.cancel(f.consumer_id).map(|()| ok(request_id)),
        // CREDIT has no answer unless it fails.
        Frame::Credit(f) => match queues.credit(f.consumer_id, f.credit) {
            Ok(_window) => return None,
            Err(err) => Err(err),
        },
        Frame::Ack(f) => queues.ack(&f.ids).map(|()| ok(request_id)),
        Frame::Nack(f) => queues
            .nack(&f.ids, f.delay_ms.map(Duration::from_millis))
            .map(|()| ok(request_id)),
        other => Err(not_a_queue_command(&other)),
    };
    answer(session, request_id, result);
    None
}

/// Serves a queue command that [`handle`] handed back: one that waits for the store.
pub(crate) async fn handle_stored(session: &mut Session, frame: Frame) {
    let request_id = frame.request_id().unwrap_or(0);
    let engine = &session.shared.queues.engine;
    let result: Result<Frame, QueueError> = match frame {
        Frame::QueueDeclare(f) => engine
            .declare(&f.name, &f.options)
            .await
            .map(|()| ok(request_id)),
        Frame::QueueDelete(f) => engine.delete(&f.name).await.map(|()| ok(request_id)),
        Frame::QueueBind(f) => engine
            .bind(&f.name, &f.pattern)
            .await
            .map(|()| ok(request_id)),
        Frame::QueueUnbind(f) => engine
            .unbind(&f.name, &f.pattern)
            .await
            .map(|()| ok(request_id)),
        Frame::DeadLetters(f) => {
            // A reply never exceeds the max frame the server announced.
            let max_bytes = session
                .shared
                .config
                .max_frame_len()
                .saturating_sub(DEAD_LETTERS_REPLY_OVERHEAD);
            engine
                .dead_letters(&f.queue, f.from.unwrap_or(0), f.limit, max_bytes)
                .await
                .map(|page| {
                    Frame::DeadLettersReply(DeadLettersReply {
                        request_id: f.request_id,
                        letters: page.letters,
                        next: page.next,
                    })
                })
        }
        Frame::Redrive(f) => engine.redrive(&f.queue, f.limit).await.map(|moved| {
            Frame::RedriveReply(RedriveReply {
                request_id: f.request_id,
                moved,
            })
        }),
        other => Err(not_a_queue_command(&other)),
    };
    answer(session, request_id, result);
}

fn not_a_queue_command(frame: &Frame) -> QueueError {
    QueueError::InvalidArgument(format!("{} is not a queue command", frame.name()))
}

fn answer(session: &Session, request_id: u32, result: Result<Frame, QueueError>) {
    match result {
        Ok(reply) => session.reply(reply),
        Err(err) => session.reply_error(request_id, err.code(), err.to_string()),
    }
}

fn ok(request_id: u32) -> Frame {
    Frame::Ok(OkReply { request_id })
}

/// Hands a published message (topic and payload already validated) to the durable
/// queues, and answers a confirm request once every queue that took it has made it
/// durable: at once when no queue took it, else through [`queue_confirm`].
///
/// The read loop never waits for storage: when the engine cannot answer at once
/// (the message went to a queue), the publish joins the connection's confirm queue,
/// so one connection can have many publishes in flight. One task per connection
/// awaits them in order and queues their CONFIRMs: the publishes of one group commit
/// become durable together, so their confirms reach the outbox back to back and
/// leave in one write, without a task or a wake-up per publish. Group commits
/// complete in order, so waiting in publish order delays no confirm.
pub(crate) fn publish(session: &Session, publish: &Publish) -> Option<PendingConfirm> {
    session.queues.inner.as_ref()?;
    let request_id = publish.request_id.unwrap_or(0);
    let confirm = publish.confirm;
    match session.shared.queues.engine.publish_now(publish) {
        // The common pub/sub case: no binding matched; answered without allocating.
        Published::Done(result) => {
            send_answer(session, request_id, confirm, result);
            None
        }
        Published::Pending(stored) => Some(PendingConfirm {
            stored,
            request_id,
            confirm,
        }),
    }
}

/// Queues a publish for the connection's confirm task (started with its first
/// durable publish) without waiting. Past `--max-pending-requests` outstanding the
/// queue is full and the publish comes back, for [`wait_confirm`]: the read loop
/// then waits, so a fast publisher feels the store's pace.
pub(crate) fn queue_confirm(
    session: &mut Session,
    pending: PendingConfirm,
) -> Option<PendingConfirm> {
    let confirms = match &session.queues.confirms {
        Some(tx) => tx,
        None => {
            let (tx, rx) = mpsc::channel(session.shared.config.limits.max_pending_requests);
            tokio::spawn(send_confirms(
                rx,
                session.outbox.clone(),
                session.shared.stats.clone(),
            ));
            session.queues.confirms.insert(tx)
        }
    };
    match confirms.try_send(pending) {
        Ok(()) => None,
        Err(mpsc::error::TrySendError::Full(pending)) => Some(pending),
        // The confirm task is gone only with the runtime.
        Err(mpsc::error::TrySendError::Closed(_)) => None,
    }
}

/// Waits for room in the confirm queue that [`queue_confirm`] found full.
pub(crate) async fn wait_confirm(session: &Session, pending: PendingConfirm) {
    if let Some(confirms) = &session.queues.confirms {
        // Fails only if the confirm task is gone, which happens only with the runtime.
        let _ = confirms.send(pending).await;
    }
}

/// The confirm task of one connection: answers its publishes in order as they
/// become durable. Ends when the connection's queue session is dropped and every
/// publish queued before has been answered (or has failed).
async fn send_confirms(
    mut rx: mpsc::Receiver<PendingConfirm>,
    outbox: Outbox,
    stats: Arc<crate::stats::Stats>,
) {
    // The confirms of publishes already durable (a group commit's, nearly always)
    // are held in the outbox and released, one wake-up of the writer for them all,
    // before this task can wait (for the next publish or for its commit), and at
    // least every `RELEASE_EVERY`, so that a publisher that keeps the queue full
    // still gets its confirms as they come.
    const RELEASE_EVERY: usize = 64;
    let mut held = 0;
    loop {
        let p = match rx.try_recv() {
            Ok(p) => p,
            Err(mpsc::error::TryRecvError::Empty) => {
                outbox.release();
                held = 0;
                match rx.recv().await {
                    Some(p) => p,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        if !p.stored.is_done() {
            outbox.release();
            held = 0;
        }
        let result = p.stored.wait().await;
        if let Some(frame) = answer_frame(&stats, p.request_id, p.confirm, result) {
            let _ = outbox.send_held(frame);
            held += 1;
            if held == RELEASE_EVERY {
                outbox.release();
                held = 0;
            }
        }
    }
    outbox.release();
}

fn send_answer(
    session: &Session,
    request_id: u32,
    confirm: bool,
    result: Result<PublishOutcome, QueueError>,
) {
    if let Some(frame) = answer_frame(&session.shared.stats, request_id, confirm, result) {
        session.reply(frame);
    }
}

/// CONFIRM (or ERROR) for a publish that asked for it; an ERROR with request id 0
/// for a fire-and-forget publish the queues could not store, so the failure is not
/// silent.
fn answer_frame(
    stats: &crate::stats::Stats,
    request_id: u32,
    confirm: bool,
    result: Result<PublishOutcome, QueueError>,
) -> Option<Frame> {
    Some(match result {
        Ok(outcome) if confirm => Frame::Confirm(Confirm {
            request_id,
            queues: outcome.queues,
            rejected: outcome.rejected,
            duplicate: outcome.duplicate,
        }),
        Ok(_) => return None,
        Err(err) => {
            stats.error(err.code());
            Frame::Error(ErrorReply::new(
                if confirm { request_id } else { 0 },
                err.code(),
                err.to_string(),
            ))
        }
    })
}

/// Queue figures for STATS_REPLY (`queue.<name>.<figure>`), after the broker's own.
pub(crate) fn stats(session: &Session) -> Vec<(Text, u64)> {
    session
        .shared
        .queues
        .engine
        .stats()
        .into_iter()
        .map(|(name, value)| (Text::from(name), value))
        .collect()
}

/// The connection is gone: release its consumers and their deliveries.
pub(crate) async fn connection_closed(session: &mut Session) {
    // Dropping the engine session returns every unacked delivery to its queue.
    drop(std::mem::take(&mut session.queues));
}
