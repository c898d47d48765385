//! Who a client is and what it may do.
//!
//! - [`Authenticator`]: built once from the config; checks HELLO credentials (a
//!   user with password or token, a bare token, or a client certificate) and
//!   yields a [`Principal`]. The HTTP side can use the same type.
//! - [`Principal`]: an authenticated client; decides publish, subscribe and queue
//!   operations through its [`Permissions`].
//! - Three modes: open (no `--auth-token`, no `[[users]]`: everything allowed),
//!   shared token (`--auth-token`: one secret, everything allowed), and users
//!   (`[[users]]`: each user's rules, default deny).
//!
//! Failures are answered only after `--auth-failure-delay` (from the moment the
//! HELLO arrived, so a wrong password and an unknown user take the same time),
//! and logged rate-limited ([`FailureLog`]).

mod failures;
pub mod permissions;
mod secret;
pub mod users;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;

pub use failures::FailureLog;
pub use permissions::{Denied, Operation, Permissions, QueueRight};
pub use secret::{
    PasswordHashString, SecretDigest, hash_password, hash_password_with, test_params,
};
pub use users::{User, UserEntry, UserEntryError};

use users::Credential;

/// Password checks (argon2id, ~19 MiB and tens of ms each) running at once; more
/// wait, so a flood of logins cannot take every core or much memory.
const CONCURRENT_HASHES: usize = 2;

/// What a client presents to authenticate.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// The user name (HELLO's user field).
    pub user: Option<&'a str>,
    /// The password or token (HELLO's token field).
    pub secret: Option<&'a str>,
    /// Names in a client certificate that TLS verified: subject common name
    /// first, then subject alternative names.
    pub certificate_names: &'a [String],
    /// Where the client connects from, for the log.
    pub peer: Option<SocketAddr>,
}

/// Why authentication failed. The client only learns that it failed; the reason
/// goes to the (rate-limited) log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailure {
    /// For the log.
    pub reason: &'static str,
}

/// An authenticated client.
#[derive(Debug, Clone)]
pub enum Principal {
    /// No users are configured: everything is allowed.
    Unrestricted,
    /// A configured user, under its permissions.
    User(Arc<User>),
}

impl Principal {
    /// The user's name, if a user.
    pub fn user_name(&self) -> Option<&str> {
        match self {
            Principal::Unrestricted => None,
            Principal::User(user) => Some(&user.name),
        }
    }

    /// The permissions, if restricted.
    pub fn permissions(&self) -> Option<&Permissions> {
        match self {
            Principal::Unrestricted => None,
            Principal::User(user) => Some(&user.permissions),
        }
    }

    /// May this client publish to `topic`?
    pub fn check_publish(&self, topic: &str) -> Result<(), Denied> {
        self.permissions()
            .map_or(Ok(()), |p| p.check_publish(topic))
    }

    /// May this client subscribe to (or bind a queue to) `pattern`?
    pub fn check_subscribe(&self, pattern: &tidings_protocol::Pattern) -> Result<(), Denied> {
        self.permissions()
            .map_or(Ok(()), |p| p.check_subscribe(pattern))
    }

    /// May this client do `right` on `queue`?
    pub fn check_queue(&self, queue: &str, right: QueueRight) -> Result<(), Denied> {
        self.permissions()
            .map_or(Ok(()), |p| p.check_queue(queue, right))
    }

    /// Does this client see `queue` in QUEUE_LIST?
    pub fn sees_queue(&self, queue: &str) -> bool {
        self.permissions().is_none_or(|p| p.sees_queue(queue))
    }
}

#[derive(Debug)]
enum Mode {
    Open,
    SharedToken(SecretDigest),
    Users {
        users: Vec<Arc<User>>,
        by_name: HashMap<String, usize>,
    },
}

/// Checks credentials against the configured mode. Cheap to share (`Arc` it).
///
/// ```
/// use tidings_broker::auth::{Authenticator, Credentials, UserEntry};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let entry = UserEntry {
///     name: "svc".into(),
///     token: Some("0123456789abcdef".into()),
///     ..UserEntry::default()
/// };
/// let auth = Authenticator::new(None, &[entry]).unwrap();
/// let ok = auth
///     .authenticate(Credentials { secret: Some("0123456789abcdef"), ..Credentials::default() })
///     .await
///     .unwrap();
/// assert_eq!(ok.user_name(), Some("svc"));
/// assert!(ok.check_publish("anything").is_err()); // default deny
/// # }
/// ```
#[derive(Debug)]
pub struct Authenticator {
    mode: Mode,
    hashing: Semaphore,
    failures: FailureLog,
}

