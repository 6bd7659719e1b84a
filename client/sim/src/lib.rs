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

pub mod events;
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
    gateway_client::GatewayClient, Exploration, RankRequest, RecommendRequest, UserContext,
};
use tonic::transport::Channel;

use policy::{Ctx, ExploringOracle, FeatureOracle, ModelCopy, Policy, Snapshot, Thompson, Vw};
use report::SeedRun;
use world::{Grounding, Schedule, World, WorldConfig};

use anyhow::Context as _;
use freshet_client::gateway::{
    events_for, upsert_and_wait, Gateway, RetryPolicy, UPSERT_WAIT_DEFAULT as CATALOG_WAIT,
};

/// How long the live run retries one Rank, and one Feedback (which waits for its seal).
const RANK_RETRY: Duration = Duration::from_secs(30);
const FEEDBACK_RETRY: Duration = Duration::from_secs(60);
/// The gateway's default slot limit: the most items one Rank answer carries.
const RANK_K_MAX: usize = 100;

/// What one live impression showed and got.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rec {
    pub user: u32,
    /// Expected clicks of the slate shown (exact, from the click model).
    pub expected: f32,
    pub clicks: u8,
    pub random: f32,
    pub oracle: f32,
    /// Expected clicks of the slate the served model's own scores put first (greedy, not
    /// served): what exploration costs is `greedy - expected`.
    pub greedy: f32,
}

/// How the live run calls the gateway.
#[derive(Debug, Clone, Copy)]
pub struct LiveOptions {
    pub temperature: f32,
    pub epsilon: f32,
    pub slots: usize,
    pub concurrency: usize,
    /// Whether Rank carries the impression's search query (a search world's; false:
    /// the same searches ranked without it).
    pub query: bool,
    /// Serve every impression with Recommend retrieving this many of the catalog (the
    /// gateway finds the candidates); None: Rank every active item.
    pub retrieve: Option<u32>,
}

