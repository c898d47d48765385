//! `PagedWindow`: the part of a queue's stored messages kept in memory, in key
//! order, bounded in count and bytes, with the rest left in the store and paged in
//! when consumers get to it. One type serves the ready messages (key `(0, seq)`)
//! and the delayed ones (key `(due_ms, seq)`).
//!
//! Invariant: every stored message with a key below `upto` is in `entries` or
//! accounted for elsewhere (in flight, waiting to be retried, moving out); stored
//! messages at or above `upto` may be in the store only, and `unloaded` counts
//! them. `upto == None` means everything is in memory.

use std::collections::BTreeMap;

use crate::queue::record::Message;
use crate::storage::{Loaded, Slot};

/// A message of the window, with where it is stored.
pub(crate) struct Entry {
    pub slot: Slot,
    pub msg: Message,
}

/// Key of a window entry: `(0, seq)` for ready messages, `(due_ms, seq)` for
/// delayed ones.
pub(crate) type Key = (u64, u64);

pub(crate) struct PagedWindow {
    entries: BTreeMap<Key, Entry>,
    bytes: u64,
    upto: Option<Key>,
    unloaded: u64,
    /// A page read is on its way.
    pub paging: bool,
    max_count: usize,
    max_bytes: u64,
}

impl PagedWindow {
    pub fn new(max_count: usize, max_bytes: u64) -> Self {
        Self {
            entries: BTreeMap::new(),
            bytes: 0,
            upto: None,
            unloaded: 0,
            paging: false,
            max_count: max_count.max(1),
            max_bytes: max_bytes.max(1),
        }
    }

    /// Stored messages counted but not in memory (as of the last restart, a page
    /// read or an eviction).
    pub fn unloaded(&self) -> u64 {
        self.unloaded
    }

    /// Counts `n` stored messages that start out in the store only (at start).
    pub fn start_unloaded(&mut self, n: u64) {
        self.unloaded = n;
        if n > 0 {
            self.upto = Some((0, 0));
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn first_key(&self) -> Option<Key> {
        self.entries.first_key_value().map(|(k, _)| *k)
    }

    pub fn last_key(&self) -> Option<Key> {
        self.entries.last_key_value().map(|(k, _)| *k)
    }

    pub fn first(&self) -> Option<&Entry> {
        self.entries.first_key_value().map(|(_, e)| e)
    }

    pub fn pop_first(&mut self) -> Option<(Key, Entry)> {
        let (k, e) = self.entries.pop_first()?;
        self.bytes -= e.msg.size();
        Some((k, e))
    }

    /// Takes the entry under `key` out, if it is in memory.
    pub fn remove(&mut self, key: Key) -> Option<Entry> {
        let e = self.entries.remove(&key)?;
        self.bytes -= e.msg.size();
        Some(e)
    }

    /// Whether a stored message with this key may be in the store only.
    pub fn beyond(&self, key: Key) -> bool {
        self.upto.is_some_and(|u| key >= u)
    }

    /// A stored-only message was taken out without being paged in (a redrive or a
    /// drop claimed it from the store).
    pub fn forget_unloaded(&mut self) {
        self.unloaded = self.unloaded.saturating_sub(1);
    }

    /// Adds a newly stored (committed) message: kept in memory if it sorts before
    /// what is left in the store and the bounds allow, else left in the store.
    pub fn add(&mut self, key: Key, entry: Entry) {
        if self.beyond(key) {
            self.unloaded += 1;
            return;
        }
        self.bytes += entry.msg.size();
        self.entries.insert(key, entry);
        self.evict();
    }

    /// Keeps the bounds by leaving the last entries to the store.
    fn evict(&mut self) {
        while self.entries.len() > self.max_count
            || (self.bytes > self.max_bytes && self.entries.len() > 1)
        {
            let Some((key, e)) = self.entries.pop_last() else {
                break;
            };
            self.bytes -= e.msg.size();
            self.upto = Some(key);
            self.unloaded += 1;
        }
    }

    /// Whether a page read should start: the window is low and the store holds more.
    pub fn wants_page(&self) -> bool {
        !self.paging && self.unloaded > 0 && self.entries.len() < self.max_count / 2 + 1
    }

    /// Where the next page read starts, and how many messages and bytes it may bring.
    pub fn page_request(&self) -> (Key, usize, usize) {
        let from = self.upto.unwrap_or((0, 0));
        let count = self.max_count.saturating_sub(self.entries.len()).max(1);
        let bytes =
            usize::try_from(self.max_bytes.saturating_sub(self.bytes).max(1)).unwrap_or(usize::MAX);
        (from, count, bytes)
    }

    /// Whether a page read that started at `from` is still the one wanted.
    pub fn expects(&self, from: Key) -> bool {
        self.upto == Some(from)
    }

    /// Takes a page read from `from`: keeps the messages `keep` accepts (committed,
    /// not taken out meanwhile) and moves `upto` past everything the page covered.
    /// `fix` adjusts each message kept. Returns how many were kept.
    pub fn take_page(
        &mut self,
        from: Key,
        page: Vec<Loaded>,
        requested: usize,
        mut keep: impl FnMut(&Loaded) -> PageVerdict,
        mut fix: impl FnMut(Key, &mut Message),
    ) -> usize {
        if !self.expects(from) {
            return 0;
        }
        let full = page.len() >= requested;
        let mut kept = 0;
        let mut last = None;
        for loaded in page {
            if loaded.key < from {
                continue;
            }
            match keep(&loaded) {
                PageVerdict::Stop => {
                    break;
                }
                PageVerdict::Skip => {
                    last = Some(loaded.key);
                    continue;
                }
                PageVerdict::Keep => {}
            }
            last = Some(loaded.key);
            let slot = loaded.slot();
            let mut msg = loaded.message;
            fix(loaded.key, &mut msg);
            self.bytes += msg.size();
            self.entries.insert(loaded.key, Entry { slot, msg });
            self.unloaded = self.unloaded.saturating_sub(1);
            kept += 1;
        }
        match last {
            Some((a, b)) if full || self.unloaded > 0 => {
                self.upto = Some((a, b.saturating_add(1)));
            }
            // The page held all there was.
            _ => {
                self.upto = None;
                self.unloaded = 0;
            }
        }
        self.evict();
        kept
    }

    /// Where the next page read would start (`None`: everything is in memory).
    pub fn read_start(&self) -> Option<Key> {
        self.upto
    }

    /// The store held fewer messages than counted: stop expecting them.
    pub fn give_up_unloaded(&mut self) {
        self.unloaded = 0;
        self.upto = None;
    }

    /// Entries in key order, for a scan that takes some out (redrive, drop).
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.entries.keys()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
        self.upto = None;
        self.unloaded = 0;
    }
}

/// What [`PagedWindow::take_page`] does with one message of a page.
pub(crate) enum PageVerdict {
    Keep,
    /// Already accounted for elsewhere; pass over it.
    Skip,
    /// Not committed here yet: this and everything after it stays unloaded.
    Stop,
}
