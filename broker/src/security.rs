//! `SecurityConfig`: TLS, users and the limits that hold before a client is
//! authenticated. Part of [`crate::Config`] (flattened: the flags sit beside the
//! others), checked fail-closed by [`SecurityConfig::validate`].

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::auth::{AuthConfigError, Authenticator, UserEntry};
use crate::config::{parse_duration, parse_size};

/// Default largest frame before HELLO is accepted.
pub const DEFAULT_PRE_AUTH_MAX_FRAME: usize = 4 * 1024;
/// Shortest `--auth-failure-delay`: a brute-force run must pay at least this per try.
pub const MIN_AUTH_FAILURE_DELAY: Duration = Duration::from_millis(100);

/// TLS, users and pre-authentication settings.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct SecurityConfig {
    /// PEM file with the server's certificate chain (leaf first). With --tls-key,
    /// the listener speaks only TLS 1.2/1.3; re-read on SIGHUP [default: unset:
    /// plaintext].
    #[arg(long, env = "TIDINGS_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// PEM file with the private key of --tls-cert (PKCS#8, PKCS#1 or SEC1); re-read
    /// on SIGHUP [default: unset].
    #[arg(long, env = "TIDINGS_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// PEM file with the CA certificates that sign client certificates. Turns on
    /// mutual TLS: every client must present a certificate from one of them, and
    /// with `[[users]]` the certificate's subject common name or a subject alternative
    /// name can name a user that has `certificate = true` [default: unset].
    #[arg(long, env = "TIDINGS_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,

    /// Largest frame a client may send before its HELLO is accepted; a larger
    /// length prefix closes the connection before anything is allocated for it
    /// [default: 4KiB].
    #[arg(long, env = "TIDINGS_PRE_AUTH_MAX_FRAME", default_value = "4KiB", hide_default_value = true, value_parser = parse_size)]
    pub pre_auth_max_frame: usize,

    /// Wait before a failed authentication is answered and closed, counted from
    /// the HELLO's arrival; at least 100ms [default: 1s].
    #[arg(long, env = "TIDINGS_AUTH_FAILURE_DELAY", default_value = "1s", hide_default_value = true, value_parser = parse_duration)]
    pub auth_failure_delay: Duration,

    /// `[[users]]` from the config file (there is no flag for them).
    #[arg(skip)]
    pub users: Vec<UserEntry>,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            pre_auth_max_frame: DEFAULT_PRE_AUTH_MAX_FRAME,
            auth_failure_delay: Duration::from_secs(1),
            users: Vec::new(),
        }
    }
}

/// Why a security setting was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecurityConfigError {
    /// A setting that needs another one.
    #[error("`{name}` {message}")]
    Invalid {
        /// The setting.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The shared token or a `[[users]]` entry.
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
}

impl SecurityConfig {
    /// True when the listener speaks TLS.
    pub fn tls_enabled(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// Sets one setting from its text form (config file), if it is one of these.
    pub(crate) fn set(&mut self, id: &str, raw: &str) -> Option<Result<(), String>> {
        let path = || Ok(Some(PathBuf::from(raw)));
        let result = match id {
            "tls_cert" => path().map(|v| self.tls_cert = v),
            "tls_key" => path().map(|v| self.tls_key = v),
            "tls_client_ca" => path().map(|v| self.tls_client_ca = v),
            "pre_auth_max_frame" => parse_size(raw).map(|v| self.pre_auth_max_frame = v),
            "auth_failure_delay" => parse_duration(raw).map(|v| self.auth_failure_delay = v),
            _ => return None,
        };
        Some(result)
    }

    /// Checks what the types alone do not, fail closed: half a TLS setup, a
    /// too-short failure delay, certificate users without mutual TLS, a bad user.
    pub fn validate(&self, auth_token: Option<&str>) -> Result<(), SecurityConfigError> {
        let invalid = |name, message: &str| {
            Err(SecurityConfigError::Invalid {
                name,
                message: message.to_owned(),
            })
        };
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return invalid("tls-cert", "is set without `tls-key`"),
            (None, Some(_)) => return invalid("tls-key", "is set without `tls-cert`"),
            _ => {}
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return invalid(
                "tls-client-ca",
                "needs `tls-cert` and `tls-key`: mutual TLS is TLS",
            );
        }
        if self.pre_auth_max_frame < 256 {
            return invalid("pre-auth-max-frame", "must be at least 256 bytes");
        }
        if self.auth_failure_delay < MIN_AUTH_FAILURE_DELAY {
            return invalid("auth-failure-delay", "must be at least 100ms");
        }
        if self.tls_client_ca.is_none()
            && let Some(user) = self.users.iter().find(|u| u.certificate)
        {
            return Err(SecurityConfigError::Invalid {
                name: "users",
                message: format!(
                    "entry `{}` has `certificate = true`, which needs `tls-client-ca` (mutual TLS)",
                    user.name
                ),
            });
        }
        Authenticator::new(auth_token, &self.users)?;
        Ok(())
    }

    /// The file-form lines of the set settings (secrets redacted).
    pub(crate) fn toml_lines(&self, line: &mut dyn FnMut(&str, String)) {
        let quoted = |s: &std::path::Path| format!("{:?}", s.display().to_string());
        if let Some(p) = &self.tls_cert {
            line("tls-cert", quoted(p));
        }
        if let Some(p) = &self.tls_key {
            line("tls-key", quoted(p));
        }
        if let Some(p) = &self.tls_client_ca {
            line("tls-client-ca", quoted(p));
        }
        line("pre-auth-max-frame", self.pre_auth_max_frame.to_string());
        line(
            "auth-failure-delay",
            format!("\"{}ms\"", self.auth_failure_delay.as_millis()),
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::{Config, ConfigError};

    fn load_file(text: &str, extra: &[&str]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tidings.toml");
        std::fs::write(&path, text).unwrap();
        let mut args = vec!["tidings-broker", "--config", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        Config::load_from(args)
    }

    #[test]
    fn users_come_from_the_file() {
        let config = load_file(
            "pre-auth-max-frame = \"8KiB\"\n\
             [[users]]\nname = \"svc\"\ntoken = \"0123456789abcdef\"\n\
             publish = { allow = [\"a.>\"] }\n",
            &[],
        )
        .unwrap();
        assert_eq!(config.security.users.len(), 1);
        assert_eq!(config.security.pre_auth_max_frame, 8 * 1024);
        assert!(!config.to_toml().contains("0123456789abcdef"));
    }

    #[test]
    fn partial_security_settings_refuse_to_start() {
        let refused = |text: &str, extra: &[&str], needle: &str| {
            let err = load_file(text, extra).unwrap_err().to_string();
            assert!(err.contains(needle), "`{needle}` not in: {err}");
        };
        refused("", &["--tls-cert", "c.pem"], "tls-key");
        refused("", &["--tls-key", "k.pem"], "tls-cert");
        refused("", &["--tls-client-ca", "ca.pem"], "tls-client-ca");
        refused("", &["--auth-failure-delay", "10ms"], "auth-failure-delay");
        refused(
            "[[users]]\nname = \"a\"\ntoken = \"0123456789abcdef\"\n",
            &["--auth-token", "x"],
            "both set",
        );
        refused(
            "[[users]]\nname = \"cert-user\"\ncertificate = true\n",
            &[],
            "cert-user",
        );
        refused("[[users]]\nname = \"nocred\"\n", &[], "users[0] (`nocred`)");
        refused(
            "[[users]]\nname = \"typo\"\ntoken = \"0123456789abcdef\"\npublsh = {}\n",
            &[],
            "publsh",
        );
    }
}
