//! A simulated disk for tests: the [`Disk`] seam in memory, with a power switch.
//!
//! Per file it keeps what is *durable* apart from what was *written* since the last
//! `fdatasync`, and per directory which names are durable apart from the names
//! created, renamed or removed since its last `fsync`. [`SimDisk::power_loss`] drops
//! every unsynced write and every name not yet made durable, optionally *tearing*
//! the newest write: a random prefix of its 512-byte sectors reaches the platter.
//! Errors can be injected on a chosen write or sync ([`SimDisk::fail_write`],
//! [`SimDisk::fail_sync`]); a failed `fdatasync` behaves like Linux: the pending data
//! is lost (reads still see it, from the page cache), the error is returned once,
//! and the next `fdatasync` of the file succeeds. [`SimDisk::set_noop_sync`] makes
//! `fdatasync` succeed without making anything durable, so a test can prove that its
//! checker notices.
//!
//! After a power loss every handle opened before it fails with EIO, as the machine
//! is off; [`SimDisk::reboot`] hands out a working handle on what survived.

// Simulated files live in memory and are small: offsets always fit in usize.
#![allow(clippy::cast_possible_truncation)]

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::disk::{Disk, DiskFile};

/// Bytes that reach the disk together, or not at all, when a write is torn.
pub const SECTOR: u64 = 512;

/// A small deterministic random number generator (SplitMix64), so that simulation
/// runs replay exactly from their seed without a dependency.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Which error an injected fault returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimError {
    /// `EIO`: the device failed.
    Io,
    /// `ENOSPC`: the file system is full.
    NoSpace,
}

impl SimError {
    fn error(self) -> io::Error {
        match self {
            SimError::Io => io::Error::from_raw_os_error(libc::EIO),
            SimError::NoSpace => io::Error::from_raw_os_error(libc::ENOSPC),
        }
    }
}

enum Change {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Default)]
struct Inode {
    /// What reads see.
    written: Vec<u8>,
    /// What survives a power loss.
    durable: Vec<u8>,
    /// Changes since the last sync, oldest first.
    pending: Vec<Change>,
}

fn apply(buf: &mut Vec<u8>, change: &Change) {
    match change {
        Change::Write { offset, data } => {
            let (start, end) = (*offset as usize, *offset as usize + data.len());
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[start..end].copy_from_slice(data);
        }
        Change::SetLen(len) => buf.resize(*len as usize, 0),
    }
}

#[derive(Default)]
struct State {
    generation: u64,
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    /// The newest pending write: its inode.
    newest: Option<u64>,
    writes: u64,
    syncs: u64,
    fail_writes: Vec<(u64, SimError)>,
    fail_syncs: Vec<(u64, SimError)>,
    /// The next directory fsync fails with this.
    fail_dir_sync: Option<SimError>,
    noop_sync: bool,
    failures: u64,
}

impl State {
    fn powered(&self, generation: u64) -> io::Result<()> {
        if generation == self.generation {
            Ok(())
        } else {
            Err(io::Error::other(
                "simulated power loss: the disk is off for this run",
            ))
        }
    }

    fn fault(list: &mut Vec<(u64, SimError)>, count: u64) -> Option<SimError> {
        let i = list.iter().position(|(n, _)| *n == count)?;
        Some(list.remove(i).1)
    }
}

/// The simulated disk. Cheap to clone; clones share the disk.
#[derive(Clone)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
    generation: u64,
}

impl Default for SimDisk {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDisk")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            generation: 0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Cuts the power: unsynced writes and names are gone, and the newest write is
    /// torn at a random sector boundary when `tear`. Handles taken before fail from
    /// now on.
    pub fn power_loss(&self, rng: &mut SimRng, tear: bool) {
        let mut st = self.lock();
        st.generation += 1;
        let newest = st.newest.take();
        for (id, inode) in st.inodes.iter_mut() {
            if tear && newest == Some(*id) {
                // The newest change is the last pending one of this file.
                if let Some(Change::Write { offset, data }) = inode.pending.pop() {
                    let end = offset + data.len() as u64;
                    let first_boundary = (offset / SECTOR + 1) * SECTOR;
                    let mut cuts = vec![offset];
                    let mut at = first_boundary;
                    while at < end {
                        cuts.push(at);
                        at += SECTOR;
                    }
                    cuts.push(end);
                    let cut = cuts[rng.below(cuts.len() as u64) as usize];
                    let keep = (cut - offset) as usize;
                    if keep > 0 {
                        apply(
                            &mut inode.durable,
                            &Change::Write {
                                offset,
                                data: data[..keep].to_vec(),
                            },
                        );
                    }
                }
            }
            inode.pending.clear();
            inode.written = inode.durable.clone();
        }
        st.names = st.durable_names.clone();
        let named: std::collections::HashSet<u64> = st.names.values().copied().collect();
        st.inodes.retain(|id, _| named.contains(id));
    }

