//! `freshet rank`, `freshet recommend`, `freshet feedback` and `freshet status --json`: one call each, for
//! people at a terminal and for scripts (`--json`).

use std::path::Path;

use anyhow::{bail, Context};
use freshet_client::gateway::{Gateway, RetryPolicy};
use freshet_proto::admin::v1::{ClusterStatusResponse, ShardStatus};
use freshet_proto::gateway::v1::{
    gateway_client::GatewayClient, Exploration, FeedbackEvent, ItemFilter, RankRequest,
    RankResponse, RecommendRequest, Reward, RewardKind, UserContext,
};
use serde_json::json;

use freshet_local::ClusterFile;

/// Addresses of `role` processes in `<data_dir>/cluster.json`.
///
/// # Errors
/// No such file (the cluster is not running there) or no process of that role.
pub fn addrs_of(data_dir: &Path, role: &str) -> anyhow::Result<Vec<String>> {
    let path = data_dir.join("cluster.json");
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading {} (is `freshet up` running with --data-dir {}? or pass the address)",
            path.display(),
            data_dir.display()
        )
    })?;
    let f: ClusterFile =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    let v: Vec<String> = f
        .nodes
        .into_iter()
        .filter(|n| n.role == role)
        .map(|n| n.grpc)
        .collect();
    if v.is_empty() {
        bail!("{} lists no running {role}", path.display());
    }
    Ok(v)
}

/// The gateway to call: `given`, else the first gateway of `<data_dir>/cluster.json`.
///
/// # Errors
/// As [`addrs_of`].
pub fn gateway_addr(given: Option<String>, data_dir: &Path) -> anyhow::Result<String> {
    match given {
        Some(g) => Ok(g),
        None => Ok(addrs_of(data_dir, "gateway")?.swap_remove(0)),
    }
}

