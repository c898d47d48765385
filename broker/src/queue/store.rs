//! The storage layer: the only file that touches sled. One writer thread owns the
//! database and the queue log (segments.rs); queues hand it writes and reads, and it
//! turns them into group commits.
//!
//! # Layout
//!
//! Two sled trees. `queues` maps a queue name to its JSON definition (id, resolved
//! options, bindings), plus the key `"\0next_qid"` so queue ids are never reused.
//! `messages` holds every queue's data under big-endian keys that start with the
//! queue id, so a queue is a key range:
//!
//! | key | value |
//! | --- | --- |
//! | `qid:u32 'a' seq:u64` | attempt override: `deliveries:u32` of a requeued ready message |
//! | `qid:u32 'b' first_seq:u64` | a chunk of ready or in-flight messages: its segment [`Location`] (24 bytes), then its removal bitmap as written (same layout as `'x'`) |
//! | `qid:u32 'c'` | counters: `m_count m_bytes d_count d_bytes next_seq mark` (u64 each) |
//! | `qid:u32 'd' due_ms:u64 seq:u64` | a delayed message (record.rs layout) |
//! | `qid:u32 'i' message_id` | dedup entry: `seen_ms:u64` |
//! | `qid:u32 'x' first_seq:u64` | removed entries of chunk `first_seq`: `span:u32` then a bitmap of `span` bits (u64 words), bit `seq - first_seq` set when removed |
//! | `0:u32 'g' segment:u64` | live chunks in that segment file: `count:u64` (queue ids start at 1) |
//!
//! The chunk bodies themselves, `count:u16` then `count` × (`seq:u64 len:u32`
//! record.rs layout) with `seq` ascending, are written once to the queue log
//! (segments.rs), since sled rewrites values every time it rewrites their tree node.
//! The `queues` tree also holds `"\0layout"`, the version of this layout, and
//! `"\0checkpoint"`, the log position sled is known to hold.
//!
//! Ready messages are stored in chunks: every message a queue receives within one
//! group commit goes into the same chunks (each up to [`CHUNK_MAX_ENTRIES`] messages
//! and [`CHUNK_MAX_BYTES`]), each written once to a segment. Acks, drops and dead-letter
//! moves set bits in the chunk's removal bitmap, one write per touched chunk per
//! round; when every bit is set the chunk and its bitmap are deleted. Seqs in a chunk
//! need not be contiguous (delayed messages take seqs too): the gaps start out set. A
//! redelivered message keeps its place in its chunk; its new attempt count goes to
//! an `'a'` key, read back over the page's seq range when paging in. Per message this
//! costs a fraction of a sled operation instead of an insert and a remove, which is
//! what bounded throughput with one key per message (see DESIGN.md, Storage).
//!
//! The layout changed before 1.0 (one `'m'` key per message, chunk bodies inside
//! sled, sled made durable every round, segments without end records); there is no
//! released data, so no migration: opening a data dir written by another layout
//! fails with an error that says so.
//!
//! The counters travel in the same round as the data they count, so after any crash
//! (and replay) they agree with the keys, and a restart needs no scan of a
//! 10-million-message queue. `mark` is the highest `seq` that may have been delivered: a message at or
//! below it comes back after a restart as a redelivery.
//!
//! # Durability: the log, not sled's flush
//!
//! Each round's index writes are logged as one batch record after its chunks, and
//! the records are written out before the round is applied to sled (segments.rs has
//! the format and the recovery rules). Under [`FsyncPolicy::Always`] a round's
//! confirms go out once the segments it wrote are `fdatasync`ed (and their directory
//! `fsync`ed when a segment was created): one sync, of data written once.
//!
//! sled is flushed only at checkpoints (`EngineConfig::checkpoint_interval`), and a
//! restart replays the log from the last durable checkpoint. That is also the only
//! way sled could be made durable: 0.34's `Db::flush` calls just `sync_file_range(2)`
//! on Linux (sled issues #1351 and #1452), which neither flushes the disk's cache nor
//! covers file metadata, and sled never fsyncs its `blobs/` files (values of about 16
//! KiB and up) or `snap.*` snapshots. So a checkpoint is `Db::flush`, then a real
//! `fdatasync` of the `db` file, of `conf`, of every `snap.*` and every blob not yet
//! synced, and an `fsync` of the directories when new files appeared; only then is
//! the checkpoint's log position written (and it is known durable at the next one).

//! # Threads
//!
//! Every sled call is blocking, so none runs on the async workers. Two threads form a
//! pipeline:
//!
//! - the writer (`tidings-store`) takes everything queued since its last round
//!   (writes and reads together, in the order they were queued), logs and writes out
//!   the round, applies it to sled, and hands it to the syncer; then it takes the
//!   next round at once, without waiting for the disk;
//! - the syncer (`tidings-sync`) takes every round handed over since its last sync,
//!   makes them durable with one `fdatasync` per segment written (per the policy),
//!   and then, round by round, resolves the tickets, tells the listeners, and serves
//!   the round's reads. Between rounds it runs the checkpoints and deletes the
//!   segments they free.
//!
//! So while one sync runs, the next group commit is already being applied, and each
//! sync covers everything that arrived meanwhile. A read is served after the
//! callbacks of every write queued before it. It may also see writes of later rounds
//! that are applied but not yet durable: readers keep only what their own commit
//! callbacks have already made visible (queue.rs filters pages by committed seq), so
//! nothing is delivered before it is durable.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use sled::IVec;
use thiserror::Error;
use tokio::sync::watch;

use crate::queue::config::{EngineConfig, FsyncPolicy};
use crate::queue::error::QueueError;
use crate::queue::options::StoredDefinition;
use crate::queue::record::Message;
use crate::queue::segments::{self, Files, Location, Position, Segments, Unsynced};
use crate::telemetry::StorageMetrics;

const TAG_ATTEMPTS: u8 = b'a';
const TAG_CHUNK: u8 = b'b';
const TAG_COUNTERS: u8 = b'c';
const TAG_DELAYED: u8 = b'd';
const TAG_DEDUP: u8 = b'i';
const TAG_REMOVED: u8 = b'x';
const TAG_SEGMENT: u8 = b'g';
/// Where segment counts live: no queue has id 0.
const SEGMENT_QID: u32 = 0;
const LAYOUT_KEY: &[u8] = b"\0layout";
/// Bumped whenever stored data would be misread by an older or newer broker.
const LAYOUT_VERSION: u32 = 4;
/// Most messages in one chunk: its removal bitmap stays one or two words.
pub(crate) const CHUNK_MAX_ENTRIES: usize = 64;
/// Most bytes in one chunk, unless a single message is larger. Bodies live in
/// segment files, so this only sets how much a paging read fetches at once and how
/// many sled keys a round writes: one per chunk.
pub(crate) const CHUNK_MAX_BYTES: usize = 64 << 10;
/// Most seqs one chunk spans (gaps included), bounding its bitmap.
const CHUNK_MAX_SPAN: u64 = 1024;
/// How long opening waits for another store in this process to release the files.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Chunk states the writer keeps between rounds; past this it forgets them all and
/// reads bitmaps back from sled as needed.
const CHUNK_CACHE_MAX: usize = 65_536;
const NEXT_QID_KEY: &[u8] = b"\0next_qid";
/// In `queues`: the log position sled held at its last checkpoint.
const CHECKPOINT_KEY: &[u8] = b"\0checkpoint";
const TREE_DATA: u8 = 0;
const TREE_DEFS: u8 = 1;
const OP_PUT: u8 = 0;
const OP_REMOVE: u8 = 1;
/// Keys removed per sled batch when a queue is deleted, so that deleting a huge queue
/// does not build one huge batch in memory.
const DROP_CHUNK: usize = 10_000;

