//! `Config`: every setting of the broker, from flags, `TIDINGS_*` environment
//! variables and an optional TOML file (precedence: flag > env > file > default).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use thiserror::Error;

mod values;

pub(crate) use values::format_duration;
pub use values::{HttpListen, HttpTls, LogFormat, parse_duration, parse_size};

use crate::limits::Limits;
use crate::queue::FsyncPolicy;
use crate::security::{SecurityConfig, SecurityConfigError};

/// Room in a frame beyond its payload for the topic, reply-to, headers and fixed
/// fields; the codec's maximum frame length is `max_payload` plus this (the
/// protocol's rule, so that no frame the broker sends exceeds what it announces).
pub const FRAME_OVERHEAD: usize = tidings_protocol::FRAME_OVERHEAD;

/// Largest `--max-payload` accepted: keeps `max_payload + FRAME_OVERHEAD` inside the
/// protocol's `u32` length prefix with room to spare.
pub const MAX_PAYLOAD_LIMIT: usize = 256 * 1024 * 1024;

/// Largest `--max-connections` accepted (far beyond what descriptors allow anyway).
pub const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {path} is not valid TOML: {source}")]
    Toml {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: Box<toml::de::Error>,
    },
    /// A key in the config file is unknown or its value does not parse.
    #[error("config file {path}: key `{key}`: {message}")]
    FileValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A value is outside its allowed range.
    #[error("invalid setting `{name}`: {message}")]
    Invalid {
        /// The setting.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A TLS, user or authentication setting is incomplete or wrong.
    #[error("invalid security setting: {0}")]
    Security(#[from] SecurityConfigError),
    /// The command line or environment did not parse (also `--help`/`--version`).
    #[error(transparent)]
    Cli(#[from] clap::Error),
}

/// The broker's configuration. Each field is a command-line flag, a `TIDINGS_*`
/// environment variable and a key of the `--config` TOML file (same name as the
/// flag, with `-` or `_`).
///
/// ```
/// use tidings_broker::Config;
/// let mut config = Config::for_test("/tmp/tidings-doc");
/// config.max_connections = 10;
/// assert!(config.validate().is_ok());
/// assert_eq!(config.listen.port(), 0);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(
    name = "tidings-broker",
    version,
    about = "The tidings event broker: pub/sub, request/reply and durable queues over TCP.",
    long_about = "The tidings event broker: pub/sub, request/reply and durable queues over TCP.\n\n\
        Every option can also be set through its TIDINGS_* environment variable or in a TOML \
        file given with --config, with keys named like the flags. Precedence: flag, then \
        environment, then file, then default.\n\n\
        `tidings-broker hash-password < file` prints an argon2id hash of the password on the \
        file's first line, for the `password_hash` of a [[users]] entry in the config file. \
        SIGHUP reloads --tls-cert and --tls-key."
)]
pub struct Config {
    /// TOML file with settings; flags and TIDINGS_* variables override it.
    #[arg(long, env = "TIDINGS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Repair mode, for one start after the broker refused to start because the
    /// queue log is damaged (a record that fails its checksum where no crash can have
    /// torn it; the error names the file and offset). Cuts the log at the damage,
    /// logs how many records and stored messages it dropped, keeps everything before
    /// the damage and every later segment, and then starts. Without damage it changes
    /// nothing. Take a copy of the data dir first.
    #[arg(long)]
    pub repair: bool,

