//! `OverlayIndex`: the index writes of the rounds since the last checkpoint, kept in
//! memory in front of the index proper (sled), and written to it only at the next
//! checkpoint (or once there are too many of them).
//!
//! Why: most index writes are short-lived. A chunk of messages that consumers ack
//! within a second is inserted, gets its removal bitmap written a few times, and is
//! removed again, all between two checkpoints; its segment's live count goes up and
//! down; the queue's counters are rewritten every round. Written through to sled, each
//! of those is a sled operation of a few microseconds on the store thread, the thread
//! every confirm and delivery waits behind. Kept here, each is a `BTreeMap` update,
//! and the checkpoint writes only what is left: the last value of each key, and no
//! trace at all of a chunk that came and went.
//!
//! That last part needs to know that the index proper never had the key: a removal
//! of a key it may hold must be kept and written, or the old value would come back.
//! A chunk's keys are new (under `--fsync always`, its first seq has never been
//! used for a write the index could hold), and the store says so
//! ([`Index::insert_new`]); the overlay then marks the entry,
//! and a removal before the next flush simply forgets it. Without the mark, every
//! chunk acked within the second left two removals to hold and then write, which at
//! one message per chunk (1,000 queues, each round giving each queue about one)
//! filled the overlay to its limit and made every insert a walk of a big tree.
//!
//! Durability is unchanged. The index is only ever durable at checkpoints, and
//! between them may hold any prefix of its writes (sled writes back on its own);
//! holding back more of them is one more such state, and a replay of the log from
//! the last durable checkpoint re-applies every write since (replay.rs). Writes
//! reach the overlay only from durable rounds, as before (syncer.rs), so the index
//! proper can still never be ahead of the log.
//!
//! Reads see the overlay over the index proper: a key's overlay entry (a value, or
//! a removal) wins. A flush takes a write gate that every range read holds for
//! reading, so a range never misses a key that moves from the overlay to the index
//! proper under it. Callbacks of [`Index::range`] must not write to the index.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use super::StoreError;
use super::index::{Index, Tree};

/// Overlay entries (keys written since the last flush) at which the overlay is
/// written to the index proper before the next checkpoint: bounds its memory (about
/// 150 bytes an entry) whatever the checkpoint interval.
pub(crate) const DEFAULT_OVERLAY_LIMIT: usize = 100_000;

/// A key's state in the overlay.
struct Entry {
    /// Its new value, or `None` when removed.
    value: Option<Vec<u8>>,
    /// The index proper holds no value for the key (it came in through
    /// [`Index::insert_new`] and no flush has written it since): a removal then
    /// forgets the entry instead of keeping a removal to write at the next flush.
    base_absent: bool,
}

/// The overlay's entries by full key ([`full_key`]), and a buffer to build the full
/// key of a lookup in: a put or get of a key already held then allocates nothing
/// (with a `(Tree, Vec<u8>)` key every lookup copied its key, and every update
/// its value: at 1,000 queues, where every round rewrites hundreds of counters, a
/// put cost ~1,800 instructions).
#[derive(Default)]
struct Entries {
    map: BTreeMap<Vec<u8>, Entry>,
    scratch: Vec<u8>,
}

/// Puts `key` of `tree` into `scratch` as the map holds it.
fn fill(scratch: &mut Vec<u8>, tree: Tree, key: &[u8]) {
    scratch.clear();
    scratch.push(tree_tag(tree));
    scratch.extend_from_slice(key);
}

/// A tree's first byte in a full key: the map orders by tree, then by key.
fn tree_tag(tree: Tree) -> u8 {
    match tree {
        Tree::Data => 0,
        Tree::Defs => 1,
    }
}

/// `key` of `tree` as the map holds it.
fn full_key(tree: Tree, key: &[u8]) -> Vec<u8> {
    let mut full = Vec::with_capacity(key.len() + 1);
    full.push(tree_tag(tree));
    full.extend_from_slice(key);
    full
}

/// The tree and key of a full key. Every key the map holds starts with a tag
/// from [`tree_tag`] (a new tree gets its tag there, and its arm here).
fn split_key(full: &[u8]) -> (Tree, &[u8]) {
    match full.split_first() {
        Some((0, key)) => (Tree::Data, key),
        Some((_, key)) => (Tree::Defs, key),
        None => (Tree::Data, full),
    }
}

/// The greatest key below `key` that any of our keys can be, as an inclusive bound:
/// the key with its last byte one lower and then as high as any longer key goes,
/// or the key without its last byte when that byte is 0.
fn below(key: &[u8]) -> Option<Vec<u8>> {
    let (&last, head) = key.split_last()?;
    let mut out = head.to_vec();
    if last > 0 {
        out.push(last - 1);
        out.extend_from_slice(&[0xff; 512]);
    }
    Some(out)
}