/// A storage failure, as text so it can be handed to every waiter of a batch.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub(crate) struct StoreError(String);

impl StoreError {
    fn io(context: &str, err: impl std::fmt::Display) -> Self {
        StoreError(format!("{context}: {err}"))
    }
}

impl From<StoreError> for QueueError {
    fn from(err: StoreError) -> Self {
        QueueError::Storage(err.0)
    }
}

/// Per-queue figures stored next to its data (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub m_count: u64,
    pub m_bytes: u64,
    pub d_count: u64,
    pub d_bytes: u64,
    pub next_seq: u64,
    pub mark: u64,
}

impl Counters {
    fn encode(&self) -> [u8; 48] {
        let mut out = [0u8; 48];
        let fields = [
            self.m_count,
            self.m_bytes,
            self.d_count,
            self.d_bytes,
            self.next_seq,
            self.mark,
        ];
        for (chunk, v) in out.chunks_exact_mut(8).zip(fields) {
            chunk.copy_from_slice(&v.to_be_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 48 {
            return None;
        }
        let f = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_be_bytes(b)
        };
        Some(Self {
            m_count: f(0),
            m_bytes: f(1),
            d_count: f(2),
            d_bytes: f(3),
            next_seq: f(4),
            mark: f(5),
        })
    }
}

fn prefix(qid: u32, tag: u8) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[..4].copy_from_slice(&qid.to_be_bytes());
    k[4] = tag;
    k
}

