//! `tidings-bench scale`: how cost grows with one dimension at a time
//! (subscriptions, topics, queues, connections, backlog), as a table and one PNG
//! plot per curve, tidings against nats-server where the dimension applies to it.
//!
//! Every tidings step runs against a fresh `tidings-broker` process, so that its
//! memory and CPU belong to that step alone; nats-server is the one
//! `benches/peers/peers.sh` started (its RSS sampled, its CPU read before and after).

mod backlog;
mod plot;
mod pubsub;
mod queues;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;

use crate::broker_process::{self, BrokerProcess};
use crate::driver::System;
use crate::driver::tidings::TidingsDriver;
use crate::report::thousands;
use crate::rss;

/// The dimension a run sweeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dimension {
    /// Distinct idle subscriptions (exact and wildcard) while one matching
    /// subscriber receives fanin.
    Subscriptions,
    /// Topics published to, all under one wildcard subscription.
    Topics,
    /// Durable queues, each with a consumer, producers spread over them; and the
    /// broker's CPU while they sit idle.
    Queues,
    /// Idle subscriber connections: broker RSS per connection, and the time one
    /// publish takes to reach them all.
    Connections,
    /// Messages stored in one queue: publish and drain rates, RSS, the time to be
    /// ready after kill -9, and disk use.
    Backlog,
}

impl Dimension {
    fn name(self) -> &'static str {
        match self {
            Dimension::Subscriptions => "subscriptions",
            Dimension::Topics => "topics",
            Dimension::Queues => "queues",
            Dimension::Connections => "connections",
            Dimension::Backlog => "backlog",
        }
    }

    /// The steps of a full run and of a `--quick` one.
    fn default_steps(self, quick: bool) -> Vec<u64> {
        match (self, quick) {
            (Dimension::Subscriptions | Dimension::Topics, false) => {
                vec![1, 10, 100, 1_000, 10_000, 100_000]
            }
            (Dimension::Subscriptions | Dimension::Topics, true) => vec![1, 100, 1_000],
            (Dimension::Queues, false) => vec![1, 10, 100, 1_000, 10_000],
            (Dimension::Queues, true) => vec![1, 10, 50],
            (Dimension::Connections, false) => vec![10, 100, 1_000, 10_000],
            (Dimension::Connections, true) => vec![10, 100],
            // Backlog: the number of points the fill and the drain are measured at.
            (Dimension::Backlog, _) => vec![],
        }
    }

    /// Whether nats-server has this dimension.
    fn applies_to_nats(self) -> bool {
        matches!(
            self,
            Dimension::Subscriptions | Dimension::Topics | Dimension::Connections
        )
    }
}

/// The `scale` subcommand's options.
#[derive(Debug, Clone, clap::Args)]
pub struct ScaleArgs {
    /// The dimension to sweep.
    #[arg(value_enum)]
    pub dimension: Dimension,
    /// The steps, comma separated (default: 1..100,000 by powers of ten for
    /// subscriptions and topics, 1..10,000 for queues, 10..10,000 for connections).
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<u64>,
    /// A smoke run: few, small steps, few messages, a small backlog.
    #[arg(long)]
    pub quick: bool,
    /// Messages per measured step (subscriptions, topics, queues) [default: 200000;
    /// --quick: 2000].
    #[arg(long)]
    pub messages: Option<u64>,
    /// Message size in bytes [default: 128; queues and backlog: 1024].
    #[arg(long)]
    pub size: Option<usize>,
    /// Systems, comma separated [default: tidings, and nats where the dimension
    /// applies and it is reachable; peers need the `peers` feature].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub systems: Vec<System>,
    /// Where the PNG plots go (one per curve: DIMENSION-METRIC.png).
    #[arg(long, default_value = "scale-plots")]
    pub out: PathBuf,
    /// The tidings-broker binary [default: the one beside this executable].
    #[arg(long, value_name = "PATH")]
    pub broker_bin: Option<PathBuf>,
    /// nats-server address.
    #[arg(long, default_value = "127.0.0.1:4222")]
    pub nats: String,
    /// Where benches/peers/peers.sh keeps its pid files (to measure nats-server).
    #[arg(long, env = "TIDINGS_PEERS_DIR", default_value = rss::DEFAULT_PEERS_DIR)]
    pub peers_dir: PathBuf,
    /// queues: producers, spread over the queues.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// queues: each consumer's prefetch.
    #[arg(long, default_value_t = 32)]
    pub prefetch: u16,
    /// queues: how long the idle broker's CPU is measured after each step, seconds
    /// [default: 5; --quick: 1].
    #[arg(long)]
    pub idle_seconds: Option<f64>,
    /// backlog: messages stored at the top [default: 10000000; --quick: 20000].
    #[arg(long)]
    pub backlog: Option<u64>,
    /// backlog: points at which the fill and the drain are measured.
    #[arg(long, default_value_t = 5)]
    pub points: u64,
    /// backlog: where the broker keeps its data [default: a temporary dir under
    /// the system's temp dir]; must have room for 1.5x the backlog.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Hard time limit per step, seconds.
    #[arg(long, default_value_t = 300.0)]
    pub deadline: f64,
    /// How long receivers wait for stragglers once senders are done, milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub drain_ms: u64,
}

