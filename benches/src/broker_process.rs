//! A `tidings-broker` process started for one run, so that tidings runs as a separate
//! process like every peer does: found beside the bench's executable (or given with
//! `--broker-bin`), started on a free loopback port with a temporary data dir, its
//! address read from the `listening on ADDR` line it logs, stopped with SIGTERM.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};

/// How long the broker may take to log its address.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the broker may take to exit after SIGTERM before it is killed. Its own
/// graceful shutdown is bounded by its `--shutdown-timeout`; this is the upper bound.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Log lines kept to explain a broker that failed.
const LOG_TAIL: usize = 40;

/// The binary's file name on this platform.
fn binary_name() -> String {
    format!("tidings-broker{}", std::env::consts::EXE_SUFFIX)
}

/// Where the broker binary sits when cargo built it with the bench: the same
/// directory (`target/<profile>/`) as the executable `exe`. Test executables live one
/// level deeper, in `target/<profile>/deps/`, and look there too.
pub fn candidates(exe: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = exe.parent() {
        out.push(dir.join(binary_name()));
        if dir.file_name().is_some_and(|name| name == "deps") {
            out.extend(dir.parent().map(|profile| profile.join(binary_name())));
        }
    }
    out
}

/// The broker binary to spawn: `explicit` (an error if it is not a file), else the
/// one beside the running executable, else `None`.
pub fn locate(explicit: Option<&Path>) -> Result<Option<PathBuf>> {
    if let Some(path) = explicit {
        if !path.is_file() {
            bail!("--broker-bin {}: no such file", path.display());
        }
        return Ok(Some(path.to_owned()));
    }
    let exe = std::env::current_exe().context("finding the bench's own executable")?;
    Ok(candidates(&exe).into_iter().find(|p| p.is_file()))
}

/// A warning when `broker` is older than the bench executable: the bench links the
/// broker library, so a newer bench with an older broker binary usually means that
/// only the bench was rebuilt and the broker measured is not the current code.
pub fn staleness_warning(broker: &Path) -> Option<String> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let exe = std::env::current_exe().ok()?;
    if modified(broker)? + Duration::from_secs(1) < modified(&exe)? {
        return Some(format!(
            "warning: {} is older than this bench executable; rebuild it \
             (`cargo build [--release] -p tidings-broker`, the bench's profile) or pass \
             --broker-bin, so that the broker measured is the current code",
            broker.display()
        ));
    }
    None
}

/// The address in the broker's startup line, e.g.
/// `2025-01-01T00:00:00Z  INFO tidings_broker: listening on 127.0.0.1:41234 version=0.1.0`.
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("listening on ")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// The last lines the broker logged, shared with the task that reads them.
type Tail = Arc<Mutex<VecDeque<String>>>;

fn remember(tail: &Tail, line: String) {
    if let Ok(mut lines) = tail.lock() {
        if lines.len() == LOG_TAIL {
            lines.pop_front();
        }
        lines.push_back(line);
    }
}

fn tail_text(tail: &Tail) -> String {
    tail.lock()
        .map(|lines| lines.iter().map(|l| format!("\n  | {l}")).collect())
        .unwrap_or_default()
}

/// A running broker process. Dropping it kills the process; [`BrokerProcess::stop`]
/// stops it gracefully.
pub struct BrokerProcess {
    // Field order matters: the process is killed (on drop) before its data dir goes.
    child: Child,
    pid: u32,
    addr: SocketAddr,
    tail: Tail,
    /// A temporary data dir removed with the broker; `None` when the caller owns it.
    _data: Option<tempfile::TempDir>,
}

impl BrokerProcess {
    /// Starts `bin` on 127.0.0.1 with a port the kernel picks and a temporary data
    /// dir, and waits for it to log where it listens.
    pub async fn start(bin: &Path) -> Result<BrokerProcess> {
        let data = tempfile::tempdir().context("creating a temporary data dir")?;
        let path = data.path().to_owned();
        BrokerProcess::start_in(bin, &path, &[], Some(data)).await
    }

