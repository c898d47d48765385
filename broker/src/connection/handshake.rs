//! Authenticating a HELLO: credentials to [`Principal`] through the
//! [`crate::auth::Authenticator`], and a refusal answered only after
//! `--auth-failure-delay` from the HELLO's arrival, so that guessing costs time and
//! every failure takes the same time.

use std::net::SocketAddr;

use tidings_protocol::{ErrorCode, Hello};
use tokio::time::Instant;

use super::{Ending, Signals, close, shutting_down};
use crate::auth::{Credentials, Principal};
use crate::shared::Shared;

/// Checks the HELLO's credentials; on failure waits out the failure delay and
/// returns the closing `AuthFailed`.
pub(super) async fn authenticate(
    shared: &Shared,
    hello: &Hello,
    peer: Option<SocketAddr>,
    certificate_names: &[String],
    arrived: Instant,
    signals: &Signals,
) -> Result<Principal, Ending> {
    let creds = Credentials {
        user: hello.user.as_deref(),
        secret: hello.token.as_deref(),
        certificate_names,
        peer,
    };
    let outcome = tokio::select! {
        biased;
        _ = signals.shutdown.cancelled() => return Err(shutting_down()),
        outcome = shared.auth.authenticate(creds) => outcome,
    };
    match outcome {
        Ok(principal) => Ok(principal),
        Err(_) => {
            // The client learns only that it failed; the reason went to the
            // (rate-limited) log.
            let until = arrived + shared.config.security.auth_failure_delay;
            tokio::select! {
                _ = signals.kill.cancelled() => {}
                _ = tokio::time::sleep_until(until) => {}
            }
            Err(close(
                ErrorCode::AuthFailed,
                "authentication failed: wrong or missing credentials",
            ))
        }
    }
}
