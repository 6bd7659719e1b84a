//! `freshet.gateway.v1.Gateway`: Rank from one pinned model version, catalog upserts,
//! lookups for debugging.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_client::PsClient;
use freshet_model::{self as model, Params, UserInput};
use freshet_proto::gateway::v1::{
    gateway_server::Gateway, Exploration, FeedbackRequest, FeedbackResponse, LookupRequest,
    LookupResponse, RankRequest, RankResponse, RankedItem, RecommendRequest, StatusRequest,
    StatusResponse, UpsertItemsRequest, UpsertItemsResponse, UserContext,
};
use rand::{Rng, SeedableRng};
use tonic::{Request, Response, Status, Streaming};

use super::ann::AnnState;
use super::feedback::{FeedbackPipeline, SealTracker};
use super::impressions::{now_ms, ImpressionLog};
use super::recommend::{Candidate, Retrieval};
use super::replica::{serving, Published, Version};
use super::{GatewayConfig, GatewayError};
use freshet_proto::catalog::{validate_item, validate_set, ITEMS_PER_CALL_MAX, SETS_PER_CALL_MAX};
use freshet_proto::ps::v1::{ImpressionRecord, ShownSlot};
use freshet_proto::FieldError;

/// How long Rank waits for its `min_epoch` to be served. A Feedback answer's sealed
/// epoch reaches a gateway's replica within tens of milliseconds (the freshness figure),
/// so this only runs out when the gateway is cut off from its shards or the epoch is bogus.
pub const MIN_EPOCH_WAIT: Duration = Duration::from_secs(2);

/// The Gateway service. Cheap to clone (shared state behind `Arc`s).
#[derive(Clone)]
pub struct GatewayService {
    pub(crate) cfg: Arc<GatewayConfig>,
    pub(crate) client: Arc<PsClient>,
    pub(crate) published: Arc<Published>,
    /// Where served impressions go (the shards; nothing kept here).
    pub(crate) impressions: Arc<ImpressionLog>,
    /// Feedback: join, dedup, train, wait for the seal.
    pub(crate) feedback: FeedbackPipeline,
    /// Recommend's approximate index, rebuilt in the background ([`crate::ann`]).
    pub(crate) ann: Arc<AnnState>,
    stopping: Arc<AtomicBool>,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Status {
    GatewayError::Invalid(FieldError::new(field, reason)).into()
}

impl GatewayService {
    pub fn new(
        cfg: GatewayConfig,
        client: Arc<PsClient>,
        published: Arc<Published>,
        seals: Arc<SealTracker>,
        impressions: Arc<ImpressionLog>,
    ) -> Self {
        let cfg = Arc::new(cfg);
        let stopping = Arc::new(AtomicBool::new(false));
        let feedback = FeedbackPipeline::new(
            Arc::clone(&cfg),
            Arc::clone(&client),
            Arc::clone(&published),
            Arc::clone(&impressions),
            seals,
            Arc::clone(&stopping),
        );
        GatewayService {
            impressions,
            feedback,
            cfg,
            client,
            published,
            ann: Arc::default(),
            stopping,
        }
    }

    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// The version to serve from, or UNAVAILABLE while bootstrapping.
    pub(crate) fn version(&self) -> Result<Arc<Version>, Status> {
        serving(&self.published, &self.stopping)
    }

    /// The serving version once it is at least `min_epoch` (read your own click): waits
    /// at most [`MIN_EPOCH_WAIT`] (tonic ends the call sooner if its deadline is shorter),
    /// never answers from an older version.
    async fn version_at_least(&self, min_epoch: u64) -> Result<Arc<Version>, Status> {
        let version = self.version()?;
        if version.epoch >= min_epoch {
            return Ok(version);
        }
        let mut rx = self.published.watch();
        let reached = tokio::time::timeout(MIN_EPOCH_WAIT, rx.wait_for(|e| *e >= min_epoch)).await;
        let version = self.version()?;
        if version.epoch >= min_epoch {
            return Ok(version);
        }
        metrics::counter!(crate::metrics::MIN_EPOCH_MISSED).increment(1);
        Err(Status::from(GatewayError::unavailable(format!(
            "min_epoch: epoch {min_epoch} is not served yet (serving {} after waiting {} ms{}); retry",
            version.epoch,
            MIN_EPOCH_WAIT.as_millis(),
            if matches!(reached, Ok(Err(_))) { ", replica stopping" } else { "" }
        ))))
    }

