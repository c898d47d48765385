//! End to end: `tidings-bench scale` sweeps a dimension in tiny steps against real
//! `tidings-broker` processes, prints its table and writes real PNG plots.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// The broker binary cargo built beside the bench (`cargo test --workspace` builds
/// it before any test runs; `cargo test -p tidings-bench` alone does not).
fn broker_binary() -> Option<PathBuf> {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_tidings-bench"));
    let bin = bench
        .parent()?
        .join(format!("tidings-broker{}", std::env::consts::EXE_SUFFIX));
    bin.is_file().then_some(bin)
}

/// Runs `scale` with `args`, plots into `out`; returns its stdout.
async fn scale(args: &[&str], out: &Path) -> Option<String> {
    let Some(bin) = broker_binary() else {
        eprintln!("SKIPPED: no tidings-broker beside the bench; `cargo build -p tidings-broker`");
        return None;
    };
    let child = Command::new(env!("CARGO_BIN_EXE_tidings-bench"))
        .arg("scale")
        .args(args)
        .arg("--broker-bin")
        .arg(&bin)
        .arg("--out")
        .arg(out)
        .args(["--deadline", "30", "--drain-ms", "1000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the bench binary starts");
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("scale finishes in time")
        .expect("its output is readable");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{args:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    Some(stdout)
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
}

#[tokio::test]
async fn a_quick_subscriptions_sweep_prints_its_table_and_plots() {
    let out = tempfile::tempdir().expect("temp dir");
    let Some(stdout) = scale(
        &[
            "subscriptions",
            "--quick",
            "--steps",
            "1,50",
            "--messages",
            "500",
            "--systems",
            "tidings",
        ],
        out.path(),
    )
    .await
    else {
        return;
    };
    assert!(
        stdout.contains("| system | subscriptions | msgs/s | CPU µs/msg | RSS MiB |"),
        "{stdout}"
    );
    assert!(stdout.contains("| tidings | 1 |"), "{stdout}");
    assert!(stdout.contains("| tidings | 50 |"), "{stdout}");
    assert!(
        !stdout.contains("| tidings ! |"),
        "no step lost messages: {stdout}"
    );
    assert_png(&out.path().join("subscriptions-msgs-s.png"));
    assert_png(&out.path().join("subscriptions-rss-mib.png"));
}

#[tokio::test]
async fn a_tiny_backlog_survives_kill_9_and_drains() {
    let out = tempfile::tempdir().expect("temp dir");
    let Some(stdout) = scale(
        &["backlog", "--quick", "--backlog", "600", "--points", "2"],
        out.path(),
    )
    .await
    else {
        return;
    };
    assert!(stdout.contains("| tidings | 0 |"), "{stdout}");
    assert!(stdout.contains("| tidings | 300 |"), "{stdout}");
    assert!(
        stdout.contains("ready after kill -9 with 600 stored"),
        "{stdout}"
    );
    assert!(stdout.contains("after the drain settled"), "{stdout}");
    assert!(!stdout.contains("| tidings ! |"), "nothing lost: {stdout}");
    assert_png(&out.path().join("backlog-publish-msgs-s.png"));
    assert_png(&out.path().join("backlog-drain-msgs-s.png"));
}
