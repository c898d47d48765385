//! Reading queues back from the index and the log: the pages queues read while
//! running, and everything a queue needs at start.

use bytes::Bytes;

use super::StoreError;
use super::chunks::{ChunkState, chunk_entries, decode_chunk_index};
use super::index::{Index, Tree};
use super::keys::{
    CHECKPOINT_KEY, Counters, LAYOUT_KEY, NEXT_QID_KEY, TAG_ATTEMPTS, TAG_CHUNK, TAG_COUNTERS,
    TAG_DEDUP, TAG_DELAYED, TAG_REMOVED, be_u64, delayed_key, prefix, seq_key,
};
use super::records::Location;
use super::segments::Files;
use super::{Loaded, LoadedQueue, Range};
use crate::queue::EngineConfig;
use crate::queue::options::StoredDefinition;
use crate::queue::record::Message;

fn decode_message(value: &[u8]) -> Option<Message> {
    Message::decode(Bytes::copy_from_slice(value))
}

/// Every queue with what it needs to start, and the next free queue id.
pub(crate) fn load(
    index: &dyn Index,
    files: &Files,
    config: &EngineConfig,
) -> Result<(Vec<LoadedQueue>, u32), StoreError> {
    let mut next_qid = 1u32;
    if let Some(v) = index.get(Tree::Defs, NEXT_QID_KEY)? {
        if let Some(bytes) = v.get(..4).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
            next_qid = u32::from_be_bytes(bytes);
        }
    }
    let mut defs = Vec::new();
    index.range(Tree::Defs, &[], &[0xff; 8], &mut |k, v| {
        defs.push((k.to_vec(), v.to_vec()));
        true
    })?;
    let mut queues = Vec::new();
    for (key, value) in defs {
        if [NEXT_QID_KEY, LAYOUT_KEY, CHECKPOINT_KEY].contains(&key.as_slice()) {
            continue;
        }
        let name = String::from_utf8_lossy(&key).into_owned();
        let definition: StoredDefinition = match serde_json::from_slice(&value) {
            Ok(d) => d,
            Err(err) => {
                tracing::error!(queue = %name, error = %err, "unreadable queue definition, skipped");
                continue;
            }
        };
        let qid = definition.qid;
        next_qid = next_qid.max(qid.saturating_add(1));
        let counters = index
            .get(Tree::Data, &prefix(qid, TAG_COUNTERS))?
            .and_then(|v| Counters::decode(&v))
            .unwrap_or_default();
        let ready = scan(
            index,
            files,
            Range::Messages { qid, from: 0 },
            config.ready_window,
            config.ready_window_bytes,
        )?;
        let delayed = scan(
            index,
            files,
            Range::Delayed { qid, from: (0, 0) },
            config.delayed_window,
            usize::MAX,
        )?;
        let mut dedup = Vec::new();
        let (start, end) = (prefix(qid, TAG_DEDUP), prefix(qid, TAG_DEDUP + 1));
        index.range(Tree::Data, &start, &end, &mut |k, v| {
            let id = String::from_utf8_lossy(&k[5..]).into_owned();
            dedup.push((id, be_u64(v).unwrap_or(0)));
            true
        })?;
        queues.push(LoadedQueue {
            name,
            definition,
            counters,
            ready,
            delayed,
            dedup,
        });
    }
    Ok((queues, next_qid))
}

/// The messages of `range`, at most `max_count` and about `max_bytes` of payload.
pub(crate) fn scan(
    index: &dyn Index,
    files: &Files,
    range: Range,
    max_count: usize,
    max_bytes: usize,
) -> Result<Vec<Loaded>, StoreError> {
    match range {
        Range::Messages { qid, from } => scan_ready(index, files, qid, from, max_count, max_bytes),
        Range::Delayed { qid, from } => scan_delayed(index, qid, from, max_count, max_bytes),
    }
}

fn scan_delayed(
    index: &dyn Index,
    qid: u32,
    from: (u64, u64),
    max_count: usize,
    max_bytes: usize,
) -> Result<Vec<Loaded>, StoreError> {
    let start = delayed_key(qid, from.0, from.1);
    let end = prefix(qid, TAG_DELAYED + 1);
    let mut out = Vec::new();
    let mut bytes = 0usize;
    index.range(Tree::Data, &start, &end, &mut |k, v| {
        if out.len() >= max_count || bytes >= max_bytes {
            return false;
        }
        let key = (
            be_u64(&k[5..]).unwrap_or(0),
            be_u64(k.get(13..).unwrap_or(&[])).unwrap_or(0),
        );
        let Some(message) = decode_message(v) else {
            tracing::error!(key = ?k, "unreadable message record, skipped");
            return true;
        };
        bytes += message.payload.len();
        out.push(Loaded {
            key,
            message,
            chunk: 0,
            attempts_key: false,
        });
        true
    })?;
    Ok(out)
}

