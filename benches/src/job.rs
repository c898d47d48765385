//! One benchmark run: which workload with which parameters, on which system.

use std::time::Duration;

use anyhow::{Result, anyhow};

use crate::cpu::{self, CpuMeter};
use crate::driver::tidings::{Launch, TidingsDriver};
use crate::driver::{Driver, System, Workload};
use crate::report::{RunReport, whole};
use crate::rss::{Peak, Sampler};
use crate::workload::bursty::BurstyParams;
use crate::workload::fanin::FaninParams;
use crate::workload::fanout::FanoutParams;
use crate::workload::latency::LatencyParams;
use crate::workload::queue::QueueParams;
use crate::workload::reqrep::ReqrepParams;
use crate::workload::{self, Common};

/// A workload with its parameters.
#[derive(Debug, Clone)]
pub enum Job {
    /// See [`workload::fanin`].
    Fanin(FaninParams),
    /// See [`workload::fanout`].
    Fanout(FanoutParams),
    /// See [`workload::queue`].
    Queue(QueueParams),
    /// See [`workload::latency`].
    Latency(LatencyParams),
    /// See [`workload::reqrep`].
    Reqrep(ReqrepParams),
    /// See [`workload::bursty`].
    Bursty(BurstyParams),
}

impl Job {
    /// Which workload this is.
    pub fn workload(&self) -> Workload {
        match self {
            Job::Fanin(_) => Workload::Fanin,
            Job::Fanout(_) => Workload::Fanout,
            Job::Queue(p) => p.workload(),
            Job::Latency(_) => Workload::Latency,
            Job::Reqrep(_) => Workload::Reqrep,
            Job::Bursty(_) => Workload::Bursty,
        }
    }

    /// The issue's defaults, with counts (and the latency run's length) multiplied by `scale`.
    pub fn scaled(workload: Workload, scale: f64) -> Job {
        let n = |default: u64| whole(default as f64 * scale).max(1);
        match workload {
            Workload::Fanin => Job::Fanin(FaninParams {
                publishers: 1,
                size: 128,
                messages: n(1_000_000),
            }),
            Workload::Fanout => Job::Fanout(FanoutParams {
                subscribers: 4,
                size: 128,
                messages: n(1_000_000),
            }),
            Workload::Queue => Job::Queue(QueueParams {
                producers: 1,
                consumers: 1,
                window: 256,
                prefetch: 256,
                size: 1024,
                messages: n(200_000),
                rate: 0,
            }),
            Workload::QueueLatency => Job::Queue(QueueParams {
                producers: 1,
                consumers: 1,
                window: 256,
                prefetch: 256,
                size: 1024,
                messages: n(50_000),
                rate: 10_000,
            }),
            Workload::Latency => Job::Latency(LatencyParams {
                rate: 10_000,
                seconds: (10.0 * scale).clamp(0.5, 10.0),
                size: 128,
            }),
            Workload::Reqrep => Job::Reqrep(ReqrepParams {
                responders: 2,
                requesters: 8,
                requests: n(100_000),
                size: 128,
            }),
            Workload::Bursty => Job::Bursty(BurstyParams {
                rate: 100_000,
                seconds: (10.0 * scale).clamp(0.5, 10.0),
                size: 128,
                pause_ms: 100,
                every_ms: 1000,
            }),
        }
    }

    /// Checks the parameters before anything connects.
    pub fn validate(&self) -> Result<()> {
        match self {
            Job::Fanin(p) => p.validate(),
            Job::Fanout(p) => p.validate(),
            Job::Queue(p) => p.validate(),
            Job::Latency(p) => p.validate(),
            Job::Reqrep(p) => p.validate(),
            Job::Bursty(p) => p.validate(),
        }
    }
}

/// Runs `job` with an already built driver.
pub async fn run_with<D: Driver>(driver: &D, job: &Job, common: &Common) -> Result<RunReport> {
    match job {
        Job::Fanin(p) => workload::fanin::run(driver, p, common).await,
        Job::Fanout(p) => workload::fanout::run(driver, p, common).await,
        Job::Queue(p) => workload::queue::run(driver, p, common).await,
        Job::Latency(p) => workload::latency::run(driver, p, common).await,
        Job::Reqrep(p) => workload::reqrep::run(driver, p, common).await,
        Job::Bursty(p) => workload::bursty::run(driver, p, common).await,
    }
}

/// Where a run goes, and which process's memory it measures.
#[derive(Debug, Clone)]
pub struct Target {
    /// The system driven.
    pub system: System,
    /// A peer's address (its default when `None`); ignored for tidings, see `launch`.
    pub server: Option<String>,
    /// For tidings: the broker to use, start or spawn.
    pub launch: Launch,
    /// The broker process to measure, when it is not one spawned for the run (a peer's
    /// server from its pid file, or `--broker-pid`).
    pub broker_pid: Option<u32>,
}

impl Target {
    /// `system` at its default address (tidings: in-process), measuring nothing.
    #[cfg(test)]
    pub fn plain(system: System, server: Option<&str>) -> Target {
        Target {
            system,
            server: server.map(str::to_owned),
            launch: server.map_or(Launch::InProcess, |s| Launch::External(s.to_owned())),
            broker_pid: None,
        }
    }
}