fn seq_key(qid: u32, tag: u8, seq: u64) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[..5].copy_from_slice(&prefix(qid, tag));
    k[5..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn delayed_key(qid: u32, due_ms: u64, seq: u64) -> [u8; 21] {
    let mut k = [0u8; 21];
    k[..5].copy_from_slice(&prefix(qid, TAG_DELAYED));
    k[5..13].copy_from_slice(&due_ms.to_be_bytes());
    k[13..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn dedup_key(qid: u32, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + id.len());
    k.extend_from_slice(&prefix(qid, TAG_DEDUP));
    k.extend_from_slice(id.as_bytes());
    k
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

fn decode_message(value: &[u8]) -> Option<Message> {
    Message::decode(Bytes::copy_from_slice(value))
}

/// Index writes of one round (or part of one), logged first as one batch record so
/// that a replay can apply them again (segments.rs), then applied to sled.
///
/// They are applied as single inserts and removes, not as a `sled::Batch`: sled seals
/// and writes out its log buffer after every batch, which cost a disk write and a
/// wake-up of its I/O threads per round, while crash atomicity now comes from the
/// log (a replay re-applies every write since the last checkpoint). Readers may see a
/// round half applied; each key is then either old or new, which they already allow
/// for (queue.rs keeps only seqs its commit callbacks have made visible).
///
/// Log layout, per write: `tree:u8 op:u8 key_len:u32 key`, then for a put
/// `value_len:u32 value`.
#[derive(Default)]
struct IndexBatch {
    log: Vec<u8>,
}

impl IndexBatch {
    fn insert(&mut self, key: &[u8], value: &[u8]) {
        self.record(TREE_DATA, key, Some(value));
    }

    fn remove(&mut self, key: &[u8]) {
        self.record(TREE_DATA, key, None);
    }

    fn insert_def(&mut self, key: &[u8], value: &[u8]) {
        self.record(TREE_DEFS, key, Some(value));
    }

    fn remove_def(&mut self, key: &[u8]) {
        self.record(TREE_DEFS, key, None);
    }

    fn is_empty(&self) -> bool {
        self.log.is_empty()
    }

    fn record(&mut self, tree: u8, key: &[u8], value: Option<&[u8]>) {
        // Keys and values are far below 4 GiB: frames are capped well under that.
        let len = |b: &[u8]| u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes();
        self.log.push(tree);
        self.log
            .push(if value.is_some() { OP_PUT } else { OP_REMOVE });
        self.log.extend_from_slice(&len(key));
        self.log.extend_from_slice(key);
        if let Some(value) = value {
            self.log.extend_from_slice(&len(value));
            self.log.extend_from_slice(value);
        }
    }

    /// Applies the writes of a logged batch to sled, in order.
    fn apply(log: &[u8], data: &sled::Tree, defs: &sled::Tree) -> Result<(), StoreError> {
        let malformed = || StoreError("malformed batch record".into());
        let field = |at: &mut usize| -> Option<&[u8]> {
            let len = u32::from_be_bytes(log.get(*at..*at + 4)?.try_into().ok()?);
            let start = *at + 4;
            let end = start.checked_add(usize::try_from(len).ok()?)?;
            *at = end;
            log.get(start..end)
        };
        let write = |e| StoreError::io("writing", e);
        let mut at = 0usize;
        while at < log.len() {
            let (tree, op) = (log[at], *log.get(at + 1).ok_or_else(malformed)?);
            at += 2;
            let key = field(&mut at).ok_or_else(malformed)?;
            let tree = match tree {
                TREE_DATA => data,
                TREE_DEFS => defs,
                _ => return Err(malformed()),
            };
            match op {
                OP_PUT => {
                    let value = field(&mut at).ok_or_else(malformed)?;
                    tree.insert(key, value).map_err(write)?;
                }
                OP_REMOVE => {
                    tree.remove(key).map_err(write)?;
                }
                _ => return Err(malformed()),
            }
        }
        Ok(())
    }
}

/// A `'b'` value: where the chunk's body is, and its removal state when written.
fn chunk_index_value(loc: &Location, state: &ChunkState) -> Vec<u8> {
    let mut out = Vec::with_capacity(Location::ENCODED_LEN + 4 + state.removed.len() * 8);
    out.extend_from_slice(&loc.encode());
    out.extend_from_slice(&state.encode());
    out
}

fn decode_chunk_index(value: &[u8]) -> Option<(Location, ChunkState)> {
    let loc = Location::decode(value)?;
    let state = ChunkState::decode(value.get(Location::ENCODED_LEN..)?)?;
    Some((loc, state))
}

fn segment_key(segment: u64) -> [u8; 13] {
    seq_key(SEGMENT_QID, TAG_SEGMENT, segment)
}

/// The stored live chunk count of every segment.
fn stored_segments(data: &sled::Tree) -> Result<HashMap<u64, u64>, StoreError> {
    let mut live = HashMap::new();
    let (start, end) = (
        prefix(SEGMENT_QID, TAG_SEGMENT),
        prefix(SEGMENT_QID, TAG_SEGMENT + 1),
    );
    for item in data.range(start..end) {
        let (k, v) = item.map_err(|e| StoreError::io("reading segment counts", e))?;
        if let (Some(segment), Some(count)) = (be_u64(&k[5..]), be_u64(&v)) {
            live.insert(segment, count);
        }
    }
    Ok(live)
}

/// The entries of a chunk body: `(seq, record)` in seq order; `None` if malformed.
fn chunk_entries(value: &[u8]) -> Option<Vec<(u64, &[u8])>> {
    let count = usize::from(u16::from_be_bytes(value.get(..2)?.try_into().ok()?));
    let mut out = Vec::with_capacity(count.min(CHUNK_MAX_ENTRIES));
    let mut at = 2usize;
    for _ in 0..count {
        let seq = be_u64(value.get(at..)?)?;
        let len = u32::from_be_bytes(value.get(at + 8..at + 12)?.try_into().ok()?);
        let start = at + 12;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        out.push((seq, value.get(start..end)?));
        at = end;
    }
    Some(out)
}

/// Which entries of one chunk are removed. Bit `seq - first` is set for a removed
/// message and for a seq the chunk never held.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChunkState {
    span: u32,
    removed: Vec<u64>,
    live: u32,
}

impl ChunkState {
    /// A chunk holding exactly `seqs` (ascending, starting at `first`), none removed.
    fn new(first: u64, seqs: impl Iterator<Item = u64>) -> Option<Self> {
        let mut held = Vec::new();
        let mut last = first;
        for seq in seqs {
            let off = usize::try_from(seq.checked_sub(first)?).ok()?;
            if off >= held.len() {
                held.resize(off + 1, false);
            }
            held[off] = true;
            last = last.max(seq);
        }
        let span = u32::try_from(last - first + 1).ok()?;
        let mut removed = vec![!0u64; usize::try_from(span.div_ceil(64)).ok()?];
        let mut live = 0;
        for (off, h) in held.iter().enumerate() {
            if *h {
                removed[off / 64] &= !(1u64 << (off % 64));
                live += 1;
            }
        }
        Some(Self {
            span,
            removed,
            live,
        })
    }

    fn is_removed(&self, off: u64) -> bool {
        let Ok(off) = usize::try_from(off) else {
            return true;
        };
        self.removed
            .get(off / 64)
            .is_none_or(|w| w & (1u64 << (off % 64)) != 0)
    }

    /// Marks `off` removed; false if it already was (or is outside the chunk).
    fn remove(&mut self, off: u64) -> bool {
        if self.is_removed(off) {
            return false;
        }
        // is_removed checked the bounds.
        let off = usize::try_from(off).unwrap_or(usize::MAX);
        if let Some(w) = self.removed.get_mut(off / 64) {
            *w |= 1u64 << (off % 64);
            self.live -= 1;
        }
        true
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.removed.len() * 8);
        out.extend_from_slice(&self.span.to_be_bytes());
        for w in &self.removed {
            out.extend_from_slice(&w.to_be_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let span = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
        let words = usize::try_from(span.div_ceil(64)).ok()?;
        if bytes.len() != 4 + words * 8 {
            return None;
        }
        let removed: Vec<u64> = bytes[4..].chunks_exact(8).filter_map(be_u64).collect();
        let mut live = 0u32;
        for off in 0..span {
            let off = off as usize;
            if removed[off / 64] & (1u64 << (off % 64)) == 0 {
                live += 1;
            }
        }
        Some(Self {
            span,
            removed,
            live,
        })
    }
}

/// Where a ready message is stored.
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

type ReadCallback = Box<dyn FnOnce(Result<Vec<Loaded>, StoreError>) + Send>;

struct ReadRequest {
    range: Range,
    max_count: usize,
    max_bytes: usize,
    then: ReadCallback,
}

/// Told when a batch it wrote to has been made durable (or has failed).
pub(crate) trait CommitListener: Send + Sync {
    /// Runs on the writer thread; must not block on I/O.
    fn committed(&self, epoch: u64, result: &Result<(), StoreError>);
}

enum Op {
    Put(IVec, IVec),
    Remove(IVec),
    DropQueue(u32),
    PutDef(String, Vec<u8>),
    RemoveDef(String),
}

type TicketSender = watch::Sender<Option<Result<(), StoreError>>>;

/// Ready messages of one queue written in one round, encoded as one chunk value.
struct ChunkBuf {
    qid: u32,
    first: u64,
    last: u64,
    count: u16,
    buf: Vec<u8>,
}

impl ChunkBuf {
    /// Whether a message `seq` whose record is `len` bytes may join this chunk.
    fn fits(&self, seq: u64, len: usize) -> bool {
        usize::from(self.count) < CHUNK_MAX_ENTRIES
            && self.buf.len() + 12 + len <= CHUNK_MAX_BYTES
            && seq > self.last
            && seq - self.first < CHUNK_MAX_SPAN
    }

    fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        chunk_entries(&self.buf)
            .unwrap_or_default()
            .into_iter()
            .map(|(seq, _)| seq)
    }
}

#[derive(Default)]
struct Pending {
    epoch: u64,
    ops: Vec<Op>,
    /// Chunks being filled this round, and each queue's open one.
    chunks: Vec<ChunkBuf>,
    open_chunk: HashMap<u32, usize>,
    /// Ready messages removed: `(qid, chunk, seq)`.
    removals: Vec<(u32, u64, u64)>,
    bytes: usize,
    counters: HashMap<u32, Counters>,
    listeners: Vec<Arc<dyn CommitListener>>,
    ticket: Option<TicketSender>,
    reads: Vec<ReadRequest>,
    shutdown: bool,
    stopped: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic on the writer thread must not turn every later call into a panic.
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

    /// True once the writer has stopped; nothing queued now will be written.
    pub fn stopped(&self) -> bool {
        self.p.stopped || self.p.shutdown
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
                Op::Remove(IVec::from(&seq_key(qid, TAG_ATTEMPTS, slot.seq)[..])),
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
                IVec::from(&seq_key(qid, TAG_ATTEMPTS, slot.seq)[..]),
                IVec::from(&deliveries.to_be_bytes()[..]),
            ),
            17,
        );
    }

    pub fn put_delayed(&mut self, qid: u32, due_ms: u64, seq: u64, message: &Message) {
        let value = message.encode_vec();
        let len = value.len() + 21;
        self.push(
            Op::Put(
                IVec::from(&delayed_key(qid, due_ms, seq)[..]),
                IVec::from(value),
            ),
            len,
        );
    }

    pub fn remove_delayed(&mut self, qid: u32, due_ms: u64, seq: u64) {
        self.push(
            Op::Remove(IVec::from(&delayed_key(qid, due_ms, seq)[..])),
            21,
        );
    }

    pub fn put_dedup(&mut self, qid: u32, id: &str, seen_ms: u64) {
        let key = dedup_key(qid, id);
        let len = key.len() + 8;
        self.push(
            Op::Put(IVec::from(key), IVec::from(&seen_ms.to_be_bytes()[..])),
            len,
        );
    }

    pub fn remove_dedup(&mut self, qid: u32, id: &str) {
        let key = dedup_key(qid, id);
        let len = key.len();
        self.push(Op::Remove(IVec::from(key)), len);
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
    /// Waits for the commit; errors if it failed or the writer stopped first.
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

/// Handle to the writer thread.
pub(crate) struct Store {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// For [`Store::read_now`]; sled trees may be read from any thread. Taken at
    /// shutdown, since sled closes (and unlocks) its files when the last tree goes.
    data: Mutex<Option<sled::Tree>>,
    files: Arc<Files>,
}

impl Store {
    /// Opens (or creates) the store and loads what each queue needs to start.
    /// Blocking: call it before serving or from a blocking context.
    pub fn open(config: &EngineConfig) -> Result<Opened, QueueError> {
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir)
            .map_err(|e| StoreError::io(&format!("creating {}", dir.display()), e))?;
        // Checkpoints flush sled (and fdatasync it); its own timer would only add
        // writes and sync_file_range calls that promise nothing.
        let sled_config = sled::Config::new()
            .path(&dir)
            .cache_capacity(config.cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None);
        let db = open_sled(&sled_config)
            .map_err(|e| StoreError::io(&format!("opening sled at {}", dir.display()), e))?;
        let data = db
            .open_tree("messages")
            .map_err(|e| StoreError::io("opening tree", e))?;
        let defs = db
            .open_tree("queues")
            .map_err(|e| StoreError::io("opening tree", e))?;
        check_layout(&data, &defs)?;
        let segments_dir = dir.join("segments");
        let from = defs
            .get(CHECKPOINT_KEY)
            .map_err(|e| StoreError::io("reading the checkpoint", e))?
            .and_then(|v| Position::decode(&v))
            .unwrap_or_default();
        let replayed = segments::replay(&segments_dir, from, |log| {
            IndexBatch::apply(log, &data, &defs).map_err(|e| e.to_string())
        })
        .map_err(|e| StoreError::io(&format!("replaying {}", segments_dir.display()), e))?;
        if replayed.batches > 0 {
            tracing::info!(
                batches = replayed.batches,
                "replayed the queue log written since the last checkpoint"
            );
        }
        if let Some(end) = replayed.end {
            segments::seal(&segments_dir, end).map_err(|e| {
                StoreError::io(
                    &format!("closing the queue log in {}", segments_dir.display()),
                    e,
                )
            })?;
        }
        let mut files = FileSyncer::new(&dir).map_err(|e| StoreError::io("opening db file", e))?;
        // What sled wrote while opening (a new database, recovery, the replay) is made
        // durable before anything is built on it, and before the segments that only
        // held replayed records are deleted as orphans.
        let sync = |files: &mut FileSyncer| -> Result<(), StoreError> {
            db.flush().map_err(|e| StoreError::io("flush", e))?;
            files.sync().map_err(|e| StoreError::io("fdatasync", e))
        };
        sync(&mut files)?;
        let segments = Segments::open(&segments_dir, stored_segments(&data)?, config.segment_bytes)
            .map_err(|e| {
                StoreError::io(
                    &format!("opening segments in {}", segments_dir.display()),
                    e,
                )
            })?;
        // Nothing is appended to old segments: the next replay starts at the new one.
        let start = segments.end();
        defs.insert(CHECKPOINT_KEY, &start.encode()[..])
            .map_err(|e| StoreError::io("writing the checkpoint", e))?;
        sync(&mut files)?;
        let (queues, next_qid) = load(&data, &defs, &segments.files(), config)?;

        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                epoch: 1,
                ..Pending::default()
            }),
            wake: Condvar::new(),
        });
        let reader = data.clone();
        let handoff = Arc::new(Handoff::default());
        let syncer = Syncer {
            handoff: handoff.clone(),
            db,
            data: data.clone(),
            defs: defs.clone(),
            files,
            segments: segments.files(),
            unsynced: Unsynced::default(),
            retired: Vec::new(),
            policy: config.fsync,
            log_end: start,
            checkpoint: start,
            durable: start,
            last_checkpoint: Instant::now(),
            checkpoint_every: config.checkpoint_interval,
            metrics: config.metrics.clone(),
        };
        let syncer = std::thread::Builder::new()
            .name("tidings-sync".into())
            .spawn(move || syncer.run())
            .map_err(|e| StoreError::io("spawning the sync thread", e))?;
        let reader_files = segments.files();
        let writer = Writer {
            shared: shared.clone(),
            data,
            defs,
            next_qid,
            chunks: HashMap::new(),
            segments,
            handoff,
            syncer: Some(syncer),
            metrics: config.metrics.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("tidings-store".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::io("spawning the store thread", e))?;
        Ok(Opened {
            store: Store {
                shared,
                thread: Mutex::new(Some(thread)),
                data: Mutex::new(Some(reader)),
                files: reader_files,
            },
            queues,
            next_qid,
        })
    }

    /// Queues writes for the next group commit. Callers may hold their queue's lock:
    /// the store's lock is always taken last.
    pub fn batch<R>(&self, f: impl FnOnce(&mut Batch<'_>) -> R) -> R {
        let mut p = self.shared.lock();
        let was_idle = p.ops.is_empty()
            && p.reads.is_empty()
            && p.counters.is_empty()
            && p.chunks.is_empty()
            && p.removals.is_empty();
        let r = f(&mut Batch { p: &mut p });
        if was_idle {
            self.shared.wake.notify_one();
        }
        r
    }

    /// Queues a read, served after every write queued before it; `then` runs on the
    /// writer thread.
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
            then(Err(StoreError("the store is shut down".into())));
            return;
        }
        p.reads.push(ReadRequest {
            range,
            max_count,
            max_bytes,
            then: Box::new(then),
        });
        self.shared.wake.notify_one();
    }

    /// Reads at once on the calling thread (blocking), without waiting for the writer.
    /// Like every read it may see rounds that are applied but not yet durable, and
    /// not removals still queued: the caller keeps only seqs it has seen committed
    /// and not removed (queue.rs `take_page`).
    pub fn read_now(
        &self,
        range: Range,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Loaded>, StoreError> {
        let data = self
            .data
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match data {
            Some(data) if !self.shared.lock().stopped => {
                scan(&data, &self.files, range, max_count, max_bytes)
            }
            _ => Err(StoreError("the store is shut down".into())),
        }
    }

    /// Writes out everything queued, makes it durable whatever the policy, and stops
    /// the writer thread (which closes sled). Blocking.
    pub fn shutdown(&self) {
        self.data
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

/// Refuses a data dir written in another layout; stamps a new one with ours.
fn check_layout(data: &sled::Tree, defs: &sled::Tree) -> Result<(), StoreError> {
    let read = |e| StoreError::io("reading the layout version", e);
    let stored = defs
        .get(LAYOUT_KEY)
        .map_err(read)?
        .and_then(|v| Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?)));
    match stored {
        Some(LAYOUT_VERSION) => Ok(()),
        None if data.is_empty() => {
            defs.insert(LAYOUT_KEY, &LAYOUT_VERSION.to_be_bytes()[..])
                .map_err(|e| StoreError::io("writing the layout version", e))?;
            Ok(())
        }
        found => Err(StoreError(format!(
            "the data dir holds queues in storage layout {}, this broker reads layout \
             {LAYOUT_VERSION}; there is no migration before 1.0: move the data dir away",
            found.map_or_else(|| "1 (unversioned)".to_owned(), |v| v.to_string())
        ))),
    }
}

