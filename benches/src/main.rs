//! tidings-bench: the same workloads against tidings and its peers, and `compare`.
//!
//! ```text
//! cargo run --release -p tidings-bench -- fanin                 # in-process broker
//! cargo run --release -p tidings-bench -- fanin --server 127.0.0.1:7878 --json
//! cargo run --release -p tidings-bench --features peers -- fanin --system nats
//! cargo run --release -p tidings-bench --features peers -- compare --quick
//! ```

mod compare;
mod control;
mod driver;
mod job;
mod latency;
mod payload;
mod report;
mod tracker;
mod workload;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::compare::CompareArgs;
use crate::driver::System;
use crate::job::Job;
use crate::workload::fanin::FaninParams;
use crate::workload::fanout::FanoutParams;
use crate::workload::latency::LatencyParams;
use crate::workload::queue::QueueParams;
use crate::workload::reqrep::ReqrepParams;

/// Load benchmark for tidings and the brokers it is compared with.
#[derive(Debug, Parser)]
#[command(name = "tidings-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// P publishers -> 1 subscriber on one topic; delivered msgs/s at the subscriber.
    Fanin {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        params: FaninParams,
    },
    /// 1 publisher -> K subscribers; per-subscriber and aggregate delivered msgs/s.
    Fanout {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        params: FanoutParams,
    },
    /// Durable: producers with confirms -> consumers with explicit acks; end-to-end msgs/s.
    Queue {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        params: QueueParams,
    },
    /// One publisher at a fixed rate -> one subscriber; latency percentiles.
    Latency {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        params: LatencyParams,
    },
    /// Requesters (one request in flight each) -> a group of responders.
    Reqrep {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        params: ReqrepParams,
    },
    /// Every workload on every reachable system; one table with ratios to the best peer.
    Compare(CompareArgs),
}

/// Where to run, and how to report.
#[derive(Debug, Clone, Args)]
struct Target {
    /// The system to drive (peers need the `peers` feature).
    #[arg(long, value_enum, default_value_t = System::Tidings)]
    system: System,
    /// Its address: host:port, or a URL for rabbitmq and redis. Default: the peer's
    /// usual local port; for tidings, a broker started in this process.
    #[arg(long)]
    server: Option<String>,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    json: bool,
    /// Hard time limit of the run, seconds; whatever has not arrived is missing.
    #[arg(long, default_value_t = 120.0)]
    deadline: f64,
    /// How long receivers wait for stragglers once senders are done, milliseconds.
    #[arg(long, default_value_t = 2000)]
    drain_ms: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command; `Ok(false)` when messages were lost.
async fn run(command: Command) -> anyhow::Result<bool> {
    let (target, job) = match command {
        Command::Compare(args) => return compare::compare(args).await,
        Command::Fanin { target, params } => (target, Job::Fanin(params)),
        Command::Fanout { target, params } => (target, Job::Fanout(params)),
        Command::Queue { target, params } => (target, Job::Queue(params)),
        Command::Latency { target, params } => (target, Job::Latency(params)),
        Command::Reqrep { target, params } => (target, Job::Reqrep(params)),
    };
    if !(target.deadline > 0.0 && target.deadline.is_finite()) {
        anyhow::bail!("--deadline must be a positive number of seconds");
    }
    let report = job::run(
        target.system,
        target.server.as_deref(),
        &job,
        Duration::from_secs_f64(target.deadline),
        Duration::from_millis(target.drain_ms),
    )
    .await?;
    if target.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.human());
    }
    if report.failed() {
        eprintln!(
            "error: {} on {} lost messages ({} missing)",
            report.workload, report.system, report.missing
        );
    }
    Ok(!report.failed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_the_issue_defaults() {
        let cli = Cli::try_parse_from(["tidings-bench", "reqrep"]).expect("parses");
        match cli.command {
            Command::Reqrep { target, params } => {
                assert_eq!(target.system, System::Tidings);
                assert_eq!(target.server, None);
                assert_eq!(
                    (
                        params.responders,
                        params.requesters,
                        params.requests,
                        params.size
                    ),
                    (2, 8, 100_000, 128)
                );
            }
            other => panic!("parsed as {other:?}"),
        }
        let cli = Cli::try_parse_from(["tidings-bench", "latency", "--json"]).expect("parses");
        match cli.command {
            Command::Latency { target, params } => {
                assert!(target.json);
                assert_eq!(
                    (params.rate, params.seconds, params.size),
                    (10_000, 10.0, 128)
                );
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn bad_arguments_are_rejected() {
        assert!(Cli::try_parse_from(["tidings-bench", "fanin", "--system", "kafka"]).is_err());
        assert!(Cli::try_parse_from(["tidings-bench", "fanin", "--size", "-1"]).is_err());
        let cli = Cli::try_parse_from(["tidings-bench", "fanin", "--size", "8"]).expect("parses");
        match cli.command {
            Command::Fanin { params, .. } => assert!(params.validate().is_err()),
            other => panic!("parsed as {other:?}"),
        }
        let cli = Cli::try_parse_from([
            "tidings-bench",
            "compare",
            "--workloads",
            "fanin,reqrep",
            "--systems",
            "tidings,nats",
            "--quick",
        ])
        .expect("parses");
        match cli.command {
            Command::Compare(args) => {
                assert_eq!(args.workloads.len(), 2);
                assert_eq!(args.systems, vec![System::Tidings, System::Nats]);
                assert!(args.quick);
            }
            other => panic!("parsed as {other:?}"),
        }
    }
}
