//! The store's handle: [`Store`], the [`Batch`] of writes queued for the next group
//! commit, the [`Ticket`] that resolves when they are durable, and the reads.

// Integer keys the broker assigns: a fast hash is enough (no client picks them).
use foldhash::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use super::StoreError;
use super::chunks::{CHUNK_MAX_BYTES, ChunkBuf};
use super::index::Index;
use super::keys::{Counters, TAG_ATTEMPTS, dedup_key, delayed_key, seq_key};
use super::rounds::UNAWAITED_HOLD;
use super::scan::scan;
use super::segments::Files;
use crate::queue::QueueError;
use crate::queue::options::StoredDefinition;
use crate::queue::record::Message;
use crate::telemetry::StorageMetrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    /// Its place in the queue's FIFO order.
    pub seq: u64,
    /// The first seq of the chunk that holds it.
    pub chunk: u64,
    /// An attempt override (`'a'` key) exists and must go when the message does.
    pub attempts_key: bool,
}

/// Which key range a paging read covers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Range {
    /// Ready messages with `seq >= from`.
    Messages { qid: u32, from: u64 },
    /// Delayed messages with `(due, seq) >= from`.
    Delayed { qid: u32, from: (u64, u64) },
}

/// One message read back by a paging read.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// `(0, seq)` for ready messages, `(due, seq)` for delayed ones.
    pub key: (u64, u64),
    pub message: Message,
    /// For ready messages: the chunk holding it and whether it has an attempt override.
    pub chunk: u64,
    pub attempts_key: bool,
}

impl Loaded {
    /// Where a ready message is stored.
    pub fn slot(&self) -> Slot {
        Slot {
            seq: self.key.1,
            chunk: self.chunk,
            attempts_key: self.attempts_key,
        }
    }
}

pub(crate) type ReadCallback = Box<dyn FnOnce(Result<Vec<Loaded>, StoreError>) + Send>;

pub(crate) struct ReadRequest {
    pub range: Range,
    pub max_count: usize,
    pub max_bytes: usize,
    pub then: ReadCallback,
}

/// Told when a batch it wrote to has been made durable (or has failed).
pub(crate) trait CommitListener: Send + Sync {
    /// Runs on the store thread; must not block on I/O, nor wait for the store
    /// (a [`Ticket`] or a read): the store thread would wait for itself.
    fn committed(&self, epoch: u64, result: &Result<(), StoreError>);
}

pub(crate) enum Op {
    Put(Vec<u8>, Vec<u8>),
    Remove(Vec<u8>),
    DropQueue(u32),
    PutDef(String, Vec<u8>),
    RemoveDef(String),
}

pub(crate) type TicketSender = watch::Sender<Option<Result<(), StoreError>>>;

#[derive(Default)]
pub(crate) struct Pending {
    pub epoch: u64,
    pub ops: Vec<Op>,
    /// Chunks being filled this round, and each queue's open one.
    pub chunks: Vec<ChunkBuf>,
    pub open_chunk: HashMap<u32, usize>,
    /// Ready messages removed: `(qid, chunk, seq)`.
    pub removals: Vec<(u32, u64, u64)>,
    pub bytes: usize,
    pub counters: HashMap<u32, Counters>,
    pub listeners: Vec<Arc<dyn CommitListener>>,
    pub ticket: Option<TicketSender>,
    pub reads: Vec<ReadRequest>,
    pub shutdown: bool,
    pub stopped: bool,
    /// Set by the first failed write or sync: the store takes no more writes.
    pub failed: Option<StoreError>,
    /// The store thread waits on [`Shared::wake`] for work; nobody else does, so
    /// with this unset a notify (a system call with std's condvar, waiter or not) is
    /// skipped.
    pub writer_waiting: bool,
    /// The store thread is holding back what is queued, which nobody waits for
    /// (rounds.rs): only work somebody waits for needs to wake it.
    pub writer_holding: bool,
}

pub(crate) struct Shared {
    pending: Mutex<Pending>,
    pub wake: Condvar,
    /// Operators' view of the store (`/metrics`, `/readyz`).
    pub metrics: Arc<StorageMetrics>,
    /// How long writes nobody waits for may wait for a round (rounds.rs).
    pub hold: Duration,
    /// Wake-ups sent to the store thread (tests count them).
    #[cfg(test)]
    pub wakes: std::sync::atomic::AtomicUsize,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic on the store thread must not turn every later call into a panic.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes queued for the next group commit. Obtained from [`Store::batch`].
pub(crate) struct Batch<'a> {
    p: &'a mut Pending,
}

