//! `bursty`: a publisher at a fixed rate -> a subscriber that pauses now and then
//! (100 ms every second by default) and a second, fast subscriber; run once with
//! the fast subscriber alone and once with both, so the paused one's effect on the
//! fast one shows in its p99.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use serde_json::{Map, json};

use super::latency::{LatencyParams, paced};
use super::{Common, check_size, joined};
use crate::control::{OnComplete, Progress, Received, RunControl, receive};
use crate::driver::{Driver, Source, Workload};
use crate::report::RunReport;
use crate::tracker::{SeqTracker, Tally};

/// Parameters. The setting is a publisher at half the subscriber's rate:
/// measure the subscriber's rate with `fanin` first and pass half of it as --rate.
#[derive(Debug, Clone, clap::Args)]
pub struct BurstyParams {
    /// Messages per second the publisher sends.
    #[arg(short = 'r', long, default_value_t = 100_000)]
    pub rate: u64,
    /// How long to publish, in seconds, in each of the two phases.
    #[arg(short = 't', long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Message size in bytes (at least 16).
    #[arg(short = 's', long, default_value_t = 128)]
    pub size: usize,
    /// How long the paused subscriber stops reading each time, milliseconds.
    #[arg(long, default_value_t = 100)]
    pub pause_ms: u64,
    /// How often it pauses, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub every_ms: u64,
}

impl BurstyParams {
    /// Rejects parameters that cannot make a run.
    pub fn validate(&self) -> Result<()> {
        if self.every_ms == 0 || self.pause_ms >= self.every_ms {
            bail!("--pause-ms must be shorter than --every-ms (and --every-ms more than 0)");
        }
        self.paced().validate()?;
        check_size(self.size)
    }

    fn paced(&self) -> LatencyParams {
        LatencyParams {
            rate: self.rate,
            seconds: self.seconds,
            size: self.size,
        }
    }

    fn to_json(&self) -> Map<String, serde_json::Value> {
        let v = json!({"rate": self.rate, "seconds": self.seconds, "size": self.size,
            "pause_ms": self.pause_ms, "every_ms": self.every_ms});
        v.as_object().cloned().unwrap_or_default()
    }
}

/// A source that stops reading for `pause` once every `every`: a subscriber that
/// falls behind for a moment (a GC pause, a slow disk write) and then catches up.
pub struct Pausing<S> {
    inner: S,
    pause: Duration,
    every: Duration,
    next_pause: Option<Instant>,
    /// Pauses taken.
    pub pauses: u64,
}

impl<S> Pausing<S> {
    /// Wraps `inner`; its first pause comes `every` after its first message.
    pub fn new(inner: S, pause: Duration, every: Duration) -> Pausing<S> {
        Pausing {
            inner,
            pause,
            every,
            next_pause: None,
            pauses: 0,
        }
    }
}

impl<S: Source> Source for Pausing<S> {
    async fn next(&mut self) -> Result<Option<Bytes>> {
        let now = Instant::now();
        match self.next_pause {
            None => self.next_pause = Some(now + self.every),
            Some(at) if now >= at => {
                tokio::time::sleep(self.pause).await;
                self.pauses += 1;
                self.next_pause = Some(at + self.every);
            }
            Some(_) => {}
        }
        self.inner.next().await
    }

    fn incidents(&mut self) -> Option<String> {
        self.inner.incidents()
    }
}

/// What one phase measured.
struct Phase {
    fast: Received,
    fast_tally: Tally,
    paused: Option<(Received, Tally)>,
    errors: Vec<String>,
}

/// One phase: the paced publisher to the fast subscriber and, with `with_paused`,
/// to the pausing one too, on a topic of its own.
async fn phase<D: Driver>(
    driver: &D,
    p: &BurstyParams,
    common: &Common,
    with_paused: bool,
) -> Result<Phase> {
    let name = if with_paused {
        "bursty.both"
    } else {
        "bursty.alone"
    };
    let topic = common.topic(name);
    let mut fast = driver.subscriber(&topic).await.context("subscribing")?;
    let paused = if with_paused {
        let sub = driver.subscriber(&topic).await.context("subscribing")?;
        Some(Pausing::new(
            sub,
            Duration::from_millis(p.pause_ms),
            Duration::from_millis(p.every_ms),
        ))
    } else {
        None
    };
    let publisher = driver
        .publisher(&topic)
        .await
        .context("connecting the publisher")?;
    let paced_params = p.paced();
    let total = paced_params.messages();
    let ctl = RunControl::new(
        common.deadline + Duration::from_secs_f64(p.seconds),
        common.drain,
    );
    let _progress = Progress::start(
        ctl.clone(),
        total * (1 + u64::from(with_paused)),
        name.into(),
    );
    let fast_tracker = Arc::new(SeqTracker::new(total));
    let fast_task = tokio::spawn({
        let (ctl, tracker) = (ctl.clone(), fast_tracker.clone());
        async move {
            let got = receive(&mut fast, &tracker, &ctl, OnComplete::StopSelf).await;
            (got, fast.incidents())
        }
    });
    let paused_tracker = Arc::new(SeqTracker::new(total));
    let paused_task = paused.map(|mut sub| {
        let (ctl, tracker) = (ctl.clone(), paused_tracker.clone());
        tokio::spawn(async move {
            let got = receive(&mut sub, &tracker, &ctl, OnComplete::StopSelf).await;
            (got, sub.incidents())
        })
    });
    let sent = joined(tokio::spawn(paced(publisher, paced_params, ctl.clone())).await)
        .map_err(anyhow::Error::msg)?;
    let mut errors = Vec::new();
    if let Some(e) = sent.error {
        errors.push(format!("publisher: {e}"));
    }
    ctl.senders_done.cancel();
    let (fast, incidents) = joined(fast_task.await).map_err(anyhow::Error::msg)?;
    errors.extend(fast.error.iter().map(|e| format!("fast subscriber: {e}")));
    errors.extend(incidents.map(|e| format!("fast subscriber: {e}")));
    let paused = match paused_task {
        Some(task) => {
            let (got, incidents) = joined(task.await).map_err(anyhow::Error::msg)?;
            errors.extend(got.error.iter().map(|e| format!("paused subscriber: {e}")));
            errors.extend(incidents.map(|e| format!("paused subscriber: {e}")));
            Some((got, paused_tracker.tally()))
        }
        None => None,
    };
    ctl.stop.cancel();
    Ok(Phase {
        fast,
        fast_tally: fast_tracker.tally(),
        paused,
        errors,
    })
}

