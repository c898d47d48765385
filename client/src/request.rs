//! Request/reply: one private inbox subscription per client serves every request;
//! each request gets its own reply topic under it and is matched by that topic.

use std::time::Duration;

use bytes::Bytes;
use tidings_protocol::{ErrorCode, Text};
use tokio::sync::oneshot;

use crate::client::Client;
use crate::command::Command;
use crate::error::{CallError, PublishError, RequestError};
use crate::message::Message;

impl Client {
    /// Sends `payload` to `topic` and waits for one reply, up to the client's
    /// request timeout ([`crate::ClientBuilder::request_timeout`]).
    ///
    /// Fails at once with [`RequestError::NoResponders`] when nothing is
    /// subscribed to `topic`, and with [`RequestError::TimedOut`] when no reply
    /// comes in time.
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::RequestError> {
    /// use tidings_client::RequestError;
    /// match client.request("pricing.quote", "sku-42").await {
    ///     Ok(reply) => println!("price: {}", String::from_utf8_lossy(reply.payload())),
    ///     Err(RequestError::NoResponders { .. }) => println!("pricing is down"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn request(
        &self,
        topic: impl Into<Text>,
        payload: impl Into<Bytes>,
    ) -> Result<Message, RequestError> {
        let timeout = self.default_request_timeout();
        self.request_message(Message::new(topic, payload), timeout)
            .await
    }

    /// [`Client::request`] with its own timeout.
    pub async fn request_timeout(
        &self,
        topic: impl Into<Text>,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Message, RequestError> {
        self.request_message(Message::new(topic, payload), timeout)
            .await
    }

    /// Sends a whole [`Message`] (with headers) as a request. Its `reply_to`, if
    /// any, is replaced by this client's inbox.
    pub async fn request_message(
        &self,
        message: Message,
        timeout: Duration,
    ) -> Result<Message, RequestError> {
        let handle = self.handle();
        let topic = message.topic().to_owned();
        let mut publish = message.to_publish();
        handle.check_publish(&publish)?;
        let token = handle.shared.next_token();
        publish.reply_to = Some(Text::from(format!("{}.{token}", handle.shared.inbox)));
        publish.check_responders = true;
        let exchange = async {
            handle
                .ready(handle.offline_deadline())
                .await
                .map_err(PublishError::from)?;
            let id = handle.shared.next_id();
            publish.request_id = Some(id);
            let (reply_tx, reply_rx) = oneshot::channel();
            handle
                .send(Command::Request {
                    id,
                    token,
                    frame: publish,
                    reply: reply_tx,
                })
                .map_err(|_| RequestError::Closed)?;
            match reply_rx.await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(CallError::Server(e))) if e.code() == Some(ErrorCode::NoResponders) => {
                    Err(RequestError::NoResponders {
                        topic: topic.clone(),
                    })
                }
                Ok(Err(CallError::Server(e))) => Err(RequestError::Server(e)),
                Ok(Err(CallError::Closed)) => Err(RequestError::Closed),
                Ok(Err(_)) | Err(_) => Err(RequestError::ConnectionLost),
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(RequestError::TimedOut {
                topic,
                after: timeout,
            }),
        }
    }
}
