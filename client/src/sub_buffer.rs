//! `SubBuffer`: the bounded buffer between the connection task and one
//! [`crate::Subscription`]. The connection task appends every message of a read and
//! wakes the subscription once; the subscription takes everything buffered under
//! one lock. When it is full, the connection task waits for room instead of
//! dropping (backpressure).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;

use crate::message::Message;
use crate::subscriber::Interruption;

/// What a subscription takes from its buffer: a message, or the place in the
/// stream where messages may have been lost.
pub(crate) enum Item {
    Message(Message),
    Gap(Interruption),
}

/// What pushing a message did.
pub(crate) enum Push {
    /// Buffered; wake this waker once the current batch is done.
    Queued(Option<Waker>),
    /// The buffer is full: wait for [`SubBuffer::space`], then push again.
    Full(Message),
    /// The subscription is gone.
    Gone,
}

struct State {
    items: VecDeque<Item>,
    /// Messages and bytes held: those in `items` plus the batch the subscription
    /// took and has not finished yet.
    count: usize,
    bytes: usize,
    waker: Option<Waker>,
    /// The connection task will push no more (the subscription ended).
    ended: bool,
    /// The subscription was dropped.
    gone: bool,
}

/// Shared by the connection task (pushing) and one subscription (taking).
pub(crate) struct SubBuffer {
    state: Mutex<State>,
    max_messages: usize,
    max_bytes: usize,
    /// Set while the connection task waits for room; the subscription then hands
    /// back what it consumed at once instead of at the end of its batch.
    producer_waiting: AtomicBool,
    /// Signalled when room is made (or the subscription is dropped).
    space: Notify,
}