/// Runs `bursty`. The fixed fields describe the second phase: msgs/s is the paused
/// subscriber's delivered rate, the percentiles are the fast subscriber's, missing
/// and duplicates are summed over both subscribers of both phases.
pub async fn run<D: Driver>(driver: &D, p: &BurstyParams, common: &Common) -> Result<RunReport> {
    p.validate()?;
    let alone = phase(driver, p, common, false).await?;
    let both = phase(driver, p, common, true).await?;
    let (paused, paused_tally) = both
        .paused
        .ok_or_else(|| anyhow::anyhow!("the second phase ran without its paused subscriber"))?;
    let tally = Tally {
        unique: both.fast_tally.unique + paused_tally.unique,
        missing: alone.fast_tally.missing + both.fast_tally.missing + paused_tally.missing,
        duplicates: alone.fast_tally.duplicates
            + both.fast_tally.duplicates
            + paused_tally.duplicates,
        foreign: alone.fast_tally.foreign + both.fast_tally.foreign + paused_tally.foreign,
    };
    let fast_with = both.fast.latencies.percentiles();
    let fast_alone = alone.fast.latencies.percentiles();
    let mut report = RunReport::new(
        driver.system().name(),
        Workload::Bursty.name(),
        p.to_json(),
        tally,
        fast_with,
    );
    report.msgs_per_sec = paused.rate();
    report.mb_per_sec = report.msgs_per_sec * p.size as f64 / 1e6;
    report.duration_s = match (paused.first, paused.last) {
        (Some(f), Some(l)) => (l - f).as_secs_f64(),
        _ => 0.0,
    };
    let d = &mut report.details;
    d.insert("paused_missing".into(), paused_tally.missing.into());
    d.insert(
        "fast_missing".into(),
        (alone.fast_tally.missing + both.fast_tally.missing).into(),
    );
    d.insert("fast_msgs_per_sec".into(), both.fast.rate().into());
    if let Some(a) = fast_alone {
        d.insert("fast_alone_p99_us".into(), a.p99_us.into());
        if let Some(w) = fast_with {
            d.insert("fast_with_paused_p99_us".into(), w.p99_us.into());
            if a.p99_us > 0.0 {
                d.insert("fast_p99_ratio".into(), (w.p99_us / a.p99_us).into());
            }
        }
    }
    if let Some(pp) = paused.latencies.percentiles() {
        d.insert("paused_p99_us".into(), pp.p99_us.into());
    }
    for e in alone
        .errors
        .into_iter()
        .map(|e| format!("phase 1 (fast alone): {e}"))
    {
        report.add_error(e);
    }
    for e in both
        .errors
        .into_iter()
        .map(|e| format!("phase 2 (with the paused one): {e}"))
    {
        report.add_error(e);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload;
    use tokio::sync::mpsc;

    struct Channel(mpsc::UnboundedReceiver<Bytes>);

    impl Source for Channel {
        async fn next(&mut self) -> Result<Option<Bytes>> {
            Ok(self.0.recv().await)
        }
    }

    #[test]
    fn parameters_are_checked() {
        let p = BurstyParams {
            rate: 1000,
            seconds: 1.0,
            size: 128,
            pause_ms: 100,
            every_ms: 1000,
        };
        assert!(p.validate().is_ok());
        assert!(
            BurstyParams {
                pause_ms: 1000,
                ..p.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            BurstyParams {
                every_ms: 0,
                ..p.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            BurstyParams {
                size: 8,
                ..p.clone()
            }
            .validate()
            .is_err()
        );
        assert!(BurstyParams { rate: 0, ..p }.validate().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_source_pauses_once_per_period() {
        let (tx, rx) = mpsc::unbounded_channel();
        for seq in 0..5 {
            tx.send(payload::encode(seq, 32)).expect("receiver alive");
        }
        let mut src = Pausing::new(
            Channel(rx),
            Duration::from_millis(100),
            Duration::from_secs(1),
        );
        let start = tokio::time::Instant::now();
        src.next().await.expect("ok").expect("a message");
        assert_eq!(src.pauses, 0, "no pause before the first period ends");
        tokio::time::advance(Duration::from_millis(1500)).await;
        src.next().await.expect("ok").expect("a message");
        assert_eq!(src.pauses, 1);
        assert!(start.elapsed() >= Duration::from_millis(1600));
        src.next().await.expect("ok").expect("a message");
        assert_eq!(src.pauses, 1, "one pause per period");
    }
}
