//! Checks of the power-loss simulation itself (sim_test.rs): that it cannot pass
//! vacuously (a broken sync or a broken write order must be found), and targeted
//! regressions of what its seeds found, made deterministic.

use bytes::Bytes;
use tidings_protocol::Publish;

use super::sim_model::Q;
use super::sim_test::{Broken, Logged, config, config_for_check, q_options, run_seeds, runtime};
use super::{MemoryIndex, SimDisk, SimError, SimRng, Store};
use crate::queue::{QueueEngine, QueueError};

/// A broker whose store stopped on a failed `fsync` of the segment directory, right
/// after it created a segment, leaves that segment with records in the page cache and
/// no durable name. The next start replays those records into the index (and makes
/// the index durable); it must make the name durable first, or a power loss after it
/// leaves the index counting messages in a file that is gone.
#[test]
fn a_start_makes_the_names_of_the_segments_it_replayed_durable() {
    runtime().block_on(async {
        let disk = SimDisk::new();
        let index = MemoryIndex::new();
        let mut config = config(&disk, &index, 3, Broken::Not);
        config.segment_bytes = 4 << 10;
        let engine = tokio::task::block_in_place(|| QueueEngine::open(config.clone())).unwrap();
        engine.declare(Q, &q_options()).await.unwrap();
        // Larger than a segment: its round starts a new one, whose directory fsync fails.
        disk.fail_next_dir_sync(SimError::Io);
        let big = Publish::new("t.a", Bytes::from(vec![7u8; 6 << 10]));
        let confirm = engine.publish(&big).await;
        assert!(
            matches!(confirm, Err(QueueError::Storage(_))),
            "{confirm:?}"
        );
        engine.shutdown().await;
        // A restart on the same disk (the machine stayed up), then the power goes.
        let opened = tokio::task::block_in_place(|| Store::open(&config)).unwrap();
        opened.store.shutdown();
        drop(opened);
        disk.power_loss(&mut SimRng::new(1), false);
        let (disk, index) = (disk.reboot(), index.reboot());
        let config = config_for_check(&disk, &index, 3);
        let logged = Logged::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(logged.clone())
            .finish();
        let opened = tracing::subscriber::with_default(subscriber, || {
            tokio::task::block_in_place(|| Store::open(&config))
        })
        .unwrap();
        opened.store.shutdown();
        let q = opened.queues.iter().find(|q| q.name == Q).expect("q");
        assert_eq!(
            (q.counters.m_count, q.ready.len()),
            (1, 1),
            "the replayed message stays, in a segment that is still there ({})",
            logged.text()
        );
    });
}

/// The proof cannot pass vacuously: with `fdatasync` made a no-op, confirmed
/// messages must be found lost.
#[test]
fn a_noop_fdatasync_is_caught() {
    // About one seed in twenty finds a loss (the rest end in a clean restart, or
    // their power loss hits nothing confirmed): 400 seeds leave no room for luck.
    const SEEDS: u64 = 400;
    let failures = run_seeds(0, SEEDS, Broken::NoopSync);
    let losses = failures.iter().filter(|(_, e)| e.contains("LOSS")).count();
    eprintln!("fdatasync a no-op: {losses} of {SEEDS} seeds found a loss");
    assert!(
        losses > 0,
        "no loss found with fdatasync a no-op: the checker proves nothing ({failures:?})"
    );
}

/// The checker catches the order the issue describes: with the index written before
/// the log is durable (sled writes back on its own), a power loss leaves an index
/// that disagrees with the log — counters off, a delayed message both moved and not,
/// a confirmed message gone.
#[test]
fn an_index_ahead_of_the_log_is_caught() {
    // About 3 % of seeds hit such a state (a power loss right after sled wrote back
    // a round that was not durable yet): 600 seeds find 10 to 30 of them.
    let failures = run_seeds(0, 600, Broken::IndexAhead);
    eprintln!(
        "index ahead of the log: {} of 600 seeds found it",
        failures.len()
    );
    for (seed, err) in failures.iter().take(3) {
        eprintln!("index ahead of the log, seed {seed}: {err}");
    }
    assert!(
        failures.len() >= 3,
        "the checker hardly notices an index ahead of the log: {failures:?}"
    );
}
