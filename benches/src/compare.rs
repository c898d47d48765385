//! `tidings-bench compare`: every workload on every reachable system, one table.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::broker_process;
use crate::driver::tidings::Launch;
use crate::driver::{System, Workload};
use crate::floor;
use crate::job::{self, Job, Target};
use crate::report::{RunReport, thousands};
use crate::rss;

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
    /// A running tidings broker. Default: a tidings-broker process per run, found
    /// beside this executable (or --broker-bin); in-process when there is none.
    #[arg(long)]
    pub tidings: Option<String>,
    /// The tidings-broker binary to spawn for each tidings run.
    #[arg(long, value_name = "PATH", conflicts_with = "tidings")]
    pub broker_bin: Option<PathBuf>,
    /// Run tidings inside the bench's process (sharing its runtime) even when a
    /// tidings-broker binary is at hand.
    #[arg(long, conflicts_with_all = ["tidings", "broker_bin"])]
    pub in_process: bool,
    /// Where benches/peers/peers.sh keeps its pid files (to measure the peers' memory).
    #[arg(long, env = "TIDINGS_PEERS_DIR", default_value = rss::DEFAULT_PEERS_DIR)]
    pub peers_dir: PathBuf,
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

impl CompareArgs {
    /// How tidings runs, and a line saying so: a process when a binary is at hand,
    /// else in-process (said loudly, since then it shares the clients' runtime).
    fn launch(&self) -> Result<(Launch, String)> {
        if let Some(addr) = &self.tidings {
            return Ok((
                Launch::External(addr.clone()),
                format!("tidings: the running broker at {addr}"),
            ));
        }
        if self.in_process {
            return Ok((
                Launch::InProcess,
                "tidings: in-process (--in-process), sharing the bench's runtime".into(),
            ));
        }
        Ok(match broker_process::locate(self.broker_bin.as_deref())? {
            Some(bin) => {
                let mut note = format!(
                    "tidings: a separate tidings-broker process per run, from {}",
                    bin.display()
                );
                if let Some(warning) = broker_process::staleness_warning(&bin) {
                    note = format!("{note}\n{warning}");
                }
                (Launch::Process(bin), note)
            }
            None => (
                Launch::InProcess,
                "tidings: NO tidings-broker binary beside this executable, so the broker runs \
                 IN-PROCESS, sharing the bench's runtime and cores; for a fair comparison \
                 build it (`cargo build --release -p tidings-broker`) or pass --broker-bin"
                    .into(),
            ),
        })
    }

    /// The pid of a peer's server: from the pid file of benches/peers/peers.sh when
    /// `system` is targeted at that peer's default address, else the process
    /// listening on the address's port when it is on this machine.
    fn peer_pid(&self, system: System) -> Option<u32> {
        let addr = self.server(system)?;
        let default = system.default_server()?;
        let from_file = (host_port(addr) == host_port(default))
            .then(|| rss::peer_pid(system, &self.peers_dir))
            .flatten();
        from_file.or_else(|| local_port(addr).and_then(rss::pid_by_port))
    }
}

/// `host:port` out of an address or URL (`amqp://user:pw@host:port/vhost` → `host:port`).
pub fn host_port(addr: &str) -> String {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// The port of `addr` when its host is this machine (loopback or `localhost`).
pub fn local_port(addr: &str) -> Option<u16> {
    let hp = host_port(addr);
    let (host, port) = hp.rsplit_once(':')?;
    let local = matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "0.0.0.0");
    local.then(|| port.parse().ok()).flatten()
}

