//! `freshet sim`: a recommendation environment with known ground truth (grounded in the
//! Open Bandit Dataset sample, with preference drift and new items), driven through a
//! real gateway, and the report comparing the live cluster with baselines on the same
//! stream.
//!
//! Per seed: a fresh local cluster (or the one given), the world's catalog upserted,
//! then every impression ranked by the gateway (Rank over gRPC, sampling at the given
//! temperature and ε) and every shown slot's outcome fed back (Feedback, acknowledged
//! once sealed), so the model learns from its own traffic. At every simulated hour the
//! model is copied out of the gateway (one epoch, via Lookup). Afterwards the baselines
//! run on exactly the same users in the same world state: uniform random and the oracle
//! (exact expectations), context-free Bernoulli Thompson sampling, the model copy frozen
//! at 2 h, the model copy refreshed every hour (a batch retrain that sees all data up to
//! the hour, with no training delay: generous to it), and Vowpal Wabbit.

pub mod policy;
pub mod progress;
pub mod replay;
pub mod report;
pub mod table;
pub mod world;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use freshet_proto::gateway::v1::{
    gateway_client::GatewayClient, Exploration, FeedbackEvent, FeedbackRequest, RankRequest,
    Reward, UserContext,
};
use tonic::transport::Channel;

use policy::{Ctx, ExploringOracle, FeatureOracle, ModelCopy, Policy, Snapshot, Thompson, Vw};
use report::SeedRun;
use world::{Grounding, Schedule, World, WorldConfig};

use freshet_client::gateway::{upsert_and_wait, UPSERT_WAIT_DEFAULT as CATALOG_WAIT};

/// What one live impression showed and got.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rec {
    pub user: u32,
    /// Expected clicks of the slate shown (exact, from the click model).
    pub expected: f32,
    pub clicks: u8,
    pub random: f32,
    pub oracle: f32,
}

/// How the live run calls the gateway.
#[derive(Debug, Clone, Copy)]
pub struct LiveOptions {
    pub temperature: f32,
    pub epsilon: f32,
    pub slots: usize,
    pub concurrency: usize,
}

/// Name of the [`ExploringOracle`] series.
pub const EXPLORING_ORACLE: &str = "oracle with the same exploration (ceiling)";
/// The live cluster's and the hourly-refreshed copy's names in the report.
pub const LIVE: &str = "Freshet (live, every epoch)";
pub const HOURLY: &str = "hourly refresh";

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            // Measured on the simulator: with the world's exact click rates, Plackett-Luce
            // at temperature 0.5 reaches only 0.36 of the oracle's normalised CTR, at 0.2
            // 0.73, at 0.1 0.91 (ε 0.02 keeps every item reachable).
            temperature: 0.1,
            epsilon: 0.02,
            slots: 3,
            concurrency: 32,
        }
    }
}

async fn retry<T, F, Fut>(what: &str, limit: Duration, mut op: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "{what} retry");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => anyhow::bail!("{what}: {}", e.message()),
        }
    }
}

