//! `freshet replay events FILE`: anyone's time-ordered interaction log replayed through a
//! running gateway as a progressive held-out test, so users can try Freshet on their own
//! data.
//!
//! For every positive event, in time order, before the system learns from it:
//! 1. the candidates are the event's item and up to `candidates - 1` others drawn
//!    uniformly from the items seen earlier in the log that this user has not interacted
//!    with (new items join the pool on their first event);
//! 2. Rank over all of them (K = all) with the user id and user features of the row, and
//!    `min_epoch` = the epoch that acknowledged this user's previous event (the user's
//!    last click is in their next ranking);
//! 3. HR@k and NDCG@k of the event's item by the served order (what the user is shown)
//!    and by the model's own scores (greedy);
//! 4. Feedback: the click on the item at its served position, acknowledged once sealed.
//!    Nothing else: the log does not say what the user would have done with the other
//!    items Freshet showed (treating the items served above as skipped, a cascade
//!    reading, labels the model's own top picks negative whatever they are, and on a
//!    generated log that taught it to rank popular items last: HR@10 fell below random).
//!
//! The baselines rank the same candidates at the same point of the stream and learn
//! from each event right after it (no training delay, generous to them): online item
//! popularity (clicks so far) and online matrix factorisation (BPR, dim 32, the event's
//! item against sampled candidates). A random order's expectation is exact. Ties count
//! as a random order among the tied (a popularity count of zero everywhere scores as
//! random, not as first).
//!
//! Events of one user are replayed in order; different users' run concurrently.

pub mod gen;
pub mod log;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use freshet_client::gateway::{Gateway, RetryPolicy, UPSERT_WAIT_DEFAULT};
use freshet_model as model;
use freshet_proto::gateway::v1::{FeedbackEvent, RankRequest, Reward, UserContext};
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;

use crate::report::mean_ci;
use crate::table::{Outputs, Table};
use log::LogEvent;

/// Item ids on the cluster: the log's n-th item is `FIRST_ITEM + n`.
pub(crate) const FIRST_ITEM: u64 = 6_000_000;
const RANK_RETRY: Duration = Duration::from_secs(30);
const FEEDBACK_RETRY: Duration = Duration::from_secs(60);
/// Learning-curve windows.
const WINDOWS: usize = 10;

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Candidates per Rank (the event's item included).
    pub candidates: usize,
    /// The cut-off of HR@k and NDCG@k.
    pub k: usize,
    /// Users in flight at once.
    pub concurrency: usize,
    /// Seeds the candidate draws and the baselines.
    pub seed: u64,
    /// Positive events to replay at most.
    pub limit: Option<usize>,
}

/// One positive event to evaluate.
pub(crate) struct Task {
    pub(crate) user: usize,
    pub(crate) item: usize,
    /// Candidate item indices (the event's item among them, in random order).
    pub(crate) cands: Vec<usize>,
    /// The user's previous task, which must be acknowledged first.
    prev: Option<usize>,
    pub(crate) first_of_user: bool,
}

/// Where the event's item landed, 1-based, for one policy: (rank, tied others) so a
/// random order among the tied can be scored exactly.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Placed {
    greater: usize,
    tied: usize,
}

impl Placed {
    pub(crate) fn from_scores(scores: &[f32], target: usize) -> Self {
        let t = scores[target];
        let greater = scores.iter().filter(|&&s| s > t).count();
        let tied = scores.iter().filter(|&&s| s == t).count() - 1;
        Placed { greater, tied }
    }

    pub(crate) fn at(position: usize) -> Self {
        Placed {
            greater: position - 1,
            tied: 0,
        }
    }

    /// Expected HR@k and NDCG@k over a uniform order of the tied.
    pub(crate) fn metrics(self, k: usize) -> (f64, f64) {
        let (mut hr, mut ndcg) = (0.0, 0.0);
        for r in self.greater + 1..=self.greater + self.tied + 1 {
            if r <= k {
                hr += 1.0;
                ndcg += 1.0 / (r as f64 + 1.0).log2();
            }
        }
        let n = (self.tied + 1) as f64;
        (hr / n, ndcg / n)
    }
}

