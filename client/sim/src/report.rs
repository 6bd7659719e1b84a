//! Metrics over seeds, and the report: Markdown, JSON and SVG plots.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use super::world::Schedule;

/// Expected clicks per impression of every policy on one seed's stream.
#[derive(Debug, Clone)]
pub struct SeedRun {
    pub seed: u64,
    /// (policy name, expected clicks of its slate at every impression).
    pub series: Vec<(String, Vec<f32>)>,
    pub random: Vec<f32>,
    pub oracle: Vec<f32>,
}

/// One policy's figures on one seed.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Metrics {
    /// Mean normalised CTR over the hour before the abrupt shift.
    pub steady: f64,
    /// Impressions after the shift until a window reaches 80% of the pre-shift CTR.
    pub recovery: Option<u64>,
    /// Mean normalised CTR during the gradual drift.
    pub gradual: f64,
    /// Mean normalised CTR from the new items to the end.
    pub new_items: f64,
    /// Mean normalised CTR over the whole run.
    pub overall: f64,
    /// Expected clicks below the oracle's, per 1,000 impressions, over the whole run.
    pub lost_per_1k: f64,
}

fn mean(xs: &[f32]) -> f64 {
    xs.iter().map(|x| f64::from(*x)).sum::<f64>() / xs.len().max(1) as f64
}

/// Normalised CTR over `range`: (policy − random) / (oracle − random) of the sums.
fn normalised(run: &SeedRun, s: &[f32], range: std::ops::Range<usize>) -> f64 {
    let range = range.start.min(s.len())..range.end.min(s.len());
    let (p, r, o) = (
        mean(&s[range.clone()]),
        mean(&run.random[range.clone()]),
        mean(&run.oracle[range]),
    );
    (p - r) / (o - r).max(1e-12)
}

/// Recovery windows: 1/50 of an hour.
pub fn recovery_window(s: &Schedule) -> u64 {
    (s.hour / 50).max(1)
}

pub fn metrics(run: &SeedRun, series: &[f32], s: &Schedule) -> Metrics {
    let h = s.hour as usize;
    let end = series.len();
    let mut m = Metrics {
        overall: normalised(run, series, 0..end),
        lost_per_1k: 1000.0 * (mean(&run.oracle) - mean(series)),
        ..Metrics::default()
    };
    if let Some(at) = s.shift_at {
        let at = at as usize;
        m.steady = normalised(run, series, at.saturating_sub(h)..at);
        let pre = mean(&series[at.saturating_sub(h / 2)..at]);
        let w = recovery_window(s) as usize;
        let limit = s.gradual.map_or(end, |(g0, _)| g0 as usize);
        let mut j = at;
        while j + w <= limit {
            if mean(&series[j..j + w]) >= 0.8 * pre {
                m.recovery = Some((j + w - at) as u64);
                break;
            }
            j += w;
        }
    } else {
        m.steady = normalised(run, series, end.saturating_sub(h)..end);
    }
    if let Some((g0, g1)) = s.gradual {
        m.gradual = normalised(run, series, g0 as usize..g1 as usize);
    }
    if let Some(at) = s.new_items_at {
        m.new_items = normalised(run, series, at as usize..end);
    }
    m
}

/// Impressions after the reshuffle within which recovery is looked for (0 without one).
fn recovery_limit(s: &Schedule, end: u64) -> u64 {
    s.shift_at.map_or(0, |at| {
        s.gradual.map_or(end, |(g0, _)| g0).saturating_sub(at)
    })
}

/// Per seed, how many times faster the live cluster recovered than the hourly refresh; a
/// seed where hourly did not recover within `limit` gives a lower bound (`limit` / live),
/// one where the live cluster did not recover gives none.
fn recovery_ratio(policies: &[PolicyJson], limit: u64) -> Option<String> {
    let find = |n: &str| policies.iter().find(|p| p.name == n);
    let (live, hourly) = (find(super::LIVE)?, find(super::HOURLY)?);
    let per_seed: Vec<String> = live
        .per_seed
        .iter()
        .zip(&hourly.per_seed)
        .map(|(l, h)| match (l.recovery, h.recovery) {
            (Some(l), Some(h)) => format!("{:.1}×", h as f64 / l as f64),
            (Some(l), None) => format!("≥ {:.1}×", limit as f64 / l as f64),
            (None, _) => "— (live did not recover)".into(),
        })
        .collect();
    Some(format!(
        "Recovery, {} against {}, per seed: {}.",
        super::LIVE,
        super::HOURLY,
        per_seed.join(", ")
    ))
}

