//! tidings-bench: the same workloads against tidings and its peers, and `compare`.
//!
//! ```text
//! cargo run --release -p tidings-bench -- fanin                 # in-process broker
//! cargo run --release -p tidings-bench -- fanin --spawn-broker  # a tidings-broker process
//! cargo run --release -p tidings-bench -- fanin --server 127.0.0.1:7878 --json
//! cargo run --release -p tidings-bench --features peers -- fanin --system nats
//! cargo run --release -p tidings-bench --features peers -- compare --quick
//! ```

mod broker_process;
mod compare;
mod control;
mod cpu;
mod driver;
mod floor;
mod job;
mod latency;
mod payload;
mod report;
mod rss;
mod scale;
mod tracker;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};

use crate::compare::CompareArgs;
use crate::driver::System;
use crate::driver::tidings::Launch;
use crate::job::Job;
use crate::workload::bursty::BurstyParams;
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
    /// A fixed-rate publisher -> a subscriber pausing 100 ms every second, and a fast
    /// one; missing messages and the fast one's p99 with and without the paused one.
    Bursty {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        params: BurstyParams,
    },
    /// Cost curves: sweeps one dimension (subscriptions, topics, queues,
    /// connections, backlog), prints a table and writes a PNG plot per curve.
    Scale(scale::ScaleArgs),
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
    /// usual local port; for tidings, a broker started in this process (or, with
    /// --spawn-broker, a tidings-broker process).
    #[arg(long)]
    server: Option<String>,
    /// tidings: run the broker as a separate tidings-broker process, as the peers run,
    /// instead of inside the bench; the binary is the one beside this executable
    /// (target/PROFILE/tidings-broker) unless --broker-bin names one.
    #[arg(long, conflicts_with = "server")]
    spawn_broker: bool,
    /// The tidings-broker binary to spawn; implies --spawn-broker.
    #[arg(long, value_name = "PATH", conflicts_with = "server")]
    broker_bin: Option<PathBuf>,
    /// Measure the peak RSS of this process during the run. Default: the spawned
    /// tidings broker, or a peer started by benches/peers/peers.sh (its pid file).
    #[arg(long, value_name = "PID")]
    broker_pid: Option<u32>,
    /// Where benches/peers/peers.sh keeps its pid files.
    #[arg(long, env = "TIDINGS_PEERS_DIR", default_value = rss::DEFAULT_PEERS_DIR)]
    peers_dir: PathBuf,
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

impl Target {
    /// Where the run goes: the broker to use or start, and the process to measure.
    fn resolve(&self) -> anyhow::Result<job::Target> {
        let spawn = self.spawn_broker || self.broker_bin.is_some();
        if spawn && self.system != System::Tidings {
            bail!(
                "--spawn-broker and --broker-bin start a tidings broker: they need --system tidings"
            );
        }
        let launch = match &self.server {
            Some(addr) => Launch::External(addr.clone()),
            None if spawn => match broker_process::locate(self.broker_bin.as_deref())? {
                Some(bin) => Launch::Process(bin),
                None => bail!(
                    "--spawn-broker: no tidings-broker beside this executable; build it with \
                     `cargo build --release -p tidings-broker` or pass --broker-bin PATH"
                ),
            },
            None => Launch::InProcess,
        };
        // A peer's pid file describes the server on its default port only; any
        // other server on this machine is found by the port it listens on.
        let broker_pid = self.broker_pid.or_else(|| {
            let from_file = self
                .server
                .is_none()
                .then(|| rss::peer_pid(self.system, &self.peers_dir))
                .flatten();
            let addr = self.server.as_deref().or(self.system.default_server());
            from_file.or_else(|| {
                addr.and_then(compare::local_port)
                    .and_then(rss::pid_by_port)
            })
        });
        Ok(job::Target {
            system: self.system,
            server: self.server.clone(),
            launch,
            broker_pid,
        })
    }
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
        Command::Scale(args) => return scale::scale(args).await,
        Command::Fanin { target, params } => (target, Job::Fanin(params)),
        Command::Fanout { target, params } => (target, Job::Fanout(params)),
        Command::Queue { target, params } => (target, Job::Queue(params)),
        Command::Latency { target, params } => (target, Job::Latency(params)),
        Command::Reqrep { target, params } => (target, Job::Reqrep(params)),
        Command::Bursty { target, params } => (target, Job::Bursty(params)),
    };
    if !(target.deadline > 0.0 && target.deadline.is_finite()) {
        anyhow::bail!("--deadline must be a positive number of seconds");
    }
    let resolved = target.resolve()?;
    if let Launch::Process(bin) = &resolved.launch {
        eprintln!("tidings: a tidings-broker process from {}", bin.display());
        if let Some(warning) = broker_process::staleness_warning(bin) {
            eprintln!("{warning}");
        }
    }
    let report = job::run(
        &resolved,
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

    fn target(args: &[&str]) -> Target {
        let cli =
            Cli::try_parse_from(["tidings-bench", "fanin"].iter().chain(args)).expect("parses");
        match cli.command {
            Command::Fanin { target, .. } => target,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn how_the_tidings_broker_runs() {
        let plain = target(&[]).resolve().expect("resolves");
        assert_eq!(plain.launch, Launch::InProcess, "in-process by default");
        let external = target(&["--server", "127.0.0.1:7878"])
            .resolve()
            .expect("resolves");
        assert_eq!(external.launch, Launch::External("127.0.0.1:7878".into()));
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = dir.path().join("tidings-broker");
        std::fs::write(&bin, b"").expect("file written");
        let bin_arg = bin.to_str().expect("utf-8 path");
        let spawned = target(&["--broker-bin", bin_arg])
            .resolve()
            .expect("resolves");
        assert_eq!(spawned.launch, Launch::Process(bin.clone()));
        let err = target(&["--spawn-broker", "--broker-bin", "/nonexistent/b"])
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("no such file"), "{err}");
        let err = target(&["--system", "nats", "--spawn-broker"])
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("--system tidings"), "{err}");
        assert!(
            Cli::try_parse_from([
                "tidings-bench",
                "fanin",
                "--spawn-broker",
                "--server",
                "x:1"
            ])
            .is_err()
        );
        let measured = target(&["--broker-pid", "4242"])
            .resolve()
            .expect("resolves");
        assert_eq!(measured.broker_pid, Some(4242));
        // A port nobody listens on (bound, then released): no pid file and no process
        // found by its port, so nothing is measured — whatever runs on this machine
        // (a redis on its default port would otherwise be found).
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .to_string();
        let peer = target(&[
            "--system",
            "redis",
            "--peers-dir",
            "/nonexistent",
            "--server",
            &free,
        ])
        .resolve()
        .expect("resolves");
        assert_eq!(peer.broker_pid, None, "no pid file, nothing measured");
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
