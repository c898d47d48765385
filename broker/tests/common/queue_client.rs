//! Queue commands for the raw test client: declare, confirmed publish, consume,
//! ack and nack, each awaiting its answer.

use bytes::Bytes;
use tidings_protocol::{Ack, Consume, Delivery, Frame, Nack, Publish, QueueDeclare, QueueOptions};

use super::Client;

impl Client {
    pub async fn declare(&mut self, name: &str, options: QueueOptions) {
        let request_id = self.request_id();
        self.send(Frame::QueueDeclare(QueueDeclare {
            request_id,
            name: name.into(),
            options,
        }))
        .await;
        self.expect_ok(request_id).await;
    }

    /// Publishes with a confirm and waits for it; returns how many queues took it.
    pub async fn publish_confirmed(&mut self, topic: &str, payload: impl Into<Bytes>) -> u32 {
        let request_id = self.request_id();
        let mut p = Publish::new(topic, payload);
        p.request_id = Some(request_id);
        p.confirm = true;
        self.send(Frame::Publish(p)).await;
        match self.recv().await {
            Some(Frame::Confirm(c)) => {
                assert_eq!(c.request_id, request_id);
                c.queues
            }
            other => panic!("expected CONFIRM, got {other:?}"),
        }
    }

    /// Starts a consumer; returns the deliveries that arrived before its OK.
    pub async fn consume(&mut self, consumer_id: u32, queue: &str, credit: u32) -> Vec<Delivery> {
        let request_id = self.request_id();
        self.send(Frame::Consume(Consume {
            request_id,
            consumer_id,
            queue: queue.into(),
            credit,
            limit: None,
        }))
        .await;
        self.ok_after_deliveries(request_id).await
    }

    pub async fn delivery(&mut self) -> Delivery {
        match self.recv().await {
            Some(Frame::Delivery(d)) => d,
            other => panic!("expected DELIVERY, got {other:?}"),
        }
    }

    /// Acks; returns the deliveries that arrived before its OK.
    pub async fn ack(&mut self, ids: Vec<u64>) -> Vec<Delivery> {
        let request_id = self.request_id();
        self.send(Frame::Ack(Ack { request_id, ids })).await;
        self.ok_after_deliveries(request_id).await
    }

    /// Nacks; returns the deliveries that arrived before its OK.
    pub async fn nack(&mut self, ids: Vec<u64>) -> Vec<Delivery> {
        let request_id = self.request_id();
        self.send(Frame::Nack(Nack {
            request_id,
            delay_ms: None,
            ids,
        }))
        .await;
        self.ok_after_deliveries(request_id).await
    }

    async fn ok_after_deliveries(&mut self, request_id: u32) -> Vec<Delivery> {
        let mut early = Vec::new();
        loop {
            match self.recv().await {
                Some(Frame::Ok(ok)) if ok.request_id == request_id => return early,
                Some(Frame::Delivery(d)) => early.push(d),
                other => panic!("expected OK {request_id}, got {other:?}"),
            }
        }
    }
}