/// Draws every event's candidates (deterministic in the seed).
pub(crate) fn plan(events: &[LogEvent], opts: &ReplayOptions) -> (Vec<Task>, Vec<String>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed ^ 0xC4D5);
    let mut items: HashMap<&str, usize> = HashMap::new();
    let mut users: HashMap<&str, usize> = HashMap::new();
    let mut user_names = Vec::new();
    let mut touched: Vec<HashSet<usize>> = Vec::new();
    let mut last: Vec<Option<usize>> = Vec::new();
    let mut tasks = Vec::new();
    for e in events {
        let n_items = items.len();
        let item = *items.entry(&e.item).or_insert(n_items);
        let n_users = users.len();
        let user = *users.entry(&e.user).or_insert_with(|| {
            user_names.push(e.user.clone());
            touched.push(HashSet::new());
            last.push(None);
            n_users
        });
        if e.reward > 0.0 && opts.limit.is_none_or(|l| tasks.len() < l) {
            // The pool: items seen before this event, not touched by this user.
            let pool = n_items;
            let mut cands = vec![item];
            let mut chosen: HashSet<usize> = [item].into();
            let available = pool.saturating_sub(touched[user].len() + 1);
            let want = (opts.candidates - 1).min(available);
            let mut tries = 0;
            while cands.len() < want + 1 && tries < 50 * opts.candidates {
                tries += 1;
                let c = rng.random_range(0..pool.max(1));
                if c < pool && !touched[user].contains(&c) && chosen.insert(c) {
                    cands.push(c);
                }
            }
            for k in (1..cands.len()).rev() {
                cands.swap(k, rng.random_range(0..=k));
            }
            tasks.push(Task {
                user,
                item,
                cands,
                prev: last[user],
                first_of_user: last[user].is_none(),
            });
            last[user] = Some(tasks.len() - 1);
        }
        touched[user].insert(item);
    }
    (tasks, user_names)
}

/// Online item popularity: positive events so far per item.
pub(crate) fn popularity(tasks: &[Task], n_items: usize) -> Vec<Placed> {
    let mut clicks = vec![0f32; n_items];
    tasks
        .iter()
        .map(|t| {
            let scores: Vec<f32> = t.cands.iter().map(|&c| clicks[c]).collect();
            let target = t.cands.iter().position(|&c| c == t.item).expect("in cands");
            clicks[t.item] += 1.0;
            Placed::from_scores(&scores, target)
        })
        .collect()
}

/// Online BPR matrix factorisation (dim 32, user and item vectors plus item bias), one
/// SGD pass per event: the event's item against 5 of its other candidates.
pub(crate) fn bpr(tasks: &[Task], n_users: usize, n_items: usize, seed: u64) -> Vec<Placed> {
    const DIM: usize = 32;
    const LR: f32 = 0.05;
    const REG: f32 = 0.01;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xB9B);
    let mut init = |n: usize| -> Vec<Vec<f32>> {
        (0..n)
            .map(|_| {
                (0..DIM)
                    .map(|_| (rng.random::<f32>() - 0.5) * 0.1)
                    .collect()
            })
            .collect()
    };
    let (mut users, mut items) = (init(n_users), init(n_items));
    let mut bias = vec![0f32; n_items];
    tasks
        .iter()
        .map(|t| {
            let u = &users[t.user];
            let scores: Vec<f32> = t
                .cands
                .iter()
                .map(|&c| model::dot(u, &items[c]) + bias[c])
                .collect();
            let target = t.cands.iter().position(|&c| c == t.item).expect("in cands");
            let placed = Placed::from_scores(&scores, target);
            for _ in 0..5.min(t.cands.len() - 1) {
                let j = loop {
                    let j = t.cands[rng.random_range(0..t.cands.len())];
                    if j != t.item {
                        break j;
                    }
                };
                let i = t.item;
                let u = users[t.user].clone();
                let x = model::dot(&u, &items[i]) + bias[i] - model::dot(&u, &items[j]) - bias[j];
                let g = 1.0 / (1.0 + x.exp());
                for d in 0..DIM {
                    let (ud, id, jd) = (u[d], items[i][d], items[j][d]);
                    users[t.user][d] += LR * (g * (id - jd) - REG * ud);
                    items[i][d] += LR * (g * ud - REG * id);
                    items[j][d] += LR * (-g * ud - REG * jd);
                }
                bias[i] += LR * (g - REG * bias[i]);
                bias[j] += LR * (-g - REG * bias[j]);
            }
            placed
        })
        .collect()
}