impl Batch<'_> {
    /// The commit these writes will be part of.
    pub fn epoch(&self) -> u64 {
        self.p.epoch
    }

    /// Bytes queued and not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.p.bytes
    }

    /// True once the store thread has stopped or the store has failed; nothing queued now
    /// will be written. [`Batch::refusal`] also says why.
    #[allow(dead_code)]
    pub fn stopped(&self) -> bool {
        self.p.stopped || self.p.shutdown || self.p.failed.is_some()
    }

    /// Why writes queued now would not be written: the store failed (fail-stop:
    /// `Storage`, with the first failure) or is shutting down.
    pub fn refusal(&self) -> Option<QueueError> {
        match &self.p.failed {
            Some(err) => Some(err.clone().into()),
            None if self.p.stopped || self.p.shutdown => Some(QueueError::ShuttingDown),
            None => None,
        }
    }

    fn push(&mut self, op: Op, bytes: usize) {
        self.p.bytes += bytes;
        self.p.ops.push(op);
    }

    /// Stores a ready message (seqs of one queue must ascend); returns where.
    pub fn put_ready(&mut self, qid: u32, seq: u64, message: &Message) -> Slot {
        let p = &mut *self.p;
        let len = message.encoded_len();
        let open = p
            .open_chunk
            .get(&qid)
            .copied()
            .filter(|i| p.chunks.get(*i).is_some_and(|c| c.fits(seq, len)));
        let i = match open {
            Some(i) => i,
            None => {
                let mut buf = Vec::with_capacity(CHUNK_MAX_BYTES.max(len + 14));
                buf.extend_from_slice(&0u16.to_be_bytes());
                p.chunks.push(ChunkBuf {
                    qid,
                    first: seq,
                    last: seq,
                    count: 0,
                    buf,
                });
                p.open_chunk.insert(qid, p.chunks.len() - 1);
                p.chunks.len() - 1
            }
        };
        let c = &mut p.chunks[i];
        let start = c.buf.len();
        c.buf.extend_from_slice(&seq.to_be_bytes());
        c.buf.extend_from_slice(&[0u8; 4]);
        message.encode_into(&mut c.buf);
        // A record is far below 4 GiB: frames are capped well under that.
        let len = u32::try_from(c.buf.len() - start - 12).unwrap_or(u32::MAX);
        c.buf[start + 8..start + 12].copy_from_slice(&len.to_be_bytes());
        c.count += 1;
        c.last = seq;
        let first = c.first;
        p.bytes += c.buf.len() - start;
        Slot {
            seq,
            chunk: first,
            attempts_key: false,
        }
    }

    /// Removes a ready message (ack, drop, expiry, move, delay).
    pub fn remove_ready(&mut self, qid: u32, slot: Slot) {
        if slot.attempts_key {
            self.push(
                Op::Remove(seq_key(qid, TAG_ATTEMPTS, slot.seq).to_vec()),
                13,
            );
        }
        self.p.removals.push((qid, slot.chunk, slot.seq));
        self.p.bytes += 20;
    }

    /// Records a ready message's new attempt count (it stays in its chunk).
    pub fn set_attempts(&mut self, qid: u32, slot: &mut Slot, deliveries: u32) {
        slot.attempts_key = true;
        self.push(
            Op::Put(
                seq_key(qid, TAG_ATTEMPTS, slot.seq).to_vec(),
                deliveries.to_be_bytes().to_vec(),
            ),
            17,
        );
    }

    pub fn put_delayed(&mut self, qid: u32, due_ms: u64, seq: u64, message: &Message) {
        let value = message.encode_vec();
        let len = value.len() + 21;
        self.push(Op::Put(delayed_key(qid, due_ms, seq).to_vec(), value), len);
    }

    pub fn remove_delayed(&mut self, qid: u32, due_ms: u64, seq: u64) {
        self.push(Op::Remove(delayed_key(qid, due_ms, seq).to_vec()), 21);
    }

    pub fn put_dedup(&mut self, qid: u32, id: &str, seen_ms: u64) {
        let key = dedup_key(qid, id);
        let len = key.len() + 8;
        self.push(Op::Put(key, seen_ms.to_be_bytes().to_vec()), len);
    }

    pub fn remove_dedup(&mut self, qid: u32, id: &str) {
        let key = dedup_key(qid, id);
        let len = key.len();
        self.push(Op::Remove(key), len);
    }

    /// The queue's counters as of the writes queued so far (the last call wins).
    pub fn set_counters(&mut self, qid: u32, counters: Counters) {
        self.p.counters.insert(qid, counters);
    }

    /// Deletes every key of the queue (after the writes queued before this one).
    pub fn drop_queue(&mut self, qid: u32) {
        self.p.counters.remove(&qid);
        // Its chunks and removals this round would only be deleted again.
        self.p.chunks.retain(|c| c.qid != qid);
        self.p.removals.retain(|r| r.0 != qid);
        self.p.open_chunk.clear();
        self.push(Op::DropQueue(qid), 4);
    }

    pub fn put_definition(&mut self, name: &str, def: &StoredDefinition) {
        match serde_json::to_vec(def) {
            Ok(json) => {
                let len = json.len() + name.len();
                self.push(Op::PutDef(name.to_owned(), json), len);
            }
            // Plain data always serialises; keep the old definition rather than panic.
            Err(err) => {
                tracing::error!(queue = name, error = %err, "cannot encode queue definition")
            }
        }
    }

    pub fn remove_definition(&mut self, name: &str) {
        self.push(Op::RemoveDef(name.to_owned()), name.len());
    }

    /// Calls `listener` after this batch commits. `last_epoch` is the caller's record
    /// of the last epoch it listened to, so that it is told once per batch.
    pub fn listen(&mut self, listener: Arc<dyn CommitListener>, last_epoch: &mut u64) {
        if *last_epoch != self.p.epoch {
            *last_epoch = self.p.epoch;
            self.p.listeners.push(listener);
        }
    }

    /// A ticket that resolves when this batch is durable (per the fsync policy).
    pub fn ticket(&mut self) -> Ticket {
        let sender = self.p.ticket.get_or_insert_with(|| watch::channel(None).0);
        Ticket {
            rx: sender.subscribe(),
        }
    }
}