/// Two-sided 95% Student t quantile for `dof` degrees of freedom.
fn t95(dof: usize) -> f64 {
    const T: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    match dof {
        0 => f64::NAN,
        1..=10 => T[dof - 1],
        11..=30 => 2.1,
        _ => 1.96,
    }
}

/// Mean and 95% half-width over seeds.
pub fn mean_ci(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    let m = xs.iter().sum::<f64>() / n.max(1) as f64;
    if n < 2 {
        return (m, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64;
    (m, t95(n - 1) * (var / n as f64).sqrt())
}

fn fmt_ci((m, ci): (f64, f64), digits: usize) -> String {
    if ci.is_nan() {
        format!("{m:.digits$}")
    } else {
        format!("{m:.digits$} ± {ci:.digits$}")
    }
}

/// Everything the report says, for the JSON file.
#[derive(Debug, serde::Serialize)]
struct Summary<'a> {
    grounding: &'a str,
    schedule: ScheduleJson,
    seeds: Vec<u64>,
    policies: Vec<PolicyJson>,
    windows: WindowsJson,
}

#[derive(Debug, serde::Serialize)]
struct ScheduleJson {
    impressions_per_hour: u64,
    shift_at: Option<u64>,
    gradual: Option<(u64, u64)>,
    new_items_at: Option<u64>,
    end: u64,
}

#[derive(Debug, serde::Serialize)]
struct PolicyJson {
    name: String,
    per_seed: Vec<Metrics>,
    steady: (f64, f64),
    recovery_impressions: Option<(f64, f64)>,
    recovered_seeds: usize,
    gradual: (f64, f64),
    new_items: (f64, f64),
    overall: (f64, f64),
    lost_per_1k: (f64, f64),
}

#[derive(Debug, serde::Serialize)]
struct WindowsJson {
    size: u64,
    /// Per policy: mean over seeds of the normalised CTR in each window.
    normalised: Vec<(String, Vec<f64>)>,
    /// Mean expected clicks per impression in each window: policies, random, oracle.
    ctr: Vec<(String, Vec<f64>)>,
}

/// Per window, mean over seeds of (normalised, ctr) for every policy, random, oracle.
/// Named series of per-window values.
type Lines = Vec<(String, Vec<f64>)>;

fn window_means(runs: &[SeedRun], w: usize) -> (Lines, Lines) {
    let end = runs[0].random.len();
    let nw = end.div_ceil(w);
    let mut norm = Vec::new();
    let mut ctr = Vec::new();
    for (p, (name, _)) in runs[0].series.iter().enumerate() {
        let mut nv = vec![0.0; nw];
        let mut cv = vec![0.0; nw];
        for run in runs {
            let s = &run.series[p].1;
            for (k, (a, b)) in nv.iter_mut().zip(cv.iter_mut()).enumerate() {
                *a += normalised(run, s, k * w..(k + 1) * w) / runs.len() as f64;
                *b += mean(&s[k * w..((k + 1) * w).min(end)]) / runs.len() as f64;
            }
        }
        norm.push((name.clone(), nv));
        ctr.push((name.clone(), cv));
    }
    for (name, pick) in [("random", 0), ("oracle", 1)] {
        let mut cv = vec![0.0; nw];
        for run in runs {
            let s = if pick == 0 { &run.random } else { &run.oracle };
            for (k, b) in cv.iter_mut().enumerate() {
                *b += mean(&s[k * w..((k + 1) * w).min(end)]) / runs.len() as f64;
            }
        }
        ctr.push((name.into(), cv));
    }
    (norm, ctr)
}

const COLOURS: [&str; 8] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#7f7f7f", "#17becf",
];

/// A line chart: x in hours, one polyline per series, dashed verticals at `events`.
/// Width of a chart's plot area, and the width the legend allows per character.
const PLOT_WIDTH_PX: f64 = 620.0;
const LEGEND_CHAR_PX: f64 = 7.0;