/// What the live cluster did with one event.
#[derive(Debug, Clone, Copy, Default)]
struct Live {
    served: Placed,
    scored: Placed,
    /// Whether the Rank answered from the epoch of the user's previous click or later.
    fresh: bool,
}

/// What every replay worker reads.
struct Stream {
    tasks: Vec<Task>,
    /// The cluster's item id of each item index.
    catalog: Vec<u64>,
    /// Per user index: the user id and the categorical features Rank carries.
    users: Vec<(String, Vec<(String, String)>)>,
}

async fn run_live(
    gw: &Gateway,
    trainer: &Gateway,
    stream: &Arc<Stream>,
    concurrency: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> anyhow::Result<Vec<Live>> {
    let tasks = &stream.tasks;
    let done: Arc<Vec<Semaphore>> = Arc::new((0..tasks.len()).map(|_| Semaphore::new(0)).collect());
    let acked: Arc<Vec<std::sync::atomic::AtomicU64>> =
        Arc::new((0..tasks.len()).map(|_| Default::default()).collect());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let out = Arc::new(std::sync::Mutex::new(vec![Live::default(); tasks.len()]));
    let finished = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (gw, trainer, stream) = (gw.clone(), trainer.clone(), stream.clone());
        let (done, acked, next, out, finished) = (
            done.clone(),
            acked.clone(),
            next.clone(),
            out.clone(),
            finished.clone(),
        );
        workers.spawn(async move {
            use std::sync::atomic::Ordering::{Relaxed, SeqCst};
            loop {
                let n = next.fetch_add(1, SeqCst);
                let Some(t) = stream.tasks.get(n) else {
                    return anyhow::Ok(());
                };
                let min_epoch = match t.prev {
                    Some(p) => {
                        // The user's previous event first (its permit is returned at once:
                        // it is only ever waited on by this task).
                        drop(done[p].acquire().await.context("replay stopped")?);
                        acked[p].load(SeqCst)
                    }
                    None => 0,
                };
                let (user_id, fields) = &stream.users[t.user];
                let ranked = gw
                    .rank(&RankRequest {
                        user: Some(UserContext {
                            categorical: fields.iter().cloned().collect(),
                            numeric: vec![],
                            user_id: user_id.clone(),
                            query: String::new(),
                        }),
                        candidates: t.cands.iter().map(|&c| stream.catalog[c]).collect(),
                        k: t.cands.len() as u32,
                        exploration: None,
                        candidate_set: String::new(),
                        min_epoch,
                    })
                    .await
                    .context("rank")?;
                let target = stream.catalog[t.item];
                let served_at = ranked
                    .items
                    .iter()
                    .position(|it| it.item_id == target)
                    .context("the gateway's answer lacks the event's item")?;
                let scores: Vec<f32> = ranked.items.iter().map(|it| it.score).collect();
                let live = Live {
                    served: Placed::at(served_at + 1),
                    scored: Placed::from_scores(&scores, served_at),
                    fresh: ranked.epoch >= min_epoch,
                };
                let clicked = &ranked.items[served_at];
                let event = FeedbackEvent {
                    event_id: format!("replay-{n}"),
                    impression_id: ranked.impression_id.clone(),
                    item_id: clicked.item_id,
                    position: clicked.position,
                    rewards: vec![Reward::default()],
                    event_time_ms: 0,
                };
                let ack = trainer.feedback(&[event]).await.context("feedback")?;
                acked[n].store(ack.sealed_epoch, SeqCst);
                out.lock().expect("lock")[n] = live;
                done[n].add_permits(1);
                finished.fetch_add(1, Relaxed);
            }
        });
    }
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            r = workers.join_next() => match r {
                None => break,
                Some(r) => {
                    if let Err(e) = r.context("replay worker").and_then(|r| r) {
                        workers.abort_all();
                        return Err(e);
                    }
                }
            },
            _ = ticker.tick() => progress(finished.load(std::sync::atomic::Ordering::Relaxed)),
        }
    }
    progress(tasks.len());
    tracing::debug!(seconds = started.elapsed().as_secs_f64(), "replay done");
    let out = std::mem::take(&mut *out.lock().expect("lock"));
    Ok(out)
}

