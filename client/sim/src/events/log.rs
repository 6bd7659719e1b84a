//! The interaction log `freshet replay events` reads: CSV with a header naming at least
//! `user,item,reward,time`, optionally `item_features` and `user_features`.
//!
//! - `user`, `item`: any ids (1..=128 bytes, no commas);
//! - `reward`: a number in [0, 100]; rows with 0 are read but not replayed (the protocol
//!   evaluates and trains on positive events);
//! - `time`: an integer (any unit), non-decreasing down the file;
//! - `item_features`: `;`-separated strings such as `category=shoes;brand=b12` (the
//!   item's first row decides its features);
//! - `user_features`: `;`-separated `field=value` pairs.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context};
use freshet_proto::catalog::{FEATURE_BYTES_MAX, ITEM_FEATURES_MAX};
use freshet_proto::ps::v1::Item;

/// One row of the log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEvent {
    pub user: String,
    pub item: String,
    pub reward: f32,
    pub time: i64,
    pub item_features: Vec<String>,
    pub user_features: Vec<(String, String)>,
}

/// The most bytes of a user or item id.
const ID_BYTES_MAX: usize = 128;
/// The largest reward the gateway accepts.
const REWARD_MAX: f32 = 100.0;

/// Reads and checks a log.
///
/// # Errors
/// The file cannot be read, a column is missing, or a row is malformed (the message names
/// the line and the field).
pub fn read(path: &Path) -> anyhow::Result<Vec<LogEvent>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("{}", path.display()))
}

/// [`read`] on the file's text.
///
/// # Errors
/// As [`read`].
pub fn parse(text: &str) -> anyhow::Result<Vec<LogEvent>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .context("empty log: the first line must name the columns")?
        .split(',')
        .map(str::trim)
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let need = |name: &str| {
        col(name).with_context(|| {
            format!("no column {name:?} (the header must name user,item,reward,time)")
        })
    };
    let (cu, ci, cr, ct) = (need("user")?, need("item")?, need("reward")?, need("time")?);
    let (cif, cuf) = (col("item_features"), col("user_features"));
    let mut out = Vec::new();
    let mut last_time = i64::MIN;
    for (n, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = n + 2;
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != header.len() {
            bail!(
                "line {at}: {} fields, the header names {}",
                f.len(),
                header.len()
            );
        }
        let id = |c: usize, name: &str| -> anyhow::Result<String> {
            let v = f[c].trim();
            if v.is_empty() || v.len() > ID_BYTES_MAX {
                bail!("line {at}: {name} must be 1..={ID_BYTES_MAX} bytes");
            }
            Ok(v.to_string())
        };
        let reward: f32 = f[cr]
            .trim()
            .parse()
            .ok()
            .filter(|r: &f32| r.is_finite() && (0.0..=REWARD_MAX).contains(r))
            .with_context(|| format!("line {at}: reward must be a number in [0, {REWARD_MAX}]"))?;
        let time: i64 = f[ct]
            .trim()
            .parse()
            .with_context(|| format!("line {at}: time must be an integer"))?;
        if time < last_time {
            bail!("line {at}: time {time} is before the previous row's {last_time} (the log must be in time order)");
        }
        last_time = time;
        let item_features: Vec<String> = match cif {
            Some(c) => f[c]
                .split(';')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            None => Vec::new(),
        };
        if item_features.len() > ITEM_FEATURES_MAX
            || item_features.iter().any(|s| s.len() > FEATURE_BYTES_MAX)
        {
            bail!(
                "line {at}: item_features: at most {ITEM_FEATURES_MAX} of at most \
                 {FEATURE_BYTES_MAX} bytes each"
            );
        }
        let mut user_features = Vec::new();
        if let Some(c) = cuf {
            for pair in f[c].split(';').map(str::trim).filter(|s| !s.is_empty()) {
                let (k, v) = pair.split_once('=').with_context(|| {
                    format!("line {at}: user_features: {pair:?} is not field=value")
                })?;
                user_features.push((k.to_string(), v.to_string()));
            }
        }
        out.push(LogEvent {
            user: id(cu, "user")?,
            item: id(ci, "item")?,
            reward,
            time,
            item_features,
            user_features,
        });
    }
    Ok(out)
}

/// Writes `events` in the format [`read`] takes.
///
/// # Errors
/// The file cannot be written.
pub fn write(path: &Path, events: &[LogEvent]) -> anyhow::Result<()> {
    let mut s = String::from("user,item,reward,time,item_features,user_features\n");
    for e in events {
        let uf: Vec<String> = e
            .user_features
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(
            s,
            "{},{},{},{},{},{}",
            e.user,
            e.item,
            e.reward,
            e.time,
            e.item_features.join(";"),
            uf.join(";")
        );
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

/// The log's items in order of first appearance, with the features of their first row,
/// as catalog entries with ids `first_id + index`.
pub fn catalog(
    events: &[LogEvent],
    first_id: u64,
) -> (Vec<Item>, std::collections::HashMap<String, usize>) {
    let mut index = std::collections::HashMap::new();
    let mut items = Vec::new();
    for e in events {
        if !index.contains_key(&e.item) {
            index.insert(e.item.clone(), items.len());
            items.push(Item {
                id: first_id + items.len() as u64,
                features: e.item_features.clone(),
                active: true,
                title: String::new(),
            });
        }
    }
    (items, index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let text = "user,item,reward,time,item_features,user_features\n\
                    u1,a,1,10,cat=x;brand=y,age=30\n\
                    u2,b,0,10,,\n";
        let ev = parse(text).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].item_features, vec!["cat=x", "brand=y"]);
        assert_eq!(ev[0].user_features, vec![("age".into(), "30".into())]);
        let dir = std::env::temp_dir().join(format!("freshet-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("log.csv");
        write(&p, &ev).unwrap();
        assert_eq!(read(&p).unwrap(), ev);
        std::fs::remove_dir_all(&dir).unwrap();
        let err = |t: &str| format!("{:#}", parse(t).unwrap_err());
        assert!(err("user,item,time\n").contains("\"reward\""));
        assert!(err("user,item,reward,time\nu,a,1,5\nu,b,1,4\n").contains("line 3: time"));
        assert!(err("user,item,reward,time\nu,a,-1,5\n").contains("line 2: reward"));
        assert!(err("user,item,reward,time\nu,,1,5\n").contains("line 2: item"));
        assert!(err("user,item,reward,time\nu,a,1\n").contains("line 2: 3 fields"));
        let (items, index) = catalog(&ev, 100);
        assert_eq!(items.len(), 2);
        assert_eq!(items[index["b"]].id, 101);
    }
}
