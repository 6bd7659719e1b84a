//! A recommendation environment with known ground truth, driven through a real gateway.
//!
//! Users belong to segments with latent preference vectors; items have latent vectors
//! and a base attractiveness; the click probability of item a shown to segment s at
//! position p is `bias[p] * sigmoid(base + a·s * sharpness)`, scaled so the average
//! click rate matches `mean_ctr`. Preference drift: `shift()` redraws every segment's
//! vector (an abrupt reshuffle). Every impression is ranked by the gateway and every
//! shown slot gets feedback (a click or not), so the model learns from the stream.
//!
//! The report compares, on the same users, the served policy's click rate with the
//! exact expected click rate of a uniformly random ranking and of the oracle.

use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_proto::gateway::v1::{
    gateway_client::GatewayClient, FeedbackEvent, FeedbackRequest, RankRequest, Reward,
    UpsertItemsRequest, UserContext,
};
use freshet_proto::ps::v1::Item;
use rand::{Rng, SeedableRng};
use std::sync::Mutex;
use tonic::transport::Channel;

/// Shape of the simulated world.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub items: usize,
    pub segments: usize,
    pub latent: usize,
    pub slots: usize,
    pub sharpness: f64,
    pub mean_ctr: f64,
    pub position_bias: Vec<f64>,
    pub seed: u64,
    /// First catalog item id (so several simulations can share a cluster).
    pub first_item: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            items: 20,
            segments: 4,
            latent: 4,
            slots: 3,
            sharpness: 3.0,
            mean_ctr: 0.15,
            position_bias: vec![1.0, 0.75, 0.55],
            seed: 7,
            first_item: 1,
        }
    }
}

/// The world's ground truth.
pub struct World {
    pub cfg: SimConfig,
    item_vec: Vec<Vec<f64>>,
    item_base: Vec<f64>,
    seg_vec: Vec<Vec<f64>>,
    scale: f64,
    rng: rand::rngs::StdRng,
}

