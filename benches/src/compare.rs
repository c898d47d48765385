//! `tidings-bench compare`: every workload on every reachable system, one table.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;

use crate::driver::{System, Workload};
use crate::job::{self, Job};
use crate::report::{RunReport, thousands};

/// The `compare` subcommand's options.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Workloads to run, comma separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub workloads: Vec<Workload>,
    /// Systems to try, comma separated (default: all; peers need the `peers` feature).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub systems: Vec<System>,
    /// Runs per cell; the table shows medians.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Multiplies every message count (and the latency run's length) by this.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Same as --scale 0.1: a quick look in well under a minute per system.
    #[arg(long)]
    pub quick: bool,
    /// A running tidings broker (default: one started in this process).
    #[arg(long)]
    pub tidings: Option<String>,
    /// NATS server (core and JetStream).
    #[arg(long, default_value = "127.0.0.1:4222")]
    pub nats: String,
    /// RabbitMQ AMQP URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp: String,
    /// Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    pub redis: String,
    /// MQTT broker (Mosquitto) address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub mqtt: String,
    /// Print every run's JSON object on stdout as well.
    #[arg(long)]
    pub json: bool,
    /// Hard time limit per run, seconds.
    #[arg(long, default_value_t = 120.0)]
    pub deadline: f64,
    /// How long receivers wait for stragglers once senders are done, milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub drain_ms: u64,
}

impl CompareArgs {
    fn server(&self, system: System) -> Option<&str> {
        match system {
            System::Tidings => self.tidings.as_deref(),
            System::Nats | System::Jetstream => Some(&self.nats),
            System::Rabbitmq => Some(&self.amqp),
            System::Redis => Some(&self.redis),
            System::Mqtt => Some(&self.mqtt),
        }
    }
}

