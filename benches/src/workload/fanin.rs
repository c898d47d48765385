//! `fanin`: P publishers -> 1 subscriber on one topic.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde_json::{Map, json};

use super::{Common, Sent, check_size, joined, publish_range, send_rate, split};
use crate::control::{OnComplete, Progress, RunControl, receive};
use crate::driver::{Driver, Workload};
use crate::report::RunReport;
use crate::tracker::SeqTracker;

/// Parameters, defaults as in the issue.
#[derive(Debug, Clone, clap::Args)]
pub struct FaninParams {
    /// Publishers, each on its own connection.
    #[arg(short = 'p', long, default_value_t = 1)]
    pub publishers: usize,
    /// Message size in bytes (at least 16).
    #[arg(short = 's', long, default_value_t = 128)]
    pub size: usize,
    /// Messages in total.
    #[arg(short = 'n', long, default_value_t = 1_000_000)]
    pub messages: u64,
}

impl FaninParams {
    /// Rejects parameters that cannot make a run.
    pub fn validate(&self) -> Result<()> {
        if self.publishers == 0 {
            bail!("--publishers must be at least 1");
        }
        check_size(self.size)
    }

    fn to_json(&self) -> Map<String, serde_json::Value> {
        let v =
            json!({"publishers": self.publishers, "size": self.size, "messages": self.messages});
        v.as_object().cloned().unwrap_or_default()
    }
}

/// Runs `fanin`; delivered msgs/s is measured at the subscriber, first to last message.
pub async fn run<D: Driver>(driver: &D, p: &FaninParams, common: &Common) -> Result<RunReport> {
    p.validate()?;
    let topic = common.topic("fanin");
    let mut sub = driver.subscriber(&topic).await.context("subscribing")?;
    let mut publishers = Vec::with_capacity(p.publishers);
    for _ in 0..p.publishers {
        publishers.push(
            driver
                .publisher(&topic)
                .await
                .context("connecting a publisher")?,
        );
    }

    let ctl = RunControl::new(common.deadline, common.drain);
    let tracker = Arc::new(SeqTracker::new(p.messages));
    let _progress = Progress::start(ctl.clone(), p.messages, "fanin".into());
    let receiver = tokio::spawn({
        let (ctl, tracker) = (ctl.clone(), tracker.clone());
        async move { receive(&mut sub, &tracker, &ctl, OnComplete::StopSelf).await }
    });
    let senders: Vec<_> = publishers
        .into_iter()
        .zip(split(p.messages, p.publishers))
        .map(|(publisher, seqs)| tokio::spawn(publish_range(publisher, seqs, p.size, ctl.clone())))
        .collect();
    let mut sent: Vec<Sent> = Vec::new();
    let mut errors = Vec::new();
    for (i, task) in senders.into_iter().enumerate() {
        match joined(task.await) {
            Ok(s) => {
                if let Some(e) = &s.error {
                    errors.push(format!("publisher {i}: {e}"));
                }
                sent.push(s);
            }
            Err(e) => errors.push(format!("publisher {i}: {e}")),
        }
    }
    ctl.senders_done.cancel();
    let received = joined(receiver.await).map_err(anyhow::Error::msg)?;
    ctl.stop.cancel();

    let mut report = RunReport::new(
        driver.system().name(),
        Workload::Fanin.name(),
        p.to_json(),
        tracker.tally(),
        received.latencies.percentiles(),
    );
    report.msgs_per_sec = received.rate();
    report.mb_per_sec = report.msgs_per_sec * p.size as f64 / 1e6;
    report.duration_s = match (received.first, received.last) {
        (Some(f), Some(l)) => (l - f).as_secs_f64(),
        _ => 0.0,
    };
    report
        .details
        .insert("publisher_msgs_per_sec".into(), send_rate(&sent).into());
    if let Some(e) = received.error {
        errors.push(format!("subscriber: {e}"));
    }
    errors.into_iter().for_each(|e| report.add_error(e));
    Ok(report)
}