/// Resolves when the batch it was taken from is durable.
#[derive(Debug, Clone)]
pub(crate) struct Ticket {
    rx: watch::Receiver<Option<Result<(), StoreError>>>,
}

impl Ticket {
    /// True once the commit is done (succeeded or failed): [`Ticket::wait`] would
    /// not wait.
    pub fn is_done(&self) -> bool {
        self.rx.borrow().is_some() || self.rx.has_changed().is_err()
    }

    /// Waits for the commit; errors if it failed or the store thread stopped first.
    pub async fn wait(mut self) -> Result<(), QueueError> {
        match self.rx.wait_for(Option::is_some).await {
            Ok(result) => match result.as_ref() {
                Some(Ok(())) => Ok(()),
                Some(Err(err)) => Err(err.clone().into()),
                None => Err(QueueError::ShuttingDown),
            },
            Err(_) => Err(QueueError::ShuttingDown),
        }
    }
}

/// One round's work, taken from `Pending` in one go so reads stay ordered after the
/// writes queued before them.
pub(crate) struct Round {
    pub epoch: u64,
    pub ops: Vec<Op>,
    pub chunks: Vec<ChunkBuf>,
    pub removals: Vec<(u32, u64, u64)>,
    pub counters: HashMap<u32, Counters>,
    pub listeners: Vec<Arc<dyn CommitListener>>,
    pub ticket: Option<TicketSender>,
    pub reads: Vec<ReadRequest>,
    pub shutdown: bool,
}

impl Pending {
    /// Everything queued, as one round; the next round's epoch begins.
    pub(super) fn take_round(&mut self) -> Round {
        let round = Round {
            epoch: self.epoch,
            ops: std::mem::take(&mut self.ops),
            chunks: std::mem::take(&mut self.chunks),
            removals: std::mem::take(&mut self.removals),
            counters: std::mem::take(&mut self.counters),
            listeners: std::mem::take(&mut self.listeners),
            ticket: self.ticket.take(),
            reads: std::mem::take(&mut self.reads),
            shutdown: self.shutdown,
        };
        self.open_chunk.clear();
        self.epoch += 1;
        self.bytes = 0;
        round
    }