fn gauss(rng: &mut impl Rng) -> f64 {
    // Box-Muller.
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl World {
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        let unit = |rng: &mut rand::rngs::StdRng, n: usize| {
            let v: Vec<f64> = (0..n).map(|_| gauss(rng)).collect();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-9);
            v.into_iter().map(|x| x / norm).collect::<Vec<f64>>()
        };
        let item_vec = (0..cfg.items).map(|_| unit(&mut rng, cfg.latent)).collect();
        let item_base = (0..cfg.items)
            .map(|_| -2.0 + 0.5 * gauss(&mut rng))
            .collect();
        let seg_vec = (0..cfg.segments)
            .map(|_| unit(&mut rng, cfg.latent))
            .collect();
        let mut w = World {
            cfg,
            item_vec,
            item_base,
            seg_vec,
            scale: 1.0,
            rng,
        };
        w.calibrate();
        w
    }

    /// Scales click probabilities so a random ranking's average matches `mean_ctr`.
    fn calibrate(&mut self) {
        self.scale = 1.0;
        let mut total = 0.0;
        for s in 0..self.cfg.segments {
            for a in 0..self.cfg.items {
                total += self.raw(s, a);
            }
        }
        let mean = total / (self.cfg.segments * self.cfg.items) as f64;
        self.scale = (self.cfg.mean_ctr / mean).min(1.0 / self.max_raw());
    }

    fn max_raw(&self) -> f64 {
        let mut m: f64 = 1e-9;
        for s in 0..self.cfg.segments {
            for a in 0..self.cfg.items {
                m = m.max(self.raw(s, a));
            }
        }
        m
    }

    fn raw(&self, seg: usize, item: usize) -> f64 {
        let dot: f64 = self.seg_vec[seg]
            .iter()
            .zip(&self.item_vec[item])
            .map(|(a, b)| a * b)
            .sum();
        sigmoid(self.item_base[item] + self.cfg.sharpness * dot)
    }

    /// Click probability of item index `item` for segment `seg` at slot `pos` (0-based).
    pub fn p_click(&self, seg: usize, item: usize, pos: usize) -> f64 {
        (self.scale * self.raw(seg, item) * self.cfg.position_bias[pos]).min(1.0)
    }

    /// Abrupt preference shift: every segment gets a new vector.
    pub fn shift(&mut self) {
        for s in 0..self.cfg.segments {
            let v: Vec<f64> = (0..self.cfg.latent).map(|_| gauss(&mut self.rng)).collect();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-9);
            self.seg_vec[s] = v.into_iter().map(|x| x / norm).collect();
        }
    }

    /// Expected clicks per impression of a uniformly random ranking for `seg`.
    pub fn random_clicks(&self, seg: usize) -> f64 {
        let mean: f64 =
            (0..self.cfg.items).map(|a| self.raw(seg, a)).sum::<f64>() / self.cfg.items as f64;
        (0..self.cfg.slots)
            .map(|p| (self.scale * mean * self.cfg.position_bias[p]).min(1.0))
            .sum()
    }

    /// Expected clicks per impression of the best ranking for `seg`.
    pub fn oracle_clicks(&self, seg: usize) -> f64 {
        let mut r: Vec<f64> = (0..self.cfg.items).map(|a| self.raw(seg, a)).collect();
        r.sort_by(|a, b| b.partial_cmp(a).expect("finite"));
        (0..self.cfg.slots)
            .map(|p| (self.scale * r[p] * self.cfg.position_bias[p]).min(1.0))
            .sum()
    }

    pub fn item_id(&self, idx: usize) -> u64 {
        self.cfg.first_item + idx as u64
    }

    pub fn catalog(&self) -> Vec<Item> {
        (0..self.cfg.items)
            .map(|i| Item {
                id: self.item_id(i),
                // Coarse observable features: the sign pattern of the latent vector.
                features: vec![format!(
                    "style={}",
                    self.item_vec[i]
                        .iter()
                        .take(2)
                        .map(|x| if *x > 0.0 { '+' } else { '-' })
                        .collect::<String>()
                )],
                active: true,
            })
            .collect()
    }
}

/// Clicks and impressions of one window, with what random and oracle would expect and
/// what a context-free Bernoulli Thompson sampling policy (the policy that logged OBD)
/// got on the same users.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    pub impressions: u64,
    pub clicks: f64,
    pub random: f64,
    pub oracle: f64,
    pub thompson: f64,
}

