//! `freshet replay obd`: the Open Bandit Dataset sample (ZOZOTOWN, logged by a uniform
//! random policy over 80 items and 3 positions) streamed through a running gateway.
//!
//! For every logged row the gateway ranks all 80 items for that user (exploration
//! τ = 1, ε = 0.05, so the slot-1 policy π(a|x) = 0.95·softmax(scores) + 0.05/80 is known
//! exactly from the scores). The report gives off-policy estimates of that policy's
//! click rate against the logging policy's: IPS and self-normalised IPS with 95%
//! normal-approximation intervals, the effective sample size and the largest weight.
//! The model also learns from the log by the replay method (Li et al. 2011): a logged
//! event whose item is exactly what the gateway put at the logged position is fed back
//! with its real click (unbiased for a uniformly random logger).
//!
//! The sample has about 40 clicks in 10,000 rows: far too few to rank policies. The
//! report says so; it proves the pipeline and the feature schema.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::report::mean_ci;
use freshet_client::gateway::{events_for, Gateway, RetryPolicy, UPSERT_WAIT_DEFAULT};
use freshet_proto::gateway::v1::{Exploration, RankRequest, UserContext};
use freshet_proto::ps::v1::Item;

const ITEMS: usize = 80;
const TEMPERATURE: f32 = 1.0;
const EPSILON: f32 = 0.05;
/// Item ids on the cluster: OBD item i is OFFSET + i (keeps them apart from other data).
const OFFSET: u64 = 5_000_000;

/// Locates (or downloads) the sample: `<cache>/obp-0.5.7/obp/dataset/obd/random/<campaign>/`.
///
/// # Errors
/// The download (pip) or the unpacking (tar) failed.
pub fn fetch(cache: &Path, campaign: &str) -> anyhow::Result<PathBuf> {
    let dir = cache
        .join("obp-0.5.7/obp/dataset/obd/random")
        .join(campaign);
    if dir.join(format!("{campaign}.csv")).exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache)?;
    let sdist = cache.join("obp-0.5.7.tar.gz");
    if !sdist.exists() {
        eprintln!(
            "downloading the OBD sample (pip download obp==0.5.7) into {}",
            cache.display()
        );
        let st = std::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--ignore-requires-python",
            ])
            .args(["--disable-pip-version-check", "obp==0.5.7", "-d"])
            .arg(cache)
            .status()
            .context("running python3 -m pip (is Python with pip installed?)")?;
        if !st.success() {
            bail!("pip download obp==0.5.7 failed (network to PyPI needed once)");
        }
    }
    let st = std::process::Command::new("tar")
        .arg("xzf")
        .arg(&sdist)
        .arg("-C")
        .arg(cache)
        .status()
        .context("running tar")?;
    if !st.success() || !dir.exists() {
        bail!(
            "unpacking {} did not yield {}",
            sdist.display(),
            dir.display()
        );
    }
    Ok(dir)
}

struct Row {
    item: usize,
    position: u32,
    click: bool,
    propensity: f64,
    user: Vec<String>,
}

fn read_rows(path: &Path) -> anyhow::Result<Vec<Row>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().context("empty file")?.split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .with_context(|| format!("{}: no column {name}", path.display()))
    };
    let (ci, cp, cc, cq) = (
        col("item_id")?,
        col("position")?,
        col("click")?,
        col("propensity_score")?,
    );
    let users: Vec<usize> = (0..4)
        .map(|k| col(&format!("user_feature_{k}")))
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    for (n, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        let bad = || format!("{}: line {}", path.display(), n + 2);
        rows.push(Row {
            item: f[ci].parse().with_context(bad)?,
            position: f[cp].parse().with_context(bad)?,
            click: f[cc] == "1",
            propensity: f[cq].parse().with_context(bad)?,
            user: users.iter().map(|&u| f[u].to_string()).collect(),
        });
    }
    Ok(rows)
}

fn read_items(path: &Path) -> anyhow::Result<Vec<Item>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let id: u64 = f[1].parse().context("item_id")?;
        // item_feature_0 is numeric: bucketed; the others are categorical hashes.
        let f0: f64 = f[2].parse().unwrap_or(0.0);
        let mut features = vec![format!("f0={}", (f0 * 4.0).round())];
        for (k, v) in f.iter().enumerate().skip(3) {
            features.push(format!("f{}={v}", k - 2));
        }
        out.push(Item {
            id: OFFSET + id,
            features,
            active: true,
            title: String::new(),
        });
    }
    Ok(out)
}

