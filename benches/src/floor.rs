//! The machine's `fdatasync` floor: what one durable write costs on this disk with
//! nothing else in the way, measured beside the `queue-latency` runs so that their
//! p50 can be read against it (issue 16's target is p50 <= 1.5x the floor).
//!
//! Each sample is a `pwrite` of [`ROUND_BYTES`] followed by `fdatasync`, into a file
//! whose blocks were written and synced first: an overwrite, so the sync has no file
//! size or extent to commit, only the data and the device's cache flush. That is the
//! lowest a durable write costs here (appending, or writing into `fallocate`d blocks,
//! also commits metadata and is slower), so the floor is never flattering.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};

/// Bytes per sample: about one store round at 10,000 msgs/s of 1 KiB messages
/// (a paced producer on tokio's millisecond timer sends ten at a time).
pub const ROUND_BYTES: usize = 10 * 1024;
/// Samples per measurement: about a quarter of a second on this machine's disk.
pub const SYNCS: usize = 1000;

/// One measurement of the floor, µs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncFloor {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Measures `syncs` samples of `bytes` each in a temporary file in `dir` (which
/// should be on the filesystem the brokers store on); blocking.
pub fn measure(dir: &Path, bytes: usize, syncs: usize) -> Result<SyncFloor> {
    ensure!(
        bytes > 0 && syncs > 0,
        "the fdatasync floor needs at least one sync of at least one byte"
    );
    let mut file = tempfile::tempfile_in(dir)
        .with_context(|| format!("creating a scratch file in {}", dir.display()))?;
    let block = vec![0x5a_u8; bytes];
    for _ in 0..syncs {
        file.write_all(&block)
            .context("preparing the scratch file")?;
    }
    file.sync_all().context("syncing the scratch file")?;
    let mut samples = Vec::with_capacity(syncs);
    for i in 0..syncs {
        let offset = u64::try_from(i * bytes).context("scratch offset")?;
        write_at(&file, &block, offset)?;
        let started = Instant::now();
        file.sync_data().context("fdatasync of the scratch file")?;
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(summarise(&mut samples))
}

#[cfg(unix)]
fn write_at(file: &File, buf: &[u8], offset: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, offset)
        .context("pwrite to the scratch file")
}

#[cfg(not(unix))]
fn write_at(file: &File, buf: &[u8], offset: u64) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut file = file;
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.write_all(buf))
        .context("write to the scratch file")
}

/// p50 and p99 of `samples` (nearest rank), which must not be empty.
fn summarise(samples: &mut [f64]) -> SyncFloor {
    samples.sort_by(f64::total_cmp);
    let at = |percent: usize| {
        let rank = (percent * samples.len()).div_ceil(100);
        samples[rank.clamp(1, samples.len()) - 1]
    };
    SyncFloor {
        p50_us: at(50),
        p99_us: at(99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut s: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(
            summarise(&mut s),
            SyncFloor {
                p50_us: 50.0,
                p99_us: 99.0
            }
        );
        assert_eq!(summarise(&mut [7.0]).p99_us, 7.0);
    }

    #[test]
    fn a_measurement_syncs_a_real_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let floor = measure(dir.path(), 4096, 5).expect("measured");
        assert!(
            floor.p50_us > 0.0 && floor.p99_us >= floor.p50_us,
            "{floor:?}"
        );
        assert!(
            std::fs::read_dir(dir.path())
                .expect("listed")
                .next()
                .is_none(),
            "the scratch file is gone"
        );
        assert!(measure(dir.path(), 0, 5).is_err());
        assert!(measure(&dir.path().join("missing"), 4096, 1).is_err());
    }
}
