//! The durable-queue engine: queues with bounded memory windows over a store,
//! consumers with credit, acks and redelivery, dead letters and redrive.
//!
//! ```text
//!  connection ──publish()──► QueueEngine (engine.rs) ──routes (routing.rs)──► Queue ──batch──► Store (crate::storage)
//!  connection ◄─DeliverySink (link.rs)── Queue ◄──commit / page-read callbacks (paging.rs)── Store
//!  ConsumerSession (session.rs): consume / cancel / credit / ack / nack, per connection
//!  Deadlines (deadlines.rs): the engine's one timer; runs each queue when it is due
//! ```
//!
//! One queue is `durable.rs` (state, publish, limits) plus the files that
//! each own one concern of it: `delivery.rs` (consumers, acks, nacks, timeouts,
//! expiry), `paging.rs` (the windows and the store's callbacks), `departures.rs`
//! (messages leaving for another queue), with its parts `window.rs` (the paged
//! window of ready or delayed messages), `in_flight.rs`, `dedup.rs` and
//! `rates.rs`. Moves between queues are `dead_letter.rs` and `redrive.rs`.
//!
//! Every queue keeps a bounded window of its messages in memory and everything in
//! the store. Writes from all queues and connections meet in one group commit on the
//! store thread; confirms resolve when it is durable per the [`FsyncPolicy`].
//!
//! # What the limits count
//!
//! `max_length` and `max_bytes` count every message the queue holds: ready (in
//! memory or paged out), delayed, in flight to a consumer, waiting for its group
//! commit or on its way to the dead-letter queue. `max_bytes` and every memory window
//! count a message's topic, message id, headers and payload plus a fixed overhead
//! ([`MESSAGE_OVERHEAD`] bytes), so empty messages with large headers are bounded
//! too. A message that could never fit (larger than `max_bytes`) is refused without
//! touching what is stored. With drop-head a publish drops the oldest ready messages
//! until it fits, and is refused when what is left is delayed or in flight. A
//! nacked or timed-out message coming back is never refused: it was counted all
//! along.
//!
//! # Moves never lose a message
//!
//! A move within a queue (a delayed message falling due, a nack with a delay) puts
//! the new copy and removes the old one in one store round; the store applies a
//! round to its index only once the round is durable in the log, so after a crash
//! the message is in exactly one of the two places. A move between queues (a dead
//! letter, a redrive) is two-step: the copy is stored in the other queue first, and
//! the original removed only once the copy is durable. A crash in between leaves it
//! in both (a duplicate, as any at-least-once redelivery), never in neither.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use tidings_broker::queue::{EngineConfig, QueueEngine};
//! use tidings_protocol::{Publish, QueueOptions};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let engine = QueueEngine::open(EngineConfig::new(dir.path())).unwrap();
//! let options = QueueOptions { bindings: vec!["orders.>".into()], ..Default::default() };
//! engine.declare("orders", &options).await.unwrap();
//! let outcome = engine.publish(&Publish::new("orders.created", &b"{}"[..])).await.unwrap();
//! assert_eq!(outcome.queues, 1);
//! assert_eq!(engine.info("orders").unwrap().depth, 1);
//! engine.shutdown().await;
//! # });
//! ```

mod clock;
mod config;
mod consumers;
mod dead_letter;
mod deadlines;
mod dedup;
mod delivery;
mod departures;
mod durable;
mod engine;
mod error;
mod in_flight;
mod inspect;
mod link;
pub(crate) mod options;
mod paging;
mod rates;
pub(crate) mod record;
mod redrive;
mod routing;
mod session;
mod window;

pub use config::{DEFAULT_MAX_CREDIT, EngineConfig, FsyncPolicy, QueueDefaults};
pub use dead_letter::{
    DEAD_LETTERS_REPLY_OVERHEAD, DeadLetterPage, MAX_DEAD_LETTERS_LISTED, encoded_letter_len,
};
pub use dedup::ID_OVERHEAD as DEDUP_ID_OVERHEAD;
pub use engine::{Durable, PublishOutcome, Published, QueueEngine};
pub use error::QueueError;
pub use inspect::{ConsumerView, MAX_PEEK, PeekedMessage, QueueSettingsView, QueueView};
pub use link::{DeliverySink, Held};
pub use record::MESSAGE_OVERHEAD;
pub use session::ConsumerSession;

pub(crate) use clock::Clock;
pub use clock::ManualClock;
