//! Per-message limits checked on every PUBLISH: header bytes and message id
//! length ([`crate::Limits`]). A message over a limit is refused with
//! `LimitExceeded` naming the flag; the connection stays open.

use tidings_protocol::Publish;

use crate::Limits;

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
