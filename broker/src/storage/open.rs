//! Opening the store: replay, the repair mode, the startup checkpoint, and starting
//! the store thread (writer and syncer).
//!
//! The order matters. The log is replayed into the index and its end sealed; the
//! index is made durable; a new checkpoint is written at the start of a fresh
//! segment and made durable; only then are orphan segments deleted. So a crash at
//! any point of a start replays from a checkpoint whose log is still all there, and
//! a segment id is never used twice.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::disk::{Disk, RealDisk};
use super::index::{Index, MemoryIndex, SledIndex, Tree};
use super::keys::{
    CHECKPOINT_KEY, Counters, RELAXED_KEY, TAG_CHUNK, TAG_COUNTERS, TAG_REMOVED, check_layout,
    prefix, segment_key, seq_key, stored_segments,
};
use super::overlay::{DEFAULT_OVERLAY_LIMIT, OverlayIndex};
use super::records::{IndexBatch, Position};
use super::replay::{Damage, ReplayError, cut, replay, seal};
use super::scan::{load, scan, stored_chunk_state};
use super::segments::{Files, Segments, segment_path};
use super::sim_disk::SimDisk;
use super::store::{Opened, Shared, Store};
use super::syncer::Syncer;
use super::writer::Writer;
use super::{Range, StoreError};
use crate::queue::{EngineConfig, FsyncPolicy, QueueError};

/// In `Defs` while a repair is under way: the damaged places cut so far
/// (16 bytes each), so that a crash in the middle of a repair finishes it at the
/// next start.
const REPAIR_KEY: &[u8] = b"\0repair";

/// Where the store keeps its log and its index: the real file system and sled by
/// default; a [`SimDisk`] and a [`MemoryIndex`] in simulation tests.
#[derive(Clone)]
pub struct StorageBackend {
    pub(crate) disk: Arc<dyn Disk>,
    /// `None`: sled in the data dir.
    pub(crate) index: Option<Arc<dyn Index>>,
    /// Test only: apply each round to the index before it is durable (the order this
    /// store had before), so the simulation can show that its checker catches it.
    pub(crate) index_ahead_of_log: bool,
    /// Keys the index overlay holds before it writes them to the index proper
    /// ahead of a checkpoint (overlay.rs).
    pub(crate) overlay_limit: usize,
}

impl StorageBackend {
    /// The real file system, with sled as the index.
    pub fn real() -> Self {
        Self {
            disk: Arc::new(RealDisk),
            index: None,
            index_ahead_of_log: false,
            overlay_limit: DEFAULT_OVERLAY_LIMIT,
        }
    }

    /// A simulated disk and an in-memory index (tests).
    pub fn simulated(disk: SimDisk, index: MemoryIndex) -> Self {
        Self {
            disk: Arc::new(disk),
            index: Some(Arc::new(index)),
            index_ahead_of_log: false,
            overlay_limit: DEFAULT_OVERLAY_LIMIT,
        }
    }

    /// A simulated pair with the index applied before the log is durable: broken on
    /// purpose, for the test that proves the simulation notices.
    #[cfg(test)]
    pub(crate) fn simulated_index_ahead(disk: SimDisk, index: MemoryIndex) -> Self {
        Self {
            index_ahead_of_log: true,
            ..Self::simulated(disk, index)
        }
    }

    /// The same, with the index overlay writing to the index proper once it holds
    /// more than `limit` keys (0: at every write), instead of
    /// `DEFAULT_OVERLAY_LIMIT` — so that a simulation can also see the index written
    /// through.
    #[cfg(test)]
    pub(crate) fn with_overlay_limit(mut self, limit: usize) -> Self {
        self.overlay_limit = limit;
        self
    }
}

impl Default for StorageBackend {
    fn default() -> Self {
        Self::real()
    }
}

impl std::fmt::Debug for StorageBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.index.is_some() {
            "StorageBackend(simulated)"
        } else {
            "StorageBackend(real)"
        })
    }
}

/// What the repair mode dropped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RepairReport {
    /// The damaged places, as `path:offset`.
    pub damaged: Vec<String>,
    /// Log records cut.
    pub records: u64,
    /// Bytes cut.
    pub bytes: u64,
    /// Stored messages whose chunk lay in a cut range.
    pub messages: u64,
}