/// Name of the [`ExploringOracle`] series.
pub const EXPLORING_ORACLE: &str = "oracle with the same exploration (ceiling)";
/// The live cluster's and the hourly-refreshed copy's names in the report.
pub const LIVE: &str = "Freshet (live, every epoch)";
pub const HOURLY: &str = "hourly refresh";
/// The live model's own score order (not served): the cost of exploration beside LIVE.
pub const GREEDY: &str = "Freshet by its own scores (greedy, not served)";
/// A search world's live run with the queries withheld from Rank.
pub const NO_QUERY: &str = "Freshet without the query (live, same searches)";

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            // Relative to the candidates' score spread (the gateway's default). Offline
            // harness, the report's schedule, 4 seeds, with the item bias: relative 0.2
            // gave whole run 0.385 (after the reshuffle 0.328), 0.1 0.329 (0.200), the
            // previous absolute 0.1 0.369 (0.233); steady state within 0.02 of each other.
            temperature: 0.2,
            epsilon: 0.02,
            slots: 3,
            concurrency: 32,
            query: true,
            retrieve: None,
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
    // A task takes a whole session (returning users: consecutive impressions of one
    // user), so each of its Ranks comes after the previous one's Feedback and asks for
    // the epoch that Feedback was sealed in (the user's next ranking reflects their last
    // clicks, as a client would do it).
    let session = world.cfg.returning.map_or(1, |r| r.session.max(1));
    let mut tasks = Vec::new();
    for _ in 0..opts.concurrency {
        // Rank retried for 30 s, Feedback for 60 s (a feedback waits for its seal).
        let ranker = Gateway::from_client(gw.clone(), RetryPolicy::for_up_to(RANK_RETRY));
        let trainer = Gateway::from_client(gw.clone(), RetryPolicy::for_up_to(FEEDBACK_RETRY));
        let world = Arc::clone(world);
        let recs = Arc::clone(recs);
        let next = Arc::clone(&next);
        let end = range.end;
        tasks.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(session, Ordering::Relaxed);
                if first >= end {
                    return Ok::<_, anyhow::Error>(());
                }
                let mut min_epoch = 0;
                for n in first..(first + session).min(end) {
                    let (rec, sealed) =
                        impression(&ranker, &trainer, &world, n, opts, min_epoch).await?;
                    min_epoch = sealed;
                    recs.lock().expect("lock")[n as usize] = rec;
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// One live impression: Rank every active item, show the first `opts.slots`, send their
/// outcomes; the record and the epoch the Feedback was sealed in.
async fn impression(
    ranker: &Gateway,
    trainer: &Gateway,
    world: &World,
    n: u64,
    opts: LiveOptions,
    min_epoch: u64,
) -> anyhow::Result<(Rec, u64)> {
    let user = world.user(n);
    let active = world.active(n);
    let attr = world.attractiveness(n, user);
    let (random, oracle) = world.random_and_oracle(&attr, opts.slots);
    let context = UserContext {
        categorical: world.rank_fields(user).into_iter().collect(),
        numeric: vec![],
        user_id: world.user_id(user),
        query: if opts.query {
            world.query(n, user)
        } else {
            String::new()
        },
    };
    let exploration = Exploration {
        temperature: opts.temperature,
        epsilon: opts.epsilon,
    };
    let req = RankRequest {
        user: Some(context.clone()),
        candidates: (0..active).map(|i| world.item_id(i)).collect(),
        // Every candidate is ranked (up to the gateway's default slot limit, 100), so
        // the answer carries their scores; the first `slots` are the slate shown
        // (sampling slot by slot, their propensities are those of a Rank with K =
        // slots). Beyond 100 items the greedy slate is the best-scored of the 100 the
        // answer carries: the sampler draws high scores first, so the top `slots` of
        // the catalog are among them but for a rare ε draw.
        k: active.min(RANK_K_MAX) as u32,
        exploration: Some(exploration),
        candidate_set: String::new(),
        min_epoch,
    };
    let ranked = match opts.retrieve {
        None => ranker.rank(&req).await.context("rank")?,
        // The gateway retrieves the best `retrieve` active items by the model's score
        // and ranks them; the answer carries every retrieved item (K = all of them, up
        // to 100), so the greedy slate below is the model's own top `slots`.
        Some(retrieve) => ranker
            .recommend(&RecommendRequest {
                user: Some(context),
                k: (retrieve as usize).min(RANK_K_MAX) as u32,
                exploration: Some(exploration),
                filter: None,
                retrieve,
                min_epoch,
                exact: false,
                // The gateway's default: a tenth of `retrieve`, drawn from the catalog.
                explore: None,
            })
            .await
            .context("recommend")?,
    };
    let mut by_score: Vec<(f32, usize)> = ranked
        .items
        .iter()
        .map(|it| (it.score, (it.item_id - world.cfg.first_item) as usize))
        .collect();
    by_score.sort_by(|a, b| b.0.total_cmp(&a.0));
    let greedy: f64 = by_score
        .iter()
        .take(opts.slots)
        .enumerate()
        .map(|(pos, (_, idx))| world.at_slot(attr[*idx], pos))
        .sum();
    let mut expected = 0.0;
    let mut clicks = 0u8;
    let mut pos = 0;
    let events = events_for(&ranked, &format!("sim-{}-{n}", world.cfg.seed), |it| {
        if pos >= opts.slots {
            return None; // ranked for its score, never shown
        }
        let idx = (it.item_id - world.cfg.first_item) as usize;
        let p = world.at_slot(attr[idx], pos);
        pos += 1;
        expected += p;
        let click = world.coin(n, idx) < p;
        clicks = clicks.saturating_add(u8::from(click));
        Some(click)
    });
    let fed = trainer.feedback(&events).await.context("feedback")?;
    let rec = Rec {
        user: user as u32,
        expected: expected as f32,
        clicks,
        random: random as f32,
        oracle: oracle as f32,
        greedy: greedy as f32,
    };
    Ok((rec, fed.sealed_epoch.max(min_epoch)))
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

/// A search world's seed: the live run (with the query) against the same searches
/// ranked live without it (a second fresh cluster), BM25 order, popularity, BPR and the
/// oracle with the live exploration. The model copies, Thompson, Vowpal Wabbit and the
/// feature reference are left out: none of them reads the query.
async fn search_run(
    opts: &SimOptions,
    world: &Arc<World>,
    live: &LiveRun,
) -> anyhow::Result<SeedRun> {
    let seed = world.cfg.seed;
    let slots = opts.live.slots;
    let (t, e) = (opts.live.temperature, opts.live.epsilon);
    let blind = LiveOptions {
        query: false,
        ..opts.live
    };
    let without = live_once(opts, world, blind, "live cluster without the query").await?;
    let mut series = vec![
        (
            LIVE.to_string(),
            live.recs.iter().map(|r| r.expected).collect::<Vec<f32>>(),
        ),
        (
            GREEDY.to_string(),
            live.recs.iter().map(|r| r.greedy).collect(),
        ),
        (
            NO_QUERY.to_string(),
            without.recs.iter().map(|r| r.expected).collect(),
        ),
    ];
    series.push((
        "BM25 order of titles (lexical only)".into(),
        evaluate(world, &live.recs, slots, &mut policy::Bm25::new(seed ^ 7))?,
    ));
    let mut pop = policy::Popularity::new(world.total_items(), t, e, seed ^ 5);
    series.push((
        "online item popularity".into(),
        evaluate(world, &live.recs, slots, &mut pop)?,
    ));
    let mut bpr = policy::OnlineBpr::new(world.total_items(), t, e, seed ^ 6);
    series.push((
        "online matrix factorisation (BPR)".into(),
        evaluate(world, &live.recs, slots, &mut bpr)?,
    ));
    let mut ceiling = ExploringOracle::new(t, e, seed ^ 4);
    series.push((
        EXPLORING_ORACLE.into(),
        evaluate(world, &live.recs, slots, &mut ceiling)?,
    ));
    Ok(SeedRun {
        seed,
        series,
        random: live.recs.iter().map(|r| r.random).collect(),
        oracle: live.recs.iter().map(|r| r.oracle).collect(),
    })
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
    /// Returning users, a heavy-tailed catalog and sparse clicks instead of the kinds
    /// traffic (see [`world`]).
    pub returning: Option<world::Returning>,
    /// Every impression a search (see [`world`]): the live cluster ranks with the
    /// query, a second live run on a fresh cluster ranks the same searches without it,
    /// and BM25 order is the lexical baseline.
    pub search: Option<world::Search>,
}

/// One live run of `world` on `opts.gateway` or a fresh local cluster (stopped and
/// removed afterwards).
async fn live_once(
    opts: &SimOptions,
    world: &Arc<World>,
    live_opts: LiveOptions,
    label: &str,
) -> anyhow::Result<LiveRun> {
    let seed = world.cfg.seed;
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
    let end = world.cfg.schedule.end;
    let bar = crate::progress::Bar::new(end, &format!("seed {seed}: {label}"));
    let live = live_run(&gw, world, live_opts, &|n| bar.set(n)).await;
    bar.finish();
    if let Some(mut c) = cluster.take() {
        let dir = c.data_dir().to_path_buf();
        c.stop(Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(dir);
    }
    let live = live?;
    eprintln!(
        "seed {seed}: {label}: {end} impressions in {:.1} s ({:.0}/s), {} model copies",
        live.seconds,
        end as f64 / live.seconds,
        live.copies.len()
    );
    Ok(live)
}

/// `freshet sim`: runs every seed and writes the report.
///
/// # Errors
/// The cluster or a baseline failed.
pub async fn run(opts: SimOptions) -> anyhow::Result<()> {
    if opts.vw_args.is_some() {
        policy::check_vw()?;
    }
    if opts.search.is_some() && opts.gateway.is_some() {
        // The same searches run twice (with and without the query): on one cluster the
        // second run would start from what the first learned.
        anyhow::bail!("--search runs on fresh local clusters (two per seed): leave out --gateway");
    }
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
        schedule = Schedule::stationary(opts.hour, end);
    }
    eprintln!("world: {}", grounding.source);
    let mut runs = Vec::new();
    for &seed in &opts.seeds {
        let mut cfg = match opts.returning {
            Some(r) => WorldConfig::returning(seed, schedule, r),
            None => WorldConfig::new(seed, schedule),
        };
        cfg.mean_ctr = opts.mean_ctr;
        cfg.noise = opts.noise;
        cfg.search = opts.search;
        let world = Arc::new(World::new(cfg, grounding.clone()));
        let most = world.cfg.position_bias.len().min(world.active(0));
        if opts.live.slots == 0 || opts.live.slots > most {
            anyhow::bail!("--slots must be in 1..={most} for this world");
        }
        let live = live_once(&opts, &world, opts.live, "live cluster").await?;
        let slots = opts.live.slots;
        let (t, e) = (opts.live.temperature, opts.live.epsilon);
        if opts.search.is_some() {
            runs.push(search_run(&opts, &world, &live).await?);
            continue;
        }
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
        series.push((
            GREEDY.to_string(),
            live.recs.iter().map(|r| r.greedy).collect::<Vec<f32>>(),
        ));
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
        let mut pop = policy::Popularity::new(world.total_items(), t, e, seed ^ 5);
        series.push((
            "online item popularity".into(),
            evaluate(&world, &live.recs, slots, &mut pop)?,
        ));
        let mut bpr = policy::OnlineBpr::new(world.total_items(), t, e, seed ^ 6);
        series.push((
            "online matrix factorisation (BPR)".into(),
            evaluate(&world, &live.recs, slots, &mut bpr)?,
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
    let mut traffic = match opts.returning {
        None => "every impression a fresh user of one of the grounding's user kinds".to_string(),
        Some(r) => format!(
            "returning users ({} at the start, {} new per hour, sessions of {} impressions, \
             activity exponent {}, own preferences {} beyond their kind's), {} items with \
             Zipf {} appeal and {} new ones, position discount 1/log2(position + 1)",
            r.users,
            r.new_users_per_hour,
            r.session,
            r.activity,
            r.individual,
            r.items,
            r.appeal_zipf,
            r.items / 5
        ),
    };
    if let Some(s) = opts.search {
        traffic.push_str(&format!(
            "; every impression a search: words for {} of the intended item's feature \
             values, each a synonym no title holds with probability {}, a stray word with \
             probability {}, items sharing m typed values exp({} m) times as attractive \
             (normalised)",
            s.fields, s.synonym, s.noise, s.relevance
        ));
    }
    let setup = format!(
        "World: {traffic}; slot-1 click rate of a random item {}, latent noise beyond the \
         features {}. Live cluster: {}; {} with temperature {} and ε {}, {} users in \
         flight, {} slots; Vowpal Wabbit: {}.",
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
        match opts.live.retrieve {
            None => "Rank over every active item".to_string(),
            Some(n) => format!("Recommend retrieving {n} of the catalog"),
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
mod tests;