/// Opens sled, waiting up to [`LOCK_WAIT`] for the lock on its files. sled's I/O
/// threads finish a write and report it stable a moment before they let go of the
/// file, so a store reopened right after another one in this process shut down
/// (a restart in tests, a queue engine rebuilt) can find the lock still held.
fn open_sled(config: &sled::Config) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Err(sled::Error::Io(err))
                if err.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

fn load(
    data: &sled::Tree,
    defs: &sled::Tree,
    files: &Files,
    config: &EngineConfig,
) -> Result<(Vec<LoadedQueue>, u32), QueueError> {
    let mut next_qid = 1u32;
    if let Some(v) = defs
        .get(NEXT_QID_KEY)
        .map_err(|e| StoreError::io("reading definitions", e))?
    {
        if let Some(bytes) = v.get(..4).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
            next_qid = u32::from_be_bytes(bytes);
        }
    }
    let mut queues = Vec::new();
    for item in defs.iter() {
        let (key, value) = item.map_err(|e| StoreError::io("reading definitions", e))?;
        if [NEXT_QID_KEY, LAYOUT_KEY, CHECKPOINT_KEY].contains(&key.as_ref()) {
            continue;
        }
        let name = String::from_utf8_lossy(&key).into_owned();
        let definition: StoredDefinition = match serde_json::from_slice(&value) {
            Ok(d) => d,
            Err(err) => {
                tracing::error!(queue = %name, error = %err, "unreadable queue definition, skipped");
                continue;
            }
        };
        let qid = definition.qid;
        next_qid = next_qid.max(qid.saturating_add(1));
        let counters = data
            .get(prefix(qid, TAG_COUNTERS))
            .map_err(|e| StoreError::io("reading counters", e))?
            .and_then(|v| Counters::decode(&v))
            .unwrap_or_default();
        let ready = scan(
            data,
            files,
            Range::Messages { qid, from: 0 },
            config.ready_window,
            config.ready_window_bytes,
        )?;
        let delayed = scan(
            data,
            files,
            Range::Delayed { qid, from: (0, 0) },
            config.delayed_window,
            usize::MAX,
        )?;
        let mut dedup = Vec::new();
        let (start, end) = (prefix(qid, TAG_DEDUP), prefix(qid, TAG_DEDUP + 1));
        for item in data.range(start..end) {
            let (k, v) = item.map_err(|e| StoreError::io("reading dedup ids", e))?;
            let id = String::from_utf8_lossy(&k[5..]).into_owned();
            dedup.push((id, be_u64(&v).unwrap_or(0)));
        }
        queues.push(LoadedQueue {
            name,
            definition,
            counters,
            ready,
            delayed,
            dedup,
        });
    }
    Ok((queues, next_qid))
}

