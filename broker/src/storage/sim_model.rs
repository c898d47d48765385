//! The model the power-loss simulation (sim_test.rs) holds the store to: what it
//! knows of each message, and the check run on what survives each restart.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::queue::EngineConfig;

use super::Store;

pub(super) const Q: &str = "q";
pub(super) const DLQ: &str = "q.dlq";
pub(super) const R: &str = "r";

pub(super) fn id_of(payload: &[u8]) -> u64 {
    u64::from_be_bytes(payload[..8].try_into().expect("8-byte id"))
}

/// What the model knows of one message of `q`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fate {
    /// Not confirmed: may or may not be stored.
    Maybe,
    /// Confirmed and not acked: must be stored (in `q` or its dead-letter queue).
    Required,
    /// Acked (not necessarily durably): may come back only as a redelivery.
    Acked,
}

#[derive(Debug)]
pub(super) struct Msg {
    pub(super) fate: Fate,
    pub(super) message_id: Option<String>,
    pub(super) delay_ms: u64,
    /// Queues a delivery of it came from, with the attempt: its moves.
    pub(super) seen: Vec<(String, u32)>,
    /// The queue of the delivery that was acked.
    pub(super) acked_in: String,
}

#[derive(Default)]
pub(super) struct Model {
    pub(super) msgs: BTreeMap<u64, Msg>,
    /// Message ids answered `duplicate: true`: some copy must be stored (or acked).
    pub(super) duplicate_ids: HashSet<String>,
    /// Payload ids published to `r` in its current life, and whether `r` exists.
    pub(super) r_ids: HashSet<u64>,
    pub(super) r_exists: bool,
    /// `r` was deleted or declared with a result we do not know.
    pub(super) r_unknown: bool,
    /// Moves seen since the start: for the report of a loss.
    pub(super) redrives: u64,
    pub(super) next_id: u64,
    /// A call returned StorageFailure in this run: every later write must fail.
    pub(super) failed: bool,
    /// Faults, redrives and restarts, in order: for the report of a failure.
    pub(super) events: Vec<String>,
}

