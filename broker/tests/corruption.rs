//! Corruption: a byte flipped in a middle segment of the queue log is damage, not a
//! torn write. The store refuses to open, naming the file; the repair mode cuts the
//! log there and opens with everything before the damage (and every later segment).
//! Real files and sled, through the queue engine.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tidings_broker::queue::{DeliverySink, EngineConfig, QueueEngine};
use tidings_protocol::{Delivery, Publish, QueueOptions};
use tokio::sync::mpsc;

const MESSAGES: u64 = 240;

struct Sink(mpsc::UnboundedSender<Delivery>);

impl DeliverySink for Sink {
    fn deliver(&self, d: Delivery) -> bool {
        self.0.send(d).is_ok()
    }
}

fn config(dir: &Path, repair: bool) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    // Small segments: a few hundred messages fill several.
    c.segment_bytes = 32 << 10;
    c.repair = repair;
    c
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

/// Every message id the queue delivers.
async fn drain(engine: &QueueEngine) -> BTreeSet<u64> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let session = engine.session(Arc::new(Sink(tx)));
    session.consume(1, "q", 1000).unwrap();
    let depth = engine.info("q").unwrap().depth;
    let mut ids = BTreeSet::new();
    while (ids.len() as u64) < depth {
        let d = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a delivery")
            .expect("sink open");
        ids.insert(u64::from_be_bytes(d.payload[..8].try_into().unwrap()));
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_middle_segment_refuses_the_start_and_repair_cuts_there() {
    let dir = tempfile::tempdir().unwrap();
    let engine = QueueEngine::open(config(dir.path(), false)).unwrap();
    let options = QueueOptions {
        bindings: vec!["t".into()],
        ..Default::default()
    };
    engine.declare("q", &options).await.unwrap();
    for id in 0..MESSAGES {
        let mut payload = id.to_be_bytes().to_vec();
        payload.resize(600, 7);
        let mut p = Publish::new("t", Bytes::from(payload));
        p.confirm = true;
        engine.publish(&p).await.unwrap();
    }
    engine.shutdown().await;
    drop(engine);

    let files = segments(dir.path());
    assert!(files.len() >= 3, "several segments: {files:?}");
    let middle = &files[files.len() / 2];
    // Inside the payload of the segment's first record.
    let mut bytes = std::fs::read(middle).unwrap();
    bytes[40] ^= 0x5a;
    std::fs::write(middle, &bytes).unwrap();
    let later: Vec<_> = files[files.len() / 2 + 1..].to_vec();

    let err = QueueEngine::open(config(dir.path(), false))
        .err()
        .expect("damage refuses the start");
    let text = err.to_string();
    assert!(text.contains(&middle.display().to_string()), "{text}");
    assert!(
        text.contains("offset 0") && text.contains("--repair"),
        "{text}"
    );
    for file in &later {
        assert!(
            file.exists(),
            "later segments are never deleted: {}",
            file.display()
        );
    }

    let engine = QueueEngine::open(config(dir.path(), true)).unwrap();
    let ids = drain(&engine).await;
    engine.shutdown().await;
    let lost: Vec<u64> = (0..MESSAGES).filter(|id| !ids.contains(id)).collect();
    assert!(
        !lost.is_empty(),
        "the cut dropped the damaged segment's messages"
    );
    assert!(
        lost.windows(2).all(|w| w[1] == w[0] + 1),
        "only one contiguous stretch (the damaged segment's) is gone: {lost:?}"
    );
    assert!(lost[0] > 0, "everything before the damage is kept");
    assert!(
        *lost.last().unwrap() < MESSAGES - 1,
        "the later segments are kept"
    );

    // Repaired, the store opens normally again and holds the same.
    let engine = QueueEngine::open(config(dir.path(), false)).unwrap();
    assert_eq!(drain(&engine).await, ids);
    engine.shutdown().await;
}
