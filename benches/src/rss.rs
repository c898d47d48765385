//! Peak resident memory of a broker process during a run, read from `/proc`.
//!
//! A broker the bench spawned for one run is measured by its `VmHWM` (the kernel's
//! high-water mark since the process started, so exact for that run). A peer that has
//! been up through earlier runs has a `VmHWM` from those runs too, so its `VmRSS` is
//! sampled every [`SAMPLE_EVERY`] during the run and the largest sample is reported.
//! Linux only: elsewhere nothing is measured and the reports say so by omission.

use std::path::Path;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::driver::System;

/// How often `VmRSS` is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// Where benches/peers/peers.sh keeps its pid files when `$TIDINGS_PEERS_DIR` is unset.
pub const DEFAULT_PEERS_DIR: &str = "/tmp/tidings-peers";

/// A `kB` field (`VmRSS`, `VmHWM`, …) of a `/proc/PID/status` text; the kernel's `kB`
/// are KiB.
pub fn status_kb(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        if name != key {
            return None;
        }
        let mut words = rest.split_whitespace();
        let value = words.next()?.parse().ok()?;
        (words.next() == Some("kB")).then_some(value)
    })
}

/// Reads one `kB` field of process `pid`'s status; `None` when it is gone or unreadable.
pub fn read_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_kb(&status, key)
}

/// The pid in a pid file's text (digits, maybe a newline).
pub fn parse_pid(text: &str) -> Option<u32> {
    text.trim().parse().ok().filter(|pid| *pid > 0)
}

/// The pid file benches/peers/peers.sh writes for `system`, and the process name
/// (`/proc/PID/comm`) the pid must have, so a stale file whose pid was reused by
/// another program is not measured.
pub fn peer_pid_file(system: System) -> Option<(&'static str, &'static str)> {
    match system {
        System::Tidings => None,
        System::Nats | System::Jetstream => Some(("nats.pid", "nats-server")),
        System::Rabbitmq => Some(("rabbitmq.pid", "beam.smp")),
        System::Redis => Some(("redis.pid", "redis-server")),
        System::Mqtt => Some(("mosquitto.pid", "mosquitto")),
    }
}

/// The pid of `system`'s server as started by benches/peers/peers.sh in `dir`, if
/// that process is alive and is the expected program.
pub fn peer_pid(system: System, dir: &Path) -> Option<u32> {
    let (file, program) = peer_pid_file(system)?;
    live_pid(&dir.join(file), program)
}

/// The pid in `file` if that process is alive and runs `program`.
fn live_pid(file: &Path, program: &str) -> Option<u32> {
    let pid = parse_pid(&std::fs::read_to_string(file).ok()?)?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == program).then_some(pid)
}

/// The inode of the socket listening on TCP `port` in a `/proc/net/tcp` (or
/// `tcp6`) text: rows of `sl local_address rem_address st … uid timeout inode`,
/// addresses as `HEXIP:HEXPORT`, state `0A` for LISTEN.
pub fn listening_inode(table: &str, port: u16) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (_, hex_port) = fields.get(1)?.rsplit_once(':')?;
        let listening = *fields.get(3)? == "0A";
        let matches = u16::from_str_radix(hex_port, 16).ok()? == port;
        (listening && matches).then(|| fields.get(9)?.parse().ok())?
    })
}

/// The process listening on TCP `port` on this machine, found through `/proc`
/// (the socket's inode, then the process holding it): how a peer that
/// benches/peers/peers.sh did not start is measured. Needs the right to read other
/// processes' fds (root, or the same user).
pub fn pid_by_port(port: u16) -> Option<u32> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .find_map(|path| {
            let table = std::fs::read_to_string(path).ok()?;
            listening_inode(&table, port)
        })?;
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()) {
                return Some(pid);
            }
        }
    }
    None
}

/// How a peak was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// The kernel's high-water mark of a process started for this run.
    HighWaterMark,
    /// The largest of the `VmRSS` samples taken during the run.
    Sampled,
}

impl Method {
    /// The name used in the JSON `details.rss_method`.
    pub fn name(self) -> &'static str {
        match self {
            Method::HighWaterMark => "VmHWM",
            Method::Sampled => "VmRSS sampled every 50 ms",
        }
    }
}

/// A measured peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peak {
    /// The process measured.
    pub pid: u32,
    /// Peak resident set, KiB.
    pub kb: u64,
    /// How it was obtained.
    pub method: Method,
}

/// Samples `VmRSS` of one process in the background until finished.
pub struct Sampler {
    pid: u32,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Option<u64>>,
}