    /// Whether the writer has a round to take.
    pub(super) fn has_work(&self) -> bool {
        !self.ops.is_empty()
            || !self.chunks.is_empty()
            || !self.removals.is_empty()
            || !self.counters.is_empty()
            || !self.reads.is_empty()
            || !self.listeners.is_empty()
            || self.ticket.is_some()
            || self.shutdown
    }
}

impl Round {
    /// Whether the round writes anything.
    pub fn writes(&self) -> bool {
        !self.ops.is_empty()
            || !self.counters.is_empty()
            || !self.chunks.is_empty()
            || !self.removals.is_empty()
    }
}

impl Shared {
    pub fn new(metrics: Arc<StorageMetrics>) -> Self {
        Self {
            pending: Mutex::new(Pending {
                epoch: 1,
                ..Pending::default()
            }),
            wake: Condvar::new(),
            metrics,
            hold: UNAWAITED_HOLD,
            #[cfg(test)]
            wakes: Default::default(),
        }
    }

    /// Wakes the store thread if it waits for work: with `p` just given some. It
    /// waits only while there is none, or while it holds back writes nobody waits
    /// for (rounds.rs), which only work somebody waits for ends early.
    pub(super) fn wake_writer(&self, p: &Pending) {
        if p.writer_waiting && (!p.writer_holding || p.awaited()) {
            #[cfg(test)]
            self.wakes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.wake.notify_one();
        }
    }

    /// See [`Store::batch`].
    pub(super) fn batch<R>(&self, f: impl FnOnce(&mut Batch<'_>) -> R) -> R {
        let mut p = self.lock();
        let r = f(&mut Batch { p: &mut p });
        let deferred = DEFERRED.with(|d| match d.get() {
            Some((store, _)) if store == self.id() => {
                d.set(Some((store, true)));
                true
            }
            _ => false,
        });
        if !deferred {
            self.wake_writer(&p);
        }
        r
    }

    /// See [`Store::defer_wakes`].
    pub(super) fn defer_wakes(&self) -> DeferredWakes<'_> {
        let began = DEFERRED.with(|d| {
            // Nested: the outer deferral stands (one per thread).
            if d.get().is_some() {
                return false;
            }
            d.set(Some((self.id(), false)));
            true
        });
        DeferredWakes {
            shared: self,
            began,
            _not_send: std::marker::PhantomData,
        }
    }

    /// This store's identity for [`DEFERRED`]: its address, compared, never used
    /// to reach it.
    fn id(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// The first failure, once the store has failed.
    pub fn failure(&self) -> Option<StoreError> {
        self.lock().failed.clone()
    }

    /// Fail-stop: records the first failure (logged once, at error level) so that
    /// every later write is refused and no later confirm succeeds.
    pub fn fail(&self, err: &StoreError) {
        let mut p = self.lock();
        if p.failed.is_none() {
            tracing::error!(
                error = %err,
                "the queue store failed and takes no more writes: every pending and later \
                 confirm fails with StorageFailure; pub/sub and reads go on; restart the \
                 broker to recover from what is on disk"
            );
            p.failed = Some(err.clone());
            self.metrics.failed(&err.to_string());
        }
    }

    /// Marks the store thread stopped; refuses what was queued after its last round,
    /// and answers the reads still queued with `err` (outside the lock: a read's
    /// callback takes its queue's lock).
    pub fn stop(&self, err: &StoreError) {
        let reads = {
            let mut p = self.lock();
            p.stopped = true;
            if let Some(ticket) = p.ticket.take() {
                ticket.send_replace(Some(Err(StoreError("the store is shut down".into()))));
            }
            std::mem::take(&mut p.reads)
        };
        for read in reads {
            (read.then)(Err(err.clone()));
        }
    }
}

/// What a queue had in the store when the engine opened.
pub(crate) struct LoadedQueue {
    pub name: String,
    pub definition: StoredDefinition,
    pub counters: Counters,
    /// The first ready messages, by `seq`.
    pub ready: Vec<Loaded>,
    /// The first delayed messages, by `(due, seq)`.
    pub delayed: Vec<Loaded>,
    /// Remembered message ids and when they were seen.
    pub dedup: Vec<(String, u64)>,
}

/// Everything the engine needs at start.
pub(crate) struct Opened {
    pub store: Store,
    pub queues: Vec<LoadedQueue>,
    pub next_qid: u32,
}

/// Handle to the store thread.
pub(crate) struct Store {
    pub(super) shared: Arc<Shared>,
    pub(super) thread: Mutex<Option<JoinHandle<()>>>,
    /// For [`Store::read_now`]; the index may be read from any thread. Taken at
    /// shutdown, since sled closes (and unlocks) its files when the last handle goes.
    pub(super) index: Mutex<Option<Arc<dyn Index>>>,
    pub(super) files: Arc<Files>,
}

thread_local! {
    /// The store whose wake-ups this thread defers ([`Store::defer_wakes`]), by
    /// [`Shared::id`], and whether a batch was queued since (the store thread may
    /// have started to wait after it, so the wake-up is decided at the end).
    static DEFERRED: std::cell::Cell<Option<(usize, bool)>> = const { std::cell::Cell::new(None) };
}

/// Wakes the store thread, if it waits and a batch was queued since
/// [`Store::defer_wakes`], when dropped. Not `Send`: it lives within one
/// synchronous stretch of one thread, never across an `.await`.
pub(crate) struct DeferredWakes<'a> {
    shared: &'a Shared,
    /// This guard began the deferral (an inner one leaves it to the outer).
    began: bool,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for DeferredWakes<'_> {
    fn drop(&mut self) {
        if !self.began {
            return;
        }
        if let Some((_, true)) = DEFERRED.with(std::cell::Cell::take) {
            let p = self.shared.lock();
            self.shared.wake_writer(&p);
        }
    }
}

