//! Request/reply against a real broker: replies, no responders, timeouts, many
//! concurrent requests through one inbox.

mod common;

use std::time::{Duration, Instant};

use common::{TestBroker, within};
use futures::StreamExt;
use tidings_client::{Client, Message, PublishError, RequestError};

/// Answers every request on `pattern` with "re: <payload>".
async fn responder(client: &Client, pattern: &str) -> tokio::task::JoinHandle<()> {
    let mut sub = within(client.subscribe_group(pattern, "responders"))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(req) = sub.next().await {
            let mut answer = b"re: ".to_vec();
            answer.extend_from_slice(req.payload());
            req.respond(answer).await.unwrap();
        }
    })
}

#[tokio::test]
async fn request_gets_the_reply() {
    let broker = TestBroker::start().await;
    let server = broker.client().await;
    let _task = responder(&server, "pricing.quote").await;
    let client = broker.client().await;
    let reply = within(client.request("pricing.quote", "sku-1"))
        .await
        .unwrap();
    assert_eq!(&reply.payload()[..], b"re: sku-1");
}

#[tokio::test]
async fn no_responders_is_immediate_and_typed() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let started = Instant::now();
    let err = within(client.request_timeout("nobody.home", "?", Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RequestError::NoResponders { topic } if topic == "nobody.home"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "it waited for the timeout"
    );
}

#[tokio::test]
async fn a_silent_responder_times_out() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    // Subscribed but never answering.
    let _silent = within(client.subscribe("slow.service")).await.unwrap();
    let err = within(client.request_timeout("slow.service", "?", Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::TimedOut { .. }), "{err}");
    // The client is still fine afterwards.
    let _task = responder(&client, "fast.service").await;
    let reply = within(client.request("fast.service", "x")).await.unwrap();
    assert_eq!(&reply.payload()[..], b"re: x");
}

#[tokio::test]
async fn many_concurrent_requests_share_the_inbox() {
    let broker = TestBroker::start().await;
    let server = broker.client().await;
    let _task = responder(&server, "echo.>").await;
    let client = broker.client().await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let reply = client
                    .request(format!("echo.{}", i % 7), format!("{i}"))
                    .await?;
                Ok::<_, RequestError>((i, reply))
            })
        })
        .collect();
    for t in tasks {
        let (i, reply) = within(t).await.unwrap().unwrap();
        assert_eq!(reply.payload(), format!("re: {i}").as_bytes());
    }
}

#[tokio::test]
async fn respond_without_reply_to_is_an_error() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut sub = within(client.subscribe("plain")).await.unwrap();
    within(client.publish("plain", "x")).await.unwrap();
    let msg = within(sub.next()).await.unwrap();
    assert!(matches!(
        msg.respond("y").await,
        Err(PublishError::NoReplyTo)
    ));
    assert!(matches!(
        Message::new("a", "b").respond("c").await,
        Err(PublishError::NoReplyTo)
    ));
}
