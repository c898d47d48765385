//! `latency`: one publisher at a fixed rate R for T seconds -> one subscriber.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Map, json};

use super::{Common, Sent, check_size, joined};
use crate::control::{OnComplete, Progress, RunControl, receive};
use crate::driver::{Driver, Publisher, Workload};
use crate::payload;
use crate::report::{RunReport, whole};
use crate::tracker::SeqTracker;

/// Parameters, defaults as in the issue.
#[derive(Debug, Clone, clap::Args)]
pub struct LatencyParams {
    /// Messages per second.
    #[arg(short = 'r', long, default_value_t = 10_000)]
    pub rate: u64,
    /// How long to publish, in seconds.
    #[arg(short = 't', long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Message size in bytes (at least 16).
    #[arg(short = 's', long, default_value_t = 128)]
    pub size: usize,
}

impl LatencyParams {
    /// Rejects parameters that cannot make a run.
    pub fn validate(&self) -> Result<()> {
        if self.rate == 0 {
            bail!("--rate must be at least 1 msg/s");
        }
        if !(self.seconds > 0.0 && self.seconds <= 3600.0) {
            bail!("--seconds must be in (0, 3600]");
        }
        check_size(self.size)
    }

    /// Messages the run sends: rate × seconds.
    pub fn messages(&self) -> u64 {
        whole(self.rate as f64 * self.seconds)
    }

    fn to_json(&self) -> Map<String, serde_json::Value> {
        let v = json!({"rate": self.rate, "seconds": self.seconds, "size": self.size});
        v.as_object().cloned().unwrap_or_default()
    }
}

/// Publishes on a 1 ms tick whatever the rate says is due by now, then flushes.
///
/// Timers are 1 ms coarse, so sending one message per 100 µs would need a spinning
/// core we do not have; each message is stamped when it is actually sent.
pub(super) async fn paced<P: Publisher>(
    mut publisher: P,
    p: LatencyParams,
    ctl: Arc<RunControl>,
) -> Sent {
    let total = p.messages();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut seq, mut error) = (0u64, None);
    while seq < total {
        tick.tick().await;
        if ctl.expired() || ctl.stop.is_cancelled() {
            error = Some(format!("stopped by the deadline after {seq} messages"));
            break;
        }
        // Floor, not round: a message is due once its whole interval has begun.
        let due = whole((started.elapsed().as_secs_f64() * p.rate as f64).floor()).min(total);
        while seq < due {
            if let Err(e) = publisher.publish(payload::encode(seq, p.size)).await {
                error = Some(format!("publish failed after {seq} messages: {e:#}"));
                break;
            }
            seq += 1;
        }
        if error.is_some() {
            break;
        }
        if let Err(e) = publisher.flush().await {
            error = Some(format!("flush failed: {e:#}"));
            break;
        }
    }
    Sent {
        count: seq,
        started,
        finished: Instant::now(),
        error,
    }
}

/// Runs `latency`; percentiles are one-way, publish to delivery.
pub async fn run<D: Driver>(driver: &D, p: &LatencyParams, common: &Common) -> Result<RunReport> {
    p.validate()?;
    let topic = common.topic("latency");
    let mut sub = driver.subscriber(&topic).await.context("subscribing")?;
    let publisher = driver
        .publisher(&topic)
        .await
        .context("connecting the publisher")?;

    // The deadline counts from the start of publishing, on top of the run's own length.
    let limit = common.deadline + Duration::from_secs_f64(p.seconds);
    let ctl = RunControl::new(limit, common.drain);
    let tracker = Arc::new(SeqTracker::new(p.messages()));
    let _progress = Progress::start(ctl.clone(), p.messages(), "latency".into());
    let receiver = tokio::spawn({
        let (ctl, tracker) = (ctl.clone(), tracker.clone());
        async move { receive(&mut sub, &tracker, &ctl, OnComplete::StopSelf).await }
    });
    let sender = tokio::spawn(paced(publisher, p.clone(), ctl.clone()));
    let mut errors = Vec::new();
    let sent = joined(sender.await).map_err(anyhow::Error::msg)?;
    if let Some(e) = sent.error {
        errors.push(format!("publisher: {e}"));
    }
    ctl.senders_done.cancel();
    let received = joined(receiver.await).map_err(anyhow::Error::msg)?;
    ctl.stop.cancel();

    let mut report = RunReport::new(
        driver.system().name(),
        Workload::Latency.name(),
        p.to_json(),
        tracker.tally(),
        received.latencies.percentiles(),
    );
    report.msgs_per_sec = received.rate();
    report.mb_per_sec = report.msgs_per_sec * p.size as f64 / 1e6;
    report.duration_s = (sent.finished - sent.started).as_secs_f64();
    if let Some(e) = received.error {
        errors.push(format!("subscriber: {e}"));
    }
    errors.into_iter().for_each(|e| report.add_error(e));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_is_rate_times_seconds() {
        let p = LatencyParams {
            rate: 10_000,
            seconds: 0.5,
            size: 128,
        };
        assert_eq!(p.messages(), 5_000);
        assert!(p.validate().is_ok());
        assert!(
            LatencyParams {
                rate: 0,
                ..p.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            LatencyParams {
                seconds: -1.0,
                ..p.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            LatencyParams {
                seconds: f64::NAN,
                ..p
            }
            .validate()
            .is_err()
        );
    }
}