fn io_err(context: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::io(context, err)
}

impl Store {
    /// Opens (or creates) the store and loads what each queue needs to start.
    /// Blocking: call it before serving or from a blocking context.
    pub fn open(config: &EngineConfig) -> Result<Opened, QueueError> {
        let dir = config.data_dir.clone();
        let disk = config.storage.disk.clone();
        let proper: Arc<dyn Index> = match &config.storage.index {
            Some(index) => index.clone(),
            None => {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| io_err(&format!("creating {}", dir.display()), e))?;
                Arc::new(SledIndex::open(&dir, config.cache_bytes)?)
            }
        };
        let index: Arc<dyn Index> =
            Arc::new(OverlayIndex::new(proper, config.storage.overlay_limit));
        check_layout(&*index)?;
        let segments_dir = dir.join("segments");
        let from = index
            .get(Tree::Defs, CHECKPOINT_KEY)?
            .and_then(|v| Position::decode(&v))
            .unwrap_or_default();
        let mut damages = repair_marks(&*index)?;
        let mut report = RepairReport::default();
        let replayed = loop {
            let live: HashSet<u64> = stored_segments(&*index)?.into_keys().collect();
            let result = replay(&*disk, &segments_dir, from, &live, |log| {
                IndexBatch::apply(log, &*index).map_err(|e| e.0)
            });
            match result {
                Ok(replayed) => break replayed,
                Err(ReplayError::Damage(damage)) if config.repair => {
                    // Remembered durably before the cut, so a crash mid-repair
                    // still drops the index entries that point past it.
                    damages.push(damage.clone());
                    save_repair_marks(&*index, &damages)?;
                    index.checkpoint()?;
                    let done = cut(&*disk, &segments_dir, &damage)
                        .map_err(|e| io_err("repairing the queue log", e))?;
                    tracing::warn!(
                        file = %damage.path.display(),
                        offset = damage.offset,
                        records = done.records,
                        bytes = done.bytes,
                        "repair: cut the queue log at the damage"
                    );
                    report
                        .damaged
                        .push(format!("{}:{}", damage.path.display(), damage.offset));
                    report.records += done.records;
                    report.bytes += done.bytes;
                }
                Err(ReplayError::Damage(damage)) => {
                    return Err(StoreError(damage.to_string()).into());
                }
                Err(ReplayError::Io(err)) => {
                    return Err(
                        io_err(&format!("replaying {}", segments_dir.display()), err).into(),
                    );
                }
                Err(ReplayError::Apply(err)) => return Err(StoreError(err).into()),
            }
        };
        if replayed.batches > 0 {
            tracing::info!(
                batches = replayed.batches,
                "replayed the queue log written since the last checkpoint"
            );
        }
        if let Some(end) = replayed.end {
            seal(&*disk, &segments_dir, end).map_err(|e| io_err("closing the queue log", e))?;
        }
        // Replay re-wrote and synced what it applied (a failed fdatasync may have
        // left it in the page cache only), but the segment holding it may be newer
        // than the directory's last fsync: a broker that stopped after a failed sync
        // of a new segment leaves a file whose name is not durable. Its records are
        // now in the index, which is made durable below, so the name must be first.
        if replayed.end.is_some() {
            disk.sync_dir(&segments_dir)
                .map_err(|e| io_err(&format!("fsync of {}", segments_dir.display()), e))?;
        }
        let (mut segments, orphans) = Segments::open(
            disk.clone(),
            &segments_dir,
            stored_segments(&*index)?,
            config.segment_bytes,
        )
        .map_err(|e| {
            io_err(
                &format!("opening segments in {}", segments_dir.display()),
                e,
            )
        })?;
        if !damages.is_empty() {
            report.messages = repair_index(&*index, &segments.files(), &damages)?;
            segments.set_live(stored_segments(&*index)?);
            tracing::warn!(
                damaged = ?report.damaged,
                records = report.records,
                bytes = report.bytes,
                messages = report.messages,
                "repaired the queue log: everything before the damage and every later \
                 segment is kept; the records cut and the stored messages they held are gone"
            );
        }
        if config.fsync != FsyncPolicy::Always {
            index.insert(Tree::Defs, RELAXED_KEY, b"1")?;
        }
        let new_keys =
            config.fsync == FsyncPolicy::Always && index.get(Tree::Defs, RELAXED_KEY)?.is_none();
        // What the replay (and repair) wrote is made durable, then the new
        // checkpoint: nothing is appended to old segments, so the next replay starts
        // at the next one. Only then is anything deleted.
        index.checkpoint()?;
        let start = segments.end();
        index.insert(Tree::Defs, CHECKPOINT_KEY, &start.encode())?;
        index.remove(Tree::Defs, REPAIR_KEY)?;
        index.checkpoint()?;
        for id in &orphans {
            let path = segment_path(&segments_dir, *id);
            tracing::info!(segment = id, "deleting a segment no stored chunk refers to");
            if let Err(err) = disk.remove(&path) {
                tracing::warn!(segment = id, error = %err, "cannot delete an orphan segment");
            }
        }
        let files = segments.files();
        let (queues, next_qid) = load(&*index, &files, config)?;