    /// The process dies (`kill -9`) but the machine stays up: everything written
    /// stays, as the operating system holds it. Handles taken before fail from now on.
    pub fn process_crash(&self) {
        let mut st = self.lock();
        st.generation += 1;
        st.newest = None;
        for inode in st.inodes.values_mut() {
            inode.pending.clear();
            inode.durable = inode.written.clone();
        }
        st.durable_names = st.names.clone();
    }

    /// A handle for the next run, after a power loss or a crash.
    pub fn reboot(&self) -> SimDisk {
        let generation = self.lock().generation;
        SimDisk {
            state: self.state.clone(),
            generation,
        }
    }

    /// Makes the `n`-th write from now (0 = the next one) fail with `error`.
    pub fn fail_write(&self, n: u64, error: SimError) {
        let mut st = self.lock();
        let at = st.writes + n;
        st.fail_writes.push((at, error));
    }

    /// Makes the `n`-th sync (file or directory) from now fail with `error`.
    pub fn fail_sync(&self, n: u64, error: SimError) {
        let mut st = self.lock();
        let at = st.syncs + n;
        st.fail_syncs.push((at, error));
    }

    /// Makes the next `fsync` of a directory fail with `error` (so that a file just
    /// created stays without a durable name).
    pub fn fail_next_dir_sync(&self, error: SimError) {
        self.lock().fail_dir_sync = Some(error);
    }

    /// Drops the faults not yet hit.
    pub fn clear_faults(&self) {
        let mut st = self.lock();
        st.fail_writes.clear();
        st.fail_syncs.clear();
        st.fail_dir_sync = None;
    }

    /// How many injected faults were hit so far.
    pub fn faults_hit(&self) -> u64 {
        self.lock().failures
    }

    /// Makes every `fdatasync` succeed without making anything durable (a broken
    /// disk or a deleted sync call): a checker must then report loss.
    pub fn set_noop_sync(&self, noop: bool) {
        self.lock().noop_sync = noop;
    }

    /// The durable bytes of the file at `path`, if its name is durable.
    pub fn durable_bytes(&self, path: &Path) -> Option<Vec<u8>> {
        let st = self.lock();
        let id = st.durable_names.get(path)?;
        st.inodes.get(id).map(|i| i.durable.clone())
    }