impl Sampler {
    /// Starts sampling `pid` now, and every [`SAMPLE_EVERY`].
    pub fn start(pid: u32) -> Sampler {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut peak = None;
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {
                        if let Some(kb) = read_kb(pid, "VmRSS") {
                            peak = peak.max(Some(kb));
                        }
                    }
                }
            }
            // One last sample, so a run shorter than the interval still has two.
            peak.max(read_kb(pid, "VmRSS"))
        });
        Sampler {
            pid,
            stop: Some(stop),
            task,
        }
    }

    /// Stops sampling. With `fresh` (the process was started for this run) its
    /// `VmHWM` is exact and preferred; otherwise the largest sample is the peak.
    pub async fn finish(mut self, fresh: bool) -> Option<Peak> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let sampled = (&mut self.task).await.ok().flatten();
        let hwm = if fresh {
            read_kb(self.pid, "VmHWM")
        } else {
            None
        };
        let (kb, method) = match (hwm, sampled) {
            // The high-water mark can never be below a sample; max guards against a
            // kernel that does not keep one.
            (Some(h), s) => (h.max(s.unwrap_or(0)), Method::HighWaterMark),
            (None, Some(s)) => (s, Method::Sampled),
            (None, None) => return None,
        };
        Some(Peak {
            pid: self.pid,
            kb,
            method,
        })
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tnats-server\nUmask:\t0022\nState:\tS (sleeping)\n\
        VmPeak:\t 1263312 kB\nVmSize:\t 1263312 kB\nVmHWM:\t   21840 kB\nVmRSS:\t   19016 kB\n\
        RssAnon:\t    9024 kB\nThreads:\t8\n";

    #[test]
    fn status_fields_are_read_in_kib() {
        assert_eq!(status_kb(STATUS, "VmHWM"), Some(21_840));
        assert_eq!(status_kb(STATUS, "VmRSS"), Some(19_016));
        assert_eq!(status_kb(STATUS, "RssAnon"), Some(9_024));
        // Not a kB field, absent, or a prefix of another key.
        assert_eq!(status_kb(STATUS, "Threads"), None);
        assert_eq!(status_kb(STATUS, "VmSwap"), None);
        assert_eq!(status_kb(STATUS, "Vm"), None);
        assert_eq!(status_kb("VmRSS:\tlots kB\n", "VmRSS"), None);
        assert_eq!(status_kb("", "VmRSS"), None);
    }

    #[test]
    fn pid_files() {
        assert_eq!(parse_pid("4242\n"), Some(4242));
        assert_eq!(parse_pid(" 17 "), Some(17));
        assert_eq!(parse_pid(""), None);
        assert_eq!(parse_pid("0"), None);
        assert_eq!(parse_pid("-1"), None);
        assert_eq!(parse_pid("12ab"), None);
        assert_eq!(peer_pid_file(System::Tidings), None);
        assert_eq!(
            peer_pid_file(System::Jetstream),
            peer_pid_file(System::Nats),
            "JetStream is the same nats-server"
        );
    }

    #[test]
    fn a_pid_file_naming_another_program_is_ignored() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Our own pid: alive, but not a nats-server.
        std::fs::write(dir.path().join("nats.pid"), std::process::id().to_string())
            .expect("pid file written");
        assert_eq!(peer_pid(System::Nats, dir.path()), None);
        assert_eq!(peer_pid(System::Redis, dir.path()), None, "no redis.pid");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_live_pid_file_is_read() {
        use std::io::BufRead;
        // The child says "ready" only once it runs as `sh`: right after spawn it may
        // still be between fork and exec, under the test binary's name.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "echo ready; read line"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh starts");
        let mut ready = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut ready)
            .expect("the child says ready");
        assert_eq!(ready.trim(), "ready");
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("x.pid");
        std::fs::write(&file, format!("{}\n", child.id())).expect("pid file written");
        let found = live_pid(&file, "sh");
        let other = live_pid(&file, "nats-server");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(found, Some(child.id()));
        assert_eq!(other, None);
        assert_eq!(
            live_pid(&file, "sh"),
            None,
            "a dead process is not measured"
        );
    }

    #[test]
    fn the_listening_socket_is_found_in_the_tcp_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            0: 0100007F:107E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 45678 1 0000000000000000 100 0 0 10 0\n\
            1: 0100007F:107E 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 45999 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(listening_inode(table, 4222), Some(45678));
        assert_eq!(listening_inode(table, 6379), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn our_own_listener_is_found_by_its_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bound");
        let port = listener.local_addr().expect("an address").port();
        assert_eq!(pid_by_port(port), Some(std::process::id()));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn sampling_our_own_process() {
        let me = std::process::id();
        assert!(read_kb(me, "VmRSS").is_some_and(|kb| kb > 0));
        let sampled = Sampler::start(me)
            .finish(false)
            .await
            .expect("a live process has a VmRSS");
        assert_eq!(sampled.method, Method::Sampled);
        assert!(sampled.kb > 0);
        let hwm = Sampler::start(me).finish(true).await.expect("and a VmHWM");
        assert_eq!(hwm.method, Method::HighWaterMark);
        assert!(
            hwm.kb >= sampled.kb,
            "the high-water mark covers earlier samples"
        );
        assert_eq!(read_kb(u32::MAX, "VmRSS"), None, "no such process");
    }
}
