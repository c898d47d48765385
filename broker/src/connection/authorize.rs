//! Which permission each client frame needs, asked of the connection's
//! [`Principal`] before the frame is served. A refusal is answered with
//! `PermissionDenied` naming the operation and the pattern; the connection stays
//! open and nothing is created.

use tidings_protocol::{Frame, Pattern};

use crate::auth::{Denied, Principal, QueueRight};

/// May `principal` send `frame` (a queue command)? Commands that act on the
/// connection's own consumers or deliveries (CANCEL, CREDIT, ACK, NACK) were
/// authorized when the consumer was created.
pub(super) fn queue_command(principal: &Principal, frame: &Frame) -> Result<(), Denied> {
    let check = |queue: &str, right| principal.check_queue(queue, right);
    match frame {
        Frame::QueueDeclare(f) => {
            check(&f.name, QueueRight::Manage)?;
            // A binding routes topics into a queue the user reads: it needs the
            // same right as subscribing to them. A dead-letter queue receives this
            // queue's messages: it must be one the user manages too.
            for binding in &f.options.bindings {
                binding_pattern(principal, binding)?;
            }
            if let Some(dead_letter) = &f.options.dead_letter {
                check(dead_letter, QueueRight::Manage)?;
            }
            Ok(())
        }
        Frame::QueueDelete(f) => check(&f.name, QueueRight::Manage),
        Frame::QueueBind(f) => {
            check(&f.name, QueueRight::Manage)?;
            binding_pattern(principal, &f.pattern)
        }
        Frame::QueueUnbind(f) => check(&f.name, QueueRight::Manage),
        Frame::QueueInfoRequest(f) => {
            if principal.sees_queue(&f.name) {
                Ok(())
            } else {
                check(&f.name, QueueRight::Consume)
            }
        }
        Frame::DeadLetters(f) => check(&f.queue, QueueRight::DeadLetters),
        Frame::Redrive(f) => check(&f.queue, QueueRight::DeadLetters),
        Frame::Consume(f) => check(&f.queue, QueueRight::Consume),
        _ => Ok(()),
    }
}

/// A binding pattern must be one the user may subscribe to. An invalid pattern
/// passes here and is refused by the queue engine with its own error.
fn binding_pattern(principal: &Principal, pattern: &str) -> Result<(), Denied> {
    match Pattern::new(pattern) {
        Ok(pattern) => principal.check_subscribe(&pattern),
        Err(_) => Ok(()),
    }
}