async fn gateway(addr: &str) -> anyhow::Result<GatewayClient<tonic::transport::Channel>> {
    let ch = freshet_client::endpoint(addr)?;
    Ok(GatewayClient::new(ch))
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// One attempt (a command line reports the gateway's answer as it is).
fn once(addr: &str) -> anyhow::Result<Gateway> {
    Ok(Gateway::connect(addr, RetryPolicy::NEVER)?)
}

fn client_error(e: freshet_client::ClientError) -> anyhow::Error {
    match e {
        freshet_client::ClientError::Status(s) => status_error(s),
        other => other.into(),
    }
}

/// The flags `freshet rank` and `freshet recommend` share: who asks, how to explore,
/// how new an answer must be, how to print it.
#[derive(clap::Args, Debug, Clone)]
pub struct AskFlags {
    /// User feature field=value (repeatable).
    #[arg(long = "feature")]
    pub features: Vec<String>,
    /// Numeric user features (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub numeric: Vec<f32>,
    #[arg(long, default_value = "")]
    pub user_id: String,
    /// Search query the user typed (empty: none).
    #[arg(long, default_value = "")]
    pub query: String,
    /// 0: the server default.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// 0: the server default.
    #[arg(long, default_value_t = 0.0)]
    pub epsilon: f32,
    /// Answer from a version at least this new (a Feedback answer's sealed epoch).
    #[arg(long, default_value_t = 0)]
    pub min_epoch: u64,
    #[arg(long)]
    pub json: bool,
}

impl AskFlags {
    fn user(&self) -> anyhow::Result<UserContext> {
        let mut user = user_context(&self.features, self.numeric.clone(), self.user_id.clone())?;
        user.query = self.query.clone();
        Ok(user)
    }

    fn exploration(&self) -> Exploration {
        Exploration {
            temperature: self.temperature,
            epsilon: self.epsilon,
        }
    }
}

/// Arguments of `freshet rank`.
pub struct RankArgs {
    pub gateway: String,
    pub candidates: Vec<u64>,
    pub candidate_set: String,
    pub k: u32,
    pub ask: AskFlags,
}

/// A user context from `field=value` features, numeric features and a user id.
fn user_context(
    features: &[String],
    numeric: Vec<f32>,
    user_id: String,
) -> anyhow::Result<UserContext> {
    let mut categorical = std::collections::HashMap::new();
    for f in features {
        let Some((k, v)) = f.split_once('=') else {
            bail!("--feature {f:?}: expected field=value");
        };
        categorical.insert(k.to_string(), v.to_string());
    }
    Ok(UserContext {
        categorical,
        numeric,
        user_id,
        query: String::new(),
    })
}

/// Prints a Rank or Recommend answer as a table or one JSON line.
fn print_ranked(r: &RankResponse, json: bool) {
    if json {
        let items: Vec<_> = r
            .items
            .iter()
            .map(|i| {
                json!({"item_id": i.item_id, "position": i.position,
                       "score": i.score, "propensity": i.propensity})
            })
            .collect();
        println!(
            "{}",
            json!({"epoch": r.epoch, "impression_id": r.impression_id,
                   "candidates": r.candidates, "items": items})
        );
    } else {
        println!(
            "impression {}  epoch {}  from {} candidates",
            r.impression_id, r.epoch, r.candidates
        );
        println!("pos  item        score      propensity");
        for i in &r.items {
            println!(
                "{:<4} {:<11} {:<10.4} {:.4}",
                i.position, i.item_id, i.score, i.propensity
            );
        }
    }
}

/// One Rank call.
///
/// # Errors
/// A malformed feature, the gateway's error (code and message).
pub async fn rank(a: RankArgs) -> anyhow::Result<()> {
    let gw = once(&a.gateway)?;
    let r = gw
        .rank(&RankRequest {
            user: Some(a.ask.user()?),
            candidates: a.candidates,
            k: a.k,
            exploration: Some(a.ask.exploration()),
            candidate_set: a.candidate_set,
            min_epoch: a.ask.min_epoch,
        })
        .await
        .map_err(client_error)?;
    print_ranked(&r, a.ask.json);
    Ok(())
}

/// Arguments of `freshet recommend`.
pub struct RecommendArgs {
    pub gateway: String,
    pub k: u32,
    pub retrieve: u32,
    pub require: Vec<String>,
    pub exclude: Vec<String>,
    pub exclude_items: Vec<u64>,
    /// Score every item even where the gateway would use its approximate index.
    pub exact: bool,
    /// Random catalog items added to the retrieved set (None: the gateway's default).
    pub explore: Option<u32>,
    pub ask: AskFlags,
}

/// One Recommend call.
///
/// # Errors
/// A malformed feature, the gateway's error (code and message).
pub async fn recommend(a: RecommendArgs) -> anyhow::Result<()> {
    let gw = once(&a.gateway)?;
    let r = gw
        .recommend(&RecommendRequest {
            user: Some(a.ask.user()?),
            k: a.k,
            retrieve: a.retrieve,
            exploration: Some(a.ask.exploration()),
            filter: Some(ItemFilter {
                require_features: a.require,
                exclude_features: a.exclude,
                exclude_items: a.exclude_items,
            }),
            min_epoch: a.ask.min_epoch,
            exact: a.exact,
            explore: a.explore,
        })
        .await
        .map_err(client_error)?;
    print_ranked(&r, a.ask.json);
    Ok(())
}

/// Arguments of `freshet feedback`.
pub struct FeedbackArgs {
    pub gateway: String,
    pub impression: String,
    pub item: u64,
    pub position: u32,
    pub click: bool,
    pub purchase: bool,
    pub event_id: Option<String>,
    pub json: bool,
}

/// One Feedback call (one event).
///
/// # Errors
/// The gateway's error (code and message).
pub async fn feedback(a: FeedbackArgs) -> anyhow::Result<()> {
    let mut rewards = Vec::new();
    if a.click {
        rewards.push(Reward {
            kind: RewardKind::Click as i32,
            weight: 0.0,
        });
    }
    if a.purchase {
        rewards.push(Reward {
            kind: RewardKind::Purchase as i32,
            weight: 0.0,
        });
    }
    let event_id = a
        .event_id
        .unwrap_or_else(|| format!("cli-{:016x}", rand::random::<u64>()));
    let gw = once(&a.gateway)?;
    let r = gw
        .feedback(&[FeedbackEvent {
            event_id: event_id.clone(),
            impression_id: a.impression,
            item_id: a.item,
            position: a.position,
            rewards,
            event_time_ms: 0,
        }])
        .await
        .map_err(client_error)?;
    let steps: Vec<_> = r
        .steps
        .iter()
        .map(|c| json!({"inc": c.inc, "step": c.step}))
        .collect();
    if a.json {
        println!(
            "{}",
            json!({"event_id": event_id, "accepted": r.accepted, "duplicates": r.duplicates,
                   "sealed_epoch": r.sealed_epoch, "steps": steps})
        );
    } else {
        println!(
            "event {event_id}: {} (sealed in epoch {}, step {})",
            if r.duplicates > 0 {
                "already trained on"
            } else {
                "accepted"
            },
            r.sealed_epoch,
            r.steps
                .first()
                .map_or("-".to_string(), |c| format!("{}/{}", c.inc, c.step))
        );
    }
    Ok(())
}

fn shard_json(name: &str, sh: &ShardStatus) -> serde_json::Value {
    json!({
        "shard": name,
        "leader": sh.leader_id,
        "voters": sh.voters,
        "replicas": sh.replicas.iter().map(|r| json!({
            "node": r.node_id, "role": r.role, "term": r.term,
            "commit_index": r.commit_index, "applied_index": r.applied_index,
            "sealed_epoch": r.sealed_epoch, "rows": r.row_count,
            "impressions": r.impressions, "impression_bytes": r.impression_bytes,
            "impressions_expired": r.impressions_expired,
            "impressions_evicted": r.impressions_evicted,
            "impression_ttl_ms": r.impression_ttl_ms,
            "impression_bytes_max": r.impression_bytes_max,
            "tables": r.tables.iter().map(|t| json!({
                "table": t.table, "rows": t.rows, "bytes": t.bytes,
                "expired": t.expired, "evicted": t.evicted,
                "admitted": t.admitted, "dropped": t.dropped,
                "allocated_bytes": t.allocated_bytes, "snapshot_copies": t.snapshot_copies,
            })).collect::<Vec<_>>(),
            "checksum": format!("{:016x}", r.checksum),
        })).collect::<Vec<_>>(),
    })
}

/// Status of every gateway listed in `<data_dir>/cluster.json` (None: unreachable).
pub async fn gateway_status(
    data_dir: &Path,
) -> Vec<(String, Option<freshet_proto::gateway::v1::StatusResponse>)> {
    let Ok(addrs) = addrs_of(data_dir, "gateway") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for a in addrs {
        let r = async {
            let mut gw = gateway(&a).await.ok()?;
            let mut req = tonic::Request::new(freshet_proto::gateway::v1::StatusRequest {});
            req.set_timeout(std::time::Duration::from_secs(2));
            gw.status(req).await.ok().map(|r| r.into_inner())
        }
        .await;
        out.push((a, r));
    }
    out
}

/// `freshet status --json`.
pub fn status_json(
    s: &ClusterStatusResponse,
    sealed_epoch: Option<u64>,
    gateways: &[(String, Option<freshet_proto::gateway::v1::StatusResponse>)],
    model: Option<&freshet_proto::ps::v1::ModelConfig>,
) -> serde_json::Value {
    json!({
        "shard_count": s.shard_count,
        "model": model.map(model_json),
        "sealed_epoch": sealed_epoch,
        "gateways": gateways.iter().map(|(addr, g)| match g {
            Some(g) => json!({"addr": addr, "epoch": g.epoch, "epoch_lag_ms": g.epoch_lag_ms,
                "freshness_p50_ms": g.freshness_p50_ms, "freshness_max_ms": g.freshness_max_ms,
                "impressions": g.impressions,
                "impression_durable_p50_ms": g.impression_durable_p50_ms,
                "impression_durable_max_ms": g.impression_durable_max_ms,
                "impressions_lost": g.impressions_lost,
                "impression_reads": g.impression_reads,
                "catalog_items": g.catalog_items,
                "ann": {"epoch": g.ann_epoch, "items": g.ann_items, "build_ms": g.ann_build_ms,
                    "recommend_calls": g.recommend_ann,
                    "fallbacks": g.recommend_ann_fallbacks}}),
            None => json!({"addr": addr, "reachable": false}),
        }).collect::<Vec<_>>(),
        "nodes": s.nodes.iter().map(|n| json!({"id": n.id, "addr": n.addr, "reachable": n.reachable})).collect::<Vec<_>>(),
        "shards": s.shards.iter().map(|sh| shard_json(&sh.shard.to_string(), sh)).collect::<Vec<_>>(),
        "meta": s.meta.as_ref().map(|m| shard_json("meta", m)),
    })
}

/// The cluster's model spec as `freshet status --json` and `freshet model --json` print it.
pub fn model_json(m: &freshet_proto::ps::v1::ModelConfig) -> serde_json::Value {
    json!({"dim": m.dim, "tower": m.tower, "numeric_max": m.numeric_max,
        "policy_weight": m.actor_weight(),
        "clip": m.clip, "entropy": m.entropy, "value_weight": m.value_weight,
        "reward_weight": m.reward_weight, "choice_weight": m.choice_weight,
        "revision": m.revision,
        "tables": m.tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        "rates": m.tables.iter().map(|t| (t.name.clone(), json!(optimizer_rate(t.optimizer.as_ref()))))
            .collect::<serde_json::Map<_, _>>(),
        "limits": m.tables.iter().filter_map(|t| t.limits.map(|l| (t.name.clone(),
            json!({"ttl_ms": l.ttl_ms, "rows_max": l.rows_max,
                   "admit_after": l.admit_after, "admit_window_ms": l.admit_window_ms,
                   "off": l.off}))))
            .collect::<serde_json::Map<_, _>>()})
}

/// A change for `freshet model`: new loss weights (unset: unchanged) and new learning
/// rates for named tables.
#[derive(Debug, Clone, Default)]
pub struct ModelChange {
    pub policy_weight: Option<f32>,
    pub clip: Option<f32>,
    pub entropy: Option<f32>,
    pub value_weight: Option<f32>,
    pub reward_weight: Option<f32>,
    pub choice_weight: Option<f32>,
    /// (table, learning rate): the table's optimizer keeps its kind and its other
    /// hyper-parameters (FTRL's rate is its alpha).
    pub rates: Vec<(String, f32)>,
    /// (table, limits): the table's row limits (the server validates them).
    pub limits: Vec<(String, freshet_proto::ps::v1::RowLimits)>,
}

/// The learning rate of an optimizer (FTRL's alpha), to edit.
fn rate_mut(o: &mut freshet_proto::ps::v1::OptimizerConfig) -> Option<&mut f32> {
    use freshet_proto::ps::v1::optimizer_config::Kind;
    Some(match o.kind.as_mut()? {
        Kind::Sgd(c) => &mut c.lr,
        Kind::Adagrad(c) => &mut c.lr,
        Kind::Adam(c) => &mut c.lr,
        Kind::Ftrl(c) => &mut c.alpha,
        // No rate: its rows are counts, not weights.
        Kind::Counts(_) => return None,
    })
}

/// The learning rate of an optimizer (FTRL's alpha).
pub fn optimizer_rate(o: Option<&freshet_proto::ps::v1::OptimizerConfig>) -> Option<f32> {
    let mut o = *o?;
    rate_mut(&mut o).copied()
}

impl ModelChange {
    pub fn is_empty(&self) -> bool {
        self.policy_weight.is_none()
            && self.clip.is_none()
            && self.entropy.is_none()
            && self.value_weight.is_none()
            && self.reward_weight.is_none()
            && self.choice_weight.is_none()
            && self.rates.is_empty()
            && self.limits.is_empty()
    }

    /// `m` with this change (the revision kept: it is the compare-and-set).
    ///
    /// # Errors
    /// A rate names a table the model does not have, or one without an optimizer.
    pub fn apply(
        &self,
        m: &freshet_proto::ps::v1::ModelConfig,
    ) -> anyhow::Result<freshet_proto::ps::v1::ModelConfig> {
        let mut m = m.clone();
        if let Some(w) = self.policy_weight {
            m.policy_weight = Some(w);
        }
        m.clip = self.clip.unwrap_or(m.clip);
        m.entropy = self.entropy.unwrap_or(m.entropy);
        m.value_weight = self.value_weight.unwrap_or(m.value_weight);
        m.reward_weight = self.reward_weight.unwrap_or(m.reward_weight);
        m.choice_weight = self.choice_weight.unwrap_or(m.choice_weight);
        for (table, lr) in &self.rates {
            let Some(t) = m.tables.iter_mut().find(|t| t.name == *table) else {
                let names: Vec<&str> = m.tables.iter().map(|t| t.name.as_str()).collect();
                anyhow::bail!(
                    "--rate {table}: no such table (the model has {})",
                    names.join(", ")
                );
            };
            match t.optimizer.as_mut().and_then(rate_mut) {
                Some(r) => *r = *lr,
                None => anyhow::bail!(
                    "--rate {table}: the table has no rate (a counts table, or no optimizer)"
                ),
            }
        }
        for (table, limits) in &self.limits {
            let Some(t) = m.tables.iter_mut().find(|t| t.name == *table) else {
                let names: Vec<&str> = m.tables.iter().map(|t| t.name.as_str()).collect();
                anyhow::bail!(
                    "--limits {table}: no such table (the model has {})",
                    names.join(", ")
                );
            };
            t.limits = Some(*limits);
        }
        Ok(m)
    }
}

/// `freshet model`: prints the cluster's model spec, or changes its loss weights or
/// table rates (read, edit, compare-and-set on the revision) and prints the committed
/// spec.
///
/// # Errors
/// No node answered; the cluster has no model spec; the server refused the change (the
/// message names the field).
pub async fn model(
    client: &freshet_client::PsClient,
    set: ModelChange,
    json: bool,
) -> anyhow::Result<()> {
    let cur = client.get_model().await.map_err(|e| match e {
        freshet_client::ClientError::Status(s) if s.code() == tonic::Code::NotFound => {
            anyhow::anyhow!(
                "{} (hint: the cluster was bootstrapped without one)",
                s.message()
            )
        }
        e => anyhow::anyhow!("reading the model spec: {e}"),
    })?;
    let m = if set.is_empty() {
        cur
    } else {
        client
            .set_model(set.apply(&cur)?)
            .await
            .map_err(|e| match e {
                freshet_client::ClientError::Status(s) => anyhow::anyhow!("{}", s.message()),
                e => anyhow::anyhow!("changing the model spec: {e}"),
            })?
    };
    if json {
        println!("{}", model_json(&m));
    } else {
        println!("{}", model_line(&m));
    }
    Ok(())
}

/// One line describing the cluster's model spec.
pub fn model_line(m: &freshet_proto::ps::v1::ModelConfig) -> String {
    let tables: Vec<String> = m
        .tables
        .iter()
        .map(|t| match optimizer_rate(t.optimizer.as_ref()) {
            Some(lr) => format!("{} (rate {lr})", t.name),
            None => t.name.clone(),
        })
        .collect();
    format!(
        "model (revision {}): dim {}, tower {}, {} numeric, policy weight {}, clip {}, entropy {}, \
         value weight {}, reward weight {}, choice weight {}, tables {}",
        m.revision,
        m.dim,
        m.tower,
        m.numeric_max,
        m.actor_weight(),
        m.clip,
        m.entropy,
        m.value_weight,
        m.reward_weight,
        m.choice_weight,
        tables.join(", ")
    )
}
