//! The index seam, and the only file that imports sled.
//!
//! The index maps keys to small values in two trees (keys.rs has the layout). It is
//! written only with rounds whose log records are already durable (syncer.rs), and
//! made durable itself only at checkpoints ([`Index::checkpoint`]). Between
//! checkpoints it may write back any prefix of its writes on its own, as sled does;
//! a replay of the log from the last checkpoint brings every such state to the same
//! one (replay.rs).
//!
//! Two implementations: [`SledIndex`] on disk, and [`MemoryIndex`] for the
//! simulation, which at a power loss keeps its last checkpoint plus a random prefix
//! of the writes applied since.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::StoreError;
use super::sim_disk::SimRng;

/// How long opening waits for another store in this process to release sled's files.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// One of the index's two trees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tree {
    /// Every queue's messages, counters and dedup ids, by queue id.
    Data,
    /// Queue definitions and the store's own keys (layout, checkpoint, next id).
    Defs,
}

/// What the store needs from its index. Iteration hands out borrowed bytes to a
/// callback that returns false to stop.
pub trait Index: Send + Sync {
    /// The value of `key`.
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Sets `key` to `value`.
    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    /// Sets `key`, which the caller knows this index holds no value for (a chunk's
    /// keys, under `--fsync always` in a data dir that never ran without it: a seq
    /// is then never used again once a write of it can be in the index). An index holding
    /// writes in front of another (overlay.rs) may then forget a later removal of
    /// the key instead of keeping it for its next flush; the others just insert.
    /// Only for writes of durable rounds: after a crash the index may hold writes
    /// that replay is about to repeat, so replay inserts.
    fn insert_new(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.insert(tree, key, value)
    }
    /// Removes `key` (no error if absent).
    fn remove(&self, tree: Tree, key: &[u8]) -> Result<(), StoreError>;
    /// Every entry with `start <= key < end`, ascending, until `f` returns false.
    fn range(
        &self,
        tree: Tree,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError>;
    /// The greatest key with `low <= key <= high`.
    fn last_in(&self, tree: Tree, low: &[u8], high: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Whether the tree has no entry.
    fn is_empty(&self, tree: Tree) -> Result<bool, StoreError>;
    /// Makes every write so far durable (a real sync, never sled's `sync_file_range`).
    fn checkpoint(&self) -> Result<(), StoreError>;
}

// ------------------------------------------------------------------------- sled

/// The index on disk: sled 0.34 in the data dir.
pub struct SledIndex {
    db: sled::Db,
    data: sled::Tree,
    defs: sled::Tree,
    files: Mutex<FileSyncer>,
}

impl SledIndex {
    /// Opens (or creates) sled in `dir`, with a page cache of `cache_bytes`.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        // Checkpoints flush sled (and fdatasync it); its own timer would only add
        // writes and sync_file_range calls that promise nothing.
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None);
        let db = open_sled(&config)
            .map_err(|e| StoreError::io(&format!("opening sled at {}", dir.display()), e))?;
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| StoreError::io("opening tree", e))
        };
        let (data, defs) = (tree("messages")?, tree("queues")?);
        let files = FileSyncer::new(dir)
            .map_err(|e| StoreError::io(&format!("opening {}", dir.join("db").display()), e))?;
        Ok(Self {
            db,
            data,
            defs,
            files: Mutex::new(files),
        })
    }

    fn tree(&self, tree: Tree) -> &sled::Tree {
        match tree {
            Tree::Data => &self.data,
            Tree::Defs => &self.defs,
        }
    }
}

fn read_err(e: sled::Error) -> StoreError {
    StoreError::io("reading the index", e)
}

fn write_err(e: sled::Error) -> StoreError {
    StoreError::io("writing the index", e)
}

impl Index for SledIndex {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree(tree)
            .get(key)
            .map_err(read_err)?
            .map(|v| v.to_vec()))
    }

    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.tree(tree).insert(key, value).map_err(write_err)?;
        Ok(())
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> Result<(), StoreError> {
        self.tree(tree).remove(key).map_err(write_err)?;
        Ok(())
    }

    fn range(
        &self,
        tree: Tree,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        for item in self.tree(tree).range(start..end) {
            let (k, v) = item.map_err(read_err)?;
            if !f(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn last_in(&self, tree: Tree, low: &[u8], high: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.tree(tree).range(low..=high).next_back() {
            Some(item) => Ok(Some(item.map_err(read_err)?.0.to_vec())),
            None => Ok(None),
        }
    }

    fn is_empty(&self, tree: Tree) -> Result<bool, StoreError> {
        Ok(self.tree(tree).is_empty())
    }

    fn checkpoint(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map_err(|e| StoreError::io("flushing the index", e))?;
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .sync()
            .map_err(|e| StoreError::io("fdatasync of the index", e))
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
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// Syncs the files sled writes, since sled itself only calls `sync_file_range`
/// (sled issues #1351 and #1452), and never syncs its `blobs/` files (values of about
/// 16 KiB and up) or `snap.*` snapshots.
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
        let named = |path: &Path, e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
        };
        self.db_file
            .sync_data()
            .map_err(|e| named(&self.dir.join("db"), e))?;
        let mut seen = HashSet::with_capacity(self.synced.len());
        let mut new_files = false;
        let blobs = self.dir.join("blobs");
        for dir in [&self.dir, &blobs] {
            let entries = match std::fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(named(dir, err)),
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
                        Ok(f) => f.sync_data().map_err(|e| named(&path, e))?,
                        // sled removes old snapshots and blobs as it goes.
                        Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(err) => return Err(named(&path, err)),
                    }
                    new_files = true;
                }
                seen.insert(path);
            }
        }
        self.synced = seen;
        if new_files {
            File::open(&self.dir)?
                .sync_all()
                .map_err(|e| named(&self.dir, e))?;
            if blobs.exists() {
                File::open(&blobs)?
                    .sync_all()
                    .map_err(|e| named(&blobs, e))?;
            }
        }
        Ok(())
    }
}