/// Runs `job` on `target`, measuring the broker's peak RSS when its process is known.
pub async fn run(
    target: &Target,
    job: &Job,
    deadline: Duration,
    drain: Duration,
) -> Result<RunReport> {
    job.validate()?;
    let system = target.system;
    let workload = job.workload();
    system
        .supports(workload)
        .map_err(|reason| anyhow!("{system} cannot run {workload}: {reason}"))?;
    let common = Common::new(deadline, drain);
    if system == System::Tidings {
        let driver = TidingsDriver::new(&target.launch).await?;
        let spawned = driver.broker_pid();
        let measured = spawned.or(target.broker_pid);
        let sampler = measured.map(Sampler::start);
        let meter = measured.map(CpuMeter::start);
        let report = run_with(&driver, job, &common).await;
        let cpu = meter.and_then(CpuMeter::finish);
        let peak = match sampler {
            Some(s) => s.finish(spawned.is_some()).await,
            None => None,
        };
        let stopped = driver.shutdown().await;
        let mut report = report?;
        describe(&mut report, target.launch.mode(), peak);
        describe_cpu(&mut report, job, cpu);
        if let Err(e) = stopped {
            report.add_error(format!("{e:#}"));
        }
        return Ok(report);
    }
    let sampler = target.broker_pid.map(Sampler::start);
    let meter = target.broker_pid.map(CpuMeter::start);
    let report = run_peer(system, target.server.as_deref(), job, &common).await;
    let cpu = meter.and_then(CpuMeter::finish);
    let peak = match sampler {
        Some(s) => s.finish(false).await,
        None => None,
    };
    let mut report = report?;
    describe(&mut report, "external", peak);
    describe_cpu(&mut report, job, cpu);
    Ok(report)
}

/// Adds how the broker ran and its peak memory to `details`.
fn describe(report: &mut RunReport, mode: &str, peak: Option<Peak>) {
    report.details.insert("broker_mode".into(), mode.into());
    if let Some(peak) = peak {
        report.details.insert("rss_peak_kb".into(), peak.kb.into());
        report.details.insert("rss_pid".into(), peak.pid.into());
        report
            .details
            .insert("rss_method".into(), peak.method.name().into());
    }
}

/// Messages the run published (each counted once, whatever its fan-out), the
/// denominator of the broker's CPU per message; requests for `reqrep`.
pub fn messages_published(job: &Job, report: &RunReport) -> u64 {
    match job {
        Job::Fanin(p) => p.messages,
        Job::Fanout(p) => p.messages,
        Job::Queue(p) => p.messages,
        Job::Reqrep(p) => p.requests,
        // Paced by time: what went out is the achieved rate over the run.
        Job::Latency(_) => whole(report.msgs_per_sec * report.duration_s),
        // Two phases of rate × seconds each.
        Job::Bursty(p) => 2 * whole(p.rate as f64 * p.seconds),
    }
}

/// Adds the broker's CPU time over the run, and per message, to `details`.
fn describe_cpu(report: &mut RunReport, job: &Job, cpu: Option<Duration>) {
    let Some(cpu) = cpu else { return };
    report
        .details
        .insert("broker_cpu_s".into(), cpu.as_secs_f64().into());
    if let Some(us) = cpu::us_per_message(cpu, messages_published(job, report)) {
        report
            .details
            .insert("broker_cpu_us_per_msg".into(), us.into());
    }
}

/// Runs `job` on a peer at `server` (its default address when `None`).
async fn run_peer(
    system: System,
    server: Option<&str>,
    job: &Job,
    common: &Common,
) -> Result<RunReport> {
    #[cfg(feature = "peers")]
    let addr = server.or(system.default_server()).unwrap_or_default();
    match system {
        System::Tidings => Err(anyhow!("tidings is not a peer")),
        #[cfg(feature = "peers")]
        System::Nats => {
            let driver = crate::driver::nats::NatsDriver::new(addr).await?;
            run_with(&driver, job, common).await
        }
        #[cfg(feature = "peers")]
        System::Jetstream => {
            let driver = crate::driver::jetstream::JetstreamDriver::new(addr).await?;
            run_with(&driver, job, common).await
        }
        #[cfg(feature = "peers")]
        System::Rabbitmq => {
            let driver = crate::driver::rabbitmq::RabbitDriver::new(addr).await?;
            run_with(&driver, job, common).await
        }
        #[cfg(feature = "peers")]
        System::Redis => {
            let driver = crate::driver::redis::RedisDriver::new(addr).await?;
            run_with(&driver, job, common).await
        }
        #[cfg(feature = "peers")]
        System::Mqtt => {
            let driver = crate::driver::mqtt::MqttDriver::new(addr)?;
            run_with(&driver, job, common).await
        }
        #[cfg(not(feature = "peers"))]
        other => {
            let _ = (server, job, common);
            Err(anyhow!(
                "{other} needs the peer drivers, built with the `peers` feature: \
                 cargo run --release -p tidings-bench --features peers -- ..."
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_defaults_are_the_issue_defaults() {
        match Job::scaled(Workload::Fanin, 1.0) {
            Job::Fanin(p) => assert_eq!((p.publishers, p.size, p.messages), (1, 128, 1_000_000)),
            other => panic!("wrong job {other:?}"),
        }
        match Job::scaled(Workload::Queue, 0.1) {
            Job::Queue(p) => assert_eq!((p.size, p.window, p.messages), (1024, 256, 20_000)),
            other => panic!("wrong job {other:?}"),
        }
        match Job::scaled(Workload::Latency, 0.1) {
            Job::Latency(p) => assert_eq!((p.rate, p.seconds), (10_000, 1.0)),
            other => panic!("wrong job {other:?}"),
        }
        for w in Workload::ALL {
            assert_eq!(Job::scaled(w, 0.01).workload(), w);
            assert!(Job::scaled(w, 0.01).validate().is_ok());
        }
    }

    #[tokio::test]
    async fn refused_combinations_fail_before_connecting() {
        let job = Job::scaled(Workload::Reqrep, 0.01);
        let err = run(
            &Target::plain(System::Redis, Some("127.0.0.1:1")),
            &job,
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("redis cannot run reqrep"), "{err}");
    }
}
