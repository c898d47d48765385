//! Dead letters: moving messages that used up their deliveries (or expired) into
//! their queue's dead-letter queue, and listing a queue's letters page by page.
//!
//! A move is two-step: the copy is appended to the dead-letter queue, and only
//! once that copy is durable is the message removed from its queue, so at every
//! instant a crash leaves it in at least one of them (it may come back twice, never
//! vanish). Each letter records its origin queue, so a dead-letter queue shared by
//! several queues lists and redrives each one's letters apart.

use std::sync::Arc;

use tidings_protocol::{DeadLetter, QueueOptions, Text};

use crate::queue::durable::{Appended, Departure, Queue};
use crate::queue::engine::{EngineInner, QueueEngine};
use crate::queue::error::QueueError;
use crate::queue::options::Settings;
use crate::queue::record::{DeadInfo, Message};
use crate::storage::{Loaded, Range, Ticket};

/// Most dead letters one `dead_letters` call returns, whatever the limit.
pub const MAX_DEAD_LETTERS_LISTED: u32 = 10_000;

/// Messages read from the store per page while listing or redriving.
pub(crate) const LETTER_PAGE: usize = 256;

/// Bytes a DEAD_LETTERS_REPLY spends outside its letters: frame header,
/// request id, count and the continuation position.
pub const DEAD_LETTERS_REPLY_OVERHEAD: usize = 6 + 4 + 4 + 8;

/// One page of a queue's dead letters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeadLetterPage {
    /// The letters, oldest first.
    pub letters: Vec<DeadLetter>,
    /// Where the next page starts, when there may be more (pass it as `from`).
    pub next: Option<u64>,
}

/// Bytes one letter takes in a DEAD_LETTERS_REPLY.
pub fn encoded_letter_len(l: &DeadLetter) -> usize {
    let headers: usize = l.headers.iter().map(|(k, v)| 4 + k.len() + v.len()).sum();
    8 + 2 + l.topic.len() + 4 + 2 + l.reason.len() + 2 + headers + 4 + l.payload.len()
}

impl QueueEngine {
    /// The dead letters of `queue`, oldest first, from position `from` on: at most
    /// `limit` (0 meaning [`MAX_DEAD_LETTERS_LISTED`]) and at most `max_bytes` of
    /// encoded letters. `next` says where to continue. Only letters dead-lettered
    /// from `queue` are listed, even when its dead-letter queue is shared; a queue
    /// whose dead-letter queue does not exist yet has none. Letters a consumer of
    /// the dead-letter queue nacked with a delay are not listed until due.
    pub async fn dead_letters(
        &self,
        queue: &str,
        from: u64,
        limit: u32,
        max_bytes: usize,
    ) -> Result<DeadLetterPage, QueueError> {
        let q = self.inner.queue(queue)?;
        let Ok(dlq) = self.inner.queue(&q.settings.dead_letter) else {
            return Ok(DeadLetterPage::default());
        };
        let limit = match limit {
            0 => MAX_DEAD_LETTERS_LISTED,
            n => n.min(MAX_DEAD_LETTERS_LISTED),
        } as usize;
        let mut page = DeadLetterPage::default();
        let mut bytes = 0usize;
        let mut at = from;
        loop {
            let loaded = self.inner.read_letters(&dlq, at).await?;
            let Some(last) = loaded.last().map(|l| l.key.1) else {
                return Ok(page);
            };
            for l in loaded {
                let seq = l.key.1;
                if !dlq.is_committed(seq) || !from_queue(&l.message, &q.name) {
                    continue;
                }
                let letter = to_letter(seq, l.message);
                let len = encoded_letter_len(&letter);
                if page.letters.len() >= limit || bytes + len > max_bytes {
                    if page.letters.is_empty() {
                        return Err(QueueError::InvalidArgument(format!(
                            "dead letter {seq} is {len} bytes, more than the {max_bytes} a reply may hold; list from {} to skip it",
                            seq + 1
                        )));
                    }
                    page.next = Some(seq);
                    return Ok(page);
                }
                bytes += len;
                page.letters.push(letter);
            }
            at = last + 1;
        }
    }
}

fn from_queue(msg: &Message, queue: &str) -> bool {
    match msg.dead.as_ref().and_then(|d| d.origin.as_ref()) {
        Some(origin) => origin.as_str() == queue,
        // Letters without an origin (written before origins were recorded) belong
        // to every queue that dead-letters here.
        None => true,
    }
}

fn to_letter(seq: u64, msg: Message) -> DeadLetter {
    let (reason, attempts) = match msg.dead {
        Some(d) => (d.reason, d.attempts),
        None => ("unknown".into(), msg.deliveries),
    };
    DeadLetter {
        id: seq,
        topic: msg.topic,
        attempts,
        reason,
        headers: msg.headers,
        payload: msg.payload,
    }
}

/// Builds the dead-letter copy of a message.
fn dead_letter_copy(mut msg: Message, reason: &str, origin: &Text) -> Message {
    msg.dead = Some(Box::new(DeadInfo {
        reason: Text::from(reason),
        attempts: msg.deliveries,
        origin: Some(origin.clone()),
    }));
    msg.deliveries = 0;
    msg
}