/// The removal state of chunk `first` as stored, and where its body is. `value` is
/// its `'b'` value when the caller has it.
pub(crate) fn stored_chunk_state(
    index: &dyn Index,
    qid: u32,
    first: u64,
    value: Option<&[u8]>,
) -> Result<Option<(ChunkState, Location)>, StoreError> {
    let owned;
    let value = match value {
        Some(v) => v,
        None => match index.get(Tree::Data, &seq_key(qid, TAG_CHUNK, first))? {
            Some(v) => {
                owned = v;
                &owned[..]
            }
            None => return Ok(None),
        },
    };
    let Some((loc, written)) = decode_chunk_index(value) else {
        tracing::error!(queue = qid, chunk = first, "unreadable chunk index");
        return Ok(None);
    };
    match index.get(Tree::Data, &seq_key(qid, TAG_REMOVED, first))? {
        Some(v) => Ok(ChunkState::decode(&v).map(|state| (state, loc))),
        None => Ok(Some((written, loc))),
    }
}

/// Ready messages with `seq >= from`, in seq order, with their attempt overrides.
fn scan_ready(
    index: &dyn Index,
    files: &Files,
    qid: u32,
    from: u64,
    max_count: usize,
    max_bytes: usize,
) -> Result<Vec<Loaded>, StoreError> {
    let lowest = seq_key(qid, TAG_CHUNK, 0);
    let from_key = seq_key(qid, TAG_CHUNK, from);
    let end = prefix(qid, TAG_CHUNK + 1);
    // The chunk holding `from` may start below it.
    let start = index
        .last_in(Tree::Data, &lowest, &from_key)?
        .unwrap_or_else(|| from_key.to_vec());
    let mut out: Vec<Loaded> = Vec::new();
    let mut bytes = 0usize;
    let mut failed = None;
    index.range(Tree::Data, &start, &end, &mut |k, v| {
        if out.len() >= max_count || bytes >= max_bytes {
            return false;
        }
        let first = be_u64(&k[5..]).unwrap_or(0);
        let (state, loc) = match stored_chunk_state(index, qid, first, Some(v)) {
            Ok(Some(found)) => found,
            Ok(None) => return true,
            Err(err) => {
                failed = Some(err);
                return false;
            }
        };
        if first + u64::from(state.span) <= from || state.live == 0 {
            return true;
        }
        let body = match files.read(&loc) {
            Ok(Some(body)) => body,
            // Its segment went with its last message: a removal this reader raced.
            Ok(None) => return true,
            Err(err) => {
                tracing::error!(queue = qid, chunk = first, error = %err, "unreadable chunk, skipped");
                return true;
            }
        };
        let Some(entries) = chunk_entries(&body) else {
            tracing::error!(queue = qid, chunk = first, "malformed chunk, skipped");
            return true;
        };
        for (seq, record) in entries {
            if seq < from || state.is_removed(seq - first) {
                continue;
            }
            if out.len() >= max_count || bytes >= max_bytes {
                return false;
            }
            let Some(message) = decode_message(record) else {
                tracing::error!(queue = qid, seq, "unreadable message record, skipped");
                continue;
            };
            bytes += message.payload.len();
            out.push(Loaded {
                key: (0, seq),
                message,
                chunk: first,
                attempts_key: false,
            });
        }
        true
    })?;
    if let Some(err) = failed {
        return Err(err);
    }
    if let Some(last) = out.last().map(|l| l.key.1) {
        let (low, high) = (
            seq_key(qid, TAG_ATTEMPTS, from),
            seq_key(qid, TAG_ATTEMPTS, last.saturating_add(1)),
        );
        let mut overrides = Vec::new();
        index.range(Tree::Data, &low, &high, &mut |k, v| {
            let seq = be_u64(&k[5..]).unwrap_or(0);
            let deliveries = v
                .get(..4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map_or(0, u32::from_be_bytes);
            overrides.push((seq, deliveries));
            true
        })?;
        for (seq, deliveries) in overrides {
            if let Ok(i) = out.binary_search_by_key(&seq, |l| l.key.1) {
                out[i].message.deliveries = deliveries;
                out[i].attempts_key = true;
            }
        }
    }
    Ok(out)
}