        let shared = Arc::new(Shared::new(config.metrics.clone()));
        let writer = Writer {
            shared: shared.clone(),
            index: index.clone(),
            next_qid,
            chunks: Default::default(),
            new_keys,
            log: Box::new(segments),
        };
        let syncer = Syncer {
            shared: shared.clone(),
            writer,
            index: index.clone(),
            segments: files.clone(),
            unsynced: Default::default(),
            retired: Vec::new(),
            policy: config.fsync,
            log_end: start,
            checkpoint: start,
            durable: start,
            last_checkpoint: Instant::now(),
            checkpoint_every: config.checkpoint_interval,
            apply_early: config.storage.index_ahead_of_log,
        };
        let on_panic = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tidings-store".into())
            .spawn(move || {
                // A bug on this thread (in the store, a commit listener or a read's
                // callback) must not leave every confirm waiting for ever: the store
                // fails and stops, so what waits gets an error and what comes is
                // refused, as after a failed sync.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| syncer.run()));
                if ran.is_err() {
                    let err = StoreError("the store thread panicked (a bug: see the log)".into());
                    on_panic.fail(&err);
                    on_panic.stop(&err);
                }
            })
            .map_err(|e| io_err("spawning the store thread", e))?;
        Ok(Opened {
            store: Store {
                shared,
                thread: Mutex::new(Some(thread)),
                index: Mutex::new(Some(index)),
                files,
            },
            queues,
            next_qid,
        })
    }
}

fn repair_marks(index: &dyn Index) -> Result<Vec<Damage>, StoreError> {
    let Some(v) = index.get(Tree::Defs, REPAIR_KEY)? else {
        return Ok(Vec::new());
    };
    Ok(v.chunks_exact(16)
        .filter_map(Position::decode)
        .map(|p| Damage {
            path: Default::default(),
            segment: p.segment,
            offset: p.offset,
        })
        .collect())
}

fn save_repair_marks(index: &dyn Index, damages: &[Damage]) -> Result<(), StoreError> {
    let mut v = Vec::with_capacity(damages.len() * 16);
    for d in damages {
        v.extend_from_slice(
            &Position {
                segment: d.segment,
                offset: d.offset,
            }
            .encode(),
        );
    }
    index.insert(Tree::Defs, REPAIR_KEY, &v)
}