/// What a message weighs against the byte bound.
fn weight(m: &Message) -> usize {
    m.payload.len()
        + m.topic.len()
        + m.reply_to.as_ref().map_or(0, |r| r.len())
        + m.headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

impl SubBuffer {
    pub(crate) fn new(max_messages: usize, max_bytes: usize) -> Self {
        SubBuffer {
            state: Mutex::new(State {
                items: VecDeque::new(),
                count: 0,
                bytes: 0,
                waker: None,
                ended: false,
                gone: false,
            }),
            max_messages: max_messages.max(1),
            max_bytes: max_bytes.max(1),
            producer_waiting: AtomicBool::new(false),
            space: Notify::new(),
        }
    }

    // Every update under the lock is a few field writes that cannot panic half
    // way; poisoning is ignored rather than spread.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Buffers `m` unless the buffer is full. An empty buffer always takes one
    /// message, so a message larger than the byte bound still gets through.
    pub(crate) fn push(&self, m: Message) -> Push {
        let size = weight(&m);
        let mut state = self.state();
        if state.gone {
            return Push::Gone;
        }
        if state.count > 0
            && (state.count >= self.max_messages || state.bytes + size > self.max_bytes)
        {
            self.producer_waiting.store(true, Ordering::Release);
            return Push::Full(m);
        }
        state.items.push_back(Item::Message(m));
        state.count += 1;
        state.bytes += size;
        Push::Queued(state.waker.take())
    }

    /// Marks a gap after everything buffered so far. Always taken, whatever the
    /// bounds (it weighs nothing, and at most one comes per lost connection).
    pub(crate) fn push_gap(&self, gap: Interruption) {
        let waker = {
            let mut state = self.state();
            if state.gone {
                return;
            }
            state.items.push_back(Item::Gap(gap));
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Resolves after room was made (or the subscription dropped) since the last
    /// `Full`. A permit stored before the wait starts is not lost.
    pub(crate) async fn space(&self) {
        self.space.notified().await;
    }

    /// The connection task will push no more: the subscription ends once it has
    /// taken what is buffered.
    pub(crate) fn end(&self) {
        let waker = {
            let mut state = self.state();
            state.ended = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The subscription is dropped: free what it held and release a waiting
    /// connection task.
    pub(crate) fn drop_receiver(&self) {
        {
            let mut state = self.state();
            state.gone = true;
            state.items.clear();
            state.count = 0;
            state.bytes = 0;
        }
        self.space.notify_one();
    }

    fn release(&self, state: &mut State, consumed: &mut Consumed) {
        state.count -= consumed.count;
        state.bytes -= consumed.bytes;
        *consumed = Consumed::default();
        if self.producer_waiting.load(Ordering::Acquire)
            && state.count < self.max_messages
            && state.bytes < self.max_bytes
        {
            self.producer_waiting.store(false, Ordering::Release);
            self.space.notify_one();
        }
    }
}

/// What the subscription consumed from its batch but has not yet handed back.
#[derive(Default)]
pub(crate) struct Consumed {
    count: usize,
    bytes: usize,
}

/// The subscription's side: the batch it took and works through without locking.
pub(crate) struct Taker {
    batch: VecDeque<Item>,
    consumed: Consumed,
}

impl Taker {
    pub(crate) fn new() -> Self {
        Taker {
            batch: VecDeque::new(),
            consumed: Consumed::default(),
        }
    }

    pub(crate) fn poll_next(
        &mut self,
        buf: &SubBuffer,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Item>> {
        if let Some(item) = self.batch.pop_front() {
            if let Item::Message(m) = &item {
                self.consumed.count += 1;
                self.consumed.bytes += weight(m);
                if buf.producer_waiting.load(Ordering::Acquire) {
                    buf.release(&mut buf.state(), &mut self.consumed);
                }
            }
            return Poll::Ready(Some(item));
        }
        let mut state = buf.state();
        buf.release(&mut state, &mut self.consumed);
        if !state.items.is_empty() {
            std::mem::swap(&mut self.batch, &mut state.items);
            let item = self.batch.pop_front();
            if let Some(Item::Message(m)) = &item {
                self.consumed.count += 1;
                self.consumed.bytes += weight(m);
                if buf.producer_waiting.load(Ordering::Acquire) {
                    buf.release(&mut state, &mut self.consumed);
                }
            }
            return Poll::Ready(item);
        }
        if state.ended || state.gone {
            return Poll::Ready(None);
        }
        match &state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    fn msg(n: u8) -> Message {
        Message::new("t", vec![n; 10])
    }

    #[tokio::test]
    async fn full_buffer_waits_for_room_and_loses_nothing() {
        let buf = SubBuffer::new(3, 1 << 20);
        let mut taker = Taker::new();
        for i in 0..3 {
            assert!(matches!(buf.push(msg(i)), Push::Queued(_)));
        }
        let Push::Full(back) = buf.push(msg(3)) else {
            panic!("expected full");
        };
        // Taking one hands back its room at once, since the producer waits.
        let first = next_message(&mut taker, &buf).await.unwrap();
        assert_eq!(first.payload()[0], 0);
        tokio::time::timeout(std::time::Duration::from_secs(5), buf.space())
            .await
            .unwrap();
        assert!(matches!(buf.push(back), Push::Queued(_)));
        for i in 1..4 {
            let m = next_message(&mut taker, &buf).await.unwrap();
            assert_eq!(m.payload()[0], i);
        }
        buf.end();
        assert!(poll_fn(|cx| taker.poll_next(&buf, cx)).await.is_none());
    }

    async fn next_message(taker: &mut Taker, buf: &SubBuffer) -> Option<Message> {
        match poll_fn(|cx| taker.poll_next(buf, cx)).await? {
            Item::Message(m) => Some(m),
            Item::Gap(_) => panic!("unexpected gap"),
        }
    }

    #[tokio::test]
    async fn a_gap_comes_in_order_even_when_full_and_weighs_nothing() {
        let buf = SubBuffer::new(1, 1 << 20);
        let mut taker = Taker::new();
        assert!(matches!(buf.push(msg(0)), Push::Queued(_)));
        buf.push_gap(Interruption::Disconnected {
            reason: "test".into(),
        });
        assert!(matches!(buf.push(msg(1)), Push::Full(_)));
        assert_eq!(
            next_message(&mut taker, &buf).await.unwrap().payload()[0],
            0
        );
        assert!(matches!(
            poll_fn(|cx| taker.poll_next(&buf, cx)).await,
            Some(Item::Gap(Interruption::Disconnected { .. }))
        ));
        assert!(matches!(buf.push(msg(1)), Push::Queued(_)));
    }

    #[test]
    fn bytes_bound_but_one_message_always_fits() {
        let buf = SubBuffer::new(100, 15);
        assert!(matches!(buf.push(msg(0)), Push::Queued(_)));
        assert!(matches!(buf.push(msg(1)), Push::Full(_)));
        buf.drop_receiver();
        assert!(matches!(buf.push(msg(1)), Push::Gone));
    }
}