/// One policy's figures: per event (HR, NDCG).
struct Series {
    name: String,
    per_event: Vec<(f64, f64)>,
}

fn fmt(v: (f64, f64)) -> String {
    if v.1.is_nan() {
        format!("{:.3}", v.0)
    } else {
        format!("{:.3} ± {:.3}", v.0, v.1)
    }
}

fn tables(
    series: &[Series],
    tasks: &[Task],
    opts: &ReplayOptions,
    header: &str,
    fresh: f64,
) -> Vec<Table> {
    let k = opts.k;
    let n = tasks.len();
    let half = n / 2;
    let pick = |s: &Series, f: &dyn Fn(usize) -> bool, ndcg: bool| -> (f64, f64) {
        let xs: Vec<f64> = s
            .per_event
            .iter()
            .enumerate()
            .filter(|(i, _)| f(*i))
            .map(|(_, v)| if ndcg { v.1 } else { v.0 })
            .collect();
        mean_ci(&xs)
    };
    let hr = format!("HR@{k}");
    let mut summary = Table::new(
        format!("Replay: {header}"),
        &[
            "policy",
            &format!("{hr} whole run"),
            &format!("{hr} second half"),
            &format!("{hr} user's first event"),
            &format!("NDCG@{k} whole run"),
        ],
    );
    for s in series {
        summary.row(vec![
            s.name.clone(),
            fmt(pick(s, &|_| true, false)),
            fmt(pick(s, &|i| i >= half, false)),
            fmt(pick(s, &|i| tasks[i].first_of_user, false)),
            fmt(pick(s, &|_| true, true)),
        ]);
    }
    summary.note(format!(
        "{n} positive events; ± is a 95% interval over events. Freshet's Ranks answered from \
         the epoch of the user's previous click or later: {:.1}%.",
        100.0 * fresh
    ));
    let mut headers = vec!["policy".to_string()];
    headers.extend((1..=WINDOWS).map(|w| format!("{}%", w * 100 / WINDOWS)));
    let hrefs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut curve = Table::new(
        format!("Learning curve: {hr} per tenth of the stream"),
        &hrefs,
    );
    for s in series {
        let mut row = vec![s.name.clone()];
        for w in 0..WINDOWS {
            let (a, b) = (w * n / WINDOWS, (w + 1) * n / WINDOWS);
            row.push(format!("{:.3}", pick(s, &|i| i >= a && i < b, false).0));
        }
        curve.row(row);
    }
    vec![summary, curve]
}

