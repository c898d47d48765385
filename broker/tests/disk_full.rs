//! Disk full for real: the queue engine stores on a small tmpfs that this test mounts
//! (it runs as root in CI; elsewhere it says why it cannot run and fails only when
//! `TIDINGS_REQUIRE_TMPFS` is set). Publishing with confirms fills it; from the first
//! failed confirm on, every confirm fails with StorageFailure, never succeeds. Then
//! the file system is grown (space freed), the engine reopened, and every message
//! whose confirm succeeded is there.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tidings_broker::queue::{DeliverySink, EngineConfig, QueueEngine, QueueError};
use tidings_protocol::{Delivery, Publish, QueueOptions};
use tokio::sync::mpsc;

struct Sink(mpsc::UnboundedSender<Delivery>);

impl DeliverySink for Sink {
    fn deliver(&self, d: Delivery) -> bool {
        self.0.send(d).is_ok()
    }
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount(dir: &Path, size: &str, remount: bool) -> bool {
    let options = if remount {
        format!("remount,size={size}")
    } else {
        format!("size={size}")
    };
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

fn config(dir: &Path) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.segment_bytes = 1 << 20;
    c.cache_bytes = 4 << 20;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_confirms_and_a_restart_with_space_keeps_every_confirmed_message() {
    let dir = tempfile::tempdir().unwrap();
    if !mount(dir.path(), "6m", false) {
        let required = std::env::var_os("TIDINGS_REQUIRE_TMPFS").is_some();
        eprintln!("cannot mount a tmpfs here (not root?): disk-full test not run");
        assert!(
            !required,
            "TIDINGS_REQUIRE_TMPFS is set but mounting failed"
        );
        return;
    }
    let _mount = Mount(dir.path().to_owned());
    let data = dir.path().join("queues");

    let engine = QueueEngine::open(config(&data)).unwrap();
    let options = QueueOptions {
        bindings: vec!["t".into()],
        ..Default::default()
    };
    engine.declare("q", &options).await.unwrap();
    let mut confirmed = BTreeSet::new();
    let mut first_failure = None;
    let mut after_failure = 0;
    for id in 0u64..2_000 {
        let mut payload = id.to_be_bytes().to_vec();
        payload.resize(16 << 10, 1);
        let mut p = Publish::new("t", Bytes::from(payload));
        p.confirm = true;
        p.message_id = Some(format!("m{id}").as_str().into());
        match engine.publish(&p).await {
            Ok(outcome) => {
                assert!(
                    first_failure.is_none(),
                    "message {id} was confirmed after the store failed: {outcome:?}"
                );
                assert_eq!(outcome.queues, 1);
                confirmed.insert(id);
            }
            Err(QueueError::Storage(text)) => {
                first_failure.get_or_insert(text);
                after_failure += 1;
                if after_failure == 20 {
                    break;
                }
            }
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    let failure = first_failure.expect("6 MiB filled up: a confirm must fail");
    assert!(
        failure.contains("No space left on device") || failure.contains("os error 28"),
        "the error names the cause: {failure}"
    );
    assert!(!confirmed.is_empty(), "some messages fit");
    let stats = engine.stats();
    assert!(
        stats.contains(&("storage.failed".to_owned(), 1)),
        "STATS shows the failure"
    );
    assert!(engine.storage_failure().is_some());
    engine.shutdown().await;
    drop(engine);

    // Space freed: the file system grows, the broker restarts from what is on disk.
    assert!(mount(dir.path(), "64m", true), "remount with more space");
    let engine = QueueEngine::open(config(&data)).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let session = engine.session(Arc::new(Sink(tx)));
    session.consume(1, "q", 10_000).unwrap();
    let depth = engine.info("q").unwrap().depth;
    let mut got = BTreeSet::new();
    while (got.len() as u64) < depth {
        let d = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a delivery")
            .expect("sink open");
        got.insert(u64::from_be_bytes(d.payload[..8].try_into().unwrap()));
    }
    let missing: Vec<_> = confirmed.difference(&got).collect();
    assert!(missing.is_empty(), "confirmed messages lost: {missing:?}");
    // Writes work again.
    let mut p = Publish::new("t", Bytes::from(vec![0u8; 8]));
    p.confirm = true;
    assert_eq!(engine.publish(&p).await.unwrap().queues, 1);
    drop(session);
    engine.shutdown().await;
}