// ----------------------------------------------------------------------- memory

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Default)]
struct MemoryState {
    generation: u64,
    trees: [Map; 2],
    durable: [Map; 2],
    /// Writes since the last checkpoint, in order: `(tree, key, value or removal)`.
    since: Vec<(usize, Vec<u8>, Option<Vec<u8>>)>,
    /// Every key ever written or removed, for tests of what reaches the index.
    touched: std::collections::BTreeSet<(usize, Vec<u8>)>,
}

/// An index in memory for the simulation. Cheap to clone; clones share the index.
/// [`MemoryIndex::power_loss`] keeps the last checkpoint plus a random prefix of the
/// writes applied since, since sled may have written any such prefix back.
#[derive(Clone, Default)]
pub struct MemoryIndex {
    state: Arc<Mutex<MemoryState>>,
    generation: u64,
}

impl std::fmt::Debug for MemoryIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryIndex")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

fn slot(tree: Tree) -> usize {
    match tree {
        Tree::Data => 0,
        Tree::Defs => 1,
    }
}

impl MemoryIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, MemoryState>, StoreError> {
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.generation != self.generation {
            return Err(StoreError(
                "simulated power loss: the index is off for this run".into(),
            ));
        }
        Ok(st)
    }

    /// Cuts the power: what the last checkpoint made durable stays, plus a random
    /// prefix of the writes since. Handles taken before fail from now on.
    pub fn power_loss(&self, rng: &mut SimRng) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.generation += 1;
        let keep = usize::try_from(rng.below(st.since.len() as u64 + 1)).unwrap_or(usize::MAX);
        let mut trees = st.durable.clone();
        for (tree, key, value) in st.since.drain(..).take(keep) {
            match value {
                Some(v) => trees[tree].insert(key, v),
                None => trees[tree].remove(&key),
            };
        }
        st.durable = trees.clone();
        st.trees = trees;
    }

    /// Whether any write or removal of a key starting with `prefix` (in `tree`) has
    /// ever reached this index: for tests of what an overlay in front keeps back.
    pub fn ever_touched(&self, tree: Tree, prefix: &[u8]) -> bool {
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.touched
            .range((slot(tree), prefix.to_vec())..)
            .next()
            .is_some_and(|(t, k)| *t == slot(tree) && k.starts_with(prefix))
    }

    /// A handle for the next run, after a power loss.
    pub fn reboot(&self) -> MemoryIndex {
        let generation = self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .generation;
        MemoryIndex {
            state: self.state.clone(),
            generation,
        }
    }
}

impl Index for MemoryIndex {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock()?.trees[slot(tree)].get(key).cloned())
    }

    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut st = self.lock()?;
        st.trees[slot(tree)].insert(key.to_vec(), value.to_vec());
        st.since
            .push((slot(tree), key.to_vec(), Some(value.to_vec())));
        st.touched.insert((slot(tree), key.to_vec()));
        Ok(())
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> Result<(), StoreError> {
        let mut st = self.lock()?;
        st.trees[slot(tree)].remove(key);
        st.since.push((slot(tree), key.to_vec(), None));
        st.touched.insert((slot(tree), key.to_vec()));
        Ok(())
    }

    fn range(
        &self,
        tree: Tree,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        // Collected first: `f` may call back into the index.
        let items: Vec<(Vec<u8>, Vec<u8>)> = {
            let st = self.lock()?;
            st.trees[slot(tree)]
                .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        for (k, v) in items {
            if !f(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn last_in(&self, tree: Tree, low: &[u8], high: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let st = self.lock()?;
        Ok(st.trees[slot(tree)]
            .range::<[u8], _>((Bound::Included(low), Bound::Included(high)))
            .next_back()
            .map(|(k, _)| k.clone()))
    }

    fn is_empty(&self, tree: Tree) -> Result<bool, StoreError> {
        Ok(self.lock()?.trees[slot(tree)].is_empty())
    }

    fn checkpoint(&self) -> Result<(), StoreError> {
        let mut st = self.lock()?;
        st.durable = st.trees.clone();
        st.since.clear();
        Ok(())
    }
}
