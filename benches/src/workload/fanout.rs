//! `fanout`: 1 publisher -> K subscribers, each expecting every message.

use anyhow::{Context, Result, bail};
use serde_json::{Map, json};

use super::{Common, check_size, joined, publish_range, send_rate};
use crate::control::{OnComplete, Progress, RunControl, receive};
use crate::driver::{Driver, Workload};
use crate::report::RunReport;
use crate::tracker::{SeqTracker, Tally};

/// Parameters, defaults as in the issue.
#[derive(Debug, Clone, clap::Args)]
pub struct FanoutParams {
    /// Subscribers, each on its own connection.
    #[arg(short = 'k', long, default_value_t = 4)]
    pub subscribers: usize,
    /// Message size in bytes (at least 16).
    #[arg(short = 's', long, default_value_t = 128)]
    pub size: usize,
    /// Messages published (each subscriber receives all of them).
    #[arg(short = 'n', long, default_value_t = 1_000_000)]
    pub messages: u64,
}

impl FanoutParams {
    /// Rejects parameters that cannot make a run.
    pub fn validate(&self) -> Result<()> {
        if self.subscribers == 0 {
            bail!("--subscribers must be at least 1");
        }
        check_size(self.size)
    }

    fn to_json(&self) -> Map<String, serde_json::Value> {
        let v =
            json!({"subscribers": self.subscribers, "size": self.size, "messages": self.messages});
        v.as_object().cloned().unwrap_or_default()
    }
}

/// Runs `fanout`; msgs/s is the aggregate delivered to all subscribers.
pub async fn run<D: Driver>(driver: &D, p: &FanoutParams, common: &Common) -> Result<RunReport> {
    p.validate()?;
    let topic = common.topic("fanout");
    let mut subs = Vec::with_capacity(p.subscribers);
    for _ in 0..p.subscribers {
        subs.push(driver.subscriber(&topic).await.context("subscribing")?);
    }
    let publisher = driver
        .publisher(&topic)
        .await
        .context("connecting the publisher")?;

    let ctl = RunControl::new(common.deadline, common.drain);
    let total = p.messages.saturating_mul(p.subscribers as u64);
    let _progress = Progress::start(ctl.clone(), total, "fanout".into());
    let receivers: Vec<_> = subs
        .into_iter()
        .map(|mut sub| {
            let ctl = ctl.clone();
            let tracker = SeqTracker::new(p.messages);
            tokio::spawn(async move {
                let got = receive(&mut sub, &tracker, &ctl, OnComplete::StopSelf).await;
                (got, tracker.tally())
            })
        })
        .collect();
    let sender = tokio::spawn(publish_range(publisher, 0..p.messages, p.size, ctl.clone()));
    let mut errors = Vec::new();
    let sent = match joined(sender.await) {
        Ok(s) => {
            if let Some(e) = &s.error {
                errors.push(format!("publisher: {e}"));
            }
            vec![s]
        }
        Err(e) => {
            errors.push(format!("publisher: {e}"));
            Vec::new()
        }
    };
    ctl.senders_done.cancel();

    let mut tally = Tally::default();
    let mut latencies = crate::latency::Latencies::default();
    let (mut count, mut first, mut last) = (0u64, None, None);
    let mut per_sub = Vec::new();
    for (i, task) in receivers.into_iter().enumerate() {
        let (got, sub_tally) = joined(task.await).map_err(anyhow::Error::msg)?;
        tally.add(sub_tally);
        latencies.merge(&got.latencies);
        count += got.count;
        first = first.min(got.first).or(first).or(got.first);
        last = last.max(got.last);
        per_sub.push(got.rate());
        if let Some(e) = got.error {
            errors.push(format!("subscriber {i}: {e}"));
        }
    }
    ctl.stop.cancel();

    let mut report = RunReport::new(
        driver.system().name(),
        Workload::Fanout.name(),
        p.to_json(),
        tally,
        latencies.percentiles(),
    );
    report.msgs_per_sec = crate::control::rate(count, first, last);
    report.mb_per_sec = report.msgs_per_sec * p.size as f64 / 1e6;
    report.duration_s = match (first, last) {
        (Some(f), Some(l)) => (l - f).as_secs_f64(),
        _ => 0.0,
    };
    report
        .details
        .insert("publisher_msgs_per_sec".into(), send_rate(&sent).into());
    report
        .details
        .insert("per_subscriber_msgs_per_sec".into(), per_sub.into());
    errors.into_iter().for_each(|e| report.add_error(e));
    Ok(report)
}