/// Replays `events` through the gateway at `gateway` and returns the report's tables.
///
/// # Errors
/// The log has no positive event, or the gateway kept failing (30 s of retries for a
/// Rank, 60 s for a Feedback).
pub async fn run(
    gateway: &str,
    events: &[LogEvent],
    opts: &ReplayOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> anyhow::Result<Vec<Table>> {
    anyhow::ensure!(opts.candidates >= 2, "--candidates must be at least 2");
    anyhow::ensure!(opts.k >= 1, "--k must be at least 1");
    let (tasks, user_names) = plan(events, opts);
    anyhow::ensure!(
        !tasks.is_empty(),
        "the log has no event with a reward above 0"
    );
    let (items, _) = log::catalog(events, FIRST_ITEM);
    let mut user_fields: HashMap<&str, Vec<(String, String)>> = HashMap::new();
    for e in events {
        user_fields
            .entry(e.user.as_str())
            .or_insert_with(|| e.user_features.clone());
    }
    let users: Vec<(String, Vec<(String, String)>)> = user_names
        .iter()
        .map(|u| (u.clone(), user_fields[u.as_str()].clone()))
        .collect();
    let gw = Gateway::connect(gateway, RetryPolicy::for_up_to(RANK_RETRY))?;
    let trainer = Gateway::connect(gateway, RetryPolicy::for_up_to(FEEDBACK_RETRY))?;
    for chunk in items.chunks(freshet_proto::catalog::ITEMS_PER_CALL_MAX) {
        gw.upsert_and_wait(chunk, UPSERT_WAIT_DEFAULT)
            .await
            .context("upserting the log's items")?;
    }
    let stream = Arc::new(Stream {
        tasks,
        catalog: items.iter().map(|i| i.id).collect(),
        users,
    });
    let live = run_live(&gw, &trainer, &stream, opts.concurrency, progress).await?;
    let (tasks, total) = (&stream.tasks, stream.tasks.len());
    let k = opts.k;
    let metric = |p: &[Placed]| p.iter().map(|x| x.metrics(k)).collect::<Vec<_>>();
    let served: Vec<Placed> = live.iter().map(|l| l.served).collect();
    let scored: Vec<Placed> = live.iter().map(|l| l.scored).collect();
    let fresh = live.iter().filter(|l| l.fresh).count() as f64 / total as f64;
    let random: Vec<(f64, f64)> = tasks
        .iter()
        .map(|t| {
            let n = t.cands.len();
            Placed {
                greater: 0,
                tied: n - 1,
            }
            .metrics(k)
        })
        .collect();
    let series = vec![
        Series {
            name: "Freshet, served order (what users see)".into(),
            per_event: metric(&served),
        },
        Series {
            name: "Freshet, by its own scores (greedy)".into(),
            per_event: metric(&scored),
        },
        Series {
            name: "online item popularity".into(),
            per_event: metric(&popularity(tasks, items.len())),
        },
        Series {
            name: "online matrix factorisation (BPR)".into(),
            per_event: metric(&bpr(tasks, user_names.len(), items.len(), opts.seed)),
        },
        Series {
            name: "random order".into(),
            per_event: random,
        },
    ];
    let header = format!(
        "{} events of {} users on {} items, up to {} candidates per Rank",
        events.len(),
        user_names.len(),
        items.len(),
        opts.candidates
    );
    Ok(tables(&series, tasks, opts, &header, fresh))
}

/// `freshet replay events FILE`.
#[derive(Debug, Clone, clap::Args)]
pub struct EventsArgs {
    /// The log: CSV with the columns user,item,reward,time and optionally
    /// item_features, user_features (`;`-separated), in time order.
    pub file: PathBuf,
    /// Candidates per Rank, the event's item included.
    #[arg(long, default_value_t = 100)]
    pub candidates: usize,
    /// Cut-off of HR@k and NDCG@k.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Users in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Positive events to replay at most.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub out: Outputs,
}

/// Reads the log, replays it through `gateway` and prints (and writes) the report.
///
/// # Errors
/// As [`log::read`] and [`run`].
pub async fn replay_file(gateway: &str, a: &EventsArgs) -> anyhow::Result<()> {
    let events = log::read(&a.file)?;
    let opts = ReplayOptions {
        candidates: a.candidates,
        k: a.k,
        concurrency: a.concurrency,
        seed: a.seed,
        limit: a.limit,
    };
    let positive = events.iter().filter(|e| e.reward > 0.0).count();
    let total = a.limit.map_or(positive, |l| l.min(positive));
    let bar = crate::progress::Bar::new(total as u64, "replay");
    let started = Instant::now();
    let mut tables = run(gateway, &events, &opts, &|done| bar.set(done as u64)).await;
    bar.finish();
    if let Ok(t) = &mut tables {
        let secs = started.elapsed().as_secs_f64();
        t[0].note(format!("Replayed in {secs:.1} s through {gateway}."));
    }
    a.out.emit(&tables?)
}

/// `freshet replay gen-events`.
#[derive(Debug, Clone, clap::Args)]
pub struct GenArgs {
    /// Where to write the log.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 20_000)]
    pub events: usize,
    #[arg(long, default_value_t = 2_000)]
    pub users: usize,
    #[arg(long, default_value_t = 1_000)]
    pub items: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Writes a generated log.
///
/// # Errors
/// Zero users or items, or the file cannot be written.
pub fn gen_file(a: &GenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.users > 0 && a.items > 0,
        "--users and --items must be > 0"
    );
    let events = gen::generate(&gen::GenOptions {
        events: a.events,
        users: a.users,
        items: a.items,
        seed: a.seed,
    });
    log::write(&a.out, &events)?;
    println!("{} events written to {}", events.len(), a.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_score_as_random_and_positions_exactly() {
        let (hr, ndcg) = Placed::at(1).metrics(10);
        assert_eq!((hr, ndcg), (1.0, 1.0));
        assert_eq!(Placed::at(11).metrics(10), (0.0, 0.0));
        // All tied among 100: HR@10 = 0.1 exactly.
        let (hr, _) = Placed::from_scores(&[0.0; 100], 3).metrics(10);
        assert!((hr - 0.1).abs() < 1e-12);
        let p = Placed::from_scores(&[3.0, 1.0, 2.0, 2.0], 2);
        assert_eq!((p.greater, p.tied), (1, 1));
    }

    #[test]
    fn plan_draws_unseen_candidates_in_user_order() {
        let events = gen::generate(&gen::GenOptions {
            events: 2000,
            users: 200,
            items: 150,
            seed: 3,
        });
        let opts = ReplayOptions {
            candidates: 50,
            k: 10,
            concurrency: 4,
            seed: 1,
            limit: None,
        };
        let (tasks, users) = plan(&events, &opts);
        assert_eq!(tasks.len(), events.len());
        let mut touched: Vec<HashSet<usize>> = vec![HashSet::new(); users.len()];
        for (n, t) in tasks.iter().enumerate() {
            assert!(t.cands.contains(&t.item));
            let set: HashSet<usize> = t.cands.iter().copied().collect();
            assert_eq!(set.len(), t.cands.len(), "distinct candidates");
            assert!(t
                .cands
                .iter()
                .all(|c| *c == t.item || !touched[t.user].contains(c)));
            if let Some(p) = t.prev {
                assert!(p < n && tasks[p].user == t.user);
            }
            assert_eq!(t.first_of_user, touched[t.user].is_empty());
            touched[t.user].insert(t.item);
        }
        // Later events have full candidate lists (but for the heaviest users, who have
        // touched most of the catalog).
        let full = tasks[1000..].iter().filter(|t| t.cands.len() == 50).count();
        assert!(full > 900, "{full} of 1000 full");
        // The baselines run and popularity beats random on a popularity-skewed log.
        let pop = popularity(&tasks, 150);
        let hr = pop[1000..].iter().map(|p| p.metrics(10).0).sum::<f64>() / 1000.0;
        assert!(hr > 0.3, "popularity HR@10 {hr}");
        assert_eq!(bpr(&tasks, users.len(), 150, 1).len(), tasks.len());
    }
}