fn scan(
    data: &sled::Tree,
    files: &Files,
    range: Range,
    max_count: usize,
    max_bytes: usize,
) -> Result<Vec<Loaded>, StoreError> {
    match range {
        Range::Messages { qid, from } => scan_ready(data, files, qid, from, max_count, max_bytes),
        Range::Delayed { qid, from } => scan_delayed(data, qid, from, max_count, max_bytes),
    }
}

fn scan_delayed(
    data: &sled::Tree,
    qid: u32,
    from: (u64, u64),
    max_count: usize,
    max_bytes: usize,
) -> Result<Vec<Loaded>, StoreError> {
    let start = IVec::from(&delayed_key(qid, from.0, from.1)[..]);
    let end = IVec::from(&prefix(qid, TAG_DELAYED + 1)[..]);
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for item in data.range(start..end) {
        if out.len() >= max_count || bytes >= max_bytes {
            break;
        }
        let (k, v) = item.map_err(|e| StoreError::io("reading messages", e))?;
        let key = (
            be_u64(&k[5..]).unwrap_or(0),
            be_u64(k.get(13..).unwrap_or(&[])).unwrap_or(0),
        );
        let Some(message) = decode_message(&v) else {
            tracing::error!(key = ?k, "unreadable message record, skipped");
            continue;
        };
        bytes += message.payload.len();
        out.push(Loaded {
            key,
            message,
            chunk: 0,
            attempts_key: false,
        });
    }
    Ok(out)
}

/// The removal state of chunk `first` as stored, and where its body is. `index` is
/// its `'b'` value when the caller has it.
fn stored_chunk_state(
    data: &sled::Tree,
    qid: u32,
    first: u64,
    index: Option<&[u8]>,
) -> Result<Option<(ChunkState, Location)>, StoreError> {
    let read = |e| StoreError::io("reading a chunk", e);
    let owned;
    let value = match index {
        Some(v) => v,
        None => match data.get(seq_key(qid, TAG_CHUNK, first)).map_err(read)? {
            Some(v) => {
                owned = v;
                &owned[..]
            }
            None => return Ok(None),
        },
    };
    let Some((loc, written)) = decode_chunk_index(value) else {
        tracing::error!(queue = qid, chunk = first, "unreadable chunk index");
        return Ok(None);
    };
    match data.get(seq_key(qid, TAG_REMOVED, first)).map_err(read)? {
        Some(v) => Ok(ChunkState::decode(&v).map(|state| (state, loc))),
        None => Ok(Some((written, loc))),
    }
}

/// Ready messages with `seq >= from`, in seq order, with their attempt overrides.
fn scan_ready(
    data: &sled::Tree,
    files: &Files,
    qid: u32,
    from: u64,
    max_count: usize,
    max_bytes: usize,
) -> Result<Vec<Loaded>, StoreError> {
    let read = |e| StoreError::io("reading messages", e);
    let lowest = seq_key(qid, TAG_CHUNK, 0);
    let from_key = seq_key(qid, TAG_CHUNK, from);
    let end = prefix(qid, TAG_CHUNK + 1);
    // The chunk holding `from` may start below it.
    let start = match data.range(lowest..=from_key).next_back() {
        Some(item) => item.map_err(read)?.0,
        None => IVec::from(&from_key[..]),
    };
    let mut out: Vec<Loaded> = Vec::new();
    let mut bytes = 0usize;
    'chunks: for item in data.range(start..IVec::from(&end[..])) {
        if out.len() >= max_count || bytes >= max_bytes {
            break;
        }
        let (k, v) = item.map_err(read)?;
        let first = be_u64(&k[5..]).unwrap_or(0);
        let Some((state, loc)) = stored_chunk_state(data, qid, first, Some(&v))? else {
            continue;
        };
        if first + u64::from(state.span) <= from || state.live == 0 {
            continue;
        }
        let body = match files.read(&loc) {
            Ok(Some(body)) => body,
            // Its segment went with its last message: a removal this reader raced.
            Ok(None) => continue,
            Err(err) => {
                tracing::error!(queue = qid, chunk = first, error = %err, "unreadable chunk, skipped");
                continue;
            }
        };
        let Some(entries) = chunk_entries(&body) else {
            tracing::error!(queue = qid, chunk = first, "malformed chunk, skipped");
            continue;
        };
        for (seq, record) in entries {
            if seq < from || state.is_removed(seq - first) {
                continue;
            }
            if out.len() >= max_count || bytes >= max_bytes {
                break 'chunks;
            }
            let Some(message) = decode_message(record) else {
                tracing::error!(queue = qid, seq, "unreadable message record, skipped");
                continue;
            };
            bytes += message.payload.len();
            out.push(Loaded {
                key: (0, seq),
                message,
                chunk: first,
                attempts_key: false,
            });
        }
    }
    if let Some(last) = out.last().map(|l| l.key.1) {
        let range = seq_key(qid, TAG_ATTEMPTS, from)..=seq_key(qid, TAG_ATTEMPTS, last);
        for item in data.range(range) {
            let (k, v) = item.map_err(read)?;
            let seq = be_u64(&k[5..]).unwrap_or(0);
            let deliveries = v
                .get(..4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map_or(0, u32::from_be_bytes);
            if let Ok(i) = out.binary_search_by_key(&seq, |l| l.key.1) {
                out[i].message.deliveries = deliveries;
                out[i].attempts_key = true;
            }
        }
    }
    Ok(out)
}

/// Syncs the files sled writes, since sled itself only calls `sync_file_range`.
struct FileSyncer {
    dir: PathBuf,
    db_file: File,
    /// Write-once files (`conf`, `snap.*`, blobs) already synced.
    synced: HashSet<PathBuf>,
}

