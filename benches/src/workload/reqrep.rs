//! `reqrep`: C requesters, one request in flight each -> R responders in one group.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Map, json};
use tokio_util::sync::CancellationToken;

use super::{Common, check_size, joined};
use crate::control::{Progress, RunControl};
use crate::driver::{Driver, Requester, Responder, Workload};
use crate::latency::Latencies;
use crate::payload;
use crate::report::RunReport;
use crate::tracker::SeqTracker;

/// Parameters, defaults as in the issue.
#[derive(Debug, Clone, clap::Args)]
pub struct ReqrepParams {
    /// Responders in one group, each on its own connection.
    #[arg(short = 'r', long, default_value_t = 2)]
    pub responders: usize,
    /// Requesters, each on its own connection with one request in flight.
    #[arg(short = 'c', long, default_value_t = 8)]
    pub requesters: usize,
    /// Requests in total.
    #[arg(short = 'n', long, default_value_t = 100_000)]
    pub requests: u64,
    /// Request (and reply) size in bytes (at least 16).
    #[arg(short = 's', long, default_value_t = 128)]
    pub size: usize,
}

impl ReqrepParams {
    /// Rejects parameters that cannot make a run.
    pub fn validate(&self) -> Result<()> {
        if self.responders == 0 || self.requesters == 0 {
            bail!("--responders and --requesters must be at least 1");
        }
        check_size(self.size)
    }

    fn to_json(&self) -> Map<String, serde_json::Value> {
        let v = json!({
            "responders": self.responders, "requesters": self.requesters,
            "requests": self.requests, "size": self.size,
        });
        v.as_object().cloned().unwrap_or_default()
    }
}

/// What one requester did.
struct Asked {
    latencies: Latencies,
    completed: u64,
    failed: u64,
    first_error: Option<String>,
    finished: Instant,
}

async fn ask<R: Requester>(
    mut requester: R,
    p: ReqrepParams,
    next: Arc<AtomicU64>,
    tracker: Arc<SeqTracker>,
    ctl: Arc<RunControl>,
) -> Asked {
    let mut out = Asked {
        latencies: Latencies::default(),
        completed: 0,
        failed: 0,
        first_error: None,
        finished: Instant::now(),
    };
    loop {
        if ctl.expired() || ctl.stop.is_cancelled() {
            break;
        }
        let seq = next.fetch_add(1, Ordering::Relaxed);
        if seq >= p.requests {
            break;
        }
        let sent = Instant::now();
        let asked = tokio::time::timeout_at(
            ctl.deadline.into(),
            requester.request(payload::encode(seq, p.size)),
        )
        .await;
        match asked {
            Ok(Ok(reply)) => {
                let rtt = sent.elapsed();
                match payload::decode(&reply) {
                    // The reply must echo this very request, not some other one.
                    Some(stamp) if stamp.seq == seq && reply.len() == p.size => {
                        tracker.record(seq);
                        out.latencies
                            .record_ns(u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX));
                        out.completed += 1;
                    }
                    _ => tracker.record_foreign(),
                }
                ctl.received.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                out.failed += 1;
                out.first_error.get_or_insert(format!("{e:#}"));
            }
            Err(_) => {
                out.failed += 1;
                out.first_error
                    .get_or_insert("request outstanding at the deadline".into());
                break;
            }
        }
    }
    out.finished = Instant::now();
    out
}

/// Runs `reqrep`; requests/s over all requesters, round-trip percentiles.
pub async fn run<D: Driver>(driver: &D, p: &ReqrepParams, common: &Common) -> Result<RunReport> {
    p.validate()?;
    let topic = common.topic("reqrep");
    let stop = CancellationToken::new();
    let mut responders = Vec::with_capacity(p.responders);
    for _ in 0..p.responders {
        let responder = driver
            .responder(&topic, "bench-responders")
            .await
            .context("starting a responder")?;
        responders.push(tokio::spawn(responder.serve(stop.clone())));
    }
    let mut requesters = Vec::with_capacity(p.requesters);
    for _ in 0..p.requesters {
        requesters.push(
            driver
                .requester(&topic)
                .await
                .context("connecting a requester")?,
        );
    }

    let ctl = RunControl::new(common.deadline, common.drain);
    let tracker = Arc::new(SeqTracker::new(p.requests));
    let next = Arc::new(AtomicU64::new(0));
    let _progress = Progress::start(ctl.clone(), p.requests, "reqrep".into());
    let started = Instant::now();
    let tasks: Vec<_> = requesters
        .into_iter()
        .map(|r| {
            tokio::spawn(ask(
                r,
                p.clone(),
                next.clone(),
                tracker.clone(),
                ctl.clone(),
            ))
        })
        .collect();
    let mut errors = Vec::new();
    let mut latencies = Latencies::default();
    let (mut completed, mut failed, mut finished) = (0u64, 0u64, started);
    for (i, task) in tasks.into_iter().enumerate() {
        match joined(task.await) {
            Ok(asked) => {
                latencies.merge(&asked.latencies);
                completed += asked.completed;
                failed += asked.failed;
                finished = finished.max(asked.finished);
                if let Some(e) = asked.first_error {
                    errors.push(format!("requester {i}: {e}"));
                }
            }
            Err(e) => errors.push(format!("requester {i}: {e}")),
        }
    }
    stop.cancel();
    ctl.stop.cancel();
    let mut answered = Vec::new();
    for (i, task) in responders.into_iter().enumerate() {
        match joined(task.await) {
            Ok(Ok(n)) => answered.push(n),
            Ok(Err(e)) => errors.push(format!("responder {i}: {e:#}")),
            Err(e) => errors.push(format!("responder {i}: {e}")),
        }
    }

    let mut report = RunReport::new(
        driver.system().name(),
        Workload::Reqrep.name(),
        p.to_json(),
        tracker.tally(),
        latencies.percentiles(),
    );
    report.duration_s = (finished - started).as_secs_f64();
    if report.duration_s > 0.0 {
        report.msgs_per_sec = completed as f64 / report.duration_s;
    }
    report.mb_per_sec = report.msgs_per_sec * p.size as f64 / 1e6;
    report
        .details
        .insert("failed_requests".into(), failed.into());
    report
        .details
        .insert("answered_per_responder".into(), answered.into());
    errors.into_iter().for_each(|e| report.add_error(e));
    Ok(report)
}
