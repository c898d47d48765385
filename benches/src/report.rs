//! One run's result: the JSON object of the issue and the human summary.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::latency::Percentiles;
use crate::tracker::Tally;

/// One run. Field names are fixed by the issue so that results stay comparable.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// `tidings`, `nats`, …
    pub system: String,
    /// `fanin`, `fanout`, `queue`, `latency` or `reqrep`.
    pub workload: String,
    /// The workload's parameters, named as on the command line.
    pub params: Map<String, Value>,
    /// Delivered messages (or completed requests) per second.
    pub msgs_per_sec: f64,
    /// Delivered payload megabytes (10^6 bytes) per second.
    pub mb_per_sec: f64,
    /// Median latency (end to end, or round trip for reqrep), µs.
    pub p50_us: Option<f64>,
    /// 99th percentile, µs.
    pub p99_us: Option<f64>,
    /// 99.9th percentile, µs.
    pub p999_us: Option<f64>,
    /// Largest latency seen, µs.
    pub max_us: Option<f64>,
    /// Messages delivered more than once (summed over receivers).
    pub duplicates: u64,
    /// Messages never delivered (summed over receivers).
    pub missing: u64,
    /// Wall time of the measured part of the run, seconds.
    pub duration_s: f64,
    /// Workload-specific extras: publisher rate, per-subscriber rates, p90, errors.
    pub details: Map<String, Value>,
}

impl RunReport {
    /// A report with the counts and latencies filled in; rates are set by the workload.
    pub fn new(
        system: &str,
        workload: &str,
        params: Map<String, Value>,
        tally: Tally,
        latency: Option<Percentiles>,
    ) -> RunReport {
        let mut details = Map::new();
        if let Some(p) = latency {
            details.insert("p90_us".into(), p.p90_us.into());
        }
        if tally.foreign > 0 {
            details.insert("foreign".into(), tally.foreign.into());
        }
        RunReport {
            system: system.into(),
            workload: workload.into(),
            params,
            msgs_per_sec: 0.0,
            mb_per_sec: 0.0,
            p50_us: latency.map(|p| p.p50_us),
            p99_us: latency.map(|p| p.p99_us),
            p999_us: latency.map(|p| p.p999_us),
            max_us: latency.map(|p| p.max_us),
            duplicates: tally.duplicates,
            missing: tally.missing,
            duration_s: 0.0,
            details,
        }
    }

    /// Records an error a task hit, so that it shows in both outputs.
    pub fn add_error(&mut self, error: String) {
        let errors = self
            .details
            .entry("errors")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = errors {
            list.push(error.into());
        }
    }