impl FileSyncer {
    fn new(dir: &Path) -> std::io::Result<Self> {
        Ok(Self {
            dir: dir.to_owned(),
            db_file: File::open(dir.join("db"))?,
            synced: HashSet::new(),
        })
    }

    /// `fdatasync` of the log and of every new write-once file, then `fsync` of the
    /// directories if any file was new.
    fn sync(&mut self) -> std::io::Result<()> {
        self.db_file.sync_data()?;
        let mut seen = HashSet::with_capacity(self.synced.len());
        let mut new_files = false;
        let blobs = self.dir.join("blobs");
        for dir in [&self.dir, &blobs] {
            let entries = match std::fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            for entry in entries {
                let entry = entry?;
                let path = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let wanted = dir == &blobs || name == "conf" || name.starts_with("snap.");
                if !wanted || !entry.file_type()?.is_file() {
                    continue;
                }
                if !self.synced.contains(&path) {
                    match File::open(&path) {
                        Ok(f) => f.sync_data()?,
                        // sled removes old snapshots and blobs as it goes.
                        Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(err) => return Err(err),
                    }
                    new_files = true;
                }
                seen.insert(path);
            }
        }
        self.synced = seen;
        if new_files {
            File::open(&self.dir)?.sync_all()?;
            if blobs.exists() {
                File::open(&blobs)?.sync_all()?;
            }
        }
        Ok(())
    }
}

struct Writer {
    shared: Arc<Shared>,
    data: sled::Tree,
    defs: sled::Tree,
    next_qid: u32,
    /// Removal state of recently written or touched chunks, and the segment holding
    /// each, so an ack costs no read.
    chunks: HashMap<(u32, u64), (ChunkState, u64)>,
    segments: Segments,
    handoff: Arc<Handoff>,
    syncer: Option<JoinHandle<()>>,
    metrics: Arc<StorageMetrics>,
}

/// A round the writer has applied, waiting for the syncer.
struct Applied {
    epoch: u64,
    wrote: bool,
    result: Result<(), StoreError>,
    listeners: Vec<Arc<dyn CommitListener>>,
    ticket: Option<TicketSender>,
    reads: Vec<ReadRequest>,
    shutdown: bool,
    /// Segments written by this round.
    unsynced: Unsynced,
    /// Segments this round retired.
    retired: Vec<u64>,
    /// The log's end after this round.
    log_end: Position,
}

/// Rounds passed from the writer to the syncer.
#[derive(Default)]
struct Handoff {
    rounds: Mutex<Vec<Applied>>,
    wake: Condvar,
}

impl Handoff {
    fn lock(&self) -> MutexGuard<'_, Vec<Applied>> {
        self.rounds.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Makes applied rounds durable and releases their confirms and reads; checkpoints
/// sled and deletes segments no longer needed.
struct Syncer {
    handoff: Arc<Handoff>,
    db: sled::Db,
    data: sled::Tree,
    defs: sled::Tree,
    files: FileSyncer,
    segments: Arc<Files>,
    /// Segments written since the last sync.
    unsynced: Unsynced,
    /// Retired segments, each with the log end of the round that retired it.
    retired: Vec<(u64, Position)>,
    policy: FsyncPolicy,
    /// The log end of the last round handed over (applied to sled).
    log_end: Position,
    /// The checkpoint last written to sled, and the last one known durable.
    checkpoint: Position,
    durable: Position,
    last_checkpoint: Instant,
    checkpoint_every: std::time::Duration,
    metrics: Arc<StorageMetrics>,
}

impl Syncer {
    fn run(mut self) {
        let mut last_sync = Instant::now();
        let mut dirty = false;
        loop {
            let mut rounds = self.take(self.wake_at(dirty, last_sync));
            for round in &mut rounds {
                self.unsynced.absorb(std::mem::take(&mut round.unsynced));
                let end = round.log_end;
                self.retired
                    .extend(round.retired.drain(..).map(|id| (id, end)));
                self.log_end = self.log_end.max(end);
            }
            let wrote = rounds.iter().any(|r| r.wrote && r.result.is_ok());
            let shutdown = rounds.iter().any(|r| r.shutdown);
            dirty |= wrote;
            let sync_now = match self.policy {
                FsyncPolicy::Always => wrote,
                FsyncPolicy::Interval(every) => dirty && last_sync.elapsed() >= every,
                FsyncPolicy::Never => false,
            } || (shutdown && dirty);
            let mut synced = Ok(());
            if sync_now {
                let started = Instant::now();
                synced = self
                    .unsynced
                    .sync(&self.segments)
                    .map_err(|e| StoreError::io("fdatasync of the queue log", e));
                self.metrics.fsync(started.elapsed());
                if let Err(err) = &synced {
                    self.metrics.failed(&err.to_string());
                }
                last_sync = Instant::now();
                dirty = synced.is_err();
            }
            for round in rounds {
                let result = round.result.and_then(|()| synced.clone());
                if let Some(ticket) = round.ticket {
                    ticket.send_replace(Some(result.clone()));
                }
                for listener in &round.listeners {
                    listener.committed(round.epoch, &result);
                }
                for read in round.reads {
                    let loaded = scan(
                        &self.data,
                        &self.segments,
                        read.range,
                        read.max_count,
                        read.max_bytes,
                    );
                    (read.then)(loaded);
                }
            }
            // After the confirms above, so that a checkpoint delays none of them.
            if shutdown || self.checkpoint_due() {
                let started = Instant::now();
                if let Err(err) = self.checkpoint(shutdown) {
                    tracing::error!(error = %err, "checkpoint failed; the log is kept");
                }
                self.metrics.checkpoint(started.elapsed());
            }
            if shutdown {
                return;
            }
        }
    }

    /// Whether sled holds log records (or a checkpoint) not yet known durable, and
    /// the last checkpoint is old enough.
    fn checkpoint_due(&self) -> bool {
        self.checkpoint_pending() && self.last_checkpoint.elapsed() >= self.checkpoint_every
    }

    fn checkpoint_pending(&self) -> bool {
        self.log_end > self.checkpoint || self.durable < self.checkpoint
    }

    /// When to stop waiting for rounds: the next interval sync or checkpoint.
    fn wake_at(&self, dirty: bool, last_sync: Instant) -> Option<Instant> {
        let sync = match (self.policy, dirty) {
            (FsyncPolicy::Interval(every), true) => Some(last_sync + every),
            _ => None,
        };
        let checkpoint = self
            .checkpoint_pending()
            .then(|| self.last_checkpoint + self.checkpoint_every);
        sync.into_iter().chain(checkpoint).min()
    }

