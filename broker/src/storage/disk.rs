//! The file-system seam: every file operation of the queue log goes through [`Disk`]
//! and [`DiskFile`], so that the same code runs on the real file system
//! ([`RealDisk`]) and on a simulated one that can lose power (`sim_disk.rs`).
//!
//! The operations are the few the log needs: create, open, write at an offset, read
//! at an offset, `fdatasync`, length and truncation of a file; list, rename and remove
//! in a directory, and `fsync` of a directory. sled's own files do not go through
//! here: the index has its own seam (`index.rs`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// One open file of the queue log.
#[allow(clippy::len_without_is_empty)]
pub trait DiskFile: Send + Sync {
    /// Writes all of `buf` at `offset` (one `pwrite` on the real disk).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Fills `buf` from `offset`; an error if the file is shorter.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`: makes the file's data durable.
    fn sync_data(&self) -> io::Result<()>;
    /// The file's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Cuts or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Gives the file `len` bytes of allocated blocks that read as zeros, so that
    /// later writes within them need no block allocation at their sync. The
    /// default writes the zeros.
    fn allocate(&self, len: u64) -> io::Result<()> {
        write_zeros(|buf, at| self.write_at(buf, at), len)
    }
}

/// Writes `len` zero bytes from offset 0 with `write_at`, a MiB at a time.
fn write_zeros(mut write_at: impl FnMut(&[u8], u64) -> io::Result<()>, len: u64) -> io::Result<()> {
    const STEP: u64 = 1 << 20;
    let zeros = vec![0u8; usize::try_from(STEP.min(len)).unwrap_or(0)];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(STEP);
        write_at(&zeros[..usize::try_from(n).unwrap_or(0)], at)?;
        at += n;
    }
    Ok(())
}

/// A directory tree holding the queue log. Paths are absolute or relative to the
/// process, as `std::fs` takes them.
pub trait Disk: Send + Sync + 'static {
    /// Creates `dir` and its parents if missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The names of the files in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates a new, empty file; an error if it exists.
    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>>;
    /// Renames a file within one directory (atomic, replacing `to`).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// `fsync` of a directory: makes its entries (new, renamed, removed files)
    /// durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Whether a background thread should prepare preallocated spare segments
    /// (spares.rs). They only pay off on a real file system; a simulated disk keeps
    /// the run deterministic without them.
    fn wants_spares(&self) -> bool {
        true
    }
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealDisk;

struct RealFile(File);

impl DiskFile for RealFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    /// `fallocate`: the blocks are reserved and marked unwritten, without writing
    /// them (falls back to writing zeros where the file system cannot).
    fn allocate(&self, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let Ok(len_arg) = libc::off_t::try_from(len) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate on an open descriptor we own; no memory is passed.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::fallocate(self.0.as_raw_fd(), 0, 0, len_arg) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return write_zeros(|buf, at| self.0.write_all_at(buf, at), len);
        }
        Err(err)
    }
}

impl Disk for RealDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(names)
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>> {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Arc::new(RealFile(file)))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn DiskFile>> {
        let file = File::options().read(true).write(true).open(path)?;
        Ok(Arc::new(RealFile(file)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// Names an I/O error with the file it happened to, so the operator reads the path
/// and the OS error together.
pub(crate) fn at(path: &Path, what: &str, err: io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("{what} {}: {err}", path.display()))
}