/// Gamma(shape, 1) by Marsaglia and Tsang (2000); shape > 0.
fn gamma(rng: &mut impl Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random::<f64>().max(1e-300);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = gauss(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random::<f64>().max(1e-300);
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

fn beta(rng: &mut impl Rng, a: f64, b: f64) -> f64 {
    let x = gamma(rng, a);
    let y = gamma(rng, b);
    x / (x + y)
}

/// Context-free Bernoulli Thompson sampling over item indices (Beta(1, 1) priors).
pub struct Thompson {
    ab: Vec<(f64, f64)>,
}

impl Thompson {
    pub fn new(items: usize) -> Self {
        Thompson {
            ab: vec![(1.0, 1.0); items],
        }
    }

    /// The `k` items with the largest sampled click rates.
    pub fn rank(&self, rng: &mut impl Rng, k: usize) -> Vec<usize> {
        let mut draws: Vec<(f64, usize)> = self
            .ab
            .iter()
            .enumerate()
            .map(|(i, (a, b))| (beta(rng, *a, *b), i))
            .collect();
        draws.sort_by(|x, y| y.0.partial_cmp(&x.0).expect("finite"));
        draws.into_iter().take(k).map(|(_, i)| i).collect()
    }

    pub fn update(&mut self, item: usize, click: bool) {
        if click {
            self.ab[item].0 += 1.0;
        } else {
            self.ab[item].1 += 1.0;
        }
    }
}

impl Window {
    pub fn ctr(&self) -> f64 {
        self.clicks / self.impressions.max(1) as f64
    }
    pub fn random_ctr(&self) -> f64 {
        self.random / self.impressions.max(1) as f64
    }
    pub fn oracle_ctr(&self) -> f64 {
        self.oracle / self.impressions.max(1) as f64
    }
    pub fn thompson_ctr(&self) -> f64 {
        self.thompson / self.impressions.max(1) as f64
    }
    /// (CTR − random) / (oracle − random).
    pub fn normalised(&self) -> f64 {
        (self.clicks - self.random) / (self.oracle - self.random).max(1e-9)
    }
}

/// Runs `impressions` impressions through the gateway with `concurrency` users in
/// flight (and the Thompson baseline on the same users); returns one window per
/// `window` impressions.
///
/// # Errors
/// The gateway failed a Rank or Feedback repeatedly.
pub async fn drive(
    gw: GatewayClient<Channel>,
    world: Arc<Mutex<World>>,
    thompson: Arc<Mutex<Thompson>>,
    impressions: u64,
    window: u64,
    concurrency: usize,
    seed: u64,
) -> anyhow::Result<Vec<Window>> {
    let windows = Arc::new(Mutex::new(vec![
        Window::default();
        impressions.div_ceil(window) as usize
    ]));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let mut gw = gw.clone();
        let world = Arc::clone(&world);
        let windows = Arc::clone(&windows);
        let next = Arc::clone(&next);
        let thompson = Arc::clone(&thompson);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ ((c as u64 + 1) * 0x9E37));
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= impressions {
                    return Ok::<_, anyhow::Error>(());
                }
                let (seg, candidates, slots, random, oracle) = {
                    let w = world.lock().expect("lock");
                    let seg = rng.random_range(0..w.cfg.segments);
                    let cands: Vec<u64> = (0..w.cfg.items).map(|i| w.item_id(i)).collect();
                    (
                        seg,
                        cands,
                        w.cfg.slots,
                        w.random_clicks(seg),
                        w.oracle_clicks(seg),
                    )
                };
                let req = RankRequest {
                    user: Some(UserContext {
                        categorical: [("segment".to_string(), format!("s{seg}"))].into(),
                        numeric: vec![],
                        user_id: String::new(),
                    }),
                    candidates: candidates.clone(),
                    k: slots as u32,
                    exploration: None,
                    candidate_set: String::new(),
                };
                let deadline = Instant::now() + Duration::from_secs(30);
                let ranked = loop {
                    match gw.rank(req.clone()).await {
                        Ok(r) => break r.into_inner(),
                        Err(e) if Instant::now() < deadline => {
                            tracing::debug!(error = %e, "rank retry");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => anyhow::bail!("rank: {e}"),
                    }
                };
                let mut clicks = 0.0;
                let events: Vec<FeedbackEvent> = {
                    let w = world.lock().expect("lock");
                    ranked
                        .items
                        .iter()
                        .enumerate()
                        .map(|(pos, it)| {
                            let idx = (it.item_id - w.cfg.first_item) as usize;
                            let click = rng.random::<f64>() < w.p_click(seg, idx, pos);
                            if click {
                                clicks += 1.0;
                            }
                            FeedbackEvent {
                                event_id: format!("sim-{seed}-{n}-{pos}"),
                                impression_id: ranked.impression_id.clone(),
                                item_id: it.item_id,
                                position: it.position,
                                rewards: if click {
                                    vec![Reward::default()]
                                } else {
                                    vec![]
                                },
                                event_time_ms: 0,
                            }
                        })
                        .collect()
                };
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    match gw
                        .feedback(FeedbackRequest {
                            events: events.clone(),
                        })
                        .await
                    {
                        Ok(_) => break,
                        Err(e) if Instant::now() < deadline => {
                            tracing::debug!(error = %e, "feedback retry");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => anyhow::bail!("feedback: {e}"),
                    }
                }
                // The baseline on the same user: its own ranking, its own outcomes.
                let ts_clicks = {
                    let w = world.lock().expect("lock");
                    let mut ts = thompson.lock().expect("lock");
                    let shown = ts.rank(&mut rng, w.cfg.slots);
                    let mut got = 0.0;
                    for (pos, idx) in shown.into_iter().enumerate() {
                        let click = rng.random::<f64>() < w.p_click(seg, idx, pos);
                        ts.update(idx, click);
                        if click {
                            got += 1.0;
                        }
                    }
                    got
                };
                let mut ws = windows.lock().expect("lock");
                let win = &mut ws[(n / window) as usize];
                win.impressions += 1;
                win.clicks += clicks;
                win.thompson += ts_clicks;
                win.random += random;
                win.oracle += oracle;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let ws = windows.lock().expect("lock").clone();
    Ok(ws)
}

/// Upserts the world's catalog and waits until it is rankable.
///
/// # Errors
/// The gateway did not serve the catalog within 60 s.
pub async fn install_catalog(gw: &mut GatewayClient<Channel>, world: &World) -> anyhow::Result<()> {
    install_catalog_items(gw, &world.catalog()).await
}

/// Upserts `items` and waits until they are rankable.
///
/// # Errors
/// The gateway did not serve them within 60 s.
pub async fn install_catalog_items(
    gw: &mut GatewayClient<Channel>,
    items: &[Item],
) -> anyhow::Result<()> {
    let items = items.to_vec();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let upserted = gw
            .upsert_items(UpsertItemsRequest {
                items: items.clone(),
                sets: vec![],
            })
            .await
            .is_ok();
        if upserted {
            let req = RankRequest {
                candidates: items.iter().map(|i| i.id).collect(),
                k: 1,
                ..Default::default()
            };
            if gw.rank(req).await.is_ok() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("the catalog never became rankable");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `freshet sim`: drives a running gateway and prints CTR per window against random and
/// oracle, with an abrupt preference shift after `shift_after` impressions (0: none).
///
/// # Errors
/// The gateway is unreachable or keeps failing.
pub async fn run_sim(
    gateway: &str,
    impressions: u64,
    window: u64,
    shift_after: u64,
    concurrency: usize,
    seed: u64,
) -> anyhow::Result<()> {
    let ch = crate::endpoint(gateway)?;
    let mut gw = GatewayClient::new(ch);
    let cfg = SimConfig {
        seed,
        first_item: 1_000_000 + (seed % 1000) * 1000,
        ..SimConfig::default()
    };
    let world = World::new(cfg);
    install_catalog(&mut gw, &world).await?;
    let thompson = Arc::new(Mutex::new(Thompson::new(world.cfg.items)));
    let world = Arc::new(Mutex::new(world));
    let mut all = drive(
        gw.clone(),
        Arc::clone(&world),
        Arc::clone(&thompson),
        if shift_after > 0 {
            shift_after
        } else {
            impressions
        },
        window,
        concurrency,
        seed,
    )
    .await?;
    if shift_after > 0 && impressions > shift_after {
        world.lock().expect("lock").shift();
        all.extend(
            drive(
                gw,
                world,
                thompson,
                impressions - shift_after,
                window,
                concurrency,
                seed + 1,
            )
            .await?,
        );
    }
    println!(
        "clicks per impression ({} slots) on the same users:",
        SimConfig::default().slots
    );
    println!("| window | impressions | Freshet | Thompson (context-free) | random | oracle | Freshet normalised |");
    println!("|---|---|---|---|---|---|---|");
    for (i, w) in all.iter().enumerate() {
        println!(
            "| {} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.2} |",
            i + 1,
            w.impressions,
            w.ctr(),
            w.thompson_ctr(),
            w.random_ctr(),
            w.oracle_ctr(),
            w.normalised()
        );
    }
    Ok(())
}
