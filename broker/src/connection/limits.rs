//! Limits checked at the connection ([`crate::Limits`]): header bytes and message
//! id length on every PUBLISH, queue count, bindings per queue and consumers per
//! connection on queue commands. A request over a limit is refused with
//! `LimitExceeded` naming the flag; the connection stays open.

use tidings_protocol::{Frame, Publish};

use crate::Limits;
use crate::queue::{ConsumerSession, QueueEngine};

/// The error text when `publish` breaks a per-message limit.
pub(super) fn check_publish(limits: &Limits, publish: &Publish) -> Result<(), String> {
    if let Some(id) = &publish.message_id
        && id.len() > limits.max_message_id_len
    {
        return Err(Limits::exceeded(
            "max-message-id-len",
            limits.max_message_id_len,
            &format!("message id of {} bytes", id.len()),
        ));
    }
    if !publish.headers.is_empty() {
        let bytes: usize = publish.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > limits.max_header_bytes {
            return Err(Limits::exceeded(
                "max-header-bytes",
                limits.max_header_bytes,
                &format!("headers of {bytes} bytes"),
            ));
        }
    }
    Ok(())
}

/// The error text when a queue command would pass `--max-queues`,
/// `--max-bindings` or `--max-consumers`. Checked before the command runs, so
/// connections declaring at the same instant may pass the queue limit by a few.
pub(super) fn check_queue_command(
    limits: &Limits,
    engine: &QueueEngine,
    session: &ConsumerSession,
    frame: &Frame,
) -> Result<(), String> {
    match frame {
        Frame::QueueDeclare(f) => {
            let existing = match engine.info(&f.name) {
                Ok(info) => Some(info.bindings),
                Err(_) => None,
            };
            if existing.is_none() && engine.queue_count() >= limits.max_queues {
                return Err(Limits::exceeded(
                    "max-queues",
                    limits.max_queues,
                    &format!("cannot declare queue `{}`", f.name),
                ));
            }
            let mut bindings: Vec<&str> = existing.iter().flatten().map(|b| b.as_str()).collect();
            for b in &f.options.bindings {
                if !bindings.contains(&b.as_str()) {
                    bindings.push(b.as_str());
                }
            }
            check_bindings(limits, &f.name, bindings.len())
        }
        Frame::QueueBind(f) => match engine.info(&f.name) {
            Ok(info) if !info.bindings.contains(&f.pattern) => {
                check_bindings(limits, &f.name, info.bindings.len() + 1)
            }
            _ => Ok(()),
        },
        Frame::Consume(_) if session.consumer_count() >= limits.max_consumers => {
            Err(Limits::exceeded(
                "max-consumers",
                limits.max_consumers,
                "consumers on this connection",
            ))
        }
        _ => Ok(()),
    }
}

fn check_bindings(limits: &Limits, queue: &str, count: usize) -> Result<(), String> {
    if count > limits.max_bindings {
        return Err(Limits::exceeded(
            "max-bindings",
            limits.max_bindings,
            &format!("queue `{queue}` would have {count} bindings"),
        ));
    }
    Ok(())
}