impl Authenticator {
    /// Builds the authenticator: a shared token, or users, or neither (open).
    /// Both at once, or any bad user entry, is an error.
    pub fn new(
        shared_token: Option<&str>,
        users: &[UserEntry],
    ) -> Result<Authenticator, AuthConfigError> {
        let mode = match (shared_token, users.is_empty()) {
            (Some(_), false) => return Err(AuthConfigError::TokenAndUsers),
            (Some(token), true) => {
                if token.is_empty() {
                    return Err(AuthConfigError::EmptyToken);
                }
                Mode::SharedToken(SecretDigest::of(token.as_bytes()))
            }
            (None, true) => Mode::Open,
            (None, false) => {
                let users: Vec<Arc<User>> =
                    users::compile(users)?.into_iter().map(Arc::new).collect();
                let by_name = users
                    .iter()
                    .enumerate()
                    .map(|(i, u)| (u.name.clone(), i))
                    .collect();
                Mode::Users { users, by_name }
            }
        };
        Ok(Authenticator {
            mode,
            hashing: Semaphore::new(CONCURRENT_HASHES),
            failures: FailureLog::default(),
        })
    }

    /// True when `[[users]]` are configured (permissions apply).
    pub fn has_users(&self) -> bool {
        matches!(self.mode, Mode::Users { .. })
    }

    /// True when a client must present something in HELLO.
    pub fn requires_credentials(&self) -> bool {
        !matches!(self.mode, Mode::Open)
    }

    /// The failure log (to record a failure decided elsewhere, or read the count).
    pub fn failures(&self) -> &FailureLog {
        &self.failures
    }

    /// Checks `creds`. A failure is recorded in the rate-limited log; the caller
    /// delays its answer (see [`crate::SecurityConfig::auth_failure_delay`]).
    pub async fn authenticate(&self, creds: Credentials<'_>) -> Result<Principal, AuthFailure> {
        let result = self.decide(creds).await;
        if let Err(failure) = &result {
            self.failures.record(creds.peer, creds.user, failure.reason);
        }
        result
    }

    async fn decide(&self, creds: Credentials<'_>) -> Result<Principal, AuthFailure> {
        let fail = |reason| Err(AuthFailure { reason });
        let (users, by_name) = match &self.mode {
            Mode::Open => return Ok(Principal::Unrestricted),
            Mode::SharedToken(expected) => {
                let Some(given) = creds.secret else {
                    return fail("no token");
                };
                return if SecretDigest::of(given.as_bytes()).matches(expected) {
                    Ok(Principal::Unrestricted)
                } else {
                    fail("wrong token")
                };
            }
            Mode::Users { users, by_name } => (users, by_name),
        };
        let named_by_cert =
            |user: &User| user.certificate && creds.certificate_names.contains(&user.name);
        match (creds.user, creds.secret) {
            (Some(name), secret) => {
                let Some(user) = by_name.get(name).map(|&i| &users[i]) else {
                    return fail("unknown user");
                };
                let ok = match (secret, &user.credential) {
                    (None, _) => named_by_cert(user),
                    (Some(secret), Credential::Token(digest)) => {
                        SecretDigest::of(secret.as_bytes()).matches(digest)
                    }
                    (Some(secret), Credential::Password(hash)) => {
                        self.verify_password(hash, secret).await
                    }
                    (Some(_), Credential::CertificateOnly) => false,
                };
                if ok {
                    Ok(Principal::User(user.clone()))
                } else if secret.is_none() {
                    fail("no secret and no client certificate naming the user")
                } else {
                    fail("wrong password or token")
                }
            }
            (None, Some(secret)) => {
                // A bare token names its user. Every token is compared, with no
                // early exit, so timing does not tell which (or whether one) matched.
                let given = SecretDigest::of(secret.as_bytes());
                let mut found = None;
                for user in users {
                    if let Credential::Token(digest) = &user.credential
                        && given.matches(digest)
                    {
                        found = Some(user);
                    }
                }
                match found {
                    Some(user) => Ok(Principal::User(user.clone())),
                    None => fail("token matches no user"),
                }
            }
            (None, None) => {
                // The certificate's own order decides: common name, then SANs.
                let user = creds
                    .certificate_names
                    .iter()
                    .find_map(|n| by_name.get(n).map(|&i| &users[i]).filter(|u| u.certificate));
                match user {
                    Some(user) => Ok(Principal::User(user.clone())),
                    None => fail("no credentials"),
                }
            }
        }
    }