/// `host:port` out of an address or URL (`amqp://user:pw@host:port/vhost` → `host:port`).
pub fn host_port(addr: &str) -> String {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// True when something accepts TCP connections at `addr` within half a second.
async fn reachable(addr: &str) -> bool {
    let connect = tokio::net::TcpStream::connect(host_port(addr));
    matches!(
        tokio::time::timeout(Duration::from_millis(500), connect).await,
        Ok(Ok(_))
    )
}

/// The medians of one table cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// Median msgs/s over the runs.
    pub msgs_per_sec: f64,
    /// Median p99 over the runs, µs.
    pub p99_us: Option<f64>,
    /// True when any run lost messages or failed.
    pub lost: bool,
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// Summarises K runs of one workload on one system.
pub fn cell(reports: &[RunReport], errors: usize) -> Cell {
    let mut rates: Vec<f64> = reports.iter().map(|r| r.msgs_per_sec).collect();
    let mut p99s: Vec<f64> = reports.iter().filter_map(|r| r.p99_us).collect();
    Cell {
        msgs_per_sec: median(&mut rates).unwrap_or(0.0),
        p99_us: median(&mut p99s),
        lost: errors > 0 || reports.iter().any(RunReport::failed),
    }
}

/// The ratio column: throughput for counted workloads, p99 for `latency` (lower is better).
pub fn ratio(workload: Workload, tidings: Option<&Cell>, peers: &[(System, &Cell)]) -> String {
    let Some(t) = tidings else {
        return "-".into();
    };
    if workload == Workload::Latency {
        let best = peers
            .iter()
            .filter_map(|(s, c)| c.p99_us.map(|p| (*s, p)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        match (t.p99_us, best) {
            (Some(tp), Some((s, bp))) if bp > 0.0 => format!("p99 {:.2}x {s}", tp / bp),
            _ => "-".into(),
        }
    } else {
        let best = peers
            .iter()
            .map(|(s, c)| (*s, c.msgs_per_sec))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        match best {
            Some((s, b)) if b > 0.0 => format!("{:.2}x {s}", t.msgs_per_sec / b),
            _ => "-".into(),
        }
    }
}

/// The markdown table: one row per workload, one column per system.
pub fn table(
    systems: &[System],
    rows: &BTreeMap<(usize, System), Cell>,
    workloads: &[Workload],
) -> String {
    let mut out = String::from("| workload |");
    for s in systems {
        out.push_str(&format!(" {s} msgs/s · p99 µs |"));
    }
    out.push_str(" tidings / best peer |\n|---|");
    for _ in systems {
        out.push_str("---:|");
    }
    out.push_str("---:|\n");
    for (i, w) in workloads.iter().enumerate() {
        out.push_str(&format!("| {w} |"));
        let mut peers = Vec::new();
        for s in systems {
            match rows.get(&(i, *s)) {
                Some(c) => {
                    let p99 = c.p99_us.map_or("-".into(), |p| format!("{p:.0}"));
                    let mark = if c.lost { " !" } else { "" };
                    out.push_str(&format!(" {} · {p99}{mark} |", thousands(c.msgs_per_sec)));
                    if *s != System::Tidings {
                        peers.push((*s, c));
                    }
                }
                None => out.push_str(" n/a |"),
            }
        }
        let ratio = ratio(*w, rows.get(&(i, System::Tidings)), &peers);
        out.push_str(&format!(" {ratio} |\n"));
    }
    out
}

/// Runs the comparison and prints the table; returns false when any run lost messages.
pub async fn compare(args: CompareArgs) -> Result<bool> {
    let workloads = if args.workloads.is_empty() {
        Workload::ALL.to_vec()
    } else {
        args.workloads.clone()
    };
    let wanted = if args.systems.is_empty() {
        System::ALL.to_vec()
    } else {
        args.systems.clone()
    };
    let scale = if args.quick { 0.1 } else { args.scale };
    let runs = args.runs.max(1);
    let deadline = Duration::from_secs_f64(args.deadline.max(1.0));
    let drain = Duration::from_millis(args.drain_ms);

    let mut systems = Vec::new();
    for s in wanted {
        if s != System::Tidings && !cfg!(feature = "peers") {
            eprintln!("skipping {s}: built without the `peers` feature");
            continue;
        }
        match args.server(s) {
            Some(addr) if !reachable(addr).await => {
                eprintln!("skipping {s}: nothing listens at {addr} (see benches/peers/)");
            }
            _ => systems.push(s),
        }
    }

    let mut rows = BTreeMap::new();
    let mut clean = true;
    for (i, w) in workloads.iter().enumerate() {
        let job = Job::scaled(*w, scale);
        for s in &systems {
            if s.supports(*w).is_err() {
                continue;
            }
            let mut reports = Vec::new();
            let mut errors = 0;
            for run in 1..=runs {
                eprintln!("{w} on {s}, run {run}/{runs}");
                match job::run(*s, args.server(*s), &job, deadline, drain).await {
                    Ok(report) => {
                        eprint!("{}", report.human());
                        if args.json {
                            println!("{}", report.to_json());
                        }
                        reports.push(report);
                    }
                    Err(e) => {
                        eprintln!("  failed: {e:#}");
                        errors += 1;
                    }
                }
            }
            let c = cell(&reports, errors);
            clean &= !c.lost;
            rows.insert((i, *s), c);
        }
    }
    println!(
        "\nmedians of {runs} run(s), scale {scale}; ! = messages lost or a run failed; \
         the ratio is msgs/s (latency: p99, lower is better) against the best peer\n"
    );
    println!("{}", table(&systems, &rows, &workloads));
    Ok(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_of_urls_and_addresses() {
        assert_eq!(host_port("127.0.0.1:4222"), "127.0.0.1:4222");
        assert_eq!(
            host_port("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "127.0.0.1:5672"
        );
        assert_eq!(host_port("redis://127.0.0.1:6379/"), "127.0.0.1:6379");
    }

    #[test]
    fn medians() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    fn c(rate: f64, p99: f64) -> Cell {
        Cell {
            msgs_per_sec: rate,
            p99_us: Some(p99),
            lost: false,
        }
    }

    #[test]
    fn ratio_against_best_peer() {
        let t = c(1200.0, 50.0);
        let (nats, redis) = (c(1000.0, 100.0), c(500.0, 40.0));
        let peers = [(System::Nats, &nats), (System::Redis, &redis)];
        assert_eq!(ratio(Workload::Fanin, Some(&t), &peers), "1.20x nats");
        assert_eq!(
            ratio(Workload::Latency, Some(&t), &peers),
            "p99 1.25x redis"
        );
        assert_eq!(ratio(Workload::Fanin, Some(&t), &[]), "-");
        assert_eq!(ratio(Workload::Fanin, None, &peers), "-");
    }

    #[test]
    fn table_marks_losses_and_missing_cells() {
        let mut rows = BTreeMap::new();
        rows.insert((0, System::Tidings), c(1_200_000.0, 900.0));
        rows.insert(
            (0, System::Nats),
            Cell {
                lost: true,
                ..c(1_000_000.0, 800.0)
            },
        );
        let t = table(
            &[System::Tidings, System::Nats],
            &rows,
            &[Workload::Fanin, Workload::Queue],
        );
        assert!(
            t.contains("| fanin | 1,200,000 · 900 | 1,000,000 · 800 ! | 1.20x nats |"),
            "{t}"
        );
        assert!(t.contains("| queue | n/a | n/a | - |"), "{t}");
    }

    #[test]
    fn cells_take_medians_and_flag_failures() {
        let mk = |rate: f64, missing: u64| {
            let mut r = RunReport::new(
                "nats",
                "fanin",
                Default::default(),
                crate::tracker::Tally {
                    missing,
                    ..Default::default()
                },
                None,
            );
            r.msgs_per_sec = rate;
            r
        };
        let cell_ok = cell(&[mk(1.0, 0), mk(3.0, 0), mk(2.0, 0)], 0);
        assert_eq!(cell_ok.msgs_per_sec, 2.0);
        assert!(!cell_ok.lost);
        assert!(cell(&[mk(1.0, 5)], 0).lost);
        assert!(cell(&[mk(1.0, 0)], 1).lost);
    }
}