/// After a cut: removes every chunk entry that points into a cut range (or into a
/// segment that is gone), then recounts every queue and every segment from what the
/// index holds. Returns the live messages of the chunks removed.
fn repair_index(index: &dyn Index, files: &Files, damages: &[Damage]) -> Result<u64, StoreError> {
    let mut chunks = Vec::new();
    index.range(Tree::Data, &[0, 0, 0, 1], &[0xff; 5], &mut |k, v| {
        if k.get(4) == Some(&TAG_CHUNK) && k.len() == 13 {
            chunks.push((k.to_vec(), v.to_vec()));
        }
        true
    })?;
    let mut dropped = 0u64;
    let mut live: HashMap<u64, u64> = HashMap::new();
    for (key, value) in chunks {
        let qid = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
        let first = u64::from_be_bytes(key[5..13].try_into().unwrap_or_default());
        let Some((state, loc)) = stored_chunk_state(index, qid, first, Some(&value))? else {
            continue;
        };
        let cut = damages
            .iter()
            .any(|d| d.segment == loc.segment && loc.offset >= d.offset);
        let readable = matches!(files.read(&loc), Ok(Some(_)));
        if cut || !readable {
            index.remove(Tree::Data, &key)?;
            index.remove(Tree::Data, &seq_key(qid, TAG_REMOVED, first))?;
            dropped += u64::from(state.live);
        } else {
            *live.entry(loc.segment).or_default() += 1;
        }
    }
    for (segment, _) in stored_segments(index)? {
        index.remove(Tree::Data, &segment_key(segment))?;
    }
    for (segment, n) in live {
        index.insert(Tree::Data, &segment_key(segment), &n.to_be_bytes())?;
    }
    // Every queue's counters, from what is left.
    let mut qids = Vec::new();
    index.range(Tree::Data, &[0, 0, 0, 1], &[0xff; 5], &mut |k, _| {
        if k.get(4) == Some(&TAG_COUNTERS) && k.len() == 5 {
            qids.push(u32::from_be_bytes([k[0], k[1], k[2], k[3]]));
        }
        true
    })?;
    for qid in qids {
        let key = prefix(qid, TAG_COUNTERS);
        let mut c = index
            .get(Tree::Data, &key)?
            .and_then(|v| Counters::decode(&v))
            .unwrap_or_default();
        let ready = scan(
            index,
            files,
            Range::Messages { qid, from: 0 },
            usize::MAX,
            usize::MAX,
        )?;
        let delayed = scan(
            index,
            files,
            Range::Delayed { qid, from: (0, 0) },
            usize::MAX,
            usize::MAX,
        )?;
        c.m_count = ready.len() as u64;
        c.m_bytes = ready.iter().map(|l| l.message.size()).sum();
        c.d_count = delayed.len() as u64;
        c.d_bytes = delayed.iter().map(|l| l.message.size()).sum();
        index.insert(Tree::Data, &key, &c.encode())?;
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::store::{CommitListener, Ticket};
    use super::*;

    struct Panics;

    impl CommitListener for Panics {
        fn committed(&self, _epoch: u64, _result: &Result<(), StoreError>) {
            panic!("a listener's bug (this test's)");
        }
    }

    /// A panic on the store thread fails the store: a publish afterwards is refused
    /// or its confirm fails, and nothing waits for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_on_the_store_thread_fails_the_store_instead_of_hanging_it() {
        let mut config = EngineConfig::new("/sim/panic");
        config.storage = StorageBackend::simulated(SimDisk::new(), MemoryIndex::new());
        let opened = tokio::task::block_in_place(|| Store::open(&config)).unwrap();
        let store = opened.store;
        let mut last = 0;
        let first = store.batch(|b| {
            b.listen(Arc::new(Panics), &mut last);
            b.ticket()
        });
        // Confirms go out before the listeners run, so this one is answered.
        first.wait().await.unwrap();
        let next: Result<Ticket, QueueError> = store.batch(|b| match b.refusal() {
            Some(refused) => Err(refused),
            None => Ok(b.ticket()),
        });
        let outcome = match next {
            Err(refused) => Err(refused),
            // Queued before the thread stopped: failed when it stopped.
            Ok(ticket) => tokio::time::timeout(Duration::from_secs(30), ticket.wait())
                .await
                .expect("a confirm after the panic waited for ever"),
        };
        assert!(
            matches!(
                &outcome,
                Err(QueueError::Storage(_) | QueueError::ShuttingDown)
            ),
            "{outcome:?}"
        );
        let refused = store.batch(|b| b.refusal());
        assert!(
            matches!(&refused, Some(QueueError::Storage(msg)) if msg.contains("panicked")),
            "{refused:?}"
        );
        tokio::task::block_in_place(|| store.shutdown());
    }
}