/// Streams the sample through the gateway and prints the report.
///
/// # Errors
/// The data cannot be fetched or the gateway fails repeatedly.
pub async fn run(gateway: &str, cache: &Path, campaign: &str, limit: usize) -> anyhow::Result<()> {
    let dir = fetch(cache, campaign)?;
    let rows = read_rows(&dir.join(format!("{campaign}.csv")))?;
    let items = read_items(&dir.join("item_context.csv"))?;
    if items.len() != ITEMS {
        bail!("expected {ITEMS} items, found {}", items.len());
    }
    let gw = Gateway::connect(gateway, RetryPolicy::default())?;
    gw.upsert_and_wait(&items, UPSERT_WAIT_DEFAULT).await?;
    let candidates: Vec<u64> = items.iter().map(|i| i.id).collect();
    let rows = &rows[..rows.len().min(limit)];
    let (mut ips, mut weights, mut logged) = (Vec::new(), Vec::new(), Vec::new());
    let (mut matches, mut match_clicks) = (0u64, 0u64);
    let bar = crate::progress::Bar::terminal_only(rows.len() as u64, "replay");
    for (n, row) in rows.iter().enumerate() {
        let user = UserContext {
            categorical: row
                .user
                .iter()
                .enumerate()
                .map(|(k, v)| (format!("u{k}"), v.clone()))
                .collect(),
            numeric: vec![],
            user_id: String::new(),
            query: String::new(),
        };
        let r = gw
            .rank(&RankRequest {
                user: Some(user),
                candidates: candidates.clone(),
                k: ITEMS as u32,
                exploration: Some(Exploration {
                    temperature: TEMPERATURE,
                    epsilon: EPSILON,
                }),
                candidate_set: String::new(),
                min_epoch: 0,
            })
            .await
            .context("rank")?;
        // π(a|x) for slot 1, exactly as the gateway samples it.
        let max = r
            .items
            .iter()
            .map(|i| f64::from(i.score))
            .fold(f64::MIN, f64::max);
        let total: f64 = r
            .items
            .iter()
            .map(|i| ((f64::from(i.score) - max) / f64::from(TEMPERATURE)).exp())
            .sum();
        let logged_id = OFFSET + row.item as u64;
        let Some(a) = r.items.iter().find(|i| i.item_id == logged_id) else {
            bail!("the gateway did not rank logged item {}", row.item);
        };
        let pi = f64::from(1.0 - EPSILON)
            * ((f64::from(a.score) - max) / f64::from(TEMPERATURE)).exp()
            / total
            + f64::from(EPSILON) / ITEMS as f64;
        let w = pi / row.propensity;
        let c = if row.click { 1.0 } else { 0.0 };
        ips.push(w * c);
        weights.push(w);
        logged.push(c);
        // Replay learning: feed back exactly-matching events with their real outcome.
        let events = events_for(&r, &format!("obd-{campaign}-{n}"), |shown| {
            (shown.position == row.position && shown.item_id == logged_id).then_some(row.click)
        });
        if !events.is_empty() {
            matches += 1;
            match_clicks += u64::from(row.click);
            gw.feedback(&events).await.context("feedback")?;
        }
        bar.set(n as u64 + 1);
        if (n + 1) % 1000 == 0 || n + 1 == rows.len() {
            let (m, ci) = mean_ci(&ips);
            bar.message(&format!("IPS {m:.5}"));
            bar.println(&format!(
                "  {:>6}/{} rows  IPS {:.5} ± {:.5}  replay matches {}",
                n + 1,
                rows.len(),
                m,
                ci,
                matches
            ));
        }
    }
    bar.finish();
    let (v_logged, ci_logged) = mean_ci(&logged);
    let (v_ips, ci_ips) = mean_ci(&ips);
    let sw: f64 = weights.iter().sum();
    let v_snips = ips.iter().sum::<f64>() / sw;
    // Delta-method interval of the ratio estimator.
    let snips_terms: Vec<f64> = ips
        .iter()
        .zip(&weights)
        .map(|(r, w)| (r - v_snips * w) / (sw / weights.len() as f64))
        .collect();
    let (_, ci_snips) = mean_ci(&snips_terms);
    let ess = sw * sw / weights.iter().map(|w| w * w).sum::<f64>();
    let wmax = weights.iter().copied().fold(0.0, f64::max);
    let clicks = logged.iter().sum::<f64>();
    println!();
    println!(
        "OBD random/{campaign}: {} rows, {clicks:.0} clicks, {ITEMS} items, 3 positions",
        rows.len()
    );
    println!();
    println!("| estimate | CTR | 95% interval |");
    println!("|---|---|---|");
    println!("| logged (uniform random) | {v_logged:.5} | ±{ci_logged:.5} |");
    println!("| Freshet slot-1 policy, IPS | {v_ips:.5} | ±{ci_ips:.5} |");
    println!("| Freshet slot-1 policy, SNIPS | {v_snips:.5} | ±{ci_snips:.5} |");
    println!();
    println!(
        "effective sample size {ess:.0} of {}, largest weight {wmax:.2}; replay matches {matches} ({match_clicks} clicks) fed back",
        rows.len()
    );
    println!(
        "The sample holds {clicks:.0} clicks: the intervals overlap and it cannot rank policies; \
         it shows the pipeline and features work end to end."
    );
    Ok(())
}
