//! End to end: the `tidings-bench` binary runs tiny `fanin`, `reqrep` and `queue` workloads
//! against a tidings broker it starts in-process on 127.0.0.1:0, and its JSON says
//! nothing was lost.

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
