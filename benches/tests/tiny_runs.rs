//! End to end: the `tidings-bench` binary runs tiny `fanin`, `reqrep` and `queue` workloads
//! against a tidings broker it starts in-process on 127.0.0.1:0, and a tiny `fanin`
//! against a `tidings-broker` process it spawns; its JSON says nothing was lost.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

/// Runs the bench with `args` plus `--json`, bounded in time, and parses its one JSON line.
async fn run_bench(args: &[&str]) -> Value {
    let child = Command::new(env!("CARGO_BIN_EXE_tidings-bench"))
        .args(args)
        .args(["--json", "--deadline", "30", "--drain-ms", "2000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the bench binary starts");
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the bench finishes within its deadline")
        .expect("the bench's output is readable");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{args:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn assert_clean(report: &Value, workload: &str) {
    assert_eq!(report["system"], "tidings");
    assert_eq!(report["workload"], workload);
    assert_eq!(report["missing"], 0, "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    assert!(
        report["msgs_per_sec"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
    assert!(report["p99_us"].as_f64().unwrap_or(0.0) > 0.0, "{report}");
    assert!(
        report["duration_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
}

#[tokio::test]
async fn tiny_fanin_delivers_everything() {
    let report = run_bench(&["fanin", "--publishers", "2", "--messages", "2000"]).await;
    assert_clean(&report, "fanin");
    assert_eq!(report["params"]["publishers"], 2);
    assert_eq!(report["params"]["messages"], 2000);
}

#[tokio::test]
async fn tiny_reqrep_answers_every_request() {
    let report = run_bench(&["reqrep", "--requests", "400", "--requesters", "4"]).await;
    assert_clean(&report, "reqrep");
    assert_eq!(report["params"]["responders"], 2);
}

#[tokio::test]
async fn tiny_queue_confirms_and_delivers_everything() {
    let report = run_bench(&[
        "queue",
        "--messages",
        "600",
        "--producers",
        "2",
        "--consumers",
        "2",
        "--window",
        "32",
        "--prefetch",
        "16",
    ])
    .await;
    assert_clean(&report, "queue");
    assert_eq!(report["params"]["consumers"], 2);
}

#[tokio::test]
async fn refused_combinations_exit_non_zero_with_the_reason() {
    let output = Command::new(env!("CARGO_BIN_EXE_tidings-bench"))
        .args(["reqrep", "--system", "redis", "--requests", "1"])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("refusal is immediate")
        .expect("the bench binary runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("redis cannot run reqrep"), "{stderr}");
}

/// The broker binary cargo built beside the bench (`target/<profile>/tidings-broker`).
/// `cargo test --workspace` (what CI runs) builds every workspace binary before any
/// test runs; `cargo test -p tidings-bench` alone does not build it.
fn broker_binary() -> Option<PathBuf> {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_tidings-bench"));
    let bin = bench
        .parent()?
        .join(format!("tidings-broker{}", std::env::consts::EXE_SUFFIX));
    bin.is_file().then_some(bin)
}

#[tokio::test]
async fn tiny_fanin_against_a_spawned_broker_process_measures_its_memory() {
    let Some(bin) = broker_binary() else {
        eprintln!(
            "SKIPPED: no tidings-broker beside {}; build it first \
             (`cargo build -p tidings-broker`, or run `cargo test --workspace`)",
            env!("CARGO_BIN_EXE_tidings-bench")
        );
        return;
    };
    let bin = bin.to_str().expect("a UTF-8 path");
    let report = run_bench(&["fanin", "--messages", "3000", "--broker-bin", bin]).await;
    assert_clean(&report, "fanin");
    let details = &report["details"];
    assert_eq!(details["broker_mode"], "process", "{report}");
    assert_eq!(details["rss_method"], "VmHWM", "{report}");
    let kb = details["rss_peak_kb"].as_u64().unwrap_or(0);
    // A live broker holds at least a few hundred KiB, and far less than 4 GiB here.
    assert!((256..4 * 1024 * 1024).contains(&kb), "{report}");
    assert!(details["rss_pid"].as_u64().is_some(), "{report}");
    assert!(
        details.get("errors").is_none(),
        "the broker stops cleanly on SIGTERM: {report}"
    );

    // Found without --broker-bin too: it sits beside the bench executable.
    let report = run_bench(&["fanin", "--messages", "500", "--spawn-broker"]).await;
    assert_clean(&report, "fanin");
    assert_eq!(report["details"]["broker_mode"], "process", "{report}");
}

#[tokio::test]
async fn in_process_runs_say_so() {
    let report = run_bench(&["fanin", "--messages", "200"]).await;
    assert_clean(&report, "fanin");
    assert_eq!(report["details"]["broker_mode"], "in-process", "{report}");
    assert!(report["details"].get("rss_peak_kb").is_none(), "{report}");
}

#[tokio::test]
async fn tiny_bursty_loses_nothing_and_reports_both_subscribers() {
    let report = run_bench(&[
        "bursty",
        "--rate",
        "2000",
        "--seconds",
        "1",
        "--pause-ms",
        "100",
        "--every-ms",
        "300",
    ])
    .await;
    assert_clean(&report, "bursty");
    let details = &report["details"];
    assert_eq!(details["paused_missing"], 0, "{report}");
    assert_eq!(details["fast_missing"], 0, "{report}");
    assert!(
        details["fast_alone_p99_us"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
    assert!(
        details["fast_with_paused_p99_us"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
    // The paused subscriber's worst case includes its pauses.
    assert!(
        details["paused_p99_us"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
}
