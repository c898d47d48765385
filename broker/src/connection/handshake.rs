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

#[cfg(test)]
mod tests {
    //! Brute force under paused time: every wrong password costs at least the
    //! failure delay, so 1,000 guesses from one client take at least 100 s, and
    //! the log stays quiet.

    use std::sync::Arc;
    use std::time::Duration;

    use bytes::BytesMut;
    use tidings_protocol::{ErrorCode, Frame, FrameCodec, Hello};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::codec::Decoder;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use crate::Config;
    use crate::auth::{Authenticator, UserEntry, hash_password_with, test_params};
    use crate::connection::{Signals, Transport, serve};
    use crate::outbox::ConnId;
    use crate::router::Router;
    use crate::shared::{BrokerQueues, Shared};
    use crate::stats::Stats;

    const GUESSES: u64 = 1_000;

    #[tokio::test(start_paused = true)]
    async fn a_thousand_wrong_passwords_cost_at_least_100_seconds() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::for_test(dir.path());
        // The shortest delay the config accepts: the floor holds even then.
        config.security.auth_failure_delay = Duration::from_millis(100);
        config.security.users = vec![UserEntry {
            name: "admin".into(),
            password_hash: Some(hash_password_with("the real one", test_params()).unwrap()),
            ..UserEntry::default()
        }];
        config.validate().unwrap();
        let stats = Arc::new(Stats::default());
        let shared = Arc::new(Shared {
            router: Router::new(stats.clone()),
            stats,
            queues: BrokerQueues::open(&config, Arc::default()).unwrap(),
            connections: crate::connections::Connections::default(),
            auth: Authenticator::new(None, &config.security.users).unwrap(),
            config,
        });
        let signals = Signals {
            shutdown: CancellationToken::new(),
            kill: CancellationToken::new(),
        };
        let tracker = TaskTracker::new();

        let mut waited = Duration::ZERO;
        for guess in 0..=GUESSES {
            let (client, server) = tokio::io::duplex(16 * 1024);
            let (read, write) = tokio::io::split(server);
            let transport = Transport {
                read,
                write,
                peer: None,
                certificate_names: Vec::new(),
            };
            tracker.spawn(serve(
                transport,
                ConnId(guess + 1),
                shared.clone(),
                signals.clone(),
                tracker.clone(),
            ));
            let mut client = client;
            // The last attempt is the right password: the delay is for failures only.
            let right = guess == GUESSES;
            let mut hello = Hello::new("guesser");
            hello.user = Some("admin".into());
            hello.token = Some(if right {
                "the real one".into()
            } else {
                format!("guess {guess}").into()
            });
            let mut out = BytesMut::new();
            Frame::Hello(hello).encode(&mut out).unwrap();
            let sent = tokio::time::Instant::now();
            client.write_all(&out).await.unwrap();
            let mut buf = BytesMut::new();
            let mut codec = FrameCodec::default();
            let answer = loop {
                if let Some(frame) = codec.decode(&mut buf).unwrap() {
                    break frame;
                }
                assert!(
                    client.read_buf(&mut buf).await.unwrap() > 0,
                    "closed without an answer"
                );
            };
            let took = sent.elapsed();
            match answer {
                Frame::Error(e) if !right => {
                    assert_eq!(e.error_code(), Some(ErrorCode::AuthFailed));
                    assert!(
                        took >= Duration::from_millis(100),
                        "guess {guess} answered after {took:?}"
                    );
                    // Closed after the error.
                    let mut rest = [0u8; 64];
                    assert_eq!(client.read(&mut rest).await.unwrap(), 0);
                    waited += took;
                }
                Frame::Welcome(_) if right => {
                    assert!(
                        took < Duration::from_millis(100),
                        "success is not delayed: {took:?}"
                    );
                }
                other => panic!("guess {guess}: unexpected {other:?}"),
            }
        }
        println!("{GUESSES} wrong passwords: {waited:?} of delays (paused time)");
        assert!(waited >= Duration::from_secs(100), "{waited:?}");
        assert_eq!(shared.auth.failures().total(), GUESSES);
        signals.shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        shared.queues.shutdown().await;
    }
}
