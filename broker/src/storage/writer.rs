//! The writer, the first half of the store thread (`tidings-store`): takes everything
//! queued since its last round (writes and reads together, in the order they were
//! queued), encodes the round's chunks and its one batch record of index writes, and
//! writes them out with one `pwrite`; the syncer, the other half, then syncs, applies
//! and answers the round before the writer takes the next. It never writes to the
//! index: the syncer applies a round's batch once the round is durable.

// Queue ids, chunk seqs and segment ids the store assigns: a fast hash is enough.
use foldhash::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use super::StoreError;
use super::chunks::{ChunkState, chunk_index_value, decode_chunk_index};
use super::index::{Index, Tree};
use super::keys::{
    NEXT_QID_KEY, TAG_CHUNK, TAG_COUNTERS, TAG_REMOVED, prefix, segment_key, seq_key,
};
use super::log::Log;
use super::records::IndexBatch;
use super::scan::stored_chunk_state;
use super::store::{Op, Round, Shared};
use super::syncer::Written;
use crate::queue::options::StoredDefinition;

/// Chunk states the writer keeps between rounds; past this it forgets them all and
/// reads bitmaps back from the index as needed (after the index has caught up).
const CHUNK_CACHE_MAX: usize = 65_536;

/// What the writer remembers of a chunk between rounds.
pub(crate) struct CachedChunk {
    state: ChunkState,
    segment: u64,
    /// The chunk's removal bitmap (its `TAG_REMOVED` key) may be in the index. False
    /// only for a chunk written by this process whose bitmap it never wrote, when
    /// its keys are new to the index (`Writer::new_keys`): no key of it can be in
    /// the index from before.
    bitmap_written: bool,
}

pub(crate) struct Writer {
    pub shared: Arc<Shared>,
    pub index: Arc<dyn Index>,
    pub next_qid: u32,
    /// Removal state of recently written or touched chunks, and the segment holding
    /// each, so an ack costs no read.
    pub chunks: HashMap<(u32, u64), CachedChunk>,
    /// Chunk keys may be marked new to the index ([`IndexBatch::insert_new`]):
    /// only under `--fsync always` in a data dir that never ran under `interval` or
    /// `never` (keys.rs, `RELAXED_KEY`), where a seq is never used again once any
    /// write of it can be in the index.
    pub new_keys: bool,
    pub log: Box<dyn Log>,
}

impl Writer {
    /// Waits for work (until `wake_at`), takes it as one round and writes it out;
    /// returns the round for the syncer, or `None` if `wake_at` passed first.
    pub fn produce(&mut self, wake_at: Option<Instant>) -> Option<Written> {
        let mut round = self.shared.take(wake_at)?;
        let wrote = round.writes();
        let failed = self.shared.failure();
        if wrote && failed.is_none() {
            let messages: usize = round.chunks.iter().map(|c| usize::from(c.count)).sum();
            if messages > 0 {
                self.shared.metrics.batch(messages);
            }
        }
        let mut batch = None;
        let mut new_ops = Vec::new();
        let result = match failed {
            // Fail-stop: nothing more is written after a failure.
            Some(err) => Err(err),
            None if wrote => match self.write(&mut round) {
                Ok(b) => {
                    batch = Some(b.log);
                    new_ops = b.new_ops;
                    Ok(())
                }
                Err(err) => {
                    self.shared.fail(&err);
                    Err(err)
                }
            },
            None => Ok(()),
        };
        Some(Written {
            epoch: round.epoch,
            wrote: wrote && result.is_ok(),
            result,
            batch,
            new_ops,
            listeners: round.listeners,
            ticket: round.ticket,
            reads: round.reads,
            shutdown: round.shutdown,
            unsynced: self.log.take_unsynced(),
            retired: self.log.take_retired(),
            log_end: self.log.end(),
        })
    }