    /// Address to listen on [default: 127.0.0.1:7878].
    #[arg(
        long,
        env = "TIDINGS_LISTEN",
        default_value = "127.0.0.1:7878",
        hide_default_value = true
    )]
    pub listen: SocketAddr,

    /// Directory for durable data [default: ./tidings-data].
    #[arg(
        long,
        env = "TIDINGS_DATA_DIR",
        default_value = "./tidings-data",
        hide_default_value = true
    )]
    pub data_dir: PathBuf,

    /// Largest payload of one message, e.g. 1MiB, 512KiB or 65536 [default: 1MiB].
    #[arg(long, env = "TIDINGS_MAX_PAYLOAD", default_value = "1MiB", hide_default_value = true, value_parser = parse_size)]
    pub max_payload: usize,

    /// Most concurrent client connections; one more gets a TooManyConnections error
    /// and is closed [default: 10000].
    #[arg(
        long,
        env = "TIDINGS_MAX_CONNECTIONS",
        default_value_t = 10_000,
        hide_default_value = true
    )]
    pub max_connections: usize,

    /// Outbound bytes queued for one connection before it is disconnected as a slow
    /// consumer [default: 64MiB].
    #[arg(long, env = "TIDINGS_MAX_PENDING_BYTES", default_value = "64MiB", hide_default_value = true, value_parser = parse_size)]
    pub max_pending_bytes: usize,

    /// Bursts without loss: once a connection has more than half of
    /// --max-pending-bytes queued, the publishers feeding it wait (stop reading) until
    /// it is back under that mark; a connection still above it this long after it
    /// crossed is disconnected as a slow consumer. 0 disables the stall, so only
    /// --max-pending-bytes cuts off [default: 1s].
    #[arg(long, env = "TIDINGS_SLOW_CONSUMER_STALL", default_value = "1s", hide_default_value = true, value_parser = parse_duration)]
    pub slow_consumer_stall: Duration,

    /// Idle time after which the server pings a connection, e.g. 10s or 500ms; 0
    /// disables heartbeats [default: 10s].
    #[arg(long, env = "TIDINGS_HEARTBEAT", default_value = "10s", hide_default_value = true, value_parser = parse_duration)]
    pub heartbeat: Duration,

    /// Unanswered heartbeat pings after which a connection is closed [default: 3].
    #[arg(
        long,
        env = "TIDINGS_MISSED_HEARTBEATS",
        default_value_t = 3,
        hide_default_value = true
    )]
    pub missed_heartbeats: u32,

    /// Shared secret clients must present in HELLO: the simple mode, one secret for
    /// every client, everything allowed. For per-service secrets and permissions
    /// use `[[users]]` in the config file instead (not both) [default: unset: no
    /// authentication].
    #[arg(long, env = "TIDINGS_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,

    /// Time a new connection has to complete its handshake [default: 2s].
    #[arg(long, env = "TIDINGS_HANDSHAKE_TIMEOUT", default_value = "2s", hide_default_value = true, value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Longest wait for connections to finish and flush at shutdown before they are
    /// cut off [default: 10s].
    #[arg(long, env = "TIDINGS_SHUTDOWN_TIMEOUT", default_value = "10s", hide_default_value = true, value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// When a publisher confirm may go out [default: always]. `always`: only after
    /// the message is written to the queue log and fdatasync'ed (survives kill -9 and
    /// power loss). `interval:MS`: confirm once written to the log (the operating
    /// system holds it: survives kill -9 of the broker), fdatasync every MS
    /// milliseconds (a machine crash or power loss loses up to MS of confirmed
    /// messages). `never`: the same, but never fdatasync (a machine crash loses what
    /// the operating system had not written back).
    #[arg(
        long,
        env = "TIDINGS_FSYNC",
        default_value = "always",
        hide_default_value = true
    )]
    pub fsync: FsyncPolicy,

    /// Ready messages each queue keeps in memory; the rest wait in the store and are
    /// paged in as consumers get to them [default: 4096].
    #[arg(
        long,
        env = "TIDINGS_QUEUE_WINDOW",
        default_value_t = 4096,
        hide_default_value = true
    )]
    pub queue_window: usize,

    /// Most credit (deliveries outstanding at once) one queue consumer may have; a
    /// CONSUME or CREDIT asking for more is clamped to it. Announced to 1.1 clients
    /// in WELCOME [default: 1024].
    #[arg(
        long,
        env = "TIDINGS_MAX_CREDIT",
        default_value_t = crate::queue::DEFAULT_MAX_CREDIT,
        hide_default_value = true
    )]
    pub max_credit: u32,
    /// TLS, users and pre-authentication limits.
    #[command(flatten)]
    pub security: SecurityConfig,

    /// Limits on what one client may make the broker hold.
    #[command(flatten)]
    pub limits: Limits,

    /// Address of the HTTP listener for /metrics, /healthz, /readyz, the JSON API and
    /// the dashboard, or `off`. Left unset while --listen has port 0, it takes an
    /// ephemeral port too (logged at start) [default: 127.0.0.1:8222].
    #[arg(
        long,
        env = "TIDINGS_HTTP_LISTEN",
        default_value = "127.0.0.1:8222",
        hide_default_value = true
    )]
    pub http_listen: HttpListen,

    /// TLS on the HTTP listener: `auto` serves HTTPS exactly when the client port
    /// has TLS (--tls-cert/--tls-key), with the same certificate, reloaded on SIGHUP
    /// like it; `on` requires --tls-cert; `off` serves plain HTTP even then (behind
    /// a TLS-terminating proxy, say). With --tls-client-ca, HTTPS clients must
    /// present a certificate from that CA too [default: auto].
    #[arg(
        long,
        env = "TIDINGS_HTTP_TLS",
        default_value = "auto",
        hide_default_value = true
    )]
    pub http_tls: HttpTls,

    /// Bearer token for the HTTP API's admin actions (purge, redrive, delete a
    /// queue, close a connection); unset: `--auth-token` if set. Configured users
    /// may also run the queue actions their rights allow, over HTTP Basic
    /// [default: unset].
    #[arg(long, env = "TIDINGS_HTTP_ADMIN_TOKEN", hide_env_values = true)]
    pub http_admin_token: Option<String>,

    /// Most queues with their own series in /metrics; the rest are summed into
    /// `queue="_other"`, so a broker with many queues cannot flood Prometheus. The
    /// first queues by name get their own series [default: 500].
    #[arg(
        long,
        env = "TIDINGS_METRICS_MAX_QUEUES",
        default_value_t = 500,
        hide_default_value = true
    )]
    pub metrics_max_queues: usize,

    /// Log line format: `text` for people, `json` for log shippers (one object per
    /// line) [default: text].
    #[arg(
        long,
        env = "TIDINGS_LOG_FORMAT",
        default_value = "text",
        hide_default_value = true
    )]
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            config: None,
            print_config: false,
            repair: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            data_dir: PathBuf::from("./tidings-data"),
            max_payload: 1024 * 1024,
            max_connections: 10_000,
            max_pending_bytes: 64 * 1024 * 1024,
            slow_consumer_stall: Duration::from_secs(1),
            heartbeat: Duration::from_secs(10),
            missed_heartbeats: 3,
            auth_token: None,
            handshake_timeout: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(10),
            fsync: FsyncPolicy::Always,
            queue_window: 4096,
            max_credit: crate::queue::DEFAULT_MAX_CREDIT,
            http_listen: HttpListen(Some(SocketAddr::from(([127, 0, 0, 1], 8222)))),
            http_tls: HttpTls::Auto,
            http_admin_token: None,
            metrics_max_queues: 500,
            log_format: LogFormat::Text,
            security: SecurityConfig::default(),
            limits: Limits::default(),
        }
    }
}

