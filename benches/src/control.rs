//! Run control: deadlines, the drain after senders finish, and the shared receive loop.
//!
//! Every run is bounded twice: by its message count (receivers stop once every
//! sequence number arrived) and by time (a deadline, and a short drain once all
//! senders are done, so a system that dropped messages does not make us wait forever).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;

use crate::driver::Source;
use crate::latency::Latencies;
use crate::payload;
use crate::tracker::SeqTracker;

/// Shared by every task of one run.
pub struct RunControl {
    /// When the run started (after setup).
    pub started: Instant,
    /// Hard stop: whatever has not arrived by then is missing.
    pub deadline: Instant,
    /// How long receivers keep waiting after the senders are done and the last message came.
    pub drain: Duration,
    /// Cancelled once every sender has sent (and flushed) everything.
    pub senders_done: CancellationToken,
    /// Cancelled to stop every task at once.
    pub stop: CancellationToken,
    /// Messages received so far by all receivers, for the progress bar.
    pub received: AtomicU64,
}

impl RunControl {
    /// A run starting now that must end within `limit`.
    pub fn new(limit: Duration, drain: Duration) -> Arc<RunControl> {
        let started = Instant::now();
        Arc::new(RunControl {
            started,
            deadline: started + limit,
            drain,
            senders_done: CancellationToken::new(),
            stop: CancellationToken::new(),
            received: AtomicU64::new(0),
        })
    }

    /// True once the deadline has passed.
    pub fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }
}

/// What one receiver saw.
#[derive(Default)]
pub struct Received {
    /// End-to-end latencies of the messages it received.
    pub latencies: Latencies,
    /// Arrival of its first and last message.
    pub first: Option<Instant>,
    /// See `first`.
    pub last: Option<Instant>,
    /// Messages received, duplicates included.
    pub count: u64,
    /// Payload bytes received.
    pub bytes: u64,
    /// Why it stopped early, if it failed (a slow-consumer disconnect, a dropped connection).
    pub error: Option<String>,
}

impl Received {
    /// Messages per second from its first to its last message.
    pub fn rate(&self) -> f64 {
        rate(self.count, self.first, self.last)
    }
}

/// Messages per second over `[first, last]`; zero when fewer than two instants are known.
pub fn rate(count: u64, first: Option<Instant>, last: Option<Instant>) -> f64 {
    match (first, last) {
        (Some(f), Some(l)) if l > f => count.saturating_sub(1) as f64 / (l - f).as_secs_f64(),
        _ => 0.0,
    }
}

/// When receiving stops once complete.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnComplete {
    /// Only this receiver stops (each fan-out subscriber has its own tracker).
    StopSelf,
    /// Every task stops (competing consumers share one tracker).
    StopAll,
}

/// Receives from `src` until `tracker` is complete, the run is stopped, the deadline
/// passes, or the senders are done and nothing came for `ctl.drain`.
pub async fn receive<S: Source>(
    src: &mut S,
    tracker: &SeqTracker,
    ctl: &RunControl,
    on_complete: OnComplete,
) -> Received {
    let mut out = Received::default();
    let mut unreported = 0u64;
    let mut done_since: Option<Instant> = None;
    let mut last_seen = Instant::now();
    'receiving: loop {
        if tracker.complete() {
            if on_complete == OnComplete::StopAll {
                ctl.stop.cancel();
            }
            break;
        }
        // One `next` future lives across wake-ups: only the end of the run may drop
        // it, so a consumer is never cut off between receiving and acking a message.
        let next = src.next();
        tokio::pin!(next);
        let polled = loop {
            if done_since.is_none() && ctl.senders_done.is_cancelled() {
                done_since = Some(Instant::now());
            }
            let wake = match done_since {
                Some(done) => ctl.deadline.min(done.max(last_seen) + ctl.drain),
                None => ctl.deadline,
            };
            tokio::select! {
                polled = &mut next => break polled,
                () = ctl.senders_done.cancelled(), if done_since.is_none() => {}
                () = ctl.stop.cancelled() => break 'receiving,
                () = sleep_until(wake.into()) => break 'receiving,
            }
        };
        match polled {
            Ok(Some(body)) => {
                let now = Instant::now();
                last_seen = now;
                out.first.get_or_insert(now);
                out.last = Some(now);
                out.count += 1;
                out.bytes += body.len() as u64;
                match payload::decode(&body) {
                    Some(stamp) => {
                        tracker.record(stamp.seq);
                        out.latencies
                            .record_ns(payload::now_ns().saturating_sub(stamp.sent_ns));
                    }
                    None => tracker.record_foreign(),
                }
                unreported += 1;
                if unreported == 256 {
                    ctl.received.fetch_add(unreported, Ordering::Relaxed);
                    unreported = 0;
                }
            }
            Ok(None) => {
                out.error = Some("the system closed the subscription".into());
                break;
            }
            Err(err) => {
                out.error = Some(format!("{err:#}"));
                break;
            }
        }
    }
    ctl.received.fetch_add(unreported, Ordering::Relaxed);
    if let Some(incidents) = src.incidents() {
        out.error = Some(match out.error.take() {
            Some(error) => format!("{error}; {incidents}"),
            None => incidents,
        });
    }
    out
}