/// True when something accepts TCP connections at `addr` within half a second.
pub async fn reachable(addr: &str) -> bool {
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
    /// Median p50 over the runs, µs.
    pub p50_us: Option<f64>,
    /// Median p99 over the runs, µs.
    pub p99_us: Option<f64>,
    /// Median peak RSS of the broker process over the runs that measured it, KiB.
    pub rss_kb: Option<f64>,
    /// Median broker CPU per message published over the runs that measured it, µs.
    pub cpu_us: Option<f64>,
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
    let mut p50s: Vec<f64> = reports.iter().filter_map(|r| r.p50_us).collect();
    let mut p99s: Vec<f64> = reports.iter().filter_map(|r| r.p99_us).collect();
    let mut rss: Vec<f64> = reports
        .iter()
        .filter_map(|r| r.rss_peak_kb().map(|kb| kb as f64))
        .collect();
    let mut cpu: Vec<f64> = reports
        .iter()
        .filter_map(RunReport::broker_cpu_us_per_msg)
        .collect();
    Cell {
        msgs_per_sec: median(&mut rates).unwrap_or(0.0),
        p50_us: median(&mut p50s),
        p99_us: median(&mut p99s),
        rss_kb: median(&mut rss),
        cpu_us: median(&mut cpu),
        lost: errors > 0 || reports.iter().any(RunReport::failed),
    }
}