impl EngineInner {
    /// Reads one page of a dead-letter queue's stored ready messages from `from`.
    pub(crate) async fn read_letters(
        &self,
        dlq: &Queue,
        from: u64,
    ) -> Result<Vec<Loaded>, QueueError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.store.read(
            Range::Messages { qid: dlq.qid, from },
            LETTER_PAGE,
            usize::MAX,
            move |result| {
                let _ = tx.send(result);
            },
        );
        Ok(rx.await.map_err(|_| QueueError::ShuttingDown)??)
    }

    /// The dead-letter queue of `source`, created with default options if missing.
    fn dead_letter_queue(&self, source: &Queue) -> Result<Arc<Queue>, QueueError> {
        let name = &source.settings.dead_letter;
        if let Ok(q) = self.queue(name) {
            return Ok(q);
        }
        self.check_open()?;
        let settings = Settings::resolve(name, &QueueOptions::default(), &self.config.defaults)?;
        let mut reg = self.write();
        if let Some(q) = reg.queues.get(name) {
            return Ok(q.clone());
        }
        let q = self.create_locked(&mut reg, name, settings, Vec::new());
        drop(reg);
        let _ = self.persist(&q, q.bindings_now());
        Ok(q)
    }

    /// Moves messages leaving `source` into its dead-letter queue. Expired messages
    /// go there only if it exists (they are dropped otherwise); messages that used
    /// up their deliveries create it, unless they are dead letters already: a
    /// dead-letter queue's own dead-letter queue is used only if it exists (was
    /// declared), so dead-letter queues are not chained by default (`x.dlq.dlq`,
    /// `x.dlq.dlq.dlq` …) and a letter that used up its deliveries there stays and
    /// is redelivered. Each message is removed from `source` once its copy is
    /// durable; one the dead-letter queue refuses stays in `source`.
    pub(crate) fn move_departures(&self, source: &Arc<Queue>, departures: Vec<Departure>) {
        if departures.is_empty() {
            return;
        }
        let (expired, spent): (Vec<Departure>, Vec<Departure>) =
            departures.into_iter().partition(|d| d.reason == "expired");
        let exists = self.queue(&source.settings.dead_letter).is_ok();
        let (kept, spent): (Vec<Departure>, Vec<Departure>) = if exists {
            (Vec::new(), spent)
        } else {
            spent.into_iter().partition(|d| d.message.dead.is_some())
        };
        for d in kept {
            source.abort_departure(d.slot, d.message);
        }
        let (dropped, mut moving) = if exists {
            (Vec::new(), expired)
        } else {
            (expired, Vec::new())
        };
        moving.extend(spent);
        if !dropped.is_empty() {
            let gone: Vec<_> = dropped.iter().map(|d| (d.slot, d.message.size())).collect();
            source.finish_departures(&gone, false);
        }
        if moving.is_empty() {
            return;
        }
        let dlq = match self.dead_letter_queue(source) {
            Ok(q) => q,
            Err(err) => {
                tracing::error!(queue = %source.name, error = %err, "cannot create the dead-letter queue");
                for d in moving {
                    source.abort_departure(d.slot, d.message);
                }
                return;
            }
        };
        let now = self.clock.now_ms();
        let mut done = Vec::with_capacity(moving.len());
        let mut tickets: Vec<Ticket> = Vec::new();
        let mut arriving = Vec::new();
        for d in moving {
            let size = d.message.size();
            let copy = dead_letter_copy(d.message.clone(), d.reason, &source.name);
            match dlq.append_arriving(copy, now) {
                Ok((Appended::Stored, ticket, seq)) => {
                    tickets.extend(ticket);
                    arriving.extend(seq);
                    done.push((d.slot, size, d.message));
                }
                Ok((Appended::Duplicate | Appended::Rejected | Appended::Gone, _, _)) | Err(_) => {
                    tracing::warn!(queue = %source.name, dlq = %dlq.name, "dead-letter queue refused a message; kept in its queue");
                    source.abort_departure(d.slot, d.message);
                }
            }
        }
        if done.is_empty() {
            return;
        }
        tracing::debug!(queue = %source.name, count = done.len(), "dead-lettering");
        let source = source.clone();
        self.moves.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let moves = self.moves.clone();
        self.tracker.spawn_on(
            async move {
                let mut ok = true;
                for t in tickets {
                    ok &= t.wait().await.is_ok();
                }
                if ok {
                    let moved: Vec<_> = done.iter().map(|(slot, size, _)| (*slot, *size)).collect();
                    source.finish_departures(&moved, true);
                } else {
                    // The copy may not be durable: keep the original (a restart may
                    // then bring the message back in both queues).
                    for (slot, _, msg) in done {
                        source.abort_departure(slot, msg);
                    }
                }
                // Only now may a redrive take the letters: the originals' removal
                // is in an earlier round than any copy a redrive writes, so it is
                // durable first (the store makes rounds durable in order).
                dlq.arrived(&arriving);
                moves.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            },
            &self.runtime,
        );
    }
}