    fn validate_rank(&self, r: &RankRequest) -> Result<(UserInput, f32, f32), Status> {
        let n = r.candidates.len();
        if n == 0 || n > self.cfg.candidates_max {
            return Err(invalid(
                "candidates",
                format!("must hold 1..={} item ids", self.cfg.candidates_max),
            ));
        }
        let kmax = (self.cfg.slots_max as usize).min(n);
        if r.k == 0 || r.k as usize > kmax {
            return Err(invalid(
                "k",
                format!("must be 1..={kmax} (candidates and the server's slot limit)"),
            ));
        }
        let mut seen = HashSet::with_capacity(n);
        for (i, id) in r.candidates.iter().enumerate() {
            if !seen.insert(*id) {
                return Err(invalid(
                    format!("candidates[{i}]"),
                    format!("item {id} is listed twice"),
                ));
            }
        }
        self.validate_context(r.user.as_ref(), r.exploration)
    }

    /// The user and exploration of a Rank or Recommend: (input, temperature, epsilon).
    fn validate_context(
        &self,
        user: Option<&UserContext>,
        exploration: Option<Exploration>,
    ) -> Result<(UserInput, f32, f32), Status> {
        let e = exploration.unwrap_or_default();
        let temperature = if e.temperature == 0.0 {
            self.cfg.temperature_default
        } else {
            e.temperature
        };
        if !(self.cfg.temperature_min..=self.cfg.temperature_max).contains(&temperature) {
            return Err(invalid(
                "exploration.temperature",
                format!(
                    "must be in [{}, {}] (0 for the default {})",
                    self.cfg.temperature_min,
                    self.cfg.temperature_max,
                    self.cfg.temperature_default
                ),
            ));
        }
        let epsilon = if e.epsilon == 0.0 {
            self.cfg.epsilon_default
        } else {
            e.epsilon
        };
        if !(0.0..=self.cfg.epsilon_max).contains(&epsilon) {
            return Err(invalid(
                "exploration.epsilon",
                format!("must be in [0, {}]", self.cfg.epsilon_max),
            ));
        }
        let user = user.cloned().unwrap_or_default();
        let mut fields: Vec<(&str, &str)> = user
            .categorical
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        fields.sort_unstable();
        let input = UserInput::new(fields, &user.numeric, &user.user_id)
            .and_then(|input| input.with_query(&user.query))
            .map_err(|e| Status::from(GatewayError::Invalid(e)))?;
        Ok((input, temperature, epsilon))
    }
}

/// How one Rank samples its slots.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub k: usize,
    pub temperature: f32,
    pub epsilon: f32,
    pub seed: u64,
}

/// What a call ranks: the caller's candidates (Rank), or the catalog's best by score
/// (Recommend).
pub enum Source {
    Candidates(Vec<u64>),
    Retrieve(Retrieval),
}

/// What one call's forward pass gave: every candidate's score and lexical match level
/// (empty without a query), and the sampled slots.
pub struct Ranked {
    pub scores: Vec<f32>,
    pub lexical: Vec<u8>,
    pub slots: Vec<model::Slot>,
}

/// Each of `ids` with its catalog entry at `version`.
///
/// # Errors
/// NOT_FOUND naming the first candidate that is not an active catalog item.
pub fn catalog_entries<'v>(
    version: &'v Version,
    ids: &[u64],
) -> Result<Vec<Candidate<'v>>, Status> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| match Candidate::of(version, *id) {
            Some(c) => Ok(c),
            None => Err(Status::from(GatewayError::not_found(format!(
                "candidates[{i}]: item {id} is not in the catalog (or inactive) at epoch {}",
                version.epoch
            )))),
        })
        .collect()
}

