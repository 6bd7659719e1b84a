//! `freshet bench ps|serve|learn`: one harness for the three benchmarks.
//!
//! Every benchmark starts a fresh local cluster, drives load phases through
//! [`drive`] (closed loops, or an open loop paced at a target rate with a bound on
//! calls in flight), reads what it needs of the processes ([`ProcStats`]), prints one
//! table so figures are compared side by side in one run, and stops the cluster and
//! deletes its data whatever the outcome ([`with_cluster`]).
//!
//! - [`ps`]: push/pull throughput and latency of the parameter servers; [`memory`]:
//!   memory for an unbounded id space (capped and uncapped tables).
//! - [`serve`]: Rank latency and feedback freshness through the gateways.
//! - [`learn`]: training throughput (Train → sealed) and end to end.

pub mod ann;
pub mod learn;
pub mod memory;
pub mod ps;
pub mod serve;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_local::LocalCluster;
use tokio::sync::Semaphore;

pub use ann::{bench_ann, AnnOptions, AnnShape};
pub use learn::{bench_learn, LearnOptions};
pub use memory::{bench_memory, MemoryOptions};
pub use ps::{bench_ps, BenchOptions};
pub use serve::{bench_serve, ServeOptions};

/// How a phase offers load.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// `n` loops, each starting its next call when the previous one answers.
    Closed(usize),
    /// Calls started at `per_s` a second whatever the answers (open loop); a call due
    /// while `in_flight_max` are unanswered is skipped, so the achieved rate shows
    /// overload instead of a queue growing without bound.
    Open { per_s: f64, in_flight_max: usize },
}

/// What one phase measured: each answered call's figure (ms, sorted), failed calls, and
/// the phase's wall time from first call to last answer.
#[derive(Debug, Clone)]
pub struct Samples {
    ms: Vec<f64>,
    pub errors: u64,
    /// Calls an open loop did not start because `in_flight_max` were unanswered.
    pub skipped: u64,
    pub seconds: f64,
    /// CPU ms per answered call of a process the phase measured (NaN: not measured).
    pub cpu_ms: f64,
}

impl Samples {
    /// Answered calls.
    pub fn ok(&self) -> u64 {
        self.ms.len() as u64
    }

    /// Answered calls per second of the phase.
    pub fn rate(&self) -> f64 {
        self.ms.len() as f64 / self.seconds.max(1e-9)
    }

    /// The `q` quantile (NaN when nothing answered).
    pub fn quantile(&self, q: f64) -> f64 {
        percentile(&self.ms, q)
    }

    pub fn max(&self) -> f64 {
        self.ms.last().copied().unwrap_or(f64::NAN)
    }
}

/// The `p` quantile of sorted values (NaN when empty).
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Runs calls of `op` for `seconds` as `pace` says. `op(lane, n)` is the n-th call
/// (from 1) of loop `lane` (always 0 for an open loop) and returns its figure in ms, or
/// None when it failed. Every started call is awaited, so the phase ends by itself.
pub async fn drive<F, Fut>(pace: Pace, seconds: f64, op: F) -> Samples
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<f64>> + Send + 'static,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut skipped = 0;
    match pace {
        Pace::Closed(lanes) => {
            let op = Arc::new(op);
            for lane in 0..lanes {
                let op = Arc::clone(&op);
                tasks.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    let mut n = 0;
                    while start.elapsed().as_secs_f64() < seconds {
                        n += 1;
                        out.push(op(lane, n).await);
                    }
                    out
                }));
            }
        }
        Pace::Open {
            per_s,
            in_flight_max,
        } => {
            let sem = Arc::new(Semaphore::new(in_flight_max));
            let interval = Duration::from_secs_f64(1.0 / per_s);
            let mut next = Instant::now();
            let mut n = 0;
            while start.elapsed().as_secs_f64() < seconds {
                let now = Instant::now();
                if next > now {
                    tokio::time::sleep(next - now).await;
                }
                next += interval;
                let Ok(permit) = Arc::clone(&sem).try_acquire_owned() else {
                    skipped += 1;
                    continue;
                };
                n += 1;
                let call = op(0, n);
                tasks.push(tokio::spawn(async move {
                    let r = call.await;
                    drop(permit);
                    vec![r]
                }));
            }
        }
    }
    let mut ms = Vec::new();
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok(results) => {
                for r in results {
                    match r {
                        Some(v) => ms.push(v),
                        None => errors += 1,
                    }
                }
            }
            Err(_) => errors += 1,
        }
    }
    ms.sort_by(f64::total_cmp);
    Samples {
        ms,
        errors,
        skipped,
        seconds: start.elapsed().as_secs_f64(),
        cpu_ms: f64::NAN,
    }
}

/// What /proc says of one process.
pub struct ProcStats;

impl ProcStats {
    /// Peak resident memory (VmHWM) in MiB.
    pub fn peak_rss_mib(pid: u32) -> Option<f64> {
        Self::status_mib(pid, "VmHWM:")
    }

    /// Resident memory now (VmRSS) in MiB.
    pub fn rss_mib(pid: u32) -> Option<f64> {
        Self::status_mib(pid, "VmRSS:")
    }

    /// A memory line of /proc/PID/status (`key` with its colon) in MiB.
    fn status_mib(pid: u32, key: &str) -> Option<f64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = s.lines().find(|l| l.starts_with(key))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb / 1024.0)
    }

    /// User + system CPU seconds so far.
    pub fn cpu_seconds(pid: u32) -> Option<f64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let rest = &s[s.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Some(ticks / hz.max(1.0))
    }
}

/// Upserts items 1..=`n` with `features(id)` through the gateway on `ch` and waits
/// until it serves them.
pub async fn catalog(
    ch: &tonic::transport::Channel,
    n: u64,
    features: impl Fn(u64) -> Vec<String>,
) -> anyhow::Result<()> {
    let items: Vec<freshet_proto::ps::v1::Item> = (1..=n)
        .map(|id| freshet_proto::ps::v1::Item {
            id,
            features: features(id),
            active: true,
            title: String::new(),
        })
        .collect();
    let mut gw = freshet_proto::gateway::v1::gateway_client::GatewayClient::new(ch.clone());
    let wait = freshet_client::gateway::UPSERT_WAIT_DEFAULT;
    freshet_client::gateway::upsert_and_wait(&mut gw, &items, wait).await?;
    Ok(())
}

/// Runs `body` on a started cluster, then stops it and deletes its data directory,
/// whether the body succeeded or not (a failed phase leaves no processes behind).
pub async fn with_cluster<T>(
    mut cluster: LocalCluster,
    body: impl AsyncFnOnce(&LocalCluster) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let result = body(&cluster).await;
    cluster.stop(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(cluster.data_dir());
    result
}