impl Store {
    /// Queues writes for the next group commit. Callers may hold their queue's lock:
    /// the store's lock is always taken last.
    pub fn batch<R>(&self, f: impl FnOnce(&mut Batch<'_>) -> R) -> R {
        self.shared.batch(f)
    }

    /// Until the guard returned is dropped, batches queued on this thread do not
    /// wake the store thread; the guard wakes it once if any were queued. A
    /// connection handles the frames of one read under it: woken by the read's first
    /// publish, the store thread (on the other core) took that publish alone, and
    /// the read's other publishes, queued a few microseconds later, waited for the
    /// next round's sync.
    pub fn defer_wakes(&self) -> DeferredWakes<'_> {
        self.shared.defer_wakes()
    }

    /// Queues a read, served after every write queued before it; `then` runs on the
    /// store thread (so it must not wait for the store). Once the store has stopped,
    /// `then` runs on a thread of its own with an error: the caller may hold a lock
    /// that `then` takes.
    pub fn read(
        &self,
        range: Range,
        max_count: usize,
        max_bytes: usize,
        then: impl FnOnce(Result<Vec<Loaded>, StoreError>) + Send + 'static,
    ) {
        let mut p = self.shared.lock();
        if p.stopped {
            drop(p);
            let spawned = std::thread::Builder::new()
                .name("tidings-store-refusal".into())
                .spawn(move || then(Err(StoreError("the store is shut down".into()))));
            if let Err(err) = spawned {
                tracing::error!(error = %err, "cannot answer a read after shutdown");
            }
            return;
        }
        p.reads.push(ReadRequest {
            range,
            max_count,
            max_bytes,
            then: Box::new(then),
        });
        self.shared.wake_writer(&p);
    }

    /// Reads at once on the calling thread (blocking), without waiting for the store thread.
    /// It sees the rounds applied so far, and not removals still queued: the caller
    /// keeps only seqs it has seen committed and not removed (queue.rs `take_page`).
    pub fn read_now(
        &self,
        range: Range,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Loaded>, StoreError> {
        let index = self
            .index
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match index {
            Some(index) if !self.shared.lock().stopped => {
                scan(&*index, &self.files, range, max_count, max_bytes)
            }
            _ => Err(StoreError("the store is shut down".into())),
        }
    }

    /// The failure that stopped the store (fail-stop), if one did.
    pub fn failure(&self) -> Option<StoreError> {
        self.shared.failure()
    }

    /// Writes out everything queued, makes it durable whatever the policy (unless the
    /// store has failed), and stops the store thread (which closes the index).
    /// Blocking.
    pub fn shutdown(&self) {
        self.index
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        {
            let mut p = self.shared.lock();
            p.shutdown = true;
            self.shared.wake.notify_one();
        }
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("the store thread panicked");
            }
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let mut p = self.shared.lock();
        p.shutdown = true;
        self.shared.wake.notify_one();
    }
}