/// See the module docs.
pub(crate) struct OverlayIndex {
    base: Arc<dyn Index>,
    entries: Mutex<Entries>,
    /// Held for reading by range reads, for writing by a flush.
    gate: RwLock<()>,
    limit: usize,
}

impl OverlayIndex {
    /// An overlay in front of `base`, written to it at every checkpoint and once it
    /// holds more than `limit` keys (0: at every write).
    pub fn new(base: Arc<dyn Index>, limit: usize) -> Self {
        Self {
            base,
            entries: Mutex::new(Entries::default()),
            gate: RwLock::new(()),
            limit,
        }
    }

    fn entries(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keys written since the last flush.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.entries().map.len()
    }

    /// Records `value` (`None`: a removal) for `key`. `new`: the caller knows the
    /// index holds no value for `key` ([`Index::insert_new`]).
    fn put(
        &self,
        tree: Tree,
        key: &[u8],
        value: Option<&[u8]>,
        new: bool,
    ) -> Result<(), StoreError> {
        let full = {
            let mut entries = self.entries();
            let Entries { map, scratch } = &mut *entries;
            fill(scratch, tree, key);
            match (map.get_mut(scratch.as_slice()), value) {
                // Neither the index proper nor the overlay has it any more: nothing
                // to remember, nothing for the next flush to write.
                (Some(entry), None) if entry.base_absent => {
                    map.remove(scratch.as_slice());
                }
                // Whether the index proper has the key does not change. A value
                // rewritten reuses its buffer.
                (Some(entry), Some(value)) => match &mut entry.value {
                    Some(held) => {
                        held.clear();
                        held.extend_from_slice(value);
                    }
                    none => *none = Some(value.to_vec()),
                },
                (Some(entry), None) => entry.value = None,
                (None, value) => {
                    let entry = Entry {
                        value: value.map(<[u8]>::to_vec),
                        base_absent: new,
                    };
                    map.insert(scratch.clone(), entry);
                }
            }
            map.len() > self.limit
        };
        if full { self.flush() } else { Ok(()) }
    }

    /// Writes every overlay entry to the index proper, in key order, and forgets
    /// them. On an error the entries not yet written stay, so reads stay right; the
    /// store stops on it anyway (fail-stop).
    fn flush(&self) -> Result<(), StoreError> {
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut entries = self.entries();
        while let Some((full, entry)) = entries.map.pop_first() {
            let (tree, key) = split_key(&full);
            let written = match &entry.value {
                Some(v) => self.base.insert(tree, key, v),
                None => self.base.remove(tree, key),
            };
            if let Err(err) = written {
                entries.map.insert(full, entry);
                return Err(err);
            }
        }
        Ok(())
    }

    /// The first overlay entry of `tree` in `(after, end)` (or `[start, end)`),
    /// cloned so that no lock is held while a callback runs.
    fn next_entry(
        &self,
        tree: Tree,
        from: Bound<&[u8]>,
        end: &[u8],
    ) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
        let lower = match from {
            Bound::Included(k) => Bound::Included(full_key(tree, k)),
            Bound::Excluded(k) => Bound::Excluded(full_key(tree, k)),
            Bound::Unbounded => Bound::Included(full_key(tree, &[])),
        };
        let upper = Bound::Excluded(full_key(tree, end));
        self.entries()
            .map
            .range((lower, upper))
            .next()
            .map(|(k, e)| (split_key(k).1.to_vec(), e.value.clone()))
    }
}

