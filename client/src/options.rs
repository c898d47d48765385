//! `ClientBuilder` and `ReconnectPolicy`: every knob of a client, with its default.

use std::time::Duration;

use crate::client::Client;
use crate::error::ConnectError;
use crate::tls::ClientTls;

/// How the client reconnects after the connection drops.
///
/// Delays grow exponentially from `initial_delay` to `max_delay`, with a little
/// jitter so that many clients do not reconnect in lockstep.
///
/// ```
/// use std::time::Duration;
/// use tidings_client::ReconnectPolicy;
///
/// let fast = ReconnectPolicy::exponential(Duration::from_millis(10), Duration::from_millis(200))
///     .max_attempts(50);
/// assert_eq!(fast.delay(0), Duration::from_millis(10));
/// assert!(ReconnectPolicy::never().delay(0) > Duration::ZERO);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconnectPolicy {
    enabled: bool,
    initial_delay: Duration,
    max_delay: Duration,
    max_attempts: Option<u32>,
}

impl Default for ReconnectPolicy {
    /// Reconnect forever, waiting 100 ms, then 200 ms, … up to 5 s between attempts.
    fn default() -> Self {
        Self::exponential(Duration::from_millis(100), Duration::from_secs(5))
    }
}

impl ReconnectPolicy {
    /// Never reconnect: the first drop closes the client.
    pub fn never() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// Reconnect forever, doubling the delay from `initial` up to `max`.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        Self {
            enabled: true,
            initial_delay: initial,
            max_delay: max.max(initial),
            max_attempts: None,
        }
    }

    /// Give up (closing the client) after this many failed attempts in a row.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// True when the client reconnects at all.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The delay before attempt number `attempt` (0-based), without jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX);
        self.initial_delay
            .checked_mul(factor)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }

    /// True when `failed` attempts in a row mean giving up.
    pub(crate) fn exhausted(&self, failed: u32) -> bool {
        !self.enabled || self.max_attempts.is_some_and(|max| failed >= max)
    }
}

/// Configures and opens a [`Client`].
///
/// ```no_run
/// # async fn demo() -> Result<(), tidings_client::ConnectError> {
/// use std::time::Duration;
/// use tidings_client::ClientBuilder;
///
/// let client = ClientBuilder::new("127.0.0.1:7878")
///     .name("orders")
///     .request_timeout(Duration::from_secs(2))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    pub(crate) addr: String,
    pub(crate) name: String,
    pub(crate) token: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) tls: Option<ClientTls>,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) confirm_timeout: Duration,
    pub(crate) subscribe_timeout: Duration,
    pub(crate) queue_timeout: Duration,
    pub(crate) reconnect: ReconnectPolicy,
    pub(crate) max_buffered_bytes: usize,
    pub(crate) subscription_capacity: usize,
    pub(crate) subscription_max_bytes: usize,
    pub(crate) offline_wait: Duration,
}