/// Scores every candidate and samples the slots: the shared forward pass on one version
/// (the scorer's). One scorer per call: the candidates' shared feature rows, crosses and
/// level weights are read once; each candidate's own row and β + ρ come from the item
/// index where it holds them.
pub fn rank_on(
    scorer: &mut model::Scorer<'_, Version>,
    candidates: &[Candidate<'_>],
    sampling: Sampling,
) -> Ranked {
    let Sampling {
        k,
        temperature,
        epsilon,
        seed,
    } = sampling;
    let query = &scorer.user().query;
    let mut scores = Vec::with_capacity(candidates.len());
    let mut lexical = Vec::new();
    for c in candidates {
        let level = model::query::lexical_level(query, &c.info.title_terms);
        if !query.is_empty() {
            lexical.push(level);
        }
        scores.push(c.score(scorer, level));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t = model::relative_temperature(&scores, temperature);
    let slots = model::sample_slots(&scores, k, t, epsilon, || rng.random::<f64>());
    Ranked {
        scores,
        lexical,
        slots,
    }
}

/// The most values one Lookup answers (64 MiB of f32, the gRPC message bound).
pub const LOOKUP_VALUES_MAX: usize = 16 << 20;

impl GatewayService {
    /// Ranks from `source` at `version` and logs the impression: the path Rank and
    /// Recommend share after validation.
    async fn serve(
        &self,
        version: Arc<Version>,
        mut input: UserInput,
        (temperature, epsilon): (f32, f32),
        k: usize,
        source: Source,
    ) -> Result<RankResponse, Status> {
        let spec = version.model.clone().map_err(|e| {
            Status::from(GatewayError::failed_precondition(format!(
                "model tables: {}",
                e.reason
            )))
        })?;
        // The user's recent clicks at this version (kept in the impression for training).
        input.read_history(&spec, version.as_ref());
        let seed: u64 = rand::rng().random();
        let ann = Arc::clone(&self.ann);
        // The forward pass (and retrieval's pass over the catalog) is CPU work: off the
        // async runtime.
        let (version, input, candidates, forward) = tokio::task::spawn_blocking(move || {
            let user = model::user_state(&spec, version.as_ref(), &input);
            let found = match &source {
                Source::Candidates(c) => catalog_entries(&version, c)?,
                Source::Retrieve(r) => r.retrieve(&version, &spec, &user, Some(&ann), seed),
            };
            if found.is_empty() {
                return Err(Status::from(GatewayError::not_found(format!(
                    "filter: no active catalog item passes it at epoch {}",
                    version.epoch
                ))));
            }
            let sampling = Sampling {
                k: k.min(found.len()),
                temperature,
                epsilon,
                seed,
            };
            let mut scorer = model::Scorer::new(&spec, version.as_ref(), &user);
            let out = rank_on(&mut scorer, &found, sampling);
            let candidates: Vec<u64> = match source {
                Source::Candidates(c) => c,
                Source::Retrieve(_) => found.iter().map(|c| c.id).collect(),
            };
            drop((scorer, found));
            Ok((version, input, candidates, out))
        })
        .await
        .map_err(|e| Status::from(GatewayError::internal(format!("rank task: {e}"))))??;
        let Ranked {
            scores,
            lexical,
            slots,
        } = forward;
        let items: Vec<RankedItem> = slots
            .iter()
            .enumerate()
            .map(|(pos, s)| RankedItem {
                item_id: candidates[s.index],
                score: scores[s.index],
                propensity: s.propensity,
                position: pos as u32 + 1,
            })
            .collect();
        let ranked = candidates.len() as u32;
        // Durable shortly after this answer (write-behind; see `impressions`). The
        // candidates are what the slots were sampled from (for Recommend the retrieved
        // set), so training's propensities are exact given that set.
        let impression_id = self
            .impressions
            .push(ImpressionRecord {
                // The log names it (`ImpressionLog::push`).
                id: String::new(),
                epoch: version.epoch,
                user_feature_ids: input.feature_ids,
                has_user_id: input.user_id.is_some(),
                user_id_row: input.user_id.unwrap_or(0),
                numeric: input.numeric,
                history: input.history,
                query_terms: input.query,
                candidates,
                lexical,
                shown: items
                    .iter()
                    .map(|i| ShownSlot {
                        item_id: i.item_id,
                        position: i.position,
                        propensity: i.propensity,
                    })
                    .collect(),
                created_ms: now_ms(),
            })
            .map_err(|why| Status::from(GatewayError::Overloaded(format!("{why}; retry"))))?;
        Ok(RankResponse {
            items,
            epoch: version.epoch,
            impression_id,
            candidates: ranked,
        })
    }
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    #[tracing::instrument(skip_all, fields(candidates, k))]
    async fn rank(&self, request: Request<RankRequest>) -> Result<Response<RankResponse>, Status> {
        let start = Instant::now();
        let mut r = request.into_inner();
        let version = self.version_at_least(r.min_epoch).await?;
        if !r.candidate_set.is_empty() {
            if !r.candidates.is_empty() {
                return Err(invalid(
                    "candidate_set",
                    "give candidates or candidate_set, not both",
                ));
            }
            let set = version.candidate_set(&r.candidate_set).ok_or_else(|| {
                Status::from(GatewayError::not_found(format!(
                    "candidate_set: no set {:?} at epoch {}",
                    r.candidate_set, version.epoch
                )))
            })?;
            if set.len() > self.cfg.candidates_max {
                return Err(invalid(
                    "candidate_set",
                    format!(
                        "the set holds {} items; Rank takes at most {}",
                        set.len(),
                        self.cfg.candidates_max
                    ),
                ));
            }
            r.candidates = set.to_vec();
        }
        tracing::Span::current()
            .record("candidates", r.candidates.len())
            .record("k", r.k);
        let (input, temperature, epsilon) = self.validate_rank(&r)?;
        let out = self
            .serve(
                version,
                input,
                (temperature, epsilon),
                r.k as usize,
                Source::Candidates(r.candidates),
            )
            .await?;
        metrics::histogram!(crate::metrics::GATEWAY_RANK_SECONDS)
            .record(start.elapsed().as_secs_f64());
        Ok(Response::new(out))
    }

    #[tracing::instrument(skip_all, fields(retrieve, k))]
    async fn recommend(
        &self,
        request: Request<RecommendRequest>,
    ) -> Result<Response<RankResponse>, Status> {
        let start = Instant::now();
        let r = request.into_inner();
        let (retrieval, k) = Retrieval::validate(&r, &self.cfg)
            .map_err(|e| Status::from(GatewayError::Invalid(e)))?;
        tracing::Span::current()
            .record("retrieve", retrieval.n)
            .record("k", k);
        let (input, temperature, epsilon) =
            self.validate_context(r.user.as_ref(), r.exploration)?;
        let version = self.version_at_least(r.min_epoch).await?;
        let out = self
            .serve(
                version,
                input,
                (temperature, epsilon),
                k,
                Source::Retrieve(retrieval),
            )
            .await?;
        metrics::histogram!(crate::metrics::GATEWAY_RECOMMEND_SECONDS)
            .record(start.elapsed().as_secs_f64());
        Ok(Response::new(out))
    }

    async fn feedback(
        &self,
        request: Request<FeedbackRequest>,
    ) -> Result<Response<FeedbackResponse>, Status> {
        self.feedback
            .handle_feedback(request.into_inner().events)
            .await
    }

    async fn feedback_stream(
        &self,
        request: Request<Streaming<FeedbackRequest>>,
    ) -> Result<Response<FeedbackResponse>, Status> {
        let mut stream = request.into_inner();
        let mut total = FeedbackResponse::default();
        while let Some(batch) = stream.message().await? {
            let r = self
                .feedback
                .handle_feedback(batch.events)
                .await?
                .into_inner();
            total.accepted += r.accepted;
            total.duplicates += r.duplicates;
            total.sealed_epoch = total.sealed_epoch.max(r.sealed_epoch);
        }
        Ok(Response::new(total))
    }

    #[tracing::instrument(skip_all, fields(items))]
    async fn upsert_items(
        &self,
        request: Request<UpsertItemsRequest>,
    ) -> Result<Response<UpsertItemsResponse>, Status> {
        let r = request.into_inner();
        tracing::Span::current().record("items", r.items.len());
        if (r.items.is_empty() && r.sets.is_empty())
            || r.items.len() > ITEMS_PER_CALL_MAX
            || r.sets.len() > SETS_PER_CALL_MAX
        {
            return Err(invalid(
                "items",
                format!(
                    "must hold 1..={ITEMS_PER_CALL_MAX} items and at most {SETS_PER_CALL_MAX} sets"
                ),
            ));
        }
        for (i, item) in r.items.iter().enumerate() {
            validate_item(item, &format!("items[{i}]"))?;
        }
        for (i, set) in r.sets.iter().enumerate() {
            validate_set(set, &format!("sets[{i}]"))?;
        }
        self.client
            .upsert_items(&r.items, &r.sets)
            .await
            .map_err(|e| match e {
                freshet_client::ClientError::Status(s) => Status::from(GatewayError::Upstream(s)),
                other => Status::from(GatewayError::unavailable(other.to_string())),
            })?;
        Ok(Response::new(UpsertItemsResponse {
            upserted: r.items.len() as u32,
            sets: r.sets.len() as u32,
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let v = self.published.current();
        let ann = self.ann.current();
        let (durable_p50, durable_max) = self.impressions.window_ms();
        let mut fresh: Vec<f64> = self.feedback.freshness.lock().iter().copied().collect();
        fresh.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
        Ok(Response::new(StatusResponse {
            epoch: v.as_ref().map_or(0, |v| v.epoch),
            epoch_lag_ms: v
                .as_ref()
                .filter(|v| v.proposed_at_ms > 0)
                .map_or(0, |v| now_ms().saturating_sub(v.proposed_at_ms)),
            impressions: self.impressions.queued() as u64,
            impression_durable_p50_ms: durable_p50,
            impression_durable_max_ms: durable_max,
            impressions_lost: self.impressions.lost() as u64,
            impression_reads: self.impressions.shard_reads(),
            freshness_p50_ms: fresh.get(fresh.len() / 2).copied().unwrap_or(0.0),
            freshness_max_ms: fresh.last().copied().unwrap_or(0.0),
            shards: v.as_ref().map_or(0, |v| v.shard_count()),
            catalog_items: v
                .as_ref()
                .map_or(0, |v| v.shards.iter().map(|s| s.item_count() as u64).sum()),
            ann_epoch: ann.as_ref().map_or(0, |a| a.epoch),
            ann_items: ann.as_ref().map_or(0, |a| a.items as u64),
            ann_build_ms: ann.as_ref().map_or(0, |a| a.build_ms),
            recommend_ann: self.ann.searched.load(Ordering::Relaxed),
            recommend_ann_fallbacks: self.ann.fell_back.load(Ordering::Relaxed),
        }))
    }

    async fn lookup(
        &self,
        request: Request<LookupRequest>,
    ) -> Result<Response<LookupResponse>, Status> {
        let r = request.into_inner();
        if r.ids.is_empty() || r.ids.len() > 10_000 {
            return Err(invalid("ids", "must hold 1..=10000 ids"));
        }
        let version = self.version()?;
        let specs = version.table_specs();
        let Some(spec) = specs.iter().find(|t| t.name == r.table) else {
            return Err(invalid("table", format!("unknown table {:?}", r.table)));
        };
        let dim = spec.dim as usize;
        let dense = spec.kind == freshet_proto::ps::v1::TableKind::Dense as i32;
        // Every check before the answer is allocated: ids × dim is sized by the caller
        // (10,000 ids of a large dense tensor once asked for ~167 GB and aborted).
        if dense && r.ids != [0] {
            return Err(invalid("ids", "a dense tensor has the single id 0"));
        }
        let len = r.ids.len().saturating_mul(dim);
        if len > LOOKUP_VALUES_MAX {
            return Err(invalid(
                "ids",
                format!(
                    "{} ids of dim {dim} are {len} values; at most {LOOKUP_VALUES_MAX} per call",
                    r.ids.len()
                ),
            ));
        }
        let mut values = vec![0.0f32; len];
        if dense {
            values.copy_from_slice(version.dense(&r.table));
        } else {
            for (i, id) in r.ids.iter().enumerate() {
                version.read(&r.table, *id, &mut values[i * dim..(i + 1) * dim]);
            }
        }
        Ok(Response::new(LookupResponse {
            epoch: version.epoch,
            dim: dim as u32,
            values,
        }))
    }
}