/// Opens the store on what survived and holds it against the model:
///
/// - every confirmed message that was not acked is stored (ready, delayed, in flight
///   or dead-lettered; a move may leave it in both queues, never in neither);
/// - within one queue, no message is stored twice and no message id twice;
/// - an acked message that comes back does so as a redelivery (attempt >= 2);
/// - each queue's stored counters (depth, bytes) equal what it holds;
/// - a message id answered `duplicate` has a stored (or acked) copy;
/// - a deleted queue does not come back, and a re-created one holds nothing of
///   its earlier life.
pub(super) fn check(config: &EngineConfig, model: &mut Model) -> Result<(), String> {
    let mut config = config.clone();
    config.ready_window = usize::MAX;
    config.ready_window_bytes = usize::MAX;
    config.delayed_window = usize::MAX;
    let opened = Store::open(&config).map_err(|e| format!("restart refused: {e}"))?;
    opened.store.shutdown();
    let mut stored: HashMap<u64, Vec<&'static str>> = HashMap::new();
    let mut r_seen = false;
    for q in &opened.queues {
        let name: &'static str = match q.name.as_str() {
            Q => Q,
            DLQ => DLQ,
            R => R,
            other => return Err(format!("unknown queue {other} came back")),
        };
        let all: Vec<_> = q.ready.iter().chain(&q.delayed).collect();
        let c = q.counters;
        let bytes = |v: &[super::Loaded]| v.iter().map(|l| l.message.size()).sum::<u64>();
        if (c.m_count, c.m_bytes, c.d_count, c.d_bytes)
            != (
                q.ready.len() as u64,
                bytes(&q.ready),
                q.delayed.len() as u64,
                bytes(&q.delayed),
            )
        {
            return Err(format!(
                "{name}: counters say {} ready ({} bytes) and {} delayed ({} bytes), the store holds {} ({}) and {} ({})",
                c.m_count,
                c.m_bytes,
                c.d_count,
                c.d_bytes,
                q.ready.len(),
                bytes(&q.ready),
                q.delayed.len(),
                bytes(&q.delayed)
            ));
        }
        let mut ids = HashSet::new();
        let mut mids = HashSet::new();
        for l in &all {
            let id = id_of(&l.message.payload);
            // A message that moved between queues and was caught by a crash between
            // the two steps of a later move may be stored twice (at-least-once);
            // nothing else may.
            let moved = model
                .msgs
                .get(&id)
                .is_some_and(|m| m.seen.iter().any(|(at, _)| at.contains(DLQ)));
            if !ids.insert(id) && !moved {
                return Err(format!(
                    "{name}: message {id} is stored twice (keys {:?}, history {:?}, events {:?})",
                    all.iter()
                        .filter(|o| id_of(&o.message.payload) == id)
                        .map(|o| (o.key, o.message.deliveries))
                        .collect::<Vec<_>>(),
                    model.msgs.get(&id).map(|m| &m.seen),
                    model.events
                ));
            }
            if let Some(mid) = &l.message.message_id {
                if !mids.insert(mid.to_string()) && !moved {
                    return Err(format!("{name}: message id {mid} is stored twice"));
                }
            }
            stored.entry(id).or_default().push(name);
            if let Some(m) = model.msgs.get_mut(&id) {
                m.seen.push((
                    format!(
                        "stored in {name} at {:?}, mark {}, deliveries {}",
                        l.key, c.mark, l.message.deliveries
                    ),
                    0,
                ));
            }
            if name == R {
                r_seen = true;
                if !model.r_unknown && !model.r_ids.contains(&id) {
                    return Err(format!(
                        "r holds message {id} from an earlier life of the queue"
                    ));
                }
            }
            if let Some(m) = model.msgs.get(&id) {
                let redelivery = l.message.deliveries >= 1 || (l.key.0 == 0 && l.key.1 <= c.mark);
                // A copy of a message that moved may be another copy than the acked
                // one (a redrive makes a fresh message): checked for unmoved ones.
                if m.fate == Fate::Acked && m.acked_in == name && !redelivery && !moved {
                    return Err(format!(
                        "{name}: acked message {id} came back as a first delivery (seq {:?}, mark {}, deliveries seen {:?}, events {:?})",
                        l.key, c.mark, m.seen, model.events
                    ));
                }
            }
        }
    }
    if r_seen && !model.r_exists && !model.r_unknown {
        return Err("the deleted queue r came back with messages".into());
    }
    for (id, m) in &model.msgs {
        let home = stored
            .get(id)
            .is_some_and(|qs| qs.iter().any(|q| *q == Q || *q == DLQ));
        if m.fate == Fate::Required && !home {
            return Err(format!(
                "LOSS: confirmed message {id} is gone (delay {} ms, message id {:?}, deliveries seen {:?}, redrives {}, events {:?})",
                m.delay_ms, m.message_id, m.seen, model.redrives, model.events
            ));
        }
    }
    for mid in &model.duplicate_ids {
        let copy = model.msgs.iter().any(|(id, m)| {
            m.message_id.as_deref() == Some(mid)
                && (stored.contains_key(id) || m.fate == Fate::Acked)
        });
        if !copy {
            return Err(format!(
                "message id {mid} was answered duplicate but no copy is stored"
            ));
        }
    }
    // What is stored now is durable: from here on it is required like a confirm, and
    // an acked message that came back is a stored message again.
    for (id, m) in model.msgs.iter_mut() {
        let back = stored
            .get(id)
            .is_some_and(|qs| qs.contains(&Q) || qs.contains(&DLQ));
        if matches!(m.fate, Fate::Maybe | Fate::Acked) && back {
            m.fate = Fate::Required;
            m.acked_in.clear();
        }
    }
    model.r_exists = opened.queues.iter().any(|q| q.name == R);
    model.r_unknown = false;
    Ok(())
}