impl ClientBuilder {
    /// A builder for the broker at `addr` (`host:port`, or `tls://host:port` for
    /// TLS), with every default.
    ///
    /// ```
    /// let builder = tidings_client::ClientBuilder::new("127.0.0.1:7878");
    /// ```
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            name: String::new(),
            token: None,
            user: None,
            tls: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            confirm_timeout: Duration::from_secs(10),
            subscribe_timeout: Duration::from_secs(5),
            queue_timeout: Duration::from_secs(5),
            reconnect: ReconnectPolicy::default(),
            max_buffered_bytes: 8 * 1024 * 1024,
            subscription_capacity: 4096,
            subscription_max_bytes: 4 * 1024 * 1024,
            offline_wait: Duration::from_secs(5),
        }
    }

    /// A name for the broker's logs and stats. Default: empty.
    ///
    /// ```
    /// let builder = tidings_client::ClientBuilder::new("127.0.0.1:7878").name("billing");
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The shared secret, for brokers that require one. Default: none.
    ///
    /// ```
    /// let builder = tidings_client::ClientBuilder::new("127.0.0.1:7878").token("s3cret");
    /// ```
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The user to log in as, for brokers with `[[users]]`; pair it with
    /// [`ClientBuilder::password`] (or a token), or with a client certificate
    /// ([`ClientBuilder::tls`]) that names the user. It also names the client's
    /// reply inbox `_INBOX.<user>.…`, which the broker always lets the user
    /// read. Default: none.
    ///
    /// ```
    /// let builder = tidings_client::ClientBuilder::new("127.0.0.1:7878")
    ///     .user("billing")
    ///     .password("correct horse battery staple");
    /// ```
    pub fn user(mut self, name: impl Into<String>) -> Self {
        self.user = Some(name.into());
        self
    }

    /// The user's password or token (the same HELLO field as
    /// [`ClientBuilder::token`]). Default: none.
    ///
    /// ```
    /// let builder = tidings_client::ClientBuilder::new("127.0.0.1:7878").user("u").password("pw");
    /// ```
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.token = Some(password.into());
        self
    }

    /// Speak TLS with these settings. A `tls://host:port` address turns TLS on
    /// with [`ClientTls::system_roots`] when this is not called. Default: plain
    /// TCP for `host:port`.
    ///
    /// ```
    /// use tidings_client::{ClientBuilder, ClientTls};
    /// let builder = ClientBuilder::new("broker.internal:7878").tls(ClientTls::ca_file("ca.pem"));
    /// ```
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// How long opening the TCP connection plus the handshake may take, for the
    /// first connect and each reconnect attempt. Default: 5 s.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = tidings_client::ClientBuilder::new("127.0.0.1:7878")
    ///     .connect_timeout(Duration::from_secs(1));
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long [`Client::request`] waits for a reply. Default: 5 s. Each kind of
    /// call has its own default ([`ClientBuilder::confirm_timeout`],
    /// [`ClientBuilder::subscribe_timeout`], [`ClientBuilder::queue_timeout`]);
    /// [`Client::with_timeout`] overrides them for the calls through one handle,
    /// and [`Client::request_timeout`] for one request.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = tidings_client::ClientBuilder::new("127.0.0.1:7878")
    ///     .request_timeout(Duration::from_millis(500));
    /// ```
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long a publish confirm ([`Client::publish_confirmed`],
    /// [`Client::enqueue_confirmed`]) or a [`Client::flush`] may take. Confirms
    /// wait for the disk, so the default is longer: 10 s.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = tidings_client::ClientBuilder::new("127.0.0.1:7878")
    ///     .confirm_timeout(Duration::from_secs(30));
    /// ```
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// How long the broker may take to answer a subscribe or unsubscribe.
    /// Default: 5 s.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = tidings_client::ClientBuilder::new("127.0.0.1:7878")
    ///     .subscribe_timeout(Duration::from_secs(2));
    /// ```
    pub fn subscribe_timeout(mut self, timeout: Duration) -> Self {
        self.subscribe_timeout = timeout;
        self
    }

    /// How long the broker may take to answer a queue operation: declare,
    /// delete, bind, info, consume, cancel or close, an awaited ack, dead
    /// letters, redrive, stats. Default: 5 s.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = tidings_client::ClientBuilder::new("127.0.0.1:7878")
    ///     .queue_timeout(Duration::from_secs(15));
    /// ```
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.queue_timeout = timeout;
        self
    }

    /// What to do when the connection drops. Default:
    /// [`ReconnectPolicy::default`] (forever, 100 ms doubling up to 5 s).
    ///
    /// ```
    /// use tidings_client::{ClientBuilder, ReconnectPolicy};
    /// let builder = ClientBuilder::new("127.0.0.1:7878").reconnect(ReconnectPolicy::never());
    /// ```
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    /// How many payload bytes publishes may have queued but not yet written to the
    /// socket; a publish beyond it waits for room (backpressure). Default: 8 MiB.
    ///
    /// ```
    /// let builder = tidings_client::ClientBuilder::new("127.0.0.1:7878")
    ///     .max_buffered_bytes(1 << 20);
    /// ```
    pub fn max_buffered_bytes(mut self, bytes: usize) -> Self {
        self.max_buffered_bytes = bytes.max(1);
        self
    }

    /// How many messages each [`crate::Subscription`] holds before its connection
    /// stops reading until the subscription makes room (backpressure; nothing is
    /// dropped). Default: 4096.
    ///
    /// ```
    /// let builder = tidings_client::ClientBuilder::new("127.0.0.1:7878")
    ///     .subscription_capacity(65_536);
    /// ```
    pub fn subscription_capacity(mut self, messages: usize) -> Self {
        self.subscription_capacity = messages.max(1);
        self
    }

    /// How many bytes (payloads, topics and headers) each [`crate::Subscription`]
    /// holds before its connection stops reading until the subscription makes
    /// room. A single larger message still gets through. Default: 4 MiB.
    ///
    /// ```
    /// let builder = tidings_client::ClientBuilder::new("127.0.0.1:7878")
    ///     .subscription_max_bytes(16 << 20);
    /// ```
    pub fn subscription_max_bytes(mut self, bytes: usize) -> Self {
        self.subscription_max_bytes = bytes.max(1);
        self
    }

    /// How long an operation started while the connection is down waits for a
    /// reconnect before failing with a `Disconnected` error. Default: 5 s.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = tidings_client::ClientBuilder::new("127.0.0.1:7878")
    ///     .offline_wait(Duration::from_secs(30));
    /// ```
    pub fn offline_wait(mut self, wait: Duration) -> Self {
        self.offline_wait = wait;
        self
    }

    /// Connects, performs the handshake and starts the connection task.
    pub async fn connect(self) -> Result<Client, ConnectError> {
        Client::start(self).await
    }
}
