//! CPU time a broker process used during a run, from `/proc/PID/stat`.
//!
//! `utime + stime` of a process count every one of its threads, in clock ticks
//! (`sysconf(_SC_CLK_TCK)`, usually 100 per second). The bench reads them before and
//! after a run, so a peer that has been up for earlier runs is measured as fairly as a
//! broker spawned for this one. Linux only: elsewhere nothing is measured.

use std::time::Duration;

/// `utime + stime` in clock ticks out of a `/proc/PID/stat` line. The second field
/// (the command name, in parentheses) may itself hold spaces and parentheses, so
/// the fields are counted from the last `)`.
pub fn stat_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // After the name: state (field 3) … utime (field 14), stime (field 15).
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second of the `/proc` times.
#[cfg(unix)]
fn ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

#[cfg(not(unix))]
fn ticks_per_second() -> u64 {
    100
}

/// The CPU time process `pid` has used so far (all threads, user and system);
/// `None` when it is gone or `/proc` is not there.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = stat_ticks(&stat)?;
    let hz = ticks_per_second();
    Some(Duration::from_secs(ticks / hz) + Duration::from_secs_f64((ticks % hz) as f64 / hz as f64))
}

/// CPU time of one process from when it was started until `finish`.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    pid: u32,
    start: Option<Duration>,
}

impl CpuMeter {
    /// Starts measuring `pid` now.
    pub fn start(pid: u32) -> CpuMeter {
        CpuMeter {
            pid,
            start: cpu_time(pid),
        }
    }

    /// The CPU time used since `start`, or `None` when either reading failed.
    pub fn finish(self) -> Option<Duration> {
        let end = cpu_time(self.pid)?;
        Some(end.saturating_sub(self.start?))
    }
}

/// Microseconds of CPU per message; `None` without messages.
pub fn us_per_message(cpu: Duration, messages: u64) -> Option<f64> {
    (messages > 0).then(|| cpu.as_secs_f64() * 1e6 / messages as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_read_after_the_command_name() {
        // A name with a space and a parenthesis, as `/proc` prints it.
        let stat = "4242 (nats server) R 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    250 75 0 0 20 0 8 0 12345 1263312896 5460 18446744073709551615";
        assert_eq!(stat_ticks(stat), Some(325));
        assert_eq!(stat_ticks("4242 (x) R 1"), None, "too short");
        assert_eq!(stat_ticks("no parenthesis at all"), None);
        assert_eq!(
            stat_ticks("1 (a) b) S 0 0 0 0 0 0 0 0 0 0 7 3 0"),
            Some(10),
            "the last parenthesis ends the name"
        );
    }

    #[test]
    fn per_message() {
        assert_eq!(us_per_message(Duration::from_secs(1), 0), None);
        let us = us_per_message(Duration::from_millis(750), 100_000).expect("messages");
        assert!((us - 7.5).abs() < 1e-9);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn our_own_process_uses_cpu() {
        let me = std::process::id();
        let meter = CpuMeter::start(me);
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        std::hint::black_box(x);
        let used = meter.finish().expect("our own /proc entry");
        assert!(used >= Duration::from_millis(10), "{used:?}");
        assert_eq!(cpu_time(u32::MAX), None);
    }
}
