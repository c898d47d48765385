//! `Message`: what is published and what a subscription receives.

use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tidings_protocol::{Headers, Publish, Text};

use crate::error::PublishError;
use crate::handle::Handle;

/// A message: a topic, an opaque payload and optional headers.
///
/// Build one to publish with headers, an id, a reply topic or a delay; receive them
/// from a [`crate::Subscription`] or as the answer of [`crate::Client::request`].
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tidings_client::Message;
///
/// let msg = Message::new("orders.created", r#"{"id":7}"#)
///     .header("content-type", "application/json")
///     .id("order-7")
///     .delay(Duration::from_secs(5));
/// assert_eq!(msg.topic(), "orders.created");
/// assert_eq!(msg.header_value("content-type"), Some("application/json"));
/// ```
#[derive(Clone)]
pub struct Message {
    pub(crate) topic: Text,
    pub(crate) payload: Bytes,
    pub(crate) headers: Headers,
    pub(crate) reply_to: Option<Text>,
    pub(crate) id: Option<Text>,
    pub(crate) delay: Option<Duration>,
    /// Set on received messages that carry a reply topic, for [`Message::respond`].
    pub(crate) responder: Option<Handle>,
}

impl Message {
    /// A message for `topic` with this payload and nothing else.
    pub fn new(topic: impl Into<Text>, payload: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            headers: Headers::new(),
            reply_to: None,
            id: None,
            delay: None,
            responder: None,
        }
    }

    /// Adds a header (headers keep their order; a key may repeat).
    pub fn header(mut self, key: impl Into<Text>, value: impl Into<Text>) -> Self {
        self.headers.push((key.into(), value.into()));
        self
    }

    /// Sets the message id, which durable queues use to drop duplicates within
    /// their dedup window.
    pub fn id(mut self, id: impl Into<Text>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the topic responders should publish their answer to.
    pub fn reply_to(mut self, topic: impl Into<Text>) -> Self {
        self.reply_to = Some(topic.into());
        self
    }

    /// Asks queues to hold the message for this long before delivering it.
    /// Subscriptions get it at once.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Asks queues to deliver the message no sooner than `at` (wall-clock time). The
    /// wire carries a delay, computed from this machine's clock now; a time in the
    /// past means at once. The broker stores the due time, so it survives restarts.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tidings_client::Message;
    /// let at = SystemTime::now() + Duration::from_secs(3600);
    /// let message = Message::new("reports.daily", "run").deliver_at(at);
    /// # let _ = message;
    /// ```
    pub fn deliver_at(self, at: SystemTime) -> Self {
        let delay = at.duration_since(SystemTime::now()).unwrap_or_default();
        self.delay(delay)
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The payload, consuming the message (no copy).
    pub fn into_payload(self) -> Bytes {
        self.payload
    }

    /// The headers, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The value of the first header named `key`.
    pub fn header_value(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v.as_str())
    }

    /// Where the publisher wants answers, if anywhere.
    pub fn reply_to_topic(&self) -> Option<&str> {
        self.reply_to.as_deref()
    }

    /// The message id set by the publisher. Received messages carry it when the
    /// broker speaks protocol 1.1.
    pub fn message_id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// Publishes `payload` to this message's reply topic: the way a responder
    /// answers a [`crate::Client::request`].
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// use futures::StreamExt;
    /// let mut requests = client.subscribe_group("pricing.quote", "pricing").await?;
    /// while let Some(request) = requests.next().await {
    ///     request.respond("42.00").await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn respond(&self, payload: impl Into<Bytes>) -> Result<(), PublishError> {
        let (Some(reply_to), Some(handle)) = (&self.reply_to, &self.responder) else {
            return Err(PublishError::NoReplyTo);
        };
        handle
            .publish_message(Message::new(reply_to.clone(), payload))
            .await
    }

    /// The PUBLISH frame for this message.
    pub(crate) fn to_publish(&self) -> Publish {
        Publish {
            topic: self.topic.clone(),
            reply_to: self.reply_to.clone(),
            message_id: self.id.clone(),
            delay_ms: self
                .delay
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            headers: self.headers.clone(),
            payload: self.payload.clone(),
            ..Publish::default()
        }
    }

    /// A received message; `handle` is cloned only when the message carries a
    /// reply topic, so plain messages cost no reference-count traffic.
    pub(crate) fn from_frame(frame: tidings_protocol::Message, handle: &Handle) -> Self {
        let responder = frame.reply_to.is_some().then(|| handle.clone());
        Self {
            topic: frame.topic,
            payload: frame.payload,
            headers: frame.headers,
            reply_to: frame.reply_to,
            id: frame.message_id,
            delay: None,
            responder,
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("topic", &self.topic)
            .field("payload_len", &self.payload.len())
            .field("headers", &self.headers)
            .field("reply_to", &self.reply_to)
            .field("id", &self.id)
            .field("delay", &self.delay)
            .finish()
    }
}