/// The ratio column: throughput for counted workloads, p99 for `latency` (lower is
/// better), and for `queue-latency` tidings' p50 against `floor` (the `fdatasync`
/// floor measured in the same run, µs) as well as its p99 against the best peer's.
pub fn ratio(
    workload: Workload,
    tidings: Option<&Cell>,
    peers: &[(System, &Cell)],
    floor: Option<f64>,
) -> String {
    let Some(t) = tidings else {
        return "-".into();
    };
    match workload {
        Workload::Latency => p99_ratio(t, peers).unwrap_or_else(|| "-".into()),
        Workload::QueueLatency => {
            let p50 = match (t.p50_us, floor) {
                (Some(p), Some(f)) if f > 0.0 => {
                    format!("p50 {p:.0} µs = {:.2}x fdatasync ({f:.0} µs)", p / f)
                }
                _ => "p50 -".into(),
            };
            let p99 = p99_ratio(t, peers).unwrap_or_else(|| "p99 -".into());
            format!("{p50} · {p99}")
        }
        _ => {
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
}

/// Tidings' p99 against the lowest peer's, when both are known.
fn p99_ratio(t: &Cell, peers: &[(System, &Cell)]) -> Option<String> {
    let best = peers
        .iter()
        .filter_map(|(s, c)| c.p99_us.map(|p| (*s, p)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    match (t.p99_us, best) {
        (Some(tp), Some((s, bp))) if bp > 0.0 => Some(format!("p99 {:.2}x {s}", tp / bp)),
        _ => None,
    }
}

/// The memory column: tidings' peak RSS against nats-server's (core NATS, or
/// JetStream for `queue`), the comparison issue 7 sets a target for.
pub fn rss_ratio(tidings: Option<&Cell>, nats: Option<&Cell>) -> String {
    match (tidings.and_then(|c| c.rss_kb), nats.and_then(|c| c.rss_kb)) {
        (Some(t), Some(n)) if n > 0.0 => format!("{:.2}x", t / n),
        _ => "-".into(),
    }
}

/// The CPU column: tidings' broker CPU per message against each peer's that was
/// measured (issue 16 asks for <= Redis's on `queue`, <= 0.5x nats-server's on `fanin`).
pub fn cpu_ratio(tidings: Option<&Cell>, peers: &[(System, &Cell)]) -> String {
    let Some(t) = tidings.and_then(|c| c.cpu_us) else {
        return "-".into();
    };
    let ratios: Vec<String> = peers
        .iter()
        .filter_map(|(s, c)| {
            c.cpu_us
                .filter(|p| *p > 0.0)
                .map(|p| format!("{:.2}x {s}", t / p))
        })
        .collect();
    if ratios.is_empty() {
        "-".into()
    } else {
        ratios.join(" · ")
    }
}

/// The markdown table: one row per workload, one column per system; `floors` holds
/// the `fdatasync` floor (µs) measured beside each `queue-latency` row, by row.
pub fn table(
    systems: &[System],
    rows: &BTreeMap<(usize, System), Cell>,
    workloads: &[Workload],
    floors: &BTreeMap<usize, f64>,
) -> String {
    let mut out = String::from("| workload |");
    for s in systems {
        out.push_str(&format!(" {s} msgs/s · p99 µs · RSS MiB · CPU µs/msg |"));
    }
    out.push_str(
        " tidings / best peer | RSS tidings / nats-server | CPU/msg tidings / peer |\n|---|",
    );
    for _ in systems {
        out.push_str("---:|");
    }
    out.push_str("---:|---:|---:|\n");
    for (i, w) in workloads.iter().enumerate() {
        out.push_str(&format!("| {w} |"));
        let mut peers = Vec::new();
        for s in systems {
            match rows.get(&(i, *s)) {
                Some(c) => {
                    let p99 = c.p99_us.map_or("-".into(), |p| format!("{p:.0}"));
                    let rss = c
                        .rss_kb
                        .map_or("-".into(), |kb| format!("{:.1}", kb / 1024.0));
                    let cpu = c.cpu_us.map_or("-".into(), |us| format!("{us:.2}"));
                    let mark = if c.lost { " !" } else { "" };
                    out.push_str(&format!(
                        " {} · {p99} · {rss} · {cpu}{mark} |",
                        thousands(c.msgs_per_sec)
                    ));
                    if *s != System::Tidings {
                        peers.push((*s, c));
                    }
                }
                None => out.push_str(" n/a |"),
            }
        }
        let tidings = rows.get(&(i, System::Tidings));
        let ratio = ratio(*w, tidings, &peers, floors.get(&i).copied());
        let nats = rows
            .get(&(i, System::Nats))
            .or_else(|| rows.get(&(i, System::Jetstream)));
        out.push_str(&format!(
            " {ratio} | {} | {} |\n",
            rss_ratio(tidings, nats),
            cpu_ratio(tidings, &peers)
        ));
    }
    out
}

/// Measures the `fdatasync` floor (floor.rs) in the directory where a spawned
/// tidings broker keeps its data (the system's temporary directory), and says so.
async fn measure_floor() -> Result<floor::SyncFloor> {
    let dir = std::env::temp_dir();
    eprintln!(
        "fdatasync floor: {} syncs of {} KiB overwritten in {}",
        floor::SYNCS,
        floor::ROUND_BYTES / 1024,
        dir.display()
    );
    let measured =
        tokio::task::spawn_blocking(move || floor::measure(&dir, floor::ROUND_BYTES, floor::SYNCS))
            .await??;
    eprintln!(
        "  p50 {:.0} µs  p99 {:.0} µs",
        measured.p50_us, measured.p99_us
    );
    Ok(measured)
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
    let mut launch = Launch::InProcess;
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
    if systems.contains(&System::Tidings) {
        let (how, note) = args.launch()?;
        eprintln!("{note}");
        launch = how;
    }
    let targets: BTreeMap<System, Target> = systems
        .iter()
        .map(|s| {
            let target = Target {
                system: *s,
                server: args.server(*s).map(str::to_owned),
                launch: launch.clone(),
                broker_pid: args.peer_pid(*s),
            };
            if *s != System::Tidings {
                match target.broker_pid {
                    Some(pid) => eprintln!("{s}: measuring the memory and CPU of pid {pid}"),
                    None => eprintln!(
                        "{s}: memory and CPU not measured (no live pid file in {}, and no \
                         process of ours found listening on its port)",
                        args.peers_dir.display()
                    ),
                }
            }
            (*s, target)
        })
        .collect();

    let mut rows = BTreeMap::new();
    let mut floors = BTreeMap::new();
    let mut clean = true;
    for (i, w) in workloads.iter().enumerate() {
        let job = Job::scaled(*w, scale);
        let cells: Vec<System> = systems
            .iter()
            .copied()
            .filter(|s| s.supports(*w).is_ok())
            .collect();
        // Runs alternate between the systems (run 1 of each, then run 2 of each, …),
        // so that a shift in the load of a shared machine falls on all of them
        // rather than on whichever ran during it.
        let mut results: BTreeMap<System, (Vec<RunReport>, usize)> = BTreeMap::new();
        let mut floor_p50s = Vec::new();
        for run in 1..=runs {
            if *w == Workload::QueueLatency {
                match measure_floor().await {
                    Ok(f) => floor_p50s.push(f.p50_us),
                    Err(e) => eprintln!("  the fdatasync floor could not be measured: {e:#}"),
                }
            }
            for s in &cells {
                eprintln!("{w} on {s}, run {run}/{runs}");
                let Some(target) = targets.get(s) else {
                    continue;
                };
                let (reports, errors) = results.entry(*s).or_default();
                match job::run(target, &job, deadline, drain).await {
                    Ok(report) => {
                        eprint!("{}", report.human());
                        if args.json {
                            println!("{}", report.to_json());
                        }
                        reports.push(report);
                    }
                    Err(e) => {
                        eprintln!("  failed: {e:#}");
                        *errors += 1;
                    }
                }
            }
        }
        if let Some(f) = median(&mut floor_p50s) {
            floors.insert(i, f);
        }
        for (s, (reports, errors)) in results {
            let c = cell(&reports, errors);
            clean &= !c.lost;
            rows.insert((i, s), c);
        }
    }
    println!(
        "\nmedians of {runs} run(s), alternating between the systems, scale {scale}; \
         ! = messages lost or a run failed; \
         the ratio is msgs/s (latency: p99, lower is better) against the best peer \
         (queue-latency: p50 against the fdatasync floor measured before each run, \
         and p99 against the best peer); \
         RSS = the broker process's peak resident memory during the run; CPU = the broker \
         process's user+system CPU time over the run per message published; tidings ran {}\n",
        match launch {
            Launch::Process(_) => "as a separate tidings-broker process",
            Launch::InProcess => "IN-PROCESS (its RSS and CPU are not measured)",
            Launch::External(_) => "as an external broker (its RSS and CPU are not measured)",
        }
    );
    println!("{}", table(&systems, &rows, &workloads, &floors));
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
        assert_eq!(
            local_port("amqp://guest:guest@127.0.0.1:5672/%2f"),
            Some(5672)
        );
        assert_eq!(local_port("localhost:4222"), Some(4222));
        assert_eq!(
            local_port("10.0.0.7:4222"),
            None,
            "another machine's process"
        );
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
            p50_us: Some(p99 / 2.0),
            p99_us: Some(p99),
            rss_kb: None,
            cpu_us: None,
            lost: false,
        }
    }

    #[test]
    fn ratio_against_best_peer() {
        let t = c(1200.0, 50.0);
        let (nats, redis) = (c(1000.0, 100.0), c(500.0, 40.0));
        let peers = [(System::Nats, &nats), (System::Redis, &redis)];
        assert_eq!(ratio(Workload::Fanin, Some(&t), &peers, None), "1.20x nats");
        assert_eq!(
            ratio(Workload::Latency, Some(&t), &peers, None),
            "p99 1.25x redis"
        );
        assert_eq!(ratio(Workload::Fanin, Some(&t), &[], None), "-");
        assert_eq!(ratio(Workload::Latency, Some(&t), &[], None), "-");
        assert_eq!(ratio(Workload::Fanin, None, &peers, None), "-");
    }

    #[test]
    fn queue_latency_reads_p50_against_the_floor_and_p99_against_peers() {
        // p50 25 µs (half the p99 of 50), the floor 10 µs.
        let t = c(10_000.0, 50.0);
        let jetstream = c(10_000.0, 500.0);
        let peers = [(System::Jetstream, &jetstream)];
        assert_eq!(
            ratio(Workload::QueueLatency, Some(&t), &peers, Some(10.0)),
            "p50 25 µs = 2.50x fdatasync (10 µs) · p99 0.10x jetstream"
        );
        assert_eq!(
            ratio(Workload::QueueLatency, Some(&t), &[], None),
            "p50 - · p99 -"
        );
        let mut rows = BTreeMap::new();
        rows.insert((0, System::Tidings), t);
        rows.insert((0, System::Jetstream), jetstream);
        let floors = BTreeMap::from([(0, 10.0)]);
        let table = table(
            &[System::Tidings, System::Jetstream],
            &rows,
            &[Workload::QueueLatency],
            &floors,
        );
        assert!(
            table.contains("| queue-latency | 10,000 · 50 · - · - | 10,000 · 500 · - · - | p50 25 µs = 2.50x fdatasync (10 µs) · p99 0.10x jetstream |"),
            "{table}"
        );
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
            &BTreeMap::new(),
        );
        assert!(
            t.contains("| fanin | 1,200,000 · 900 · - · - | 1,000,000 · 800 · - · - ! | 1.20x nats | - | - |"),
            "{t}"
        );
        assert!(t.contains("| queue | n/a | n/a | - | - | - |"), "{t}");
        assert!(
            t.contains("| nats msgs/s · p99 µs · RSS MiB · CPU µs/msg | tidings / best peer | RSS tidings / nats-server | CPU/msg tidings / peer |"),
            "{t}"
        );
    }

    #[test]
    fn memory_is_shown_in_mib_and_compared_with_nats_server() {
        let mut rows = BTreeMap::new();
        let with_rss = |rate, kb| Cell {
            rss_kb: Some(kb),
            cpu_us: Some(kb / 10_240.0),
            ..c(rate, 100.0)
        };
        rows.insert((0, System::Tidings), with_rss(1000.0, 30_720.0));
        rows.insert((0, System::Nats), with_rss(900.0, 20_480.0));
        rows.insert((1, System::Tidings), with_rss(500.0, 40_960.0));
        rows.insert((1, System::Jetstream), with_rss(400.0, 81_920.0));
        let t = table(
            &[System::Tidings, System::Nats, System::Jetstream],
            &rows,
            &[Workload::Fanin, Workload::Queue],
            &BTreeMap::new(),
        );
        assert!(
            t.contains(
                "| fanin | 1,000 · 100 · 30.0 · 3.00 | 900 · 100 · 20.0 · 2.00 | n/a | 1.11x nats | 1.50x | 1.50x nats |"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "| queue | 500 · 100 · 40.0 · 4.00 | n/a | 400 · 100 · 80.0 · 8.00 | 1.25x jetstream | 0.50x | 0.50x jetstream |"
            ),
            "{t}"
        );
        assert_eq!(rss_ratio(rows.get(&(0, System::Tidings)), None), "-");
        assert_eq!(
            rss_ratio(Some(&c(1.0, 1.0)), rows.get(&(0, System::Nats))),
            "-"
        );
    }

    #[test]
    fn compare_picks_how_tidings_runs() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: CompareArgs,
        }
        let parse =
            |extra: &[&str]| Cli::try_parse_from(["compare"].iter().chain(extra)).map(|c| c.args);
        let (launch, note) = parse(&["--tidings", "127.0.0.1:7878"])
            .expect("parses")
            .launch()
            .expect("resolves");
        assert_eq!(launch, Launch::External("127.0.0.1:7878".into()));
        assert!(note.contains("127.0.0.1:7878"));
        let (launch, note) = parse(&["--in-process"])
            .expect("parses")
            .launch()
            .expect("resolves");
        assert_eq!(launch, Launch::InProcess);
        assert!(note.contains("in-process"));
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = dir.path().join("tidings-broker");
        std::fs::write(&bin, b"").expect("file written");
        let bin_arg = bin.to_str().expect("utf-8 path");
        let (launch, _) = parse(&["--broker-bin", bin_arg])
            .expect("parses")
            .launch()
            .expect("resolves");
        assert_eq!(launch, Launch::Process(bin.clone()));
        assert!(
            parse(&["--broker-bin", "/nonexistent/x"])
                .expect("parses")
                .launch()
                .is_err()
        );
        assert!(parse(&["--in-process", "--broker-bin", bin_arg]).is_err());
        assert!(parse(&["--in-process", "--tidings", "127.0.0.1:1"]).is_err());
        // A peer's pid file counts only for the peer's default address; elsewhere
        // the process listening on the port is measured (here: nobody).
        let args = parse(&["--nats", "127.0.0.1:1"]).expect("parses");
        assert_eq!(args.peer_pid(System::Nats), None);
        assert_eq!(args.peer_pid(System::Tidings), None);
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