impl Config {
    /// Defaults, but listen on 127.0.0.1:0 with the HTTP listener off, and keep data
    /// in `data_dir` (tests, benches).
    pub fn for_test(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_listen: HttpListen(None),
            data_dir: data_dir.into(),
            shutdown_timeout: Duration::from_secs(5),
            ..Config::default()
        }
    }

    /// Reads the process's arguments, environment and config file.
    pub fn load() -> Result<Config, ConfigError> {
        Self::load_from(std::env::args_os())
    }

    /// Like [`Config::load`] with explicit arguments (the first is the program name).
    pub fn load_from<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Config::command().try_get_matches_from(args)?;
        let mut config = Config::from_arg_matches(&matches)?;
        let http_default = config.http_listen;
        if let Some(path) = config.config.clone() {
            config.apply_file(&path, &matches)?;
        }
        // An ephemeral client port means several brokers may run side by side (tests,
        // embedding): a fixed default HTTP port would collide, so the HTTP listener
        // takes an ephemeral port too, unless it was set explicitly.
        let http_explicit = matches!(
            matches.value_source("http_listen"),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) || config.http_listen != http_default;
        if !http_explicit && config.listen.port() == 0 {
            if let HttpListen(Some(addr)) = &mut config.http_listen {
                addr.set_port(0);
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Fills every setting that came from its default (not a flag or variable) with
    /// the file's value, if the file has one.
    fn apply_file(&mut self, path: &Path, matches: &ArgMatches) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let table: toml::Table = text.parse().map_err(|source| ConfigError::Toml {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        for (key, value) in table {
            let id = key.replace('-', "_");
            let file_error = |message: String| ConfigError::FileValue {
                path: path.to_owned(),
                key: key.clone(),
                message,
            };
            if id == "users" {
                // `[[users]]`: only the file can give them; see `auth::users`.
                self.security.users = value
                    .try_into()
                    .map_err(|e: toml::de::Error| file_error(e.message().to_owned()))?;
                continue;
            }
            let known = Config::command().get_arguments().any(|a| {
                a.get_id().as_str() == id
                    && !matches!(id.as_str(), "config" | "print_config" | "repair")
            });
            if !known {
                return Err(file_error("unknown setting".into()));
            }
            let explicit = matches!(
                matches.value_source(&id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
            if explicit {
                continue;
            }
            let raw = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => return Err(file_error(format!("unsupported value {other}"))),
            };
            self.set(&id, &raw).map_err(file_error)?;
        }
        Ok(())
    }

    /// Sets one setting from its text form, with the same parsers as the flags.
    fn set(&mut self, id: &str, raw: &str) -> Result<(), String> {
        fn num<T: std::str::FromStr>(raw: &str) -> Result<T, String>
        where
            T::Err: std::fmt::Display,
        {
            raw.parse().map_err(|e: T::Err| e.to_string())
        }
        match id {
            "listen" => self.listen = num(raw)?,
            "data_dir" => self.data_dir = PathBuf::from(raw),
            "max_payload" => self.max_payload = parse_size(raw)?,
            "max_connections" => self.max_connections = num(raw)?,
            "max_pending_bytes" => self.max_pending_bytes = parse_size(raw)?,
            "slow_consumer_stall" => self.slow_consumer_stall = parse_duration(raw)?,
            "heartbeat" => self.heartbeat = parse_duration(raw)?,
            "missed_heartbeats" => self.missed_heartbeats = num(raw)?,
            "auth_token" => self.auth_token = Some(raw.to_owned()),
            "handshake_timeout" => self.handshake_timeout = parse_duration(raw)?,
            "shutdown_timeout" => self.shutdown_timeout = parse_duration(raw)?,
            "fsync" => self.fsync = raw.parse()?,
            "queue_window" => self.queue_window = num(raw)?,
            "max_credit" => self.max_credit = num(raw)?,
            "http_listen" => self.http_listen = raw.parse()?,
            "http_tls" => self.http_tls = raw.parse()?,
            "http_admin_token" => self.http_admin_token = Some(raw.to_owned()),
            "metrics_max_queues" => self.metrics_max_queues = num(raw)?,
            "log_format" => self.log_format = raw.parse()?,
            _ => {
                return self
                    .security
                    .set(id, raw)
                    .or_else(|| self.limits.set(id, raw))
                    .unwrap_or_else(|| Err("unknown setting".into()));
            }
        }
        Ok(())
    }

    /// Checks ranges that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |name, message: &str| {
            Err(ConfigError::Invalid {
                name,
                message: message.to_owned(),
            })
        };
        if self.max_payload == 0 || self.max_payload > MAX_PAYLOAD_LIMIT {
            return invalid("max_payload", "must be between 1 byte and 256MiB");
        }
        if self.max_connections == 0 || self.max_connections > MAX_CONNECTIONS_LIMIT {
            return invalid("max_connections", "must be between 1 and 1000000");
        }
        if self.max_pending_bytes < 1024 {
            return invalid("max_pending_bytes", "must be at least 1KiB");
        }
        if self.slow_consumer_stall > Duration::from_secs(60) {
            // A stalled publisher's connection reads nothing meanwhile, heartbeats
            // and shutdown included.
            return invalid("slow_consumer_stall", "must be at most 60s");
        }
        if self.missed_heartbeats == 0 {
            return invalid("missed_heartbeats", "must be at least 1");
        }
        if self.handshake_timeout.is_zero() {
            return invalid("handshake_timeout", "must be more than 0");
        }
        if self.queue_window == 0 {
            return invalid("queue_window", "must be at least 1");
        }
        if self.max_credit == 0 {
            return invalid("max_credit", "must be at least 1");
        }
        if self.metrics_max_queues > 100_000 {
            return invalid("metrics_max_queues", "must be at most 100000");
        }
        if self.http_admin_token.as_deref() == Some("") {
            return invalid("http_admin_token", "must not be empty");
        }
        if self.http_tls == HttpTls::On && !self.security.tls_enabled() {
            return invalid("http_tls", "is `on`, which needs `tls-cert` and `tls-key`");
        }
        if u32::try_from(self.heartbeat.as_millis()).is_err() {
            return invalid("heartbeat", "must be under 49 days");
        }
        if let Err((name, message)) = self.limits.validate() {
            return invalid(name, &message);
        }
        self.security.validate(self.auth_token.as_deref())?;
        Ok(())
    }

    /// The codec's maximum frame length: the payload limit plus room for the rest.
    pub fn max_frame_len(&self) -> usize {
        self.max_payload.saturating_add(FRAME_OVERHEAD)
    }

    /// The effective configuration as TOML, the auth token redacted; a valid
    /// `--config` file.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let mut line = |key: &str, value: String| {
            out.push_str(key);
            out.push_str(" = ");
            out.push_str(&value);
            out.push('\n');
        };
        let quoted = |s: &str| format!("{:?}", s);
        line("listen", quoted(&self.listen.to_string()));
        line("data-dir", quoted(&self.data_dir.display().to_string()));
        line("max-payload", self.max_payload.to_string());
        line("max-connections", self.max_connections.to_string());
        line("max-pending-bytes", self.max_pending_bytes.to_string());
        line(
            "slow-consumer-stall",
            quoted(&format_duration(self.slow_consumer_stall)),
        );
        line("heartbeat", quoted(&format_duration(self.heartbeat)));
        line("missed-heartbeats", self.missed_heartbeats.to_string());
        if self.auth_token.is_some() {
            line("auth-token", quoted("<redacted>"));
        }
        line(
            "handshake-timeout",
            quoted(&format_duration(self.handshake_timeout)),
        );
        line(
            "shutdown-timeout",
            quoted(&format_duration(self.shutdown_timeout)),
        );
        line("fsync", quoted(&self.fsync.to_string()));
        line("queue-window", self.queue_window.to_string());
        line("max-credit", self.max_credit.to_string());
        line("http-listen", quoted(&self.http_listen.to_string()));
        line("http-tls", quoted(&self.http_tls.to_string()));
        if self.http_admin_token.is_some() {
            line("http-admin-token", quoted("<redacted>"));
        }
        line("metrics-max-queues", self.metrics_max_queues.to_string());
        line("log-format", quoted(&self.log_format.to_string()));
        self.security.toml_lines(&mut line);
        self.limits.toml_lines(&mut line);
        if !self.security.users.is_empty() {
            out.push_str(&format!(
                "# [[users]]: {} entries, not printed (they hold secrets)\n",
                self.security.users.len()
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_defaults_match_default_impl() {
        let parsed = Config::try_parse_from(["tidings-broker"]).unwrap();
        // Environment variables could leak into this test; only compare when unset.
        if std::env::vars().all(|(k, _)| !k.starts_with("TIDINGS_")) {
            assert_eq!(parsed, Config::default());
        }
        Config::command().debug_assert();
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("64 KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("2").is_err(), "a bare number has no unit");
        assert!(parse_duration("2 fortnights").is_err());
    }

    #[test]
    fn flag_beats_file_and_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tidings.toml");
        std::fs::write(
            &path,
            "max-connections = 7\nmax_payload = \"2MiB\"\nheartbeat = \"250ms\"\n",
        )
        .unwrap();
        let config = Config::load_from([
            "tidings-broker",
            "--config",
            path.to_str().unwrap(),
            "--max-connections",
            "9",
        ])
        .unwrap();
        assert_eq!(config.max_connections, 9);
        assert_eq!(config.max_payload, 2 << 20);
        assert_eq!(config.heartbeat, Duration::from_millis(250));
        assert_eq!(config.handshake_timeout, Duration::from_secs(2));
    }

    #[test]
    fn unknown_file_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tidings.toml");
        std::fs::write(&path, "max-conections = 7\n").unwrap();
        let err =
            Config::load_from(["tidings-broker", "--config", path.to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("max-conections"), "{err}");
    }

    #[test]
    fn printed_config_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tidings.toml");
        let mut config = Config::for_test(dir.path());
        config.max_pending_bytes = 4096;
        config.heartbeat = Duration::from_millis(1500);
        std::fs::write(&path, config.to_toml()).unwrap();
        let mut read =
            Config::load_from(["tidings-broker", "--config", path.to_str().unwrap()]).unwrap();
        read.config = None;
        assert_eq!(read, config);
    }

    #[test]
    fn the_slow_consumer_stall_is_a_bounded_duration() {
        let config =
            Config::load_from(["tidings-broker", "--slow-consumer-stall", "250ms"]).unwrap();
        assert_eq!(config.slow_consumer_stall, Duration::from_millis(250));
        let off = Config::load_from(["tidings-broker", "--slow-consumer-stall", "0s"]).unwrap();
        assert!(off.slow_consumer_stall.is_zero());
        assert!(Config::load_from(["tidings-broker", "--slow-consumer-stall", "2m"]).is_err());
        assert!(Config::load_from(["tidings-broker", "--slow-consumer-stall", "5"]).is_err());
    }

    #[test]
    fn http_listen_follows_an_ephemeral_client_port_unless_set() {
        let ephemeral = Config::load_from(["tidings-broker", "--listen", "127.0.0.1:0"]).unwrap();
        assert_eq!(ephemeral.http_listen.to_string(), "127.0.0.1:0");
        let fixed = Config::load_from(["tidings-broker", "--listen", "127.0.0.1:7000"]).unwrap();
        assert_eq!(fixed.http_listen.to_string(), "127.0.0.1:8222");
        let explicit = Config::load_from([
            "tidings-broker",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:9000",
        ])
        .unwrap();
        assert_eq!(explicit.http_listen.to_string(), "127.0.0.1:9000");
        let off = Config::load_from([
            "tidings-broker",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "off",
        ])
        .unwrap();
        assert_eq!(off.http_listen, HttpListen(None));
        assert!("nonsense".parse::<HttpListen>().is_err());
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("xml".parse::<LogFormat>().is_err());
    }

    #[test]
    fn validation_rejects_out_of_range() {
        let config = Config {
            max_payload: 0,
            ..Config::default()
        };
        assert!(config.validate().is_err());
        let config = Config {
            max_connections: 0,
            ..Config::default()
        };
        assert!(config.validate().is_err());
    }
}