impl ScaleArgs {
    fn messages(&self) -> u64 {
        self.messages
            .unwrap_or(if self.quick { 2_000 } else { 200_000 })
            .max(1)
    }

    fn size(&self, durable: bool) -> usize {
        self.size.unwrap_or(if durable { 1024 } else { 128 })
    }

    fn steps(&self) -> Vec<u64> {
        if self.steps.is_empty() {
            self.dimension.default_steps(self.quick)
        } else {
            self.steps.clone()
        }
    }

    fn idle(&self) -> Duration {
        Duration::from_secs_f64(
            self.idle_seconds
                .unwrap_or(if self.quick { 1.0 } else { 5.0 })
                .clamp(0.1, 600.0),
        )
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs_f64(self.deadline.clamp(1.0, 86_400.0))
    }

    fn drain(&self) -> Duration {
        Duration::from_millis(self.drain_ms)
    }
}

/// One measured step of one system.
#[derive(Debug, Clone)]
pub struct Point {
    /// The system measured.
    pub system: System,
    /// The dimension's value.
    pub x: u64,
    /// Named figures, in column order.
    pub values: Vec<(&'static str, f64)>,
    /// What went wrong (losses, errors); the row is marked.
    pub errors: Vec<String>,
}

impl Point {
    fn new(system: System, x: u64) -> Point {
        Point {
            system,
            x,
            values: Vec::new(),
            errors: Vec::new(),
        }
    }

    fn set(&mut self, name: &'static str, value: f64) {
        self.values.push((name, value));
    }

    fn get(&self, name: &str) -> Option<f64> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }
}

/// A dimension's results: the points, and single figures that are no curve.
#[derive(Debug, Default)]
pub struct Sweep {
    /// Every step of every system.
    pub points: Vec<Point>,
    /// Figures measured once (the backlog's restart time and disk use).
    pub notes: Vec<String>,
}

/// The column names in order of first appearance.
fn columns(points: &[Point]) -> Vec<&'static str> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for p in points {
        for (name, _) in &p.values {
            if seen.insert(*name) {
                out.push(*name);
            }
        }
    }
    out
}

fn shown(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract() == 0.0 {
        thousands(v)
    } else {
        format!("{v:.2}")
    }
}