/// A progress bar over `ctl.received`, shown only once a run has lasted a second,
/// only on a terminal, and cleared when dropped.
pub struct Progress {
    ticker: tokio::task::JoinHandle<()>,
    bar: ProgressBar,
}

impl Progress {
    /// Starts watching `ctl.received` towards `total`.
    pub fn start(ctl: Arc<RunControl>, total: u64, label: String) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} ({per_sec})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(label);
        let shown = bar.clone();
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let show_at = ctl.started + Duration::from_secs(1);
            loop {
                tick.tick().await;
                if shown.is_hidden() && Instant::now() >= show_at {
                    shown.set_draw_target(ProgressDrawTarget::stderr());
                }
                shown.set_position(ctl.received.load(Ordering::Relaxed));
            }
        });
        Progress { ticker, bar }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Result;
    use bytes::Bytes;
    use tokio::sync::mpsc;

    /// A source fed through a channel, standing for a subscription.
    struct Channel(mpsc::UnboundedReceiver<Bytes>);

    impl Source for Channel {
        async fn next(&mut self) -> Result<Option<Bytes>> {
            Ok(self.0.recv().await)
        }
    }

    fn feed(seqs: impl IntoIterator<Item = u64>) -> (Channel, mpsc::UnboundedSender<Bytes>) {
        let (tx, rx) = mpsc::unbounded_channel();
        for seq in seqs {
            tx.send(payload::encode(seq, 32)).expect("receiver alive");
        }
        (Channel(rx), tx)
    }

    #[tokio::test]
    async fn stops_as_soon_as_everything_arrived() {
        let ctl = RunControl::new(Duration::from_secs(60), Duration::from_secs(60));
        let tracker = SeqTracker::new(100);
        let (mut src, _tx) = feed((0..100).rev());
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            receive(&mut src, &tracker, &ctl, OnComplete::StopAll),
        )
        .await
        .expect("complete runs do not wait for the drain");
        assert_eq!(got.count, 100);
        assert_eq!(got.bytes, 3200);
        assert!(got.error.is_none());
        assert!(tracker.complete());
        assert!(
            ctl.stop.is_cancelled(),
            "competing consumers are told to stop"
        );
        assert_eq!(ctl.received.load(Ordering::Relaxed), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_message_ends_the_run_after_the_drain() {
        let ctl = RunControl::new(Duration::from_secs(3600), Duration::from_secs(2));
        let tracker = SeqTracker::new(10);
        let (mut src, _tx) = feed((0..10).filter(|s| *s != 4));
        ctl.senders_done.cancel();
        let got = receive(&mut src, &tracker, &ctl, OnComplete::StopSelf).await;
        assert_eq!(got.count, 9);
        assert_eq!(tracker.tally().missing, 1);
        assert!(!ctl.stop.is_cancelled());
    }

    #[tokio::test]
    async fn a_closed_stream_is_an_error_and_foreign_bodies_are_counted() {
        let ctl = RunControl::new(Duration::from_secs(60), Duration::from_secs(60));
        let tracker = SeqTracker::new(5);
        let (mut src, tx) = feed([0, 1]);
        tx.send(Bytes::from_static(b"short"))
            .expect("receiver alive");
        drop(tx);
        let got = receive(&mut src, &tracker, &ctl, OnComplete::StopSelf).await;
        assert_eq!(got.count, 3);
        assert_eq!(tracker.tally().foreign, 1);
        assert!(got.error.expect("closed").contains("closed"));
    }

    #[test]
    fn rates_need_two_instants() {
        let t = Instant::now();
        assert_eq!(rate(10, None, None), 0.0);
        assert_eq!(rate(10, Some(t), Some(t)), 0.0);
        let r = rate(11, Some(t), Some(t + Duration::from_secs(2)));
        assert!((r - 5.0).abs() < 1e-9);
    }
}
