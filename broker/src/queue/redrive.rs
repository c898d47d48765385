//! Redrive: moving a queue's dead letters back into it as fresh messages.
//!
//! Like a dead-letter move it is two-step: each letter's fresh copy is appended to
//! the queue, and the letter is removed from the dead-letter queue only once that
//! copy is durable. Only the queue's own letters move, even when its dead-letter
//! queue is shared. A letter whose own move in has not finished (its original's
//! removal not yet issued) is passed over: redriving it then could make the fresh
//! copy durable before that removal, and a crash would leave the queue holding the
//! message twice.

use crate::queue::durable::{Appended, DedupCheck};
use crate::queue::engine::QueueEngine;
use crate::queue::error::QueueError;
use crate::queue::record::Message;

impl QueueEngine {
    /// Moves up to `limit` (0: all) of `queue`'s dead letters back into it as fresh
    /// messages (attempt 1 again), oldest first. Returns how many moved, once their
    /// copies are durable and the letters removed. Letters a consumer of the
    /// dead-letter queue holds right now are not moved.
    pub async fn redrive(&self, queue: &str, limit: u32) -> Result<u64, QueueError> {
        let target = self.inner.queue(queue)?;
        let Ok(dlq) = self.inner.queue(&target.settings.dead_letter) else {
            return Ok(0);
        };
        let mut left = if limit == 0 {
            u64::MAX
        } else {
            u64::from(limit)
        };
        let mut moved = 0u64;
        let mut from = 0u64;
        while left > 0 {
            let page = self.inner.read_letters(&dlq, from).await?;
            let Some(last) = page.last().map(|l| l.key.1) else {
                break;
            };
            from = last + 1;
            let mut taken = 0u64;
            let claimed = dlq.claim(page, |m| {
                let mine = m
                    .dead
                    .as_ref()
                    .and_then(|d| d.origin.as_ref())
                    .is_none_or(|o| o.as_str() == target.name.as_str());
                let take = mine && taken < left;
                taken += u64::from(take);
                take
            });
            let now = self.inner.clock.now_ms();
            let mut done = Vec::with_capacity(claimed.len());
            let mut tickets = Vec::new();
            let mut failure = None;
            for c in claimed {
                let size = c.message.size();
                match target.append(
                    redriven_copy(c.message.clone()),
                    None,
                    now,
                    DedupCheck::Skip,
                ) {
                    Ok((Appended::Stored, ticket)) => {
                        tickets.extend(ticket);
                        done.push((c.slot, size, c.message));
                    }
                    Ok((Appended::Rejected, _)) => {
                        failure.get_or_insert(QueueError::InvalidArgument(format!(
                            "queue `{queue}` is full; redrive stopped after {moved} letters"
                        )));
                        dlq.abort_departure(c.slot, c.message);
                    }
                    Ok(_) => dlq.abort_departure(c.slot, c.message),
                    Err(err) => {
                        failure.get_or_insert(err);
                        dlq.abort_departure(c.slot, c.message);
                    }
                }
            }
            let mut durable = true;
            for t in tickets {
                if let Err(err) = t.wait().await {
                    durable = false;
                    failure.get_or_insert(err);
                }
            }
            if durable {
                let gone: Vec<_> = done.iter().map(|(slot, size, _)| (*slot, *size)).collect();
                dlq.finish_departures(&gone, false);
                moved += gone.len() as u64;
                left = left.saturating_sub(gone.len() as u64);
            } else {
                // Not known durable in the queue: the letters stay (and may come back
                // in both places after a restart).
                for (slot, _, msg) in done {
                    dlq.abort_departure(slot, msg);
                }
            }
            if let Some(err) = failure {
                if moved == 0 {
                    return Err(err);
                }
                tracing::warn!(queue, moved, error = %err, "redrive stopped early");
                break;
            }
        }
        Ok(moved)
    }
}

/// Prepares a dead letter for redrive: a fresh message again.
fn redriven_copy(mut msg: Message) -> Message {
    msg.dead = None;
    msg.deliveries = 0;
    msg
}