impl Index for OverlayIndex {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        {
            let mut entries = self.entries();
            let Entries { map, scratch } = &mut *entries;
            fill(scratch, tree, key);
            if let Some(entry) = map.get(scratch.as_slice()) {
                return Ok(entry.value.clone());
            }
        }
        self.base.get(tree, key)
    }

    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.put(tree, key, Some(value), false)
    }

    fn insert_new(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.put(tree, key, Some(value), true)
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> Result<(), StoreError> {
        self.put(tree, key, None, false)
    }

    fn range(
        &self,
        tree: Tree,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let _gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        // The next overlay entry not yet merged, and whether `f` asked to stop.
        let mut next = self.next_entry(tree, Bound::Included(start), end);
        let mut stopped = false;
        self.base.range(tree, start, end, &mut |key, value| {
            // Overlay keys below this one first.
            while let Some((k, v)) = next.take_if(|(k, _)| k.as_slice() < key) {
                next = self.next_entry(tree, Bound::Excluded(&k), end);
                if let Some(v) = v {
                    if !f(&k, &v) {
                        stopped = true;
                        return false;
                    }
                }
            }
            // The overlay's entry for this very key replaces it (or removes it).
            if let Some((k, v)) = next.take_if(|(k, _)| k.as_slice() == key) {
                next = self.next_entry(tree, Bound::Excluded(&k), end);
                return match v {
                    Some(v) if !f(&k, &v) => {
                        stopped = true;
                        false
                    }
                    _ => true,
                };
            }
            if f(key, value) {
                true
            } else {
                stopped = true;
                false
            }
        })?;
        // Overlay keys past the last one the index proper has.
        while !stopped {
            let Some((k, v)) = next.take() else {
                break;
            };
            next = self.next_entry(tree, Bound::Excluded(&k), end);
            if let Some(v) = v {
                stopped = !f(&k, &v);
            }
        }
        Ok(())
    }

    fn last_in(&self, tree: Tree, low: &[u8], high: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let _gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        let mut high = high.to_vec();
        loop {
            if high.as_slice() < low {
                return Ok(None);
            }
            let base = self.base.last_in(tree, low, &high)?;
            let over = self
                .entries()
                .map
                .range((
                    Bound::Included(full_key(tree, low)),
                    Bound::Included(full_key(tree, &high)),
                ))
                .next_back()
                .map(|(k, e)| (split_key(k).1.to_vec(), e.value.is_some()));
            match (base, over) {
                (None, None) => return Ok(None),
                (Some(b), Some((o, _))) if b > o => return Ok(Some(b)),
                (Some(b), None) => return Ok(Some(b)),
                (_, Some((o, true))) => return Ok(Some(o)),
                // Removed in the overlay: look below it.
                (_, Some((o, false))) => match below(&o) {
                    Some(b) => high = b,
                    None => return Ok(None),
                },
            }
        }
    }

    fn is_empty(&self, tree: Tree) -> Result<bool, StoreError> {
        let mut any = false;
        self.range(tree, &[], &[0xff; 64], &mut |_, _| {
            any = true;
            false
        })?;
        Ok(!any)
    }

    fn checkpoint(&self) -> Result<(), StoreError> {
        self.flush()?;
        self.base.checkpoint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryIndex;
    use crate::storage::SimRng;

    fn all(index: &dyn Index, tree: Tree) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        index
            .range(tree, &[], &[0xff; 8], &mut |k, v| {
                out.push((k.to_vec(), v.to_vec()));
                true
            })
            .unwrap();
        out
    }

    /// The overlay reads exactly like the index it stands for, whatever mix of
    /// writes, flushes and reads: checked against a plain in-memory index fed the
    /// same writes, over seeded random operations on a small key space.
    #[test]
    fn reads_like_the_index_it_stands_for() {
        for seed in 0..200u64 {
            let mut rng = SimRng::new(seed);
            let base = Arc::new(MemoryIndex::new());
            let limit = [0usize, 3, 1000][usize::try_from(seed % 3).unwrap()];
            let overlay = OverlayIndex::new(base.clone(), limit);
            let reference = MemoryIndex::new();
            let key = |rng: &mut SimRng| vec![1u8, u8::try_from(rng.below(12)).unwrap()];
            for step in 0..200 {
                let tree = if rng.below(4) == 0 {
                    Tree::Defs
                } else {
                    Tree::Data
                };
                match rng.below(6) {
                    0 | 1 => {
                        let (k, v) = (key(&mut rng), vec![u8::try_from(step % 251).unwrap()]);
                        // A new key (none in the index), as the store marks a chunk's.
                        if rng.below(2) == 0 && reference.get(tree, &k).unwrap().is_none() {
                            overlay.insert_new(tree, &k, &v).unwrap();
                        } else {
                            overlay.insert(tree, &k, &v).unwrap();
                        }
                        reference.insert(tree, &k, &v).unwrap();
                    }
                    2 => {
                        let k = key(&mut rng);
                        overlay.remove(tree, &k).unwrap();
                        reference.remove(tree, &k).unwrap();
                    }
                    3 => overlay.checkpoint().unwrap(),
                    4 => {
                        let k = key(&mut rng);
                        assert_eq!(
                            overlay.get(tree, &k).unwrap(),
                            reference.get(tree, &k).unwrap(),
                            "seed {seed} step {step}: get"
                        );
                        let low = [1u8, 0];
                        assert_eq!(
                            overlay.last_in(tree, &low, &k).unwrap(),
                            reference.last_in(tree, &low, &k).unwrap(),
                            "seed {seed} step {step}: last_in"
                        );
                    }
                    _ => {
                        assert_eq!(
                            all(&overlay, tree),
                            all(&reference, tree),
                            "seed {seed} step {step}: range"
                        );
                        assert_eq!(
                            overlay.is_empty(tree).unwrap(),
                            reference.is_empty(tree).unwrap()
                        );
                    }
                }
            }
        }
    }

    /// A key that came in new and is removed before a flush leaves no trace: no
    /// entry held, nothing written to the index proper. Any other removal is held
    /// until the flush, which removes the key from the index proper.
    #[test]
    fn a_new_key_removed_before_a_flush_leaves_nothing() {
        let base = Arc::new(MemoryIndex::new());
        base.insert(Tree::Data, b"old", b"0").unwrap();
        let overlay = OverlayIndex::new(base.clone(), 100);
        overlay.insert_new(Tree::Data, b"new", b"1").unwrap();
        overlay.insert(Tree::Data, b"new", b"2").unwrap();
        overlay.insert(Tree::Data, b"plain", b"1").unwrap();
        overlay.remove(Tree::Data, b"old").unwrap();
        assert_eq!(overlay.held(), 3);
        overlay.remove(Tree::Data, b"new").unwrap();
        assert_eq!(overlay.held(), 2, "the new key is forgotten");
        overlay.remove(Tree::Data, b"plain").unwrap();
        assert_eq!(
            overlay.held(),
            2,
            "a key that may be in the index is held removed"
        );
        assert_eq!(overlay.get(Tree::Data, b"new").unwrap(), None);
        overlay.checkpoint().unwrap();
        assert!(
            base.is_empty(Tree::Data).unwrap(),
            "{:?}",
            all(&*base, Tree::Data)
        );

        // Once flushed, a new key is in the index proper: its removal is held and
        // then written.
        overlay.insert_new(Tree::Data, b"flushed", b"1").unwrap();
        overlay.checkpoint().unwrap();
        overlay.remove(Tree::Data, b"flushed").unwrap();
        assert_eq!(overlay.held(), 1);
        assert_eq!(
            base.get(Tree::Data, b"flushed").unwrap(),
            Some(b"1".to_vec())
        );
        overlay.checkpoint().unwrap();
        assert!(base.is_empty(Tree::Data).unwrap());

        // Set new over a removal still held: the index proper may have the key, so
        // removing it again is held too (not forgotten, which would bring it back).
        base.insert(Tree::Data, b"again", b"0").unwrap();
        overlay.remove(Tree::Data, b"again").unwrap();
        overlay.insert_new(Tree::Data, b"again", b"1").unwrap();
        overlay.remove(Tree::Data, b"again").unwrap();
        assert_eq!(overlay.get(Tree::Data, b"again").unwrap(), None);
        overlay.checkpoint().unwrap();
        assert_eq!(base.get(Tree::Data, b"again").unwrap(), None);
    }

    /// A range whose callback stops early stops, whichever side the keys are on.
    #[test]
    fn a_range_stops_when_told() {
        let base = Arc::new(MemoryIndex::new());
        base.insert(Tree::Data, b"a", b"1").unwrap();
        base.insert(Tree::Data, b"c", b"3").unwrap();
        let overlay = OverlayIndex::new(base, 100);
        overlay.insert(Tree::Data, b"b", b"2").unwrap();
        overlay.insert(Tree::Data, b"d", b"4").unwrap();
        for n in 1..=4 {
            let mut seen = Vec::new();
            overlay
                .range(Tree::Data, b"", b"z", &mut |k, _| {
                    seen.push(k.to_vec());
                    seen.len() < n
                })
                .unwrap();
            assert_eq!(seen.len(), n);
        }
    }

    /// Writes stay in memory until a checkpoint, which leaves only the last state
    /// of each key in the index proper (a key written and removed leaves nothing
    /// there, though its removal is held until then unless it came in new).
    #[test]
    fn a_checkpoint_writes_only_what_is_left() {
        let base = Arc::new(MemoryIndex::new());
        let overlay = OverlayIndex::new(base.clone(), 100);
        overlay.insert(Tree::Data, b"gone", b"x").unwrap();
        overlay.insert(Tree::Data, b"kept", b"1").unwrap();
        overlay.insert(Tree::Data, b"kept", b"2").unwrap();
        overlay.remove(Tree::Data, b"gone").unwrap();
        assert_eq!(overlay.held(), 2);
        assert!(base.is_empty(Tree::Data).unwrap());
        overlay.checkpoint().unwrap();
        assert_eq!(overlay.held(), 0);
        assert_eq!(all(&*base, Tree::Data), [(b"kept".to_vec(), b"2".to_vec())]);
    }
}