    /// Encodes and writes out one round; returns its index writes (the batch
    /// record's payload) for the syncer to apply once it is durable.
    fn write(&mut self, round: &mut Round) -> Result<IndexBatch, StoreError> {
        if self.chunks.len() > CHUNK_CACHE_MAX {
            // Misses read the index, which holds every earlier round: the store
            // thread applies each round before it takes the next.
            self.chunks.clear();
        }
        let log_err = |e| StoreError::io("writing the queue log", e);
        let mut batch = IndexBatch::default();
        let mut defs_touched = false;
        let mut segments_touched: HashSet<u64> = HashSet::default();
        for op in &round.ops {
            match op {
                Op::Put(k, v) => batch.insert(k, v),
                Op::Remove(k) => batch.remove(k),
                Op::PutDef(name, json) => {
                    // Keep `next_qid` above every id ever used, so a deleted queue's id
                    // is never reused.
                    if let Ok(d) = serde_json::from_slice::<StoredDefinition>(json) {
                        self.next_qid = self.next_qid.max(d.qid.saturating_add(1));
                    }
                    batch.insert_def(name.as_bytes(), json);
                    defs_touched = true;
                }
                Op::RemoveDef(name) => {
                    batch.remove_def(name.as_bytes());
                    defs_touched = true;
                }
                Op::DropQueue(qid) => self.drop_queue(*qid, &mut batch, &mut segments_touched)?,
            }
        }
        for c in &mut round.chunks {
            c.buf[..2].copy_from_slice(&c.count.to_be_bytes());
            let Some(state) = ChunkState::new(c.first, c.seqs()) else {
                tracing::error!(
                    queue = c.qid,
                    chunk = c.first,
                    "malformed chunk not written"
                );
                continue;
            };
            let loc = self.log.append_chunk(&c.buf).map_err(log_err)?;
            segments_touched.insert(loc.segment);
            // A chunk's first seq is new (seqs are never reused once durable), so
            // the index has no such key: if the chunk is acked before the next
            // checkpoint, its key never reaches the index proper at all.
            let (key, value) = (
                seq_key(c.qid, TAG_CHUNK, c.first),
                chunk_index_value(&loc, &state),
            );
            if self.new_keys {
                batch.insert_new(&key, &value);
            } else {
                batch.insert(&key, &value);
            }
            let cached = CachedChunk {
                state,
                segment: loc.segment,
                bitmap_written: !self.new_keys,
            };
            self.chunks.insert((c.qid, c.first), cached);
        }
        let mut touched: HashSet<(u32, u64)> = HashSet::default();
        for &(qid, first, seq) in &round.removals {
            let key = (qid, first);
            let cached = match self.chunks.entry(key) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    match stored_chunk_state(&*self.index, qid, first, None)? {
                        Some((state, loc)) => e.insert(CachedChunk {
                            state,
                            segment: loc.segment,
                            bitmap_written: true,
                        }),
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
            if cached.state.remove(seq.saturating_sub(first)) {
                touched.insert(key);
            }
        }
        for (qid, first) in touched {
            let Some(cached) = self.chunks.get_mut(&(qid, first)) else {
                continue;
            };
            let bitmap = seq_key(qid, TAG_REMOVED, first);
            if cached.state.live == 0 {
                let segment = cached.segment;
                batch.remove(&seq_key(qid, TAG_CHUNK, first));
                if cached.bitmap_written {
                    batch.remove(&bitmap);
                }
                self.chunks.remove(&(qid, first));
                self.log.release(segment);
                segments_touched.insert(segment);
            } else if cached.bitmap_written {
                batch.insert(&bitmap, &cached.state.encode());
            } else {
                batch.insert_new(&bitmap, &cached.state.encode());
                cached.bitmap_written = true;
            }
        }
        for segment in segments_touched {
            match self.log.live(segment) {
                0 => batch.remove(&segment_key(segment)),
                n => batch.insert(&segment_key(segment), &n.to_be_bytes()),
            }
        }
        for (qid, c) in &round.counters {
            batch.insert(&prefix(*qid, TAG_COUNTERS), &c.encode());
        }
        if defs_touched {
            batch.insert_def(NEXT_QID_KEY, &self.next_qid.to_be_bytes());
        }
        if !batch.is_empty() {
            self.log.append_batch(&batch.log).map_err(log_err)?;
        }
        self.log.write_out().map_err(log_err)?;
        Ok(batch)
    }

    /// Deletes every key of queue `qid` with one prefix removal in this round's
    /// batch, so the delete is atomic: a replay applies all of it or none.
    fn drop_queue(
        &mut self,
        qid: u32,
        batch: &mut IndexBatch,
        segments_touched: &mut HashSet<u64>,
    ) -> Result<(), StoreError> {
        // Its chunks written in earlier rounds are in the index (each round is
        // applied before the next is taken), so they can be released.
        let (start, end) = (prefix(qid, TAG_CHUNK), prefix(qid, TAG_CHUNK + 1));
        let mut segments = Vec::new();
        self.index.range(Tree::Data, &start, &end, &mut |_, v| {
            if let Some((loc, _)) = decode_chunk_index(v) {
                segments.push(loc.segment);
            }
            true
        })?;
        for segment in segments {
            self.log.release(segment);
            segments_touched.insert(segment);
        }
        self.chunks.retain(|(q, _), _| *q != qid);
        batch.remove_prefix(&qid.to_be_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use tidings_protocol::Publish;

    use super::super::keys::{TAG_CHUNK, TAG_REMOVED, prefix, seq_key};
    use super::super::sim_test::{Broken, config, runtime};
    use super::super::{Index, MemoryIndex, SimDisk, Slot, Store, Tree};
    use crate::queue::EngineConfig;
    use crate::queue::record::Message;

    /// Puts `seqs` of queue `qid` in one round (one chunk) and waits for it.
    async fn put(store: &Store, qid: u32, seqs: &[u64]) -> Vec<Slot> {
        let msg = Message::from_publish(&Publish::new("t.a", Bytes::from_static(b"x")), 0);
        let (slots, ticket) = store.batch(|b| {
            let slots: Vec<Slot> = seqs.iter().map(|s| b.put_ready(qid, *s, &msg)).collect();
            (slots, b.ticket())
        });
        ticket.wait().await.expect("durable");
        slots
    }

    /// A simulated disk and index, and a store config on them under `fsync`: seed 2
    /// (the overlay holds up to 100,000 keys) and no timed checkpoint.
    fn setup(fsync: crate::queue::FsyncPolicy) -> (MemoryIndex, EngineConfig) {
        let (disk, index) = (SimDisk::new(), MemoryIndex::new());
        let mut config = config(&disk, &index, 2, Broken::Not);
        config.checkpoint_interval = Duration::from_secs(3600);
        config.fsync = fsync;
        (index, config)
    }

    /// Removes `slots` of queue `qid` in one round and waits for it.
    async fn remove(store: &Store, qid: u32, slots: &[Slot]) {
        let ticket = store.batch(|b| {
            for slot in slots {
                b.remove_ready(qid, *slot);
            }
            b.ticket()
        });
        ticket.wait().await.expect("durable");
    }

    /// A chunk written and acked between two checkpoints never reaches the index
    /// proper: its key came in new, so the overlay forgets it at the ack, and so
    /// does the removal bitmap written for it on the way. A chunk that outlives a
    /// checkpoint is in the index proper, and its removal then reaches it too.
    #[test]
    fn a_chunk_acked_before_a_checkpoint_never_reaches_the_index_proper() {
        runtime().block_on(async {
            let (index, config) = setup(crate::queue::FsyncPolicy::Always);
            let open = || tokio::task::block_in_place(|| Store::open(&config)).unwrap();

            let opened = open();
            let store = &opened.store;
            let mut singles = Vec::new();
            for seq in 0..20 {
                singles.extend(put(store, 1, &[seq]).await);
            }
            let pair = put(store, 1, &[20, 21]).await;
            let outliving = put(store, 2, &[0, 1]).await;
            remove(store, 1, &singles).await;
            // Half of the pair: its bitmap is written; then the rest, and it goes.
            remove(store, 1, &pair[..1]).await;
            remove(store, 1, &pair[1..]).await;
            // Half of queue 2's chunk, which stays over the checkpoint.
            remove(store, 2, &outliving[..1]).await;
            store.shutdown();
            drop(opened);
            assert!(!index.ever_touched(Tree::Data, &prefix(1, TAG_CHUNK)));
            assert!(!index.ever_touched(Tree::Data, &prefix(1, TAG_REMOVED)));
            let chunk = seq_key(2, TAG_CHUNK, 0);
            let bitmap = seq_key(2, TAG_REMOVED, 0);
            assert!(index.get(Tree::Data, &chunk).unwrap().is_some());
            assert!(index.get(Tree::Data, &bitmap).unwrap().is_some());

            let opened = open();
            remove(&opened.store, 2, &outliving[1..]).await;
            opened.store.shutdown();
            drop(opened);
            assert_eq!(index.get(Tree::Data, &chunk).unwrap(), None);
            assert_eq!(index.get(Tree::Data, &bitmap).unwrap(), None);
        });
    }

    /// A data dir that ever ran under `--fsync never` (or `interval`) marks no key
    /// new again, even under `always`: a power loss then may have left the index
    /// with keys of seqs that are used again, so every removal is written.
    #[test]
    fn a_data_dir_that_ran_without_fsync_marks_nothing_new() {
        runtime().block_on(async {
            let (index, mut config) = setup(crate::queue::FsyncPolicy::Never);
            let opened = tokio::task::block_in_place(|| Store::open(&config)).unwrap();
            opened.store.shutdown();
            drop(opened);
            config.fsync = crate::queue::FsyncPolicy::Always;
            let opened = tokio::task::block_in_place(|| Store::open(&config)).unwrap();
            let slots = put(&opened.store, 1, &[0]).await;
            remove(&opened.store, 1, &slots).await;
            opened.store.shutdown();
            drop(opened);
            assert!(
                index.ever_touched(Tree::Data, &prefix(1, TAG_CHUNK)),
                "the chunk's removal is written to the index proper"
            );
            assert_eq!(
                index.get(Tree::Data, &seq_key(1, TAG_CHUNK, 0)).unwrap(),
                None
            );
        });
    }
}