fn svg_chart(
    title: &str,
    y_label: &str,
    lines: &[(String, Vec<f64>)],
    window_hours: f64,
    events: &[(f64, &str)],
    y_range: (f64, f64),
) -> String {
    // The legend sits right of the plot; the margin grows with the longest name so no
    // name is cut off at the edge (~7 px per character at font size 12).
    let longest = lines.iter().map(|l| l.0.chars().count()).max().unwrap_or(0) as f64;
    let (left, right, top, bottom) = (
        60.0,
        (46.0 + LEGEND_CHAR_PX * longest).max(220.0),
        40.0,
        50.0,
    );
    let (w, h) = (PLOT_WIDTH_PX + left + right, 480.0);
    let n = lines.iter().map(|l| l.1.len()).max().unwrap_or(1) as f64;
    let x_max = n * window_hours;
    let (y0, y1) = y_range;
    let px = |x: f64| left + (w - left - right) * x / x_max.max(1e-9);
    let py = |y: f64| top + (h - top - bottom) * (1.0 - (y.clamp(y0, y1) - y0) / (y1 - y0));
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" font-size="15" text-anchor="middle">{title}</text>"#,
        (w - right + left) / 2.0
    );
    // Axes and grid.
    let _ = write!(
        s,
        r##"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>"##,
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for k in 0..=5 {
        let y = y0 + (y1 - y0) * f64::from(k) / 5.0;
        let _ = write!(
            s,
            r##"<line x1="{left}" y1="{py}" x2="{}" y2="{py}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{y:.2}</text>"##,
            w - right,
            left - 6.0,
            py(y) + 4.0,
            py = py(y)
        );
    }
    let hours = x_max.ceil() as u64;
    for k in 0..=hours {
        let x = k as f64;
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{k}</text>"#,
            px(x),
            h - bottom + 16.0
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">simulated hours</text><text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">{y_label}</text>"#,
        (w - right + left) / 2.0,
        h - 12.0,
        (h - bottom + top) / 2.0,
        (h - bottom + top) / 2.0
    );
    for (x, label) in events {
        let ex = px(*x);
        let _ = write!(
            s,
            r##"<line x1="{px}" y1="{top}" x2="{px}" y2="{}" stroke="#555" stroke-dasharray="4 4"/><text x="{}" y="{}" fill="#555">{label}</text>"##,
            h - bottom,
            ex + 3.0,
            top + 12.0,
            px = ex
        );
    }
    for (i, (name, ys)) in lines.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = ys
            .iter()
            .enumerate()
            .map(|(k, y)| format!("{:.1},{:.1}", px((k as f64 + 0.5) * window_hours), py(*y)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="{}" points="{}"/><line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}">{name}</text>"#,
            if i == 0 { 2.5 } else { 1.5 },
            points.join(" "),
            w - right + 10.0,
            w - right + 30.0,
            w - right + 36.0,
            top + 20.0 + 18.0 * i as f64 + 4.0,
            ly = top + 20.0 + 18.0 * i as f64
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Writes `report.md`, `report.json`, `normalised.svg` and `ctr.svg` into `dir` and
/// returns the Markdown.
///
/// # Errors
/// The files cannot be written.
pub fn write(
    dir: &Path,
    grounding: &str,
    setup: &str,
    schedule: &Schedule,
    runs: &[SeedRun],
) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut policies = Vec::new();
    for (p, (name, _)) in runs[0].series.iter().enumerate() {
        let per_seed: Vec<Metrics> = runs
            .iter()
            .map(|r| metrics(r, &r.series[p].1, schedule))
            .collect();
        let col = |f: fn(&Metrics) -> f64| mean_ci(&per_seed.iter().map(f).collect::<Vec<_>>());
        let rec: Vec<f64> = per_seed
            .iter()
            .filter_map(|m| m.recovery.map(|r| r as f64))
            .collect();
        policies.push(PolicyJson {
            name: name.clone(),
            steady: col(|m| m.steady),
            recovery_impressions: (rec.len() == per_seed.len()).then(|| mean_ci(&rec)),
            recovered_seeds: rec.len(),
            gradual: col(|m| m.gradual),
            new_items: col(|m| m.new_items),
            overall: col(|m| m.overall),
            lost_per_1k: col(|m| m.lost_per_1k),
            per_seed,
        });
    }
    let limit = recovery_limit(schedule, runs[0].random.len() as u64);
    let w = (schedule.hour / 10).max(1);
    let (norm, ctr) = window_means(runs, w as usize);
    let hour = schedule.hour as f64;
    let mut events = Vec::new();
    if let Some(at) = schedule.shift_at {
        events.push((at as f64 / hour, "reshuffle"));
    }
    if let Some((g0, g1)) = schedule.gradual {
        events.push((g0 as f64 / hour, "drift"));
        events.push((g1 as f64 / hour, ""));
    }
    if let Some(at) = schedule.new_items_at {
        events.push((at as f64 / hour, "new items"));
    }
    let wh = w as f64 / hour;
    std::fs::write(
        dir.join("normalised.svg"),
        svg_chart(
            &format!(
                "Normalised CTR, mean of {} seed(s), windows of {w} impressions",
                runs.len()
            ),
            "(CTR - random) / (oracle - random)",
            &norm,
            wh,
            &events,
            (-0.2, 1.0),
        ),
    )?;
    let ymax = ctr
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max)
        * 1.1;
    std::fs::write(
        dir.join("ctr.svg"),
        svg_chart(
            "Expected clicks per impression (the slate shown)",
            "clicks per impression",
            &ctr,
            wh,
            &events,
            (0.0, ymax.max(0.01)),
        ),
    )?;

    let seeds: Vec<u64> = runs.iter().map(|r| r.seed).collect();
    let mut md = String::new();
    let _ = writeln!(md, "# freshet sim report\n");
    let _ = writeln!(md, "- World: {grounding}.");
    let _ = writeln!(md, "- {setup}");
    let _ = writeln!(
        md,
        "- Schedule ({} impressions = 1 simulated hour): abrupt reshuffle at {}, gradual drift over {}, new items at {}, end {}.",
        schedule.hour,
        schedule.shift_at.map_or("never".into(), |a| format!("{:.2} h", a as f64 / hour)),
        schedule.gradual.map_or("never".into(), |(a, b)| format!("{:.2}–{:.2} h", a as f64 / hour, b as f64 / hour)),
        schedule.new_items_at.map_or("never".into(), |a| format!("{:.2} h", a as f64 / hour)),
        format_args!("{:.2} h", schedule.end as f64 / hour),
    );
    let _ = writeln!(
        md,
        "- Seeds: {seeds:?}; figures are means ± 95% Student-t intervals over seeds. CTR is the \
         expected clicks of the slate each policy showed (exact, from the world's click \
         model); every policy saw the same users in the same world state and learned from \
         its own clicks (common random numbers).\n"
    );
    let _ = writeln!(
        md,
        "| policy | steady normalised CTR | recovery to 80% after the reshuffle (impressions) | (hours) | normalised, gradual drift | normalised, after new items | normalised, whole run | clicks lost vs oracle per 1,000 impressions |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for p in &policies {
        let (rec, rec_h) = match p.recovery_impressions {
            Some(r) => (fmt_ci(r, 0), fmt_ci((r.0 / hour, r.1 / hour), 2)),
            // Per seed, so a seed that did not recover still shows its bound.
            None => (
                p.per_seed
                    .iter()
                    .map(|m| match m.recovery {
                        Some(r) => r.to_string(),
                        None => format!("> {limit}"),
                    })
                    .collect::<Vec<_>>()
                    .join(" · "),
                "—".into(),
            ),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {rec} | {rec_h} | {} | {} | {} | {} |",
            p.name,
            fmt_ci(p.steady, 3),
            fmt_ci(p.gradual, 3),
            fmt_ci(p.new_items, 3),
            fmt_ci(p.overall, 3),
            fmt_ci(p.lost_per_1k, 1),
        );
    }
    if runs[0]
        .series
        .iter()
        .any(|(n, _)| n.starts_with("feature effects"))
    {
        let _ = writeln!(
            md,
            "\n`feature effects only (reference)` ranks by the world's shared feature-value \
             effects, knowing them exactly but nothing of the per-user-kind and per-item \
             idiosyncrasies (the latent noise): the part of the oracle's advantage that \
             generalises across users and items. Beating it needs per-item and \
             per-user-kind statistics."
        );
    }
    if runs[0]
        .series
        .iter()
        .any(|(n, _)| n == super::EXPLORING_ORACLE)
    {
        let _ = writeln!(
            md,
            "\n`{}` serves the world's exact click rates through the live policy's own \
             exploration (the same temperature and ε mix): the ceiling of any model served \
             that way. The gap between it and the oracle (1.0) is the cost of exploring; the \
             gap between it and a learned policy is what that policy has not learned.",
            super::EXPLORING_ORACLE
        );
    }
    if schedule.shift_at.is_some() {
        let _ = writeln!(
            md,
            "\nRecovery is measured in windows of {} impressions (the first window whose mean \
             CTR reaches 80% of the policy's own mean over the half hour before the \
             reshuffle), up to the gradual drift ({limit} impressions after the reshuffle; \
             `> {limit}`: not recovered by then).",
            recovery_window(schedule)
        );
        if let Some(line) = recovery_ratio(&policies, limit) {
            let _ = writeln!(md, "\n{line}");
        }
    }
    md.push('\n');
    let _ = writeln!(md, "![normalised CTR](normalised.svg)\n\n![CTR](ctr.svg)\n");
    let _ = writeln!(
        md,
        "## Expected clicks per impression, windows of {w} impressions (mean over seeds)\n"
    );
    let _ = write!(md, "| hours |");
    for (name, _) in &ctr {
        let _ = write!(md, " {name} |");
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "|---|{}", "---|".repeat(ctr.len()));
    for k in 0..ctr[0].1.len() {
        let _ = write!(md, "| {:.1}–{:.1} |", k as f64 * wh, (k + 1) as f64 * wh);
        for (_, v) in &ctr {
            let _ = write!(md, " {:.4} |", v[k]);
        }
        let _ = writeln!(md);
    }
    std::fs::write(dir.join("report.md"), &md)?;
    let summary = Summary {
        grounding,
        schedule: ScheduleJson {
            impressions_per_hour: schedule.hour,
            shift_at: schedule.shift_at,
            gradual: schedule.gradual,
            new_items_at: schedule.new_items_at,
            end: schedule.end,
        },
        seeds,
        policies,
        windows: WindowsJson {
            size: w,
            normalised: norm,
            ctr,
        },
    };
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    Ok(md)
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_legend_fits_inside_the_chart() {
        let name = "Vowpal Wabbit (cb_explore_adf --squarecb, user cross)".to_string();
        let svg = svg_chart(
            "t",
            "y",
            &[
                ("Freshet".into(), vec![0.1, 0.2]),
                (name.clone(), vec![0.2, 0.1]),
            ],
            1.0,
            &[],
            (0.0, 1.0),
        );
        let width: f64 = svg
            .split("width=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|w| w.parse().ok())
            .expect("a width");
        let legend_x: f64 = svg
            .split(&format!(">{name}</text>"))
            .next()
            .and_then(|before| before.rsplit("<text x=\"").next())
            .and_then(|r| r.split('"').next())
            .and_then(|x| x.parse().ok())
            .expect("the legend entry");
        assert!(
            legend_x + LEGEND_CHAR_PX * name.chars().count() as f64 <= width,
            "legend ends past the edge: x {legend_x}, width {width}"
        );
    }

    use super::*;

    #[test]
    fn recovery_and_normalisation() {
        let s = Schedule {
            hour: 100,
            shift_at: Some(200),
            gradual: None,
            new_items_at: None,
            end: 400,
        };
        // A policy at the oracle, dropping to random at the shift, back after 30.
        let random = vec![0.1f32; 400];
        let oracle = vec![0.5f32; 400];
        let series: Vec<f32> = (0..400)
            .map(|n| if (200..230).contains(&n) { 0.1 } else { 0.5 })
            .collect();
        let run = SeedRun {
            seed: 1,
            series: vec![("p".into(), series.clone())],
            random,
            oracle,
        };
        let m = metrics(&run, &series, &s);
        assert!((m.steady - 1.0).abs() < 1e-9);
        // Windows of 2: the first window at 80% of 0.5 ends 32 after the shift.
        assert_eq!(m.recovery, Some(32));
        assert!((m.lost_per_1k - 1000.0 * 0.4 * 30.0 / 400.0).abs() < 1e-3);
        let (mean, ci) = mean_ci(&[1.0, 2.0, 3.0]);
        assert!((mean - 2.0).abs() < 1e-12 && (ci - 4.303 / 3f64.sqrt()).abs() < 1e-3);
        let svg = svg_chart(
            "t",
            "y",
            &[("a".into(), vec![0.1, 0.5])],
            0.5,
            &[(0.5, "e")],
            (0.0, 1.0),
        );
        assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    }
}