    async fn verify_password(&self, hash: &PasswordHashString, password: &str) -> bool {
        let Ok(_permit) = self.hashing.acquire().await else {
            return false;
        };
        let hash = hash.clone();
        let password = password.as_bytes().to_vec();
        tokio::task::spawn_blocking(move || hash.verify(&password))
            .await
            .unwrap_or(false)
    }
}

/// A security configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthConfigError {
    /// Both modes at once.
    #[error(
        "`auth-token` and `[[users]]` are both set; use one (give each service a user \
         with a token instead of the shared token)"
    )]
    TokenAndUsers,
    /// An empty shared token would let anyone in who sends one.
    #[error("`auth-token` is empty")]
    EmptyToken,
    /// A bad `[[users]]` entry.
    #[error(transparent)]
    User(#[from] UserEntryError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> UserEntry {
        UserEntry {
            name: name.into(),
            ..UserEntry::default()
        }
    }

    fn creds<'a>(user: Option<&'a str>, secret: Option<&'a str>) -> Credentials<'a> {
        Credentials {
            user,
            secret,
            ..Credentials::default()
        }
    }

    #[tokio::test]
    async fn modes() {
        let open = Authenticator::new(None, &[]).unwrap();
        assert!(matches!(
            open.authenticate(creds(None, None)).await,
            Ok(Principal::Unrestricted)
        ));
        let shared = Authenticator::new(Some("t"), &[]).unwrap();
        assert!(shared.authenticate(creds(None, Some("t"))).await.is_ok());
        assert!(shared.authenticate(creds(None, Some("tt"))).await.is_err());
        assert!(shared.authenticate(creds(None, None)).await.is_err());
        assert_eq!(
            Authenticator::new(Some("t"), &[entry("a")]).unwrap_err(),
            AuthConfigError::TokenAndUsers
        );
        assert_eq!(shared.failures().total(), 2);
    }

    #[tokio::test]
    async fn users_by_password_token_and_certificate() {
        let mut pw = entry("pw");
        pw.password_hash = Some(hash_password_with("secret", test_params()).unwrap());
        let mut tok = entry("tok");
        tok.token = Some("tok-0123456789abcdef".into());
        let mut cert = entry("cert");
        cert.certificate = true;
        let auth = Authenticator::new(None, &[pw, tok, cert]).unwrap();
        let name =
            |r: Result<Principal, AuthFailure>| r.ok().map(|p| p.user_name().unwrap().to_owned());
        assert_eq!(
            name(auth.authenticate(creds(Some("pw"), Some("secret"))).await).as_deref(),
            Some("pw")
        );
        assert!(
            auth.authenticate(creds(Some("pw"), Some("wrong")))
                .await
                .is_err()
        );
        assert!(
            auth.authenticate(creds(Some("nobody"), Some("secret")))
                .await
                .is_err()
        );
        assert_eq!(
            name(
                auth.authenticate(creds(None, Some("tok-0123456789abcdef")))
                    .await
            )
            .as_deref(),
            Some("tok")
        );
        assert!(
            auth.authenticate(creds(Some("tok"), Some("secret")))
                .await
                .is_err()
        );
        assert!(auth.authenticate(creds(Some("cert"), None)).await.is_err());
        let names = vec!["other".to_owned(), "cert".to_owned()];
        let with_cert = Credentials {
            certificate_names: &names,
            ..Credentials::default()
        };
        assert_eq!(
            name(auth.authenticate(with_cert).await).as_deref(),
            Some("cert")
        );
        // A certificate naming a user without `certificate = true` does not log in.
        let names = vec!["pw".to_owned()];
        let not_allowed = Credentials {
            certificate_names: &names,
            ..Credentials::default()
        };
        assert!(auth.authenticate(not_allowed).await.is_err());
        assert!(auth.authenticate(creds(None, None)).await.is_err());
    }
}