    /// Starts `bin` on a kernel-picked loopback port with its data in `data_dir`
    /// (kept when `temp` is `None`, so a restart finds it) and `extra` flags.
    pub async fn start_in(
        bin: &Path,
        data_dir: &Path,
        extra: &[String],
        temp: Option<tempfile::TempDir>,
    ) -> Result<BrokerProcess> {
        let data = temp;
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            // The address is read from the info-level startup line.
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("{} exited at once", bin.display()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("the broker's stderr is not piped"))?;
        let tail: Tail = Arc::default();
        let mut lines = BufReader::new(stderr).lines();
        let found = tokio::time::timeout(START_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                let addr = listening_addr(&line);
                remember(&tail, line);
                if addr.is_some() {
                    return addr;
                }
            }
            None
        })
        .await;
        let addr = match found {
            Ok(Some(addr)) => addr,
            Ok(None) => bail!(
                "{} exited before listening ({}); its log:{}",
                bin.display(),
                exit_status(&mut child).await,
                tail_text(&tail)
            ),
            Err(_) => bail!(
                "{} did not log `listening on ADDR` within {START_TIMEOUT:?}; its log:{}",
                bin.display(),
                tail_text(&tail)
            ),
        };
        tokio::spawn(keep_reading(lines, tail.clone()));
        Ok(BrokerProcess {
            child,
            pid,
            addr,
            tail,
            _data: data,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process id, for measuring its memory.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `kill -9`: the crash a restart must recover from.
    pub async fn kill(mut self) -> Result<()> {
        self.child
            .kill()
            .await
            .context("killing the tidings broker")
    }

    /// SIGTERM, then waits for a clean exit; kills it if it does not exit in time.
    /// An exit other than status 0 is an error carrying the end of its log.
    pub async fn stop(mut self) -> Result<()> {
        terminate(self.pid);
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => bail!(
                "the tidings broker exited with {status} on SIGTERM; its log:{}",
                tail_text(&self.tail)
            ),
            Ok(Err(e)) => Err(e).context("waiting for the tidings broker to exit"),
            Err(_) => {
                let _ = self.child.kill().await;
                bail!(
                    "the tidings broker did not exit within {STOP_TIMEOUT:?} of SIGTERM and was killed; its log:{}",
                    tail_text(&self.tail)
                )
            }
        }
    }
}

/// Drains the broker's stderr so it never blocks on a full pipe, keeps the tail, and
/// passes on its warnings and errors (a slow-consumer disconnect, say) as they happen.
async fn keep_reading(mut lines: tokio::io::Lines<BufReader<ChildStderr>>, tail: Tail) {
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains(" WARN ") || line.contains(" ERROR ") {
            eprintln!("tidings-broker: {line}");
        }
        remember(&tail, line);
    }
}

async fn exit_status(child: &mut Child) -> String {
    match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
        Ok(Ok(status)) => status.to_string(),
        _ => "still running".into(),
    }
}

/// Sends SIGTERM: the broker's graceful shutdown signal.
#[cfg(unix)]
fn terminate(pid: u32) {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        // A broker that already exited is fine: the wait that follows sees its status.
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// No SIGTERM here: the wait times out and the process is killed.
#[cfg(not(unix))]
fn terminate(_pid: u32) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_comes_from_the_startup_line() {
        let line = "2026-01-01T07:30:00.123456Z  INFO tidings_broker: listening on \
                    127.0.0.1:41234 version=\"0.1.0\" data_dir=/tmp/x";
        assert_eq!(
            listening_addr(line),
            Some(SocketAddr::from(([127, 0, 0, 1], 41234)))
        );
        assert_eq!(
            listening_addr("INFO x: listening on [::1]:7878"),
            Some("[::1]:7878".parse().expect("an address"))
        );
        assert_eq!(listening_addr("INFO x: queue engine open"), None);
        assert_eq!(listening_addr("listening on "), None);
        assert_eq!(listening_addr("listening on 127.0.0.1"), None);
    }

    #[test]
    fn the_binary_is_looked_for_beside_the_executable() {
        let name = binary_name();
        assert_eq!(
            candidates(Path::new("/w/target/release/tidings-bench")),
            vec![PathBuf::from("/w/target/release").join(&name)]
        );
        assert_eq!(
            candidates(Path::new("/w/target/debug/deps/tiny_runs-0123abcd")),
            vec![
                PathBuf::from("/w/target/debug/deps").join(&name),
                PathBuf::from("/w/target/debug").join(&name),
            ]
        );
    }

    #[test]
    fn an_explicit_binary_must_exist() {
        let err = locate(Some(Path::new("/nonexistent/tidings-broker"))).unwrap_err();
        assert!(err.to_string().contains("no such file"), "{err}");
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = dir.path().join("tidings-broker");
        std::fs::write(&bin, b"").expect("file written");
        assert_eq!(locate(Some(&bin)).expect("exists"), Some(bin));
    }

    #[test]
    fn the_log_tail_is_bounded() {
        let tail: Tail = Arc::default();
        for i in 0..(LOG_TAIL + 10) {
            remember(&tail, format!("line {i}"));
        }
        let text = tail_text(&tail);
        assert_eq!(text.matches("\n  | ").count(), LOG_TAIL);
        assert!(!text.contains("line 9\n") && text.ends_with(&format!("line {}", LOG_TAIL + 9)));
    }
}