/// The markdown table: one row per system and step.
pub fn table(x_label: &str, sweep: &Sweep) -> String {
    let cols = columns(&sweep.points);
    let mut out = format!("| system | {x_label} |");
    for c in &cols {
        out.push_str(&format!(" {c} |"));
    }
    out.push_str("\n|---|---:|");
    for _ in &cols {
        out.push_str("---:|");
    }
    out.push('\n');
    for p in &sweep.points {
        let mark = if p.errors.is_empty() { "" } else { " !" };
        out.push_str(&format!(
            "| {}{mark} | {} |",
            p.system,
            thousands(p.x as f64)
        ));
        for c in &cols {
            let cell = p.get(c).map_or("-".into(), shown);
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out
}

/// A file-name part out of a column name: `msgs/s` -> `msgs-s`.
fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.replace('µ', "u").chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_owned()
}

/// One PNG per column, a line per system; returns the files written.
fn plot_all(args: &ScaleArgs, x_label: &str, sweep: &Sweep) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let systems: BTreeSet<System> = sweep.points.iter().map(|p| p.system).collect();
    let mut files = Vec::new();
    for col in columns(&sweep.points) {
        let series: Vec<plot::Series<'_>> = systems
            .iter()
            .map(|s| plot::Series {
                name: s.name(),
                points: sweep
                    .points
                    .iter()
                    .filter(|p| p.system == *s)
                    .filter_map(|p| p.get(col).map(|v| (p.x as f64, v)))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        let path = args
            .out
            .join(format!("{}-{}.png", args.dimension.name(), slug(col)));
        let title = format!("{}: {col}", args.dimension.name());
        plot::line_chart(&path, &title, x_label, col, &series)?;
        files.push(path);
    }
    Ok(files)
}

/// Raises this process's open-file limit to its hard limit (connections live in
/// the bench; a spawned broker inherits the limit). Returns the limit in force.
#[cfg(unix)]
fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
    getrlimit(Resource::Nofile).current
}

#[cfg(not(unix))]
fn raise_fd_limit() -> Option<u64> {
    None
}

/// A fresh tidings-broker process for one step, with `extra` flags.
async fn spawn_tidings(bin: &std::path::Path, extra: &[String]) -> Result<TidingsDriver> {
    let data = tempfile::tempdir().context("creating a temporary data dir")?;
    let path = data.path().to_owned();
    let process = BrokerProcess::start_in(bin, &path, extra, Some(data)).await?;
    Ok(TidingsDriver::from_process(process))
}

/// Runs the sweep, prints the table and writes the plots; false when a step lost
/// messages or failed.
pub async fn scale(args: ScaleArgs) -> Result<bool> {
    let Some(bin) = broker_process::locate(args.broker_bin.as_deref())? else {
        bail!(
            "scale runs tidings as its own process: no tidings-broker beside this executable; \
             build it with `cargo build --release -p tidings-broker` or pass --broker-bin PATH"
        );
    };
    if let Some(warning) = broker_process::staleness_warning(&bin) {
        eprintln!("{warning}");
    }
    if let Some(limit) = raise_fd_limit() {
        eprintln!("open files: limit {limit} for the bench and the brokers it spawns");
    }
    let systems = if args.systems.is_empty() {
        let mut s = vec![System::Tidings];
        if args.dimension.applies_to_nats() && cfg!(feature = "peers") {
            s.push(System::Nats);
        }
        s
    } else {
        args.systems.clone()
    };
    let mut kept = Vec::new();
    for s in systems {
        match s {
            System::Tidings => kept.push(s),
            System::Nats if !args.dimension.applies_to_nats() => {
                eprintln!("skipping nats: it has no {}", args.dimension.name());
            }
            System::Nats if !cfg!(feature = "peers") => {
                eprintln!("skipping nats: built without the `peers` feature");
            }
            System::Nats if !crate::compare::reachable(&args.nats).await => {
                eprintln!(
                    "skipping nats: nothing listens at {} (benches/peers/peers.sh start nats)",
                    args.nats
                );
            }
            System::Nats => kept.push(s),
            other => eprintln!(
                "skipping {other}: scale {} runs on tidings and nats only",
                args.dimension.name()
            ),
        }
    }
    let systems = kept;
    let (sweep, x_label) = match args.dimension {
        Dimension::Subscriptions | Dimension::Topics | Dimension::Connections => (
            pubsub::sweep(&args, &bin, &systems).await?,
            args.dimension.name(),
        ),
        Dimension::Queues => (queues::sweep(&args, &bin).await?, "queues"),
        Dimension::Backlog => (backlog::sweep(&args, &bin).await?, "messages stored"),
    };
    println!(
        "\nscale {}: one fresh tidings-broker process per step; ! = lost messages or errors\n",
        args.dimension.name()
    );
    println!("{}", table(x_label, &sweep));
    for note in &sweep.notes {
        println!("{note}");
    }
    let mut clean = true;
    for p in &sweep.points {
        for e in &p.errors {
            clean = false;
            eprintln!("{} at {} = {}: {e}", p.system, x_label, p.x);
        }
    }
    match plot_all(&args, x_label, &sweep) {
        Ok(files) => {
            for f in files {
                println!("plot: {}", f.display());
            }
        }
        Err(e) => eprintln!("error: the plots were not written: {e:#}"),
    }
    Ok(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_column_per_figure_and_marks_errors() {
        let mut a = Point::new(System::Tidings, 1);
        a.set("msgs/s", 700_000.0);
        a.set("CPU µs/msg", 1.25);
        let mut b = Point::new(System::Nats, 100_000);
        b.set("msgs/s", 500_000.0);
        b.errors.push("lost 3".into());
        let sweep = Sweep {
            points: vec![a, b],
            notes: vec![],
        };
        let t = table("subscriptions", &sweep);
        assert!(
            t.starts_with("| system | subscriptions | msgs/s | CPU µs/msg |"),
            "{t}"
        );
        assert!(t.contains("| tidings | 1 | 700,000 | 1.25 |"), "{t}");
        assert!(t.contains("| nats ! | 100,000 | 500,000 | - |"), "{t}");
    }

    #[test]
    fn names_and_steps() {
        assert_eq!(slug("RSS per connection KiB"), "rss-per-connection-kib");
        assert_eq!(slug("msgs/s"), "msgs-s");
        assert_eq!(slug("CPU µs/msg"), "cpu-us-msg");
        assert_eq!(
            Dimension::Subscriptions.default_steps(false).last(),
            Some(&100_000)
        );
        assert_eq!(Dimension::Queues.default_steps(false).last(), Some(&10_000));
        assert_eq!(
            Dimension::Connections.default_steps(false).first(),
            Some(&10)
        );
        assert!(!Dimension::Queues.applies_to_nats());
    }
}