/// Runs impressions `range` of the world through the gateway with `concurrency` users in
/// flight; fills `recs[n]` for each.
///
/// # Errors
/// A Rank or Feedback kept failing (30 s and 60 s of retries).
pub async fn drive_live(
    gw: &GatewayClient<Channel>,
    world: &Arc<World>,
    range: std::ops::Range<u64>,
    opts: LiveOptions,
    recs: &Arc<Mutex<Vec<Rec>>>,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(range.start));
    let mut tasks = Vec::new();
    for _ in 0..opts.concurrency {
        let gw = gw.clone();
        let world = Arc::clone(world);
        let recs = Arc::clone(recs);
        let next = Arc::clone(&next);
        let end = range.end;
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= end {
                    return Ok::<_, anyhow::Error>(());
                }
                let user = world.user(n);
                let active = world.active(n);
                let attr = world.attractiveness(n, user);
                let (random, oracle) = world.random_and_oracle(&attr, opts.slots);
                let req = RankRequest {
                    user: Some(UserContext {
                        categorical: world.rank_fields(user).into_iter().collect(),
                        numeric: vec![],
                        user_id: String::new(),
                    }),
                    candidates: (0..active).map(|i| world.item_id(i)).collect(),
                    k: opts.slots as u32,
                    exploration: Some(Exploration {
                        temperature: opts.temperature,
                        epsilon: opts.epsilon,
                    }),
                    candidate_set: String::new(),
                };
                let ranked = retry("rank", Duration::from_secs(30), || {
                    let mut gw = gw.clone();
                    let req = req.clone();
                    async move { gw.rank(req).await }
                })
                .await?
                .into_inner();
                let mut expected = 0.0;
                let mut clicks = 0u8;
                let mut events = Vec::with_capacity(ranked.items.len());
                for (pos, it) in ranked.items.iter().enumerate() {
                    let idx = (it.item_id - world.cfg.first_item) as usize;
                    let p = world.at_slot(attr[idx], pos);
                    expected += p;
                    let click = world.coin(n, idx) < p;
                    clicks += u8::from(click);
                    events.push(FeedbackEvent {
                        event_id: format!("sim-{}-{n}-{pos}", world.cfg.seed),
                        impression_id: ranked.impression_id.clone(),
                        item_id: it.item_id,
                        position: it.position,
                        rewards: if click {
                            vec![Reward::default()]
                        } else {
                            vec![]
                        },
                        event_time_ms: 0,
                    });
                }
                retry("feedback", Duration::from_secs(60), || {
                    let mut gw = gw.clone();
                    let events = events.clone();
                    async move { gw.feedback(FeedbackRequest { events }).await }
                })
                .await?;
                recs.lock().expect("lock")[n as usize] = Rec {
                    user: user as u32,
                    expected: expected as f32,
                    clicks,
                    random: random as f32,
                    oracle: oracle as f32,
                };
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// The live run of one seed: the records and the hourly model copies.
pub struct LiveRun {
    pub recs: Vec<Rec>,
    pub copies: Vec<(u64, Arc<Snapshot>)>,
    pub seconds: f64,
}

/// Drives the whole schedule through the gateway, copying the model every hour and
/// upserting the new items when due.
///
/// # Errors
/// The gateway failed repeatedly.
pub async fn live_run(
    gw: &GatewayClient<Channel>,
    world: &Arc<World>,
    opts: LiveOptions,
    progress: &dyn Fn(u64),
) -> anyhow::Result<LiveRun> {
    let s = world.cfg.schedule;
    let mut gwm = gw.clone();
    let old = world.active(0);
    upsert_and_wait(&mut gwm, &world.catalog(0..old), CATALOG_WAIT).await?;
    let recs = Arc::new(Mutex::new(vec![Rec::default(); s.end as usize]));
    let mut copies = vec![(0, Arc::new(Snapshot::read(gw, world).await?))];
    let mut cuts: Vec<u64> = (1..)
        .map(|k| k * s.hour)
        .take_while(|c| *c < s.end)
        .chain(s.new_items_at)
        .chain([s.end])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let start = Instant::now();
    let mut from = 0;
    for cut in cuts {
        // Drive in slices so progress shows.
        let mut at = from;
        while at < cut {
            let to = (at + 1000).min(cut);
            drive_live(gw, world, at..to, opts, &recs).await?;
            at = to;
            progress(at);
        }
        from = cut;
        if cut == s.end {
            break;
        }
        if cut % s.hour == 0 {
            copies.push((cut, Arc::new(Snapshot::read(gw, world).await?)));
        }
        if Some(cut) == s.new_items_at {
            upsert_and_wait(
                &mut gwm,
                &world.catalog(old..world.total_items()),
                CATALOG_WAIT,
            )
            .await?;
        }
    }
    let recs = recs.lock().expect("lock").clone();
    Ok(LiveRun {
        recs,
        copies,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Runs `policy` over the same users and world states as the live run; returns the
/// expected clicks of its slate at every impression.
///
/// # Errors
/// The policy failed (the Vowpal Wabbit co-process).
pub fn evaluate(
    world: &World,
    recs: &[Rec],
    slots: usize,
    policy: &mut dyn Policy,
) -> anyhow::Result<Vec<f32>> {
    let mut out = Vec::with_capacity(recs.len());
    for (n, r) in recs.iter().enumerate() {
        let n = n as u64;
        let ctx = Ctx {
            n,
            user: r.user as usize,
            active: world.active(n),
            slots,
        };
        let attr = world.attractiveness(n, ctx.user);
        let slate = policy.slate(world, ctx)?;
        let mut expected = 0.0;
        let clicks: Vec<bool> = slate
            .iter()
            .enumerate()
            .map(|(pos, (i, _))| {
                let p = world.at_slot(attr[*i], pos);
                expected += p;
                world.coin(n, *i) < p
            })
            .collect();
        policy.learn(world, ctx, &slate, &clicks)?;
        out.push(expected as f32);
    }
    Ok(out)
}

/// Options of `freshet sim`.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// A running gateway; None: a fresh local cluster per seed.
    pub gateway: Option<String>,
    pub server_bin: PathBuf,
    pub worker_bin: PathBuf,
    pub shards: u32,
    pub seeds: Vec<u64>,
    pub hour: u64,
    pub mean_ctr: f64,
    pub noise: f64,
    pub live: LiveOptions,
    /// `--obd-cache`: where the OBD sample is (downloaded if missing); None: synthetic.
    pub obd_cache: Option<PathBuf>,
    pub vw_args: Option<String>,
    pub out: PathBuf,
    pub quick: Option<u64>,
}

/// `freshet sim`: runs every seed and writes the report.
///
/// # Errors
/// The cluster or a baseline failed.
pub async fn run(opts: SimOptions) -> anyhow::Result<()> {
    let grounding = match &opts.obd_cache {
        Some(cache) => {
            let dir = crate::replay::fetch(cache, "all")?;
            // .../obd/random/all → .../obd
            let obd = dir
                .parent()
                .and_then(std::path::Path::parent)
                .map(std::path::Path::to_path_buf)
                .unwrap_or(dir);
            Grounding::from_obd(&obd, "all")?
        }
        None => Grounding::synthetic(1),
    };
    let mut schedule = Schedule::standard(opts.hour);
    if let Some(end) = opts.quick {
        schedule = Schedule {
            hour: opts.hour,
            shift_at: None,
            gradual: None,
            new_items_at: None,
            end,
        };
    }
    eprintln!("world: {}", grounding.source);
    let mut runs = Vec::new();
    for &seed in &opts.seeds {
        let mut cfg = WorldConfig::new(seed, schedule);
        cfg.mean_ctr = opts.mean_ctr;
        cfg.noise = opts.noise;
        let world = Arc::new(World::new(cfg, grounding.clone()));
        let mut cluster = None;
        let gateway = match &opts.gateway {
            Some(g) => g.clone(),
            None => {
                let (c, g) = freshet_local::fresh_cluster(
                    &opts.server_bin,
                    &opts.worker_bin,
                    opts.shards,
                    1,
                    &format!("sim-{seed}"),
                )
                .await?;
                cluster = Some(c);
                g
            }
        };
        let gw = GatewayClient::new(freshet_client::endpoint(&gateway)?);
        let end = schedule.end;
        let bar = crate::progress::Bar::new(end, &format!("seed {seed}: live cluster"));
        let live = live_run(&gw, &world, opts.live, &|n| bar.set(n)).await;
        bar.finish();
        if let Some(mut c) = cluster.take() {
            let dir = c.data_dir().to_path_buf();
            c.stop(Duration::from_secs(10));
            let _ = std::fs::remove_dir_all(dir);
        }
        let live = live?;
        eprintln!(
            "seed {seed}: {end} impressions in {:.1} s ({:.0}/s), {} model copies",
            live.seconds,
            end as f64 / live.seconds,
            live.copies.len()
        );
        let slots = opts.live.slots;
        let freeze = 2 * schedule.hour;
        let frozen_copies: Vec<_> = live
            .copies
            .iter()
            .filter(|(from, _)| *from <= freeze)
            .cloned()
            .collect();
        let mut series = vec![(
            LIVE.to_string(),
            live.recs.iter().map(|r| r.expected).collect::<Vec<f32>>(),
        )];
        let (t, e) = (opts.live.temperature, opts.live.epsilon);
        let mut hourly = ModelCopy::new(live.copies.clone(), t, e, seed ^ 1);
        series.push((
            HOURLY.into(),
            evaluate(&world, &live.recs, slots, &mut hourly)?,
        ));
        let mut frozen = ModelCopy::new(frozen_copies, t, e, seed ^ 2);
        series.push((
            "frozen at 2 h".into(),
            evaluate(&world, &live.recs, slots, &mut frozen)?,
        ));
        let mut ts = Thompson::new(world.total_items(), seed ^ 3);
        series.push((
            "Thompson (context-free)".into(),
            evaluate(&world, &live.recs, slots, &mut ts)?,
        ));
        if let Some(args) = &opts.vw_args {
            let mut vw = Vw::start(&world, args, seed)?;
            let started = Instant::now();
            series.push((
                "Vowpal Wabbit".into(),
                evaluate(&world, &live.recs, slots, &mut vw)?,
            ));
            eprintln!(
                "seed {seed}: Vowpal Wabbit in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        series.push((
            "feature effects only (reference)".into(),
            evaluate(&world, &live.recs, slots, &mut FeatureOracle)?,
        ));
        let mut ceiling = ExploringOracle::new(t, e, seed ^ 4);
        series.push((
            EXPLORING_ORACLE.into(),
            evaluate(&world, &live.recs, slots, &mut ceiling)?,
        ));
        runs.push(SeedRun {
            seed,
            series,
            random: live.recs.iter().map(|r| r.random).collect(),
            oracle: live.recs.iter().map(|r| r.oracle).collect(),
        });
    }
    let setup = format!(
        "World: slot-1 click rate of a random item {}, latent noise beyond the features {}. \
         Live cluster: {}; Rank with temperature {} and ε {}, {} users in flight, {} slots; \
         Vowpal Wabbit: {}.",
        opts.mean_ctr,
        opts.noise,
        if opts.gateway.is_some() {
            "the given gateway".to_string()
        } else {
            format!(
                "a fresh local cluster per seed (3 PS nodes × {} shards, 1 gateway, 1 worker)",
                opts.shards
            )
        },
        opts.live.temperature,
        opts.live.epsilon,
        opts.live.concurrency,
        opts.live.slots,
        opts.vw_args
            .as_deref()
            .map_or("not run (--no-vw)".into(), |a| format!("`{a}`")),
    );
    let md = report::write(&opts.out, &grounding.source, &setup, &schedule, &runs)?;
    // The summary table on stdout, the rest in the files.
    for line in md.lines().take_while(|l| !l.starts_with("![")) {
        println!("{line}");
    }
    println!(
        "report: {} (report.md, report.json, normalised.svg, ctr.svg)",
        opts.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The model on the simulated world without a cluster: the worker's update (batched,
    //! the optimizers as the shards apply them) in one process. It separates what the
    //! model can learn from what the system delivers, and is the harness the model's
    //! rates were tuned with:
    //! `OBD=<dir with obd/> cargo test -p freshet-client --release offline -- --ignored --nocapture`
    //! (`RUNS="n,batch,temperature;..."`, `T_<table>_LR`, `OPT=adam|adagrad` override;
    //! `RESET=rows|acc` forgets the user-side rows at the reshuffle, a diagnostic).
    use super::*;
    use freshet_model::{self as model, Hyper, ModelSpec, Params, TrainExample, UserInput};
    use freshet_proto::ps::v1::{optimizer_config::Kind, TableSpec};
    use freshet_proto::{fnv1a64, init_value};
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;

    struct Local {
        specs: Vec<TableSpec>,
        /// (table, id) → (weights, optimizer state).
        rows: HashMap<(String, u64), (Vec<f32>, Vec<f32>)>,
    }

    fn state_len(k: &Kind, dim: usize) -> Vec<f32> {
        match k {
            Kind::Adagrad(a) => vec![a.initial_accumulator; dim],
            Kind::Adam(_) => {
                let mut v = vec![0.0; 2 * dim + 2];
                v[2 * dim] = 1.0;
                v[2 * dim + 1] = 1.0;
                v
            }
            _ => unreachable!("harness optimizers: adagrad, adam"),
        }
    }

    fn apply(k: &Kind, w: &mut [f32], st: &mut [f32], g: &[f32]) {
        let dim = w.len();
        match k {
            Kind::Adagrad(a) => {
                // `RHO`: a decaying accumulator (RMSprop-like), for trying forgetting.
                let rho: f32 = std::env::var("RHO")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1.0);
                for j in 0..dim {
                    st[j] = rho * st[j] + g[j] * g[j];
                    w[j] -= a.lr * g[j] / (st[j].sqrt() + 1e-8);
                }
            }
            Kind::Adam(a) => {
                let (mv, pw) = st.split_at_mut(2 * dim);
                let (m, v) = mv.split_at_mut(dim);
                pw[0] *= a.beta1;
                pw[1] *= a.beta2;
                let (c1, c2) = (1.0 - pw[0], 1.0 - pw[1]);
                for j in 0..dim {
                    m[j] = a.beta1 * m[j] + (1.0 - a.beta1) * g[j];
                    v[j] = a.beta2 * v[j] + (1.0 - a.beta2) * g[j] * g[j];
                    w[j] -= a.lr * (m[j] / c1) / ((v[j] / c2).sqrt() + a.eps);
                }
            }
            _ => unreachable!(),
        }
    }

    impl Local {
        fn new(spec: ModelSpec) -> Self {
            let mut specs = spec.tables();
            for t in &mut specs {
                let env = |k: &str| {
                    std::env::var(format!("T_{}_{k}", t.name))
                        .ok()
                        .and_then(|v| v.parse::<f32>().ok())
                };
                let kind = t.optimizer.as_mut().unwrap().kind.as_mut().unwrap();
                if std::env::var("OPT").as_deref() == Ok("adam") {
                    *kind = Kind::Adam(freshet_proto::ps::v1::AdamConfig {
                        lr: 0.01,
                        beta1: 0.9,
                        beta2: 0.999,
                        eps: 1e-8,
                    });
                }
                if std::env::var("OPT").as_deref() == Ok("adagrad") {
                    *kind = Kind::Adagrad(freshet_proto::ps::v1::AdagradConfig {
                        lr: 0.1,
                        initial_accumulator: 0.01,
                        eps: 1e-8,
                    });
                }
                if let Some(v) = env("INIT") {
                    t.init_scale = v;
                }
                let kind = t.optimizer.as_mut().unwrap().kind.as_mut().unwrap();
                if let Some(lr) = env("LR") {
                    match kind {
                        Kind::Adagrad(a) => a.lr = lr,
                        Kind::Adam(a) => a.lr = lr,
                        _ => {}
                    }
                }
            }
            Local {
                specs,
                rows: HashMap::new(),
            }
        }

        fn table(&self, name: &str) -> &TableSpec {
            self.specs.iter().find(|t| t.name == name).unwrap()
        }

        fn init(t: &TableSpec, id: u64) -> (Vec<f32>, Vec<f32>) {
            let w = (0..u64::from(t.dim))
                .map(|j| init_value(t.seed, fnv1a64(&t.name), id, j, t.init_scale))
                .collect();
            let kind = t.optimizer.as_ref().unwrap().kind.as_ref().unwrap();
            (w, state_len(kind, t.dim as usize))
        }

        /// Applies a step (dense gradients already averaged over the batch).
        fn step(&mut self, g: &model::Grads) {
            let dense = [
                (model::TOWER, g.tower.clone()),
                (model::CRITIC, g.critic.clone()),
            ];
            let parts = g
                .sparse
                .iter()
                .map(|((t, id), grad)| (*t, *id, grad.clone()))
                .chain(dense.into_iter().map(|(t, grad)| (t, 0, grad)));
            for (t, id, grad) in parts {
                let spec = self.table(t).clone();
                let kind = spec.optimizer.as_ref().unwrap().kind.unwrap();
                let e = self
                    .rows
                    .entry((t.to_string(), id))
                    .or_insert_with(|| Local::init(&spec, id));
                apply(&kind, &mut e.0, &mut e.1, &grad);
            }
        }

        fn get(&self, table: &str, id: u64) -> Vec<f32> {
            match self.rows.get(&(table.to_string(), id)) {
                Some(r) => r.0.clone(),
                None => Local::init(self.table(table), id).0,
            }
        }
    }

    /// Dense tensors are read by reference: kept initialised in `rows`.
    struct View<'a>(&'a Local, Vec<f32>, Vec<f32>);

    impl Params for View<'_> {
        fn read(&self, table: &str, id: u64, out: &mut [f32]) {
            out.copy_from_slice(&self.0.get(table, id));
        }
        fn dense(&self, name: &str) -> &[f32] {
            if name == model::TOWER {
                &self.1
            } else {
                &self.2
            }
        }
    }

    /// Normalised CTR per window of `n / 10` impressions, with an abrupt reshuffle at
    /// `n / 2`.
    fn offline(n: u64, batch: usize, temperature: f32, epsilon: f32, seed: u64) -> Vec<f64> {
        // `SCHED=standard`: the report's schedule (shift, gradual drift, new items) in
        // `n` impressions, windows of half a simulated hour; otherwise one abrupt
        // reshuffle at `n / 2`, windows of `n / 10`.
        let standard = std::env::var("SCHED").as_deref() == Ok("standard");
        let schedule = if standard {
            let mut s = Schedule::standard(n * 2 / 13);
            s.end = n;
            s
        } else {
            Schedule {
                hour: 1000,
                shift_at: Some(n / 2),
                gradual: None,
                new_items_at: None,
                end: n,
            }
        };
        let windows = if standard { 13 } else { 10 };
        let cfg = WorldConfig::new(seed, schedule);
        let grounding = match std::env::var("OBD") {
            Ok(dir) => Grounding::from_obd(std::path::Path::new(&dir), "all").unwrap(),
            Err(_) => Grounding::synthetic(seed),
        };
        let world = World::new(cfg, grounding);
        let spec = match std::env::var("DIM").ok().and_then(|v| v.parse().ok()) {
            Some(dim) => ModelSpec { dim },
            None => ModelSpec::default(),
        };
        let mut p = Local::new(spec);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9 ^ seed);
        let mut pending: Vec<TrainExample> = Vec::new();
        let delay: usize = std::env::var("DELAY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut delayed = std::collections::VecDeque::new();
        // `H_POLICY`, `H_CLIP`, `H_ENTROPY`, `H_VALUE`, `H_REWARD` override the loss
        // weights.
        let mut hyper = Hyper::default();
        for (k, v) in [
            ("H_POLICY", &mut hyper.policy_weight),
            ("H_CLIP", &mut hyper.clip),
            ("H_ENTROPY", &mut hyper.entropy),
            ("H_VALUE", &mut hyper.value_weight),
            ("H_REWARD", &mut hyper.reward_weight),
        ] {
            if let Some(x) = std::env::var(k).ok().and_then(|x| x.parse().ok()) {
                *v = x;
            }
        }
        let w = (n / windows) as usize;
        let mut sums = vec![(0.0, 0.0, 0.0); windows as usize];
        // Diagnostics per window: the greedy top-3's expected clicks, and the ratio of
        // the scores' spread to the true log rates' spread (the calibration the served
        // temperature acts on).
        let mut greedy = vec![0.0f64; windows as usize];
        let mut spread = vec![0.0f64; windows as usize];
        for k in 0..n {
            let user = world.user(k);
            let fields = world.rank_fields(user);
            let input = UserInput::new(
                fields.iter().map(|(f, v)| (f.as_str(), v.as_str())),
                &[],
                "",
            )
            .unwrap();
            let active = world.active(k);
            let cands: Vec<(u64, Vec<u64>)> = (0..active)
                .map(|i| {
                    let mut f: Vec<u64> = world
                        .catalog_features(i)
                        .iter()
                        .map(|s| model::item_feature_id(s))
                        .collect();
                    f.sort_unstable();
                    (world.item_id(i), f)
                })
                .collect();
            // `RESET=rows|acc`, a diagnostic with the world's knowledge: at the reshuffle,
            // forget the user-side feature rows (weights and accumulators) or only reset
            // their accumulators, to measure what stale user rows cost the relearning.
            if world.cfg.schedule.shift_at == Some(k) {
                if let Ok(mode) = std::env::var("RESET") {
                    let user_rows: std::collections::HashSet<u64> = (0..world.user_kinds())
                        .flat_map(|u| world.rank_fields(u))
                        .map(|(f, v)| model::user_feature_id(&f, &v))
                        .collect();
                    let spec = p.table(model::FEATURE_TABLE).clone();
                    p.rows.retain(|(t, id), row| {
                        if t != model::FEATURE_TABLE || !user_rows.contains(id) {
                            return true;
                        }
                        if mode == "acc" {
                            row.1 = Local::init(&spec, *id).1;
                            return true;
                        }
                        false
                    });
                }
            }
            let view = View(&p, p.get(model::TOWER, 0), p.get(model::CRITIC, 0));
            let u = model::user_state(&spec, &view, &input);
            let scores: Vec<f32> = cands
                .iter()
                .map(|(id, f)| model::dot(&u.u, &model::item_vector(&spec, &view, *id, f)))
                .collect();
            let slots =
                model::sample_slots(&scores, 3, temperature, epsilon, || rng.random::<f64>());
            let attr = world.attractiveness(k, user);
            let (r, o) = world.random_and_oracle(&attr, 3);
            let wi = (k as usize / w).min(windows as usize - 1);
            {
                let sc: Vec<f64> = scores.iter().map(|&v| f64::from(v)).collect();
                greedy[wi] += world.greedy_clicks(&sc, &attr, 3);
                let sd = |x: &[f64]| {
                    let m = x.iter().sum::<f64>() / x.len() as f64;
                    (x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / x.len() as f64).sqrt()
                };
                let la: Vec<f64> = attr.iter().map(|a| a.ln()).collect();
                spread[wi] += sd(&sc) / sd(&la).max(1e-9);
            }
            let win = &mut sums[wi];
            win.1 += r;
            win.2 += o;
            let mut shown = Vec::new();
            for (pos, s) in slots.iter().enumerate() {
                let pc = world.at_slot(attr[s.index], pos);
                let click = world.coin(k, s.index) < pc;
                win.0 += pc;
                let remaining: Vec<(u64, Vec<u64>)> = cands
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !shown.contains(i))
                    .map(|(_, c)| c.clone())
                    .collect();
                let idx = remaining
                    .iter()
                    .position(|c| c.0 == cands[s.index].0)
                    .unwrap();
                pending.push(TrainExample {
                    user: input.clone(),
                    candidates: remaining,
                    shown: idx,
                    propensity: s.propensity,
                    reward: if click { 1.0 } else { 0.0 },
                });
                shown.push(s.index);
            }
            if pending.len() >= batch {
                let mut g = model::Grads::new(&spec);
                model::backward_batch(&spec, &view, &pending, &hyper, &mut g);
                // As the worker: dense gradients averaged, sparse rows summed.
                let k = 1.0 / pending.len() as f32;
                g.tower.iter_mut().for_each(|v| *v *= k);
                g.critic.iter_mut().for_each(|v| *v *= k);
                // Applied `DELAY` steps later, as a worker's steps are (pipeline, seal).
                delayed.push_back(g);
                if delayed.len() > delay {
                    let g = delayed.pop_front().unwrap();
                    p.step(&g);
                }
                pending.clear();
            }
        }
        if std::env::var("DIAG").is_ok() {
            let g: Vec<String> = sums
                .iter()
                .zip(&greedy)
                .map(|((_, r, o), g)| format!("{:.2}", (g - r) / (o - r)))
                .collect();
            let sp: Vec<String> = spread
                .iter()
                .map(|v| format!("{:.2}", v / w as f64))
                .collect();
            eprintln!("seed {seed} greedy {}", g.join(" "));
            eprintln!("seed {seed} spread {}", sp.join(" "));
        }
        sums.iter().map(|(m, r, o)| (m - r) / (o - r)).collect()
    }

    #[test]
    #[ignore = "tuning harness, see the module docs"]
    fn offline_learning_curve() {
        let runs: Vec<(u64, usize, f32)> = match std::env::var("RUNS") {
            Ok(v) => v
                .split(';')
                .map(|r| {
                    let f: Vec<&str> = r.split(',').collect();
                    (
                        f[0].parse().unwrap(),
                        f[1].parse().unwrap(),
                        f[2].parse().unwrap(),
                    )
                })
                .collect(),
            Err(_) => vec![(40_000, 32, 0.5)],
        };
        let seeds: Vec<u64> = std::env::var("SEEDS")
            .map(|v| v.split(',').map(|s| s.parse().unwrap()).collect())
            .unwrap_or_else(|_| vec![42]);
        for (n, batch, t) in runs {
            // Seeds in parallel (the harness is single-threaded per run).
            let curves: Vec<Vec<f64>> = std::thread::scope(|s| {
                let hs: Vec<_> = seeds
                    .iter()
                    .map(|&seed| s.spawn(move || offline(n, batch, t, 0.02, seed)))
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let mean: Vec<f64> = (0..curves[0].len())
                .map(|j| curves.iter().map(|c| c[j]).sum::<f64>() / curves.len() as f64)
                .collect();
            let c: Vec<String> = mean.iter().map(|x| format!("{x:.2}")).collect();
            eprintln!(
                "n {n} batch {batch} T {t} seeds {seeds:?}: normalised per window {}",
                c.join(" ")
            );
            if mean.len() == 13 {
                let avg = |r: std::ops::Range<usize>| {
                    let k = r.len() as f64;
                    mean[r].iter().sum::<f64>() / k
                };
                eprintln!(
                    "  steady {:.3} after shift {:.3} gradual {:.3} new items {:.3} whole {:.3}",
                    avg(3..5),
                    avg(5..8),
                    avg(8..10),
                    avg(11..13),
                    avg(0..13)
                );
            }
        }
    }
}
