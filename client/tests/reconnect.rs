//! The broker restarted under a client: the client reconnects, restores its
//! subscriptions, reports it, and fails what was in flight instead of hanging.

mod common;

use std::time::Duration;

use common::{TestBroker, within};
use futures::StreamExt;
use tidings_client::{
    ClientBuilder, Event, Interruption, PublishError, ReconnectPolicy, RequestError,
};

async fn wait_for(events: &mut tidings_client::Events, want: fn(&Event) -> bool) -> Event {
    loop {
        let event = within(events.next())
            .await
            .expect("events end only on close");
        if want(&event) {
            return event;
        }
    }
}

#[tokio::test]
async fn subscriptions_resume_after_a_broker_restart() {
    let mut broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut events = client.events();
    let mut sub = within(client.subscribe("orders.>")).await.unwrap();
    let mut group = within(client.subscribe_group("jobs.*", "w")).await.unwrap();

    broker.stop().await;
    wait_for(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
    broker.start_again().await;
    wait_for(&mut events, |e| matches!(e, Event::Reconnected { .. })).await;

    // Another client publishes on the new broker: the restored subscriptions get it.
    // Reconnected comes only once the broker has answered the restored
    // SUBSCRIBEs, so this publish cannot get in before them.
    let publisher = broker.client().await;
    within(publisher.publish("orders.created", "after restart"))
        .await
        .unwrap();
    within(publisher.publish("jobs.run", "job")).await.unwrap();
    // The subscription marks where messages may have been lost.
    let gap = within(sub.try_next()).await.unwrap_err();
    assert!(matches!(gap, Interruption::Disconnected { .. }), "{gap}");
    let m = within(sub.next()).await.unwrap();
    assert_eq!(&m.payload()[..], b"after restart");
    let m = within(group.next()).await.unwrap();
    assert_eq!(&m.payload()[..], b"job");

    // Requests work again too (the inbox is restored on demand).
    let mut responder = within(client.subscribe("svc")).await.unwrap();
    tokio::spawn(async move {
        while let Some(req) = responder.next().await {
            let _ = req.respond("pong").await;
        }
    });
    let reply = within(publisher.request("svc", "ping")).await.unwrap();
    assert_eq!(&reply.payload()[..], b"pong");
    assert!(client.is_connected());
}

#[tokio::test]
async fn in_flight_requests_fail_when_the_connection_drops() {
    let mut broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut silent = within(client.subscribe("never.answers")).await.unwrap();
    let pending = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .request_timeout("never.answers", "?", Duration::from_secs(30))
                .await
        })
    };
    let mut events = client.events();
    // The silent subscriber seeing the request proves it is in flight.
    within(silent.next()).await.unwrap();
    broker.stop().await;
    let err = within(pending).await.unwrap().unwrap_err();
    assert!(matches!(err, RequestError::ConnectionLost), "{err}");
    wait_for(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
}

#[tokio::test]
async fn publishes_while_down_wait_then_fail_clearly() {
    let mut broker = TestBroker::start().await;
    let client = within(
        broker
            .builder()
            .offline_wait(Duration::from_millis(200))
            .connect(),
    )
    .await
    .unwrap();
    let mut events = client.events();
    broker.stop().await;
    wait_for(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
    let err = within(client.publish("x", "y")).await.unwrap_err();
    assert!(matches!(err, PublishError::Disconnected { .. }), "{err}");
    // Once the broker is back, the same client publishes again.
    broker.start_again().await;
    wait_for(&mut events, |e| matches!(e, Event::Reconnected { .. })).await;
    within(client.publish("x", "y")).await.unwrap();
    within(client.flush()).await.unwrap();
}

#[tokio::test]
async fn a_client_that_may_not_reconnect_closes() {
    let mut broker = TestBroker::start().await;
    let client = within(
        ClientBuilder::new(broker.addr())
            .reconnect(ReconnectPolicy::never())
            .connect(),
    )
    .await
    .unwrap();
    let mut events = client.events();
    broker.stop().await;
    wait_for(&mut events, |e| matches!(e, Event::Closed)).await;
    assert!(matches!(
        within(client.publish("x", "y")).await,
        Err(PublishError::Closed)
    ));
}

#[tokio::test]
async fn connecting_to_nothing_fails_with_a_clear_error() {
    // Bind then drop a listener to get a port nobody listens on.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = within(tidings_client::Client::connect(addr.to_string()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}