    /// Every round handed over so far; with nothing handed, waits (until `wake_at`).
    fn take(&self, wake_at: Option<Instant>) -> Vec<Applied> {
        let mut rounds = self.handoff.lock();
        loop {
            if !rounds.is_empty() {
                return std::mem::take(&mut *rounds);
            }
            match wake_at {
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Vec::new();
                    }
                    rounds = self
                        .handoff
                        .wake
                        .wait_timeout(rounds, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                None => {
                    rounds = self
                        .handoff
                        .wake
                        .wait(rounds)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }

    /// Flushes and syncs sled, so every log record before `log_end` is durable in it,
    /// and so is the checkpoint written last time; then records `log_end` as the new
    /// checkpoint (durable at the next one, or at once when `last`), and deletes the
    /// retired segments no replay can need any more.
    fn checkpoint(&mut self, last: bool) -> Result<(), StoreError> {
        let reached = self.log_end;
        self.make_sled_durable()?;
        self.durable = self.checkpoint;
        self.defs
            .insert(CHECKPOINT_KEY, &reached.encode()[..])
            .map_err(|e| StoreError::io("writing the checkpoint", e))?;
        self.checkpoint = reached;
        if last {
            self.make_sled_durable()?;
            self.durable = reached;
        }
        self.last_checkpoint = Instant::now();
        let durable = self.durable;
        let (gone, kept): (Vec<_>, Vec<_>) =
            self.retired.drain(..).partition(|(_, end)| *end <= durable);
        self.retired = kept;
        let gone: Vec<u64> = gone.into_iter().map(|(id, _)| id).collect();
        self.segments.delete(&gone);
        self.unsynced.forget(&gone);
        Ok(())
    }

    fn make_sled_durable(&mut self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| StoreError::io("flush", e))?;
        self.files
            .sync()
            .map_err(|e| StoreError::io("fdatasync", e))
    }
}

/// One round's work, taken from `Pending` in one go so reads stay ordered after the
/// writes queued before them.
struct Round {
    epoch: u64,
    ops: Vec<Op>,
    chunks: Vec<ChunkBuf>,
    removals: Vec<(u32, u64, u64)>,
    counters: HashMap<u32, Counters>,
    listeners: Vec<Arc<dyn CommitListener>>,
    ticket: Option<TicketSender>,
    reads: Vec<ReadRequest>,
    shutdown: bool,
}

impl Writer {
    fn run(mut self) {
        loop {
            let round = self.take();
            let wrote = !round.ops.is_empty()
                || !round.counters.is_empty()
                || !round.chunks.is_empty()
                || !round.removals.is_empty();
            let result = if wrote {
                let messages: usize = round.chunks.iter().map(|c| usize::from(c.count)).sum();
                if messages > 0 {
                    self.metrics.batch(messages);
                }
                self.apply(round.ops, round.chunks, round.removals, &round.counters)
            } else {
                Ok(())
            };
            if let Err(err) = &result {
                self.metrics.failed(&err.to_string());
            }
            let shutdown = round.shutdown;
            self.handoff.lock().push(Applied {
                epoch: round.epoch,
                wrote,
                result,
                listeners: round.listeners,
                ticket: round.ticket,
                reads: round.reads,
                shutdown,
                unsynced: self.segments.take_unsynced(),
                retired: self.segments.take_retired(),
                log_end: self.segments.end(),
            });
            self.handoff.wake.notify_one();
            if shutdown {
                break;
            }
        }
        let mut p = self.shared.lock();
        p.stopped = true;
        // Anything queued after the last round is refused rather than left hanging.
        if let Some(ticket) = p.ticket.take() {
            ticket.send_replace(Some(Err(StoreError("the store is shut down".into()))));
        }
        let reads = std::mem::take(&mut p.reads);
        drop(p);
        for read in reads {
            (read.then)(Err(StoreError("the store is shut down".into())));
        }
        // The last round makes everything durable; shutdown waits for it.
        if let Some(syncer) = self.syncer.take() {
            if syncer.join().is_err() {
                tracing::error!("the sync thread panicked");
            }
        }
        tracing::info!("queue store closed");
    }

    fn take(&self) -> Round {
        let mut p = self.shared.lock();
        loop {
            let has_work = !p.ops.is_empty()
                || !p.chunks.is_empty()
                || !p.removals.is_empty()
                || !p.counters.is_empty()
                || !p.reads.is_empty()
                || !p.listeners.is_empty()
                || p.ticket.is_some()
                || p.shutdown;
            if has_work {
                break;
            }
            p = self
                .shared
                .wake
                .wait(p)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let round = Round {
            epoch: p.epoch,
            ops: std::mem::take(&mut p.ops),
            chunks: std::mem::take(&mut p.chunks),
            removals: std::mem::take(&mut p.removals),
            counters: std::mem::take(&mut p.counters),
            listeners: std::mem::take(&mut p.listeners),
            ticket: p.ticket.take(),
            reads: std::mem::take(&mut p.reads),
            shutdown: p.shutdown,
        };
        p.open_chunk.clear();
        p.epoch += 1;
        p.bytes = 0;
        round
    }

    fn apply(
        &mut self,
        ops: Vec<Op>,
        chunks: Vec<ChunkBuf>,
        removals: Vec<(u32, u64, u64)>,
        counters: &HashMap<u32, Counters>,
    ) -> Result<(), StoreError> {
        let result = self.apply_inner(ops, chunks, removals, counters);
        if result.is_err() || self.chunks.len() > CHUNK_CACHE_MAX {
            // After a failed write the cache may hold bits sled does not: start over
            // from what sled has.
            self.chunks.clear();
        }
        if result.is_err() {
            match stored_segments(&self.data) {
                Ok(live) => self.segments.reset_live(live),
                Err(err) => tracing::error!(error = %err, "cannot reread segment counts"),
            }
        }
        result
    }

    fn apply_inner(
        &mut self,
        ops: Vec<Op>,
        chunks: Vec<ChunkBuf>,
        removals: Vec<(u32, u64, u64)>,
        counters: &HashMap<u32, Counters>,
    ) -> Result<(), StoreError> {
        let mut batch = IndexBatch::default();
        let mut defs_touched = false;
        for op in ops {
            match op {
                Op::Put(k, v) => batch.insert(&k, &v),
                Op::Remove(k) => batch.remove(&k),
                Op::PutDef(name, json) => {
                    // Keep `next_qid` above every id ever used, so a deleted queue's id
                    // (whose keys might survive a crash mid-delete) is never reused.
                    if let Ok(d) = serde_json::from_slice::<StoredDefinition>(&json) {
                        self.next_qid = self.next_qid.max(d.qid.saturating_add(1));
                    }
                    batch.insert_def(name.as_bytes(), &json);
                    defs_touched = true;
                }
                Op::RemoveDef(name) => {
                    batch.remove_def(name.as_bytes());
                    defs_touched = true;
                }
                Op::DropQueue(qid) => {
                    // Apply what came before, so the queue's last writes are deleted too.
                    let before = std::mem::take(&mut batch);
                    self.commit(before)?;
                    self.drop_queue(qid)?;
                    self.chunks.retain(|(q, _), _| *q != qid);
                }
            }
        }
        let mut segments_touched: HashSet<u64> = HashSet::new();
        for mut c in chunks {
            c.buf[..2].copy_from_slice(&c.count.to_be_bytes());
            let Some(state) = ChunkState::new(c.first, c.seqs()) else {
                tracing::error!(
                    queue = c.qid,
                    chunk = c.first,
                    "malformed chunk not written"
                );
                continue;
            };
            let loc = self
                .segments
                .append_chunk(&c.buf)
                .map_err(|e| StoreError::io("writing the queue log", e))?;
            segments_touched.insert(loc.segment);
            batch.insert(
                &seq_key(c.qid, TAG_CHUNK, c.first),
                &chunk_index_value(&loc, &state),
            );
            self.chunks.insert((c.qid, c.first), (state, loc.segment));
        }
        let mut touched: HashSet<(u32, u64)> = HashSet::new();
        for (qid, first, seq) in removals {
            let key = (qid, first);
            let (state, _) = match self.chunks.entry(key) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    match stored_chunk_state(&self.data, qid, first, None)? {
                        Some((state, loc)) => e.insert((state, loc.segment)),
                        None => {
                            tracing::debug!(
                                queue = qid,
                                chunk = first,
                                seq,
                                "removal from a chunk that is gone"
                            );
                            continue;
                        }
                    }
                }
            };
            if state.remove(seq.saturating_sub(first)) {
                touched.insert(key);
            }
        }
        for (qid, first) in touched {
            let Some((state, segment)) = self.chunks.get(&(qid, first)) else {
                continue;
            };
            if state.live == 0 {
                let segment = *segment;
                batch.remove(&seq_key(qid, TAG_CHUNK, first));
                batch.remove(&seq_key(qid, TAG_REMOVED, first));
                self.chunks.remove(&(qid, first));
                self.segments.release(segment);
                segments_touched.insert(segment);
            } else {
                batch.insert(&seq_key(qid, TAG_REMOVED, first), &state.encode());
            }
        }
        self.count_segments(&mut batch, segments_touched);
        for (qid, c) in counters {
            batch.insert(&prefix(*qid, TAG_COUNTERS), &c.encode());
        }
        if defs_touched {
            batch.insert_def(NEXT_QID_KEY, &self.next_qid.to_be_bytes());
        }
        self.commit(batch)
    }

    /// Logs `batch`, writes the round's records out, then applies `batch` to sled:
    /// the bodies reach their file before any reader can find them in the index, and
    /// sled never holds a write the log does not.
    fn commit(&mut self, batch: IndexBatch) -> Result<(), StoreError> {
        let log = |e| StoreError::io("writing the queue log", e);
        if !batch.is_empty() {
            self.segments.append_batch(&batch.log).map_err(log)?;
        }
        self.segments.write_out().map_err(log)?;
        IndexBatch::apply(&batch.log, &self.data, &self.defs)
    }

    /// Writes the live chunk count of each segment in `touched` (removing it at 0).
    fn count_segments(&self, batch: &mut IndexBatch, touched: HashSet<u64>) {
        for segment in touched {
            match self.segments.live(segment) {
                0 => batch.remove(&segment_key(segment)),
                n => batch.insert(&segment_key(segment), &n.to_be_bytes()),
            }
        }
    }

    fn drop_queue(&mut self, qid: u32) -> Result<(), StoreError> {
        let (start, end) = (qid.to_be_bytes(), qid.saturating_add(1).to_be_bytes());
        loop {
            let mut batch = IndexBatch::default();
            let mut n = 0;
            let mut touched = HashSet::new();
            for item in self.data.range(start..end).take(DROP_CHUNK) {
                let (k, v) = item.map_err(|e| StoreError::io("deleting a queue", e))?;
                if k.get(4) == Some(&TAG_CHUNK) {
                    if let Some((loc, _)) = decode_chunk_index(&v) {
                        self.segments.release(loc.segment);
                        touched.insert(loc.segment);
                    }
                }
                batch.remove(&k);
                n += 1;
            }
            if n == 0 {
                return Ok(());
            }
            self.count_segments(&mut batch, touched);
            self.commit(batch)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_of_another_layout_is_refused() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let (data, defs) = (db.open_tree("d").unwrap(), db.open_tree("q").unwrap());
        // A new store is stamped with the current layout and opens again.
        check_layout(&data, &defs).unwrap();
        data.insert(b"k", b"v").unwrap();
        check_layout(&data, &defs).unwrap();
        // Data without a stamp, or with another one, is not guessed at.
        defs.remove(LAYOUT_KEY).unwrap();
        let err = check_layout(&data, &defs).unwrap_err();
        assert!(err.0.contains("layout 1 (unversioned)"), "{err}");
        defs.insert(LAYOUT_KEY, &2u32.to_be_bytes()[..]).unwrap();
        let err = check_layout(&data, &defs).unwrap_err();
        assert!(
            err.0.contains("layout 2") && err.0.contains("move the data dir away"),
            "{err}"
        );
    }

    #[test]
    fn a_logged_batch_applies_its_writes_in_order() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let (data, defs) = (db.open_tree("d").unwrap(), db.open_tree("q").unwrap());
        data.insert(b"gone", b"x").unwrap();
        let mut batch = IndexBatch::default();
        batch.insert(b"k", b"1");
        batch.insert(b"k", b"2");
        batch.remove(b"gone");
        batch.insert_def(b"queue", b"{}");
        batch.insert_def(b"old", b"{}");
        batch.remove_def(b"old");
        IndexBatch::apply(&batch.log, &data, &defs).unwrap();
        assert_eq!(data.get(b"k").unwrap().unwrap(), &b"2"[..]);
        assert!(data.get(b"gone").unwrap().is_none());
        assert_eq!(defs.get(b"queue").unwrap().unwrap(), &b"{}"[..]);
        assert!(defs.get(b"old").unwrap().is_none());
        // Applying it again changes nothing: a replay may repeat a round sled has.
        IndexBatch::apply(&batch.log, &data, &defs).unwrap();
        assert_eq!(data.len(), 1);
        for cut in 1..batch.log.len() {
            // A cut-off record is refused or applied up to the cut, never a panic.
            let _ = IndexBatch::apply(&batch.log[..cut], &data, &defs);
        }
        let mut bad = batch.log.clone();
        bad[0] = 9;
        assert!(
            IndexBatch::apply(&bad, &data, &defs).is_err(),
            "unknown tree"
        );
    }

    #[test]
    fn chunk_state_marks_gaps_and_round_trips() {
        // Seqs 10, 11 and 14: 12 and 13 were delayed messages, never in the chunk.
        let mut state = ChunkState::new(10, [10, 11, 14].into_iter()).unwrap();
        assert_eq!((state.span, state.live), (5, 3));
        assert!(state.is_removed(2) && state.is_removed(3) && !state.is_removed(4));
        assert!(state.remove(4));
        assert!(
            !state.remove(4),
            "a second removal of the same seq changes nothing"
        );
        assert!(!state.remove(99), "outside the chunk");
        assert_eq!(ChunkState::decode(&state.encode()), Some(state.clone()));
        assert!(state.remove(0) && state.remove(1));
        assert_eq!(state.live, 0);
        assert_eq!(
            ChunkState::decode(&[0, 0, 0, 70, 1, 2]),
            None,
            "wrong length"
        );
    }

    #[test]
    fn chunk_entries_parse_and_reject_truncation() {
        let mut chunk = ChunkBuf {
            qid: 1,
            first: 5,
            last: 5,
            count: 0,
            buf: vec![0, 0],
        };
        for (seq, body) in [(5u64, &b"ab"[..]), (7, &b"cde"[..])] {
            chunk.buf.extend_from_slice(&seq.to_be_bytes());
            chunk
                .buf
                .extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
            chunk.buf.extend_from_slice(body);
            chunk.count += 1;
        }
        chunk.buf[..2].copy_from_slice(&chunk.count.to_be_bytes());
        let entries = chunk_entries(&chunk.buf).unwrap();
        assert_eq!(entries, vec![(5, &b"ab"[..]), (7, &b"cde"[..])]);
        assert_eq!(chunk.seqs().collect::<Vec<_>>(), [5, 7]);
        for cut in 0..chunk.buf.len() {
            assert_eq!(chunk_entries(&chunk.buf[..cut]), None, "cut at {cut}");
        }
    }
}