    /// The errors recorded with [`RunReport::add_error`].
    pub fn errors(&self) -> Vec<String> {
        match self.details.get("errors") {
            Some(Value::Array(list)) => list
                .iter()
                .map(|e| e.as_str().unwrap_or_default().to_owned())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Messages that were not ours (corrupt or out of range).
    pub fn foreign(&self) -> u64 {
        self.details
            .get("foreign")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// True when the run lost or corrupted messages: it must exit non-zero.
    pub fn failed(&self) -> bool {
        self.missing > 0 || self.foreign() > 0
    }

    /// The JSON object, one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Peak RSS of the broker process during the run, KiB, when it was measured.
    pub fn rss_peak_kb(&self) -> Option<u64> {
        self.details.get("rss_peak_kb").and_then(Value::as_u64)
    }

    /// Broker CPU time per message published, µs, when it was measured.
    pub fn broker_cpu_us_per_msg(&self) -> Option<f64> {
        self.details
            .get("broker_cpu_us_per_msg")
            .and_then(Value::as_f64)
    }

    /// How the broker ran and, when measured, its peak memory and CPU.
    fn broker_line(&self) -> Option<String> {
        let mode = self.details.get("broker_mode").and_then(Value::as_str)?;
        let mut line = match mode {
            "process" => "a tidings-broker process started for this run".to_owned(),
            "in-process" => "in the bench's process, sharing its runtime".to_owned(),
            other => other.to_owned(),
        };
        if let Some(kb) = self.rss_peak_kb() {
            let pid = self.details.get("rss_pid").and_then(Value::as_u64);
            let method = self.details.get("rss_method").and_then(Value::as_str);
            let _ = write!(
                line,
                "; peak RSS {} (pid {}, {})",
                mib(kb),
                pid.unwrap_or(0),
                method.unwrap_or("?")
            );
        }
        if let Some(us) = self.broker_cpu_us_per_msg() {
            let total = self.details.get("broker_cpu_s").and_then(Value::as_f64);
            let _ = write!(
                line,
                "; CPU {us:.2} µs/msg ({:.2} s in all)",
                total.unwrap_or(0.0)
            );
        }
        Some(line)
    }

    /// The human summary.
    pub fn human(&self) -> String {
        let mut out = String::new();
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(
            out,
            "{} on {}  ({})",
            self.workload,
            self.system,
            params.join(" ")
        );
        let unit = if self.workload == "reqrep" {
            "requests/s"
        } else {
            "msgs/s"
        };
        let _ = writeln!(
            out,
            "  throughput  {} {unit}  {:.1} MB/s  over {:.3} s",
            thousands(self.msgs_per_sec),
            self.mb_per_sec,
            self.duration_s
        );
        for (key, value) in &self.details {
            if let Some(rate) = key.strip_suffix("_msgs_per_sec") {
                let shown = match value {
                    Value::Array(list) => list
                        .iter()
                        .map(|v| thousands(v.as_f64().unwrap_or(0.0)))
                        .collect::<Vec<_>>()
                        .join(", "),
                    v => thousands(v.as_f64().unwrap_or(0.0)),
                };
                let _ = writeln!(out, "  {rate:<11} {shown} msgs/s");
            }
        }
        if let (Some(p50), Some(p99), Some(p999), Some(max)) =
            (self.p50_us, self.p99_us, self.p999_us, self.max_us)
        {
            let p90 = self.details.get("p90_us").and_then(Value::as_f64);
            let _ = writeln!(
                out,
                "  latency µs  p50 {p50:.1}  p90 {}  p99 {p99:.1}  p99.9 {p999:.1}  max {max:.1}",
                p90.map_or("-".to_owned(), |v| format!("{v:.1}"))
            );
        }
        // Workload extras that are neither rates nor errors (bursty's per-subscriber
        // p99s and losses, say), one line each.
        for (key, value) in &self.details {
            let extra = (key.ends_with("_us") && key != "p90_us")
                || key.ends_with("_missing")
                || key.ends_with("_ratio");
            if extra && let Some(v) = value.as_f64() {
                let _ = writeln!(
                    out,
                    "  {key:<11} {}",
                    if v.fract() == 0.0 {
                        thousands(v)
                    } else {
                        format!("{v:.2}")
                    }
                );
            }
        }
        if let Some(line) = self.broker_line() {
            let _ = writeln!(out, "  broker      {line}");
        }
        for error in self.errors() {
            let _ = writeln!(out, "  error       {error}");
        }
        if self.failed() {
            let _ = writeln!(
                out,
                "  !!! LOST MESSAGES: {} missing, {} duplicates, {} foreign !!!",
                self.missing,
                self.duplicates,
                self.foreign()
            );
        } else if self.duplicates > 0 {
            let _ = writeln!(
                out,
                "  warning     {} duplicates (none missing)",
                self.duplicates
            );
        } else {
            let _ = writeln!(out, "  correctness ok: 0 missing, 0 duplicates");
        }
        out
    }
}

/// KiB as MiB with one decimal: `19016` -> `18.6 MiB`.
pub fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

/// `x` rounded to a whole count. Float-to-int `as` saturates (NaN gives 0), which is
/// exactly what a count derived from a rate or a scale needs.
#[allow(clippy::cast_possible_truncation)]
pub fn whole(x: f64) -> u64 {
    x.round() as u64
}

/// `1234567.8` -> `1,234,568`: rates read at a glance.
pub fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "-".into();
    }
    let rounded = whole(value.abs());
    let digits = rounded.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if value.round() < 0.0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(missing: u64) -> RunReport {
        let mut params = Map::new();
        params.insert("publishers".into(), 1.into());
        let tally = Tally {
            unique: 10 - missing,
            missing,
            duplicates: 0,
            foreign: 0,
        };
        let latency = Percentiles {
            p50_us: 10.0,
            p90_us: 20.0,
            p99_us: 30.0,
            p999_us: 40.0,
            max_us: 50.0,
        };
        let mut r = RunReport::new("tidings", "fanin", params, tally, Some(latency));
        r.msgs_per_sec = 1_234_567.0;
        r.mb_per_sec = 158.0;
        r.duration_s = 0.5;
        r
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(thousands(-1234.0), "-1,234");
        assert_eq!(thousands(f64::NAN), "-");
    }

    #[test]
    fn json_has_exactly_the_issue_fields() {
        let v: Value = serde_json::from_str(&sample(0).to_json()).expect("valid json");
        let obj = v.as_object().expect("an object");
        for field in [
            "system",
            "workload",
            "params",
            "msgs_per_sec",
            "mb_per_sec",
            "p50_us",
            "p99_us",
            "p999_us",
            "max_us",
            "duplicates",
            "missing",
            "duration_s",
        ] {
            assert!(obj.contains_key(field), "{field} missing");
        }
        assert_eq!(obj["system"], "tidings");
        assert_eq!(obj["p99_us"], 30.0);
        assert_eq!(obj["details"]["p90_us"], 20.0);
    }

    #[test]
    fn the_broker_line_names_the_mode_and_the_peak() {
        let mut r = sample(0);
        assert!(!r.human().contains("broker "), "no mode, no line");
        r.details.insert("broker_mode".into(), "in-process".into());
        assert!(r.human().contains("sharing its runtime"), "{}", r.human());
        r.details.insert("broker_mode".into(), "process".into());
        r.details.insert("rss_peak_kb".into(), 19_016.into());
        r.details.insert("rss_pid".into(), 42.into());
        r.details.insert("rss_method".into(), "VmHWM".into());
        assert_eq!(r.rss_peak_kb(), Some(19_016));
        let text = r.human();
        assert!(
            text.contains(
                "tidings-broker process started for this run; peak RSS 18.6 MiB (pid 42, VmHWM)"
            ),
            "{text}"
        );
        assert_eq!(mib(1024), "1.0 MiB");
        r.details.insert("broker_cpu_s".into(), 1.5.into());
        r.details.insert("broker_cpu_us_per_msg".into(), 7.5.into());
        assert_eq!(r.broker_cpu_us_per_msg(), Some(7.5));
        assert!(
            r.human().contains("; CPU 7.50 µs/msg (1.50 s in all)"),
            "{}",
            r.human()
        );
    }

    #[test]
    fn lost_messages_fail_loudly() {
        let ok = sample(0);
        assert!(!ok.failed());
        assert!(ok.human().contains("correctness ok"));
        assert!(ok.human().contains("1,234,567 msgs/s"));
        let mut lost = sample(3);
        lost.add_error("subscriber 0: slow consumer".into());
        assert!(lost.failed());
        let text = lost.human();
        assert!(text.contains("LOST MESSAGES: 3 missing"), "{text}");
        assert!(text.contains("slow consumer"), "{text}");
        assert_eq!(lost.errors().len(), 1);
    }
}