    /// Overwrites durable and written bytes alike (for corruption tests).
    pub fn corrupt(&self, path: &Path, offset: u64, byte: u8) -> io::Result<()> {
        let mut st = self.lock();
        let id = *st
            .names
            .get(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let inode = st.inodes.get_mut(&id).expect("named inode");
        for buf in [&mut inode.durable, &mut inode.written] {
            if let Some(b) = buf.get_mut(offset as usize) {
                *b = byte;
            }
        }
        Ok(())
    }

    fn file(&self, id: u64) -> Arc<dyn DiskFile> {
        Arc::new(SimFile {
            disk: self.clone(),
            inode: id,
        })
    }
}

struct SimFile {
    disk: SimDisk,
    inode: u64,
}

impl SimFile {
    fn with<R>(&self, f: impl FnOnce(&mut State, u64) -> io::Result<R>) -> io::Result<R> {
        let mut st = self.disk.lock();
        st.powered(self.disk.generation)?;
        // Unlinked files stay readable through open handles, as on Linux.
        st.inodes.entry(self.inode).or_default();
        f(&mut st, self.inode)
    }
}

impl DiskFile for SimFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.with(|st, id| {
            let n = st.writes;
            st.writes += 1;
            if let Some(err) = State::fault(&mut st.fail_writes, n) {
                st.failures += 1;
                return Err(err.error());
            }
            let inode = st.inodes.get_mut(&id).expect("inode");
            let change = Change::Write {
                offset,
                data: buf.to_vec(),
            };
            apply(&mut inode.written, &change);
            inode.pending.push(change);
            st.newest = Some(id);
            Ok(())
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with(|st, id| {
            let data = &st.inodes[&id].written;
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            let end = start.saturating_add(buf.len());
            let src = data
                .get(start..end)
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(|st, id| {
            let n = st.syncs;
            st.syncs += 1;
            let noop = st.noop_sync;
            let fault = State::fault(&mut st.fail_syncs, n);
            if fault.is_some() {
                st.failures += 1;
            }
            let inode = st.inodes.get_mut(&id).expect("inode");
            if let Some(err) = fault {
                // Linux marks the pages clean: the data stays readable but is not on
                // the disk, and the next fsync has nothing to report.
                inode.pending.clear();
                if st.newest == Some(id) {
                    st.newest = None;
                }
                return Err(err.error());
            }
            if noop {
                return Ok(());
            }
            for change in std::mem::take(&mut inode.pending) {
                apply(&mut inode.durable, &change);
            }
            if st.newest == Some(id) {
                st.newest = None;
            }
            Ok(())
        })
    }

    fn len(&self) -> io::Result<u64> {
        self.with(|st, id| Ok(st.inodes[&id].written.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with(|st, id| {
            let inode = st.inodes.get_mut(&id).expect("inode");
            let change = Change::SetLen(len);
            apply(&mut inode.written, &change);
            inode.pending.push(change);
            Ok(())
        })
    }
}

impl Disk for SimDisk {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        // Directories are implied by the names in them.
        self.lock().powered(self.generation)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = self.lock();
        st.powered(self.generation)?;
        Ok(st
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
            .collect())
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>> {
        let mut st = self.lock();
        st.powered(self.generation)?;
        if st.names.contains_key(path) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        let id = st.next_inode;
        st.next_inode += 1;
        st.inodes.insert(id, Inode::default());
        st.names.insert(path.to_owned(), id);
        drop(st);
        Ok(self.file(id))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>> {
        let st = self.lock();
        st.powered(self.generation)?;
        let id = *st
            .names
            .get(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        drop(st);
        Ok(self.file(id))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.powered(self.generation)?;
        let id = st
            .names
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        st.names.insert(to.to_owned(), id);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.powered(self.generation)?;
        st.names
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.powered(self.generation)?;
        let n = st.syncs;
        st.syncs += 1;
        if let Some(err) = State::fault(&mut st.fail_syncs, n).or_else(|| st.fail_dir_sync.take()) {
            st.failures += 1;
            return Err(err.error());
        }
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        let State {
            names,
            durable_names,
            ..
        } = &mut *st;
        durable_names.retain(|p, _| !in_dir(p));
        for (p, id) in names.iter() {
            if in_dir(p) {
                durable_names.insert(p.clone(), *id);
            }
        }
        Ok(())
    }

    fn wants_spares(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_loss_keeps_only_what_was_synced() {
        let disk = SimDisk::new();
        let dir = Path::new("/d");
        let a = disk.create_new(&dir.join("a")).unwrap();
        a.write_at(b"hello", 0).unwrap();
        a.sync_data().unwrap();
        let mut rng = SimRng::new(1);
        // The name was never made durable: the file is gone.
        disk.power_loss(&mut rng, false);
        let disk = disk.reboot();
        assert!(disk.list(dir).unwrap().is_empty());
        assert!(a.write_at(b"x", 0).is_err(), "old handles are dead");

        let a = disk.create_new(&dir.join("a")).unwrap();
        a.write_at(b"hello", 0).unwrap();
        a.sync_data().unwrap();
        disk.sync_dir(dir).unwrap();
        a.write_at(b" world", 5).unwrap();
        disk.power_loss(&mut rng, false);
        let disk = disk.reboot();
        let a = disk.open(&dir.join("a")).unwrap();
        assert_eq!(a.len().unwrap(), 5);
    }

    #[test]
    fn a_failed_sync_loses_its_data_and_the_next_one_succeeds() {
        let disk = SimDisk::new();
        let dir = Path::new("/d");
        let a = disk.create_new(&dir.join("a")).unwrap();
        disk.sync_dir(dir).unwrap();
        a.write_at(b"lost", 0).unwrap();
        disk.fail_sync(0, SimError::Io);
        assert_eq!(a.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
        assert!(
            a.sync_data().is_ok(),
            "Linux reports a writeback error once"
        );
        let mut buf = [0u8; 4];
        a.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"lost", "still in the page cache");
        disk.power_loss(&mut SimRng::new(2), false);
        assert_eq!(disk.durable_bytes(&dir.join("a")).unwrap(), b"");
    }

    #[test]
    fn a_torn_write_keeps_a_sector_prefix() {
        for seed in 0..20 {
            let disk = SimDisk::new();
            let dir = Path::new("/d");
            let a = disk.create_new(&dir.join("a")).unwrap();
            disk.sync_dir(dir).unwrap();
            a.write_at(&vec![7u8; 2000], 100).unwrap();
            disk.power_loss(&mut SimRng::new(seed), true);
            let bytes = disk.durable_bytes(&dir.join("a")).unwrap();
            assert!(bytes.is_empty() || bytes.len() as u64 % SECTOR == 0 || bytes.len() == 2100);
            assert!(bytes.iter().skip(100).all(|b| *b == 7));
        }
    }
}
