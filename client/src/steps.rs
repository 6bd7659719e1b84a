//! Training steps under the frontier-cut protocol (README, "The consistency protocol").
//!
//! A [`StepSession`] is one worker incarnation: it registers with the coordinator, numbers
//! its steps, sends every shard's part of a step (retrying the same (inc, step) until each
//! shard acknowledged it), keeps its frontier (the largest step f with every step <= f
//! acknowledged everywhere) and reports it to the coordinator, which renews the lease
//! and seals it. Once fenced (lease lost) the session refuses to push.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use freshet_proto::admin::v1::admin_client::AdminClient;
use freshet_proto::coord::v1::{
    coordinator_client::CoordinatorClient, ListSealsRequest, ListSealsResponse, RegisterRequest,
    RegisterResponse, ReportFrontierRequest, ReportFrontierResponse,
};
use freshet_proto::ps::v1::{
    parameter_service_client::ParameterServiceClient, DenseGrads, PushStepRequest,
    PushStepResponse, SparseGrads,
};
use freshet_proto::{dense_shard, shard_for, META_GROUP};
use tonic::Code;

use crate::{ClientError, PsClient};

/// One table's gradients of a step (row-major, `grads.len() / ids.len()` per id).
#[derive(Debug, Clone, Default)]
pub struct SparseStep {
    pub table: String,
    pub ids: Vec<u64>,
    pub grads: Vec<f32>,
}

impl PsClient {
    /// Registers a worker incarnation with the coordinator.
    ///
    /// # Errors
    /// The meta group has no leader within the deadline, or refuses (too many workers).
    pub async fn register(&self, name: &str, addr: &str) -> Result<RegisterResponse, ClientError> {
        self.call(Some(META_GROUP), |ch, timeout| {
            let mut req = tonic::Request::new(RegisterRequest {
                name: name.to_string(),
                addr: addr.to_string(),
            });
            req.set_timeout(timeout);
            async move {
                CoordinatorClient::new(ch)
                    .register(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Renews the lease of `inc` and reports its frontier.
    ///
    /// # Errors
    /// FAILED_PRECONDITION once `inc` is fenced; the deadline.
    pub async fn report_frontier(
        &self,
        inc: u64,
        frontier: u64,
    ) -> Result<ReportFrontierResponse, ClientError> {
        self.call(Some(META_GROUP), |ch, timeout| {
            let mut req = tonic::Request::new(ReportFrontierRequest { inc, frontier });
            req.set_timeout(timeout);
            async move {
                CoordinatorClient::new(ch)
                    .report_frontier(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Live workers that take training examples.
    ///
    /// # Errors
    /// No node answered.
    pub async fn list_workers(
        &self,
    ) -> Result<Vec<freshet_proto::coord::v1::WorkerInfo>, ClientError> {
        self.call(None, |ch, timeout| {
            let mut req = tonic::Request::new(freshet_proto::coord::v1::ListWorkersRequest {});
            req.set_timeout(timeout);
            async move {
                CoordinatorClient::new(ch)
                    .list_workers(req)
                    .await
                    .map(|r| r.into_inner().workers)
            }
        })
        .await
    }

    /// The cluster's model spec (stored in the meta group at bootstrap).
    ///
    /// # Errors
    /// NOT_FOUND when the cluster holds none; the deadline.
    pub async fn get_model(&self) -> Result<freshet_proto::ps::v1::ModelConfig, ClientError> {
        self.call(Some(META_GROUP), |ch, timeout| {
            let mut req = tonic::Request::new(freshet_proto::coord::v1::GetModelRequest {});
            req.set_timeout(timeout);
            async move {
                CoordinatorClient::new(ch)
                    .get_model(req)
                    .await
                    .map(|r| r.into_inner().model.unwrap_or_default())
            }
        })
        .await
    }

    /// Changes the cluster's loss weights or table rates: `model` is what
    /// [`PsClient::get_model`] returned with its loss weights (policy_weight, clip, ...) or
    /// a table's optimizer hyper-parameters edited (its revision is the compare-and-set).
    /// Returns the committed spec once every shard took its rates.
    ///
    /// Not retried blindly: a retry of a change that did commit would be refused as
    /// stale, so after an unknown outcome the spec is read again, and a cluster already
    /// holding exactly this change at the next revision counts as success once the spec
    /// is sent back as it is (which commits nothing and hands the rates to the shards
    /// again: the first attempt may have committed without finishing that).
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming the field (a shape or table changed, a weight out of
    /// range); FAILED_PRECONDITION when another change landed first; the deadline.
    pub async fn set_model(
        &self,
        model: freshet_proto::ps::v1::ModelConfig,
    ) -> Result<freshet_proto::ps::v1::ModelConfig, ClientError> {
        let sent = model.clone();
        let r = self.send_model(model).await;
        match r {
            Err(ClientError::Status(s)) if s.code() == tonic::Code::FailedPrecondition => {
                let now = self.get_model().await?;
                let mut expected = sent;
                expected.revision += 1;
                if now == expected {
                    self.send_model(now).await
                } else {
                    Err(ClientError::Status(s))
                }
            }
            other => other,
        }
    }

    async fn send_model(
        &self,
        model: freshet_proto::ps::v1::ModelConfig,
    ) -> Result<freshet_proto::ps::v1::ModelConfig, ClientError> {
        self.call(Some(META_GROUP), |ch, timeout| {
            let mut req = tonic::Request::new(freshet_proto::coord::v1::SetModelRequest {
                model: Some(model.clone()),
            });
            req.set_timeout(timeout);
            async move {
                CoordinatorClient::new(ch)
                    .set_model(req)
                    .await
                    .map(|r| r.into_inner().model.unwrap_or_default())
            }
        })
        .await
    }

    /// Committed seals after `after_epoch` (linearizable, from the meta leader).
    ///
    /// # Errors
    /// The deadline.
    pub async fn list_seals(
        &self,
        after_epoch: u64,
        limit: u32,
    ) -> Result<ListSealsResponse, ClientError> {
        self.call(Some(META_GROUP), |ch, timeout| {
            let mut req = tonic::Request::new(ListSealsRequest { after_epoch, limit });
            req.set_timeout(timeout);
            async move {
                AdminClient::new(ch)
                    .list_seals(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Splits one step by shard: sparse rows by [`shard_for`], dense tensors by
    /// [`dense_shard`]; a shard's rows beyond [`crate::ROWS_PER_CALL`] go into further
    /// parts of the step (part 1, 2, ...; dense tensors ride in part 0). Calls come back
    /// in (shard, part) order.
    ///
    /// # Errors
    /// A sparse part whose grads are not a multiple of its ids.
    pub fn prepare_step(
        &self,
        inc: u64,
        step: u64,
        sparse: &[SparseStep],
        dense: &[(String, Vec<f32>)],
    ) -> Result<Vec<PushStepRequest>, ClientError> {
        let mut parts: BTreeMap<u32, PushStepRequest> = BTreeMap::new();
        let part = |parts: &mut BTreeMap<u32, PushStepRequest>, shard: u32| {
            parts.entry(shard).or_insert_with(|| PushStepRequest {
                shard,
                inc,
                step,
                ..Default::default()
            });
        };
        for s in sparse {
            if s.ids.is_empty() || !s.grads.len().is_multiple_of(s.ids.len()) {
                return Err(ClientError::Invalid(format!(
                    "table {}: grads must be ids.len() * dim values",
                    s.table
                )));
            }
            let dim = s.grads.len() / s.ids.len();
            let mut by_shard: HashMap<u32, SparseGrads> = HashMap::new();
            for (i, id) in s.ids.iter().enumerate() {
                let g = by_shard
                    .entry(shard_for(*id, self.shard_count))
                    .or_insert_with(|| SparseGrads {
                        table: s.table.clone(),
                        ..Default::default()
                    });
                g.ids.push(*id);
                g.grads.extend_from_slice(&s.grads[i * dim..(i + 1) * dim]);
            }
            for (shard, g) in by_shard {
                part(&mut parts, shard);
                parts.get_mut(&shard).expect("inserted").sparse.push(g);
            }
        }
        for (name, grads) in dense {
            let shard = dense_shard(name, self.shard_count);
            part(&mut parts, shard);
            parts
                .get_mut(&shard)
                .expect("inserted")
                .dense
                .push(DenseGrads {
                    name: name.clone(),
                    grads: grads.clone(),
                });
        }
        Ok(parts
            .into_values()
            .flat_map(|p| split_rows(p, crate::ROWS_PER_CALL))
            .collect())
    }

    /// Delivers one shard's part of a step; safe to repeat (the shard deduplicates).
    ///
    /// # Errors
    /// FAILED_PRECONDITION when the incarnation is fenced; bad input; the deadline.
    pub async fn send_step_part(
        &self,
        part: &PushStepRequest,
    ) -> Result<PushStepResponse, ClientError> {
        self.call(Some(part.shard), |ch, timeout| {
            let mut req = tonic::Request::new(part.clone());
            req.set_timeout(timeout);
            async move {
                let mut c = ParameterServiceClient::new(ch).max_decoding_message_size(64 << 20);
                c.push_step(req).await.map(|r| r.into_inner())
            }
        })
        .await
    }
}

/// One shard's part of a step as calls of at most `max_rows` rows each: part 0 keeps
/// the dense tensors and the first rows, later parts the rest in order.
fn split_rows(req: PushStepRequest, max_rows: usize) -> Vec<PushStepRequest> {
    let rows: usize = req.sparse.iter().map(|s| s.ids.len()).sum();
    if rows <= max_rows {
        return vec![req];
    }
    let PushStepRequest {
        shard,
        inc,
        step,
        sparse,
        dense,
        ..
    } = req;
    let mut parts = vec![PushStepRequest {
        shard,
        inc,
        step,
        dense,
        ..Default::default()
    }];
    let mut room = max_rows;
    for s in sparse {
        let dim = s.grads.len() / s.ids.len().max(1);
        let mut at = 0;
        while at < s.ids.len() {
            if room == 0 {
                parts.push(PushStepRequest {
                    shard,
                    inc,
                    step,
                    part: parts.len() as u32,
                    ..Default::default()
                });
                room = max_rows;
            }
            let take = room.min(s.ids.len() - at);
            parts
                .last_mut()
                .expect("one part at least")
                .sparse
                .push(SparseGrads {
                    table: s.table.clone(),
                    ids: s.ids[at..at + take].to_vec(),
                    grads: s.grads[at * dim..(at + take) * dim].to_vec(),
                });
            at += take;
            room -= take;
        }
    }
    parts
}

/// Step session errors.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The incarnation lost its lease: nothing above its last sealed cut will be applied.
    #[error("incarnation {0} is fenced")]
    Fenced(u64),
    #[error(transparent)]
    Client(#[from] ClientError),
}

fn is_fenced(e: &ClientError) -> bool {
    matches!(e, ClientError::Status(s) if s.code() == Code::FailedPrecondition)
}

#[derive(Default)]
struct Acks {
    frontier: u64,
    above: BTreeSet<u64>,
}

/// One worker incarnation.
pub struct StepSession {
    client: Arc<PsClient>,
    inc: u64,
    lease: Duration,
    next_step: AtomicU64,
    acks: Mutex<Acks>,
    fenced: AtomicBool,
    sealed_cut: AtomicU64,
    /// The largest sealed epoch the coordinator reported (it holds every step <=
    /// `sealed_cut`).
    sealed_epoch: AtomicU64,
    /// Woken when the frontier moves, so it is reported at once (freshness) rather than
    /// at the next heartbeat.
    moved: tokio::sync::Notify,
}

impl StepSession {
    /// Registers a fresh incarnation.
    ///
    /// # Errors
    /// As [`PsClient::register`].
    pub async fn register(client: Arc<PsClient>, name: &str) -> Result<Arc<Self>, ClientError> {
        Self::register_at(client, name, "").await
    }

    /// Registers a fresh incarnation that takes training examples at `addr`.
    ///
    /// # Errors
    /// As [`PsClient::register`].
    pub async fn register_at(
        client: Arc<PsClient>,
        name: &str,
        addr: &str,
    ) -> Result<Arc<Self>, ClientError> {
        let r = client.register(name, addr).await?;
        Ok(Arc::new(StepSession {
            client,
            inc: r.inc,
            lease: Duration::from_millis(r.lease_ms),
            next_step: AtomicU64::new(1),
            acks: Mutex::new(Acks::default()),
            fenced: AtomicBool::new(false),
            sealed_cut: AtomicU64::new(0),
            sealed_epoch: AtomicU64::new(0),
            moved: tokio::sync::Notify::new(),
        }))
    }

    pub fn inc(&self) -> u64 {
        self.inc
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Reserves the next step number.
    pub fn next_step(&self) -> u64 {
        self.next_step.fetch_add(1, Ordering::Relaxed)
    }

    pub fn frontier(&self) -> u64 {
        self.acks.lock().expect("lock").frontier
    }

    /// The incarnation's cut in the last committed seal the coordinator reported.
    pub fn sealed_cut(&self) -> u64 {
        self.sealed_cut.load(Ordering::Relaxed)
    }

    /// The largest sealed epoch the coordinator reported.
    pub fn sealed_epoch(&self) -> u64 {
        self.sealed_epoch.load(Ordering::Relaxed)
    }

    /// Waits until every step <= `step` of this incarnation is sealed, reporting the
    /// frontier to learn of it, for at most `max_wait`. Returns an epoch that holds them
    /// (pull at it to read this incarnation's own updates), or None when the wait ran
    /// out or the incarnation was fenced. Step 0: nothing to wait for.
    pub async fn wait_sealed(&self, step: u64, max_wait: Duration) -> Option<u64> {
        if step == 0 {
            return Some(0);
        }
        let deadline = tokio::time::Instant::now() + max_wait;
        loop {
            if self.sealed_cut() >= step {
                return Some(self.sealed_epoch());
            }
            if self.is_fenced() || tokio::time::Instant::now() >= deadline {
                return None;
            }
            // Only a frontier past `step` can be sealed; until then there is nothing to ask.
            if self.frontier() >= step {
                let _ = self.report().await;
                if self.sealed_cut() >= step {
                    continue;
                }
            }
            // The coordinator seals every few ms (its tick); poll at about that rate.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed)
    }

    /// Gives the incarnation up: it reports no more frontiers (so its lease lapses and
    /// the coordinator fences it at its last sealed cut) and pushes nothing more.
    pub fn abandon(&self) {
        self.fenced.store(true, Ordering::Relaxed);
    }

    /// Sends every shard's part of `step` (retrying each under the same (inc, step)
    /// until acknowledged or fenced) and advances the frontier.
    ///
    /// # Errors
    /// [`StepError::Fenced`]; bad input; the client deadline (the step's outcome is then
    /// unknown: call again with the same step, never a new number for the same data).
    pub async fn push(
        &self,
        step: u64,
        sparse: &[SparseStep],
        dense: &[(String, Vec<f32>)],
    ) -> Result<(), StepError> {
        if self.is_fenced() {
            return Err(StepError::Fenced(self.inc));
        }
        let parts = self.client.prepare_step(self.inc, step, sparse, dense)?;
        let results =
            futures::future::join_all(parts.iter().map(|p| self.client.send_step_part(p))).await;
        for r in results {
            match r {
                Ok(_) => {}
                Err(e) if is_fenced(&e) => {
                    self.fenced.store(true, Ordering::Relaxed);
                    return Err(StepError::Fenced(self.inc));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut guard = self.acks.lock().expect("lock");
        let a = &mut *guard;
        if step == a.frontier + 1 {
            a.frontier = step;
            while a.above.remove(&(a.frontier + 1)) {
                a.frontier += 1;
            }
            self.moved.notify_one();
        } else if step > a.frontier {
            a.above.insert(step);
        }
        Ok(())
    }

    /// Reports the frontier once (renewing the lease).
    ///
    /// # Errors
    /// [`StepError::Fenced`] once the coordinator fenced this incarnation.
    pub async fn report(&self) -> Result<ReportFrontierResponse, StepError> {
        if self.is_fenced() {
            return Err(StepError::Fenced(self.inc));
        }
        match self.client.report_frontier(self.inc, self.frontier()).await {
            Ok(r) => {
                self.sealed_cut.fetch_max(r.sealed_cut, Ordering::Relaxed);
                // Both only grow, so the largest epoch seen sealed at least the largest
                // cut seen.
                self.sealed_epoch
                    .fetch_max(r.last_sealed_epoch, Ordering::Relaxed);
                Ok(r)
            }
            Err(e) if is_fenced(&e) => {
                self.fenced.store(true, Ordering::Relaxed);
                Err(StepError::Fenced(self.inc))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Resolves when the frontier moved since the last call (or at once if it did).
    pub async fn frontier_moved(&self) {
        self.moved.notified().await;
    }

    /// Reports the frontier every `every`, and whenever it moves, until fenced or `stop`
    /// flips.
    pub async fn heartbeat(
        self: Arc<Self>,
        every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tick.tick() => {}
                _ = self.moved.notified() => {}
            }
            match self.report().await {
                Err(StepError::Fenced(_)) => return,
                Err(e) => tracing::debug!(inc = self.inc, error = %e, "frontier report failed"),
                Ok(_) => {}
            }
        }
    }
}

impl PsClient {
    /// Upserts catalog items (split by shard) and asks the coordinator for an epoch, so
    /// they become rankable with the next sealed epoch.
    ///
    /// # Errors
    /// Bad items (INVALID_ARGUMENT naming the field), the deadline.
    pub async fn upsert_items(
        &self,
        items: &[freshet_proto::ps::v1::Item],
        sets: &[freshet_proto::ps::v1::CandidateSet],
    ) -> Result<(), ClientError> {
        type Part = (
            Vec<freshet_proto::ps::v1::Item>,
            Vec<freshet_proto::ps::v1::CandidateSet>,
        );
        // Every rule checked before the first shard changes: a bad item or set must not
        // leave the others' upserts queued.
        for (i, item) in items.iter().enumerate() {
            freshet_proto::catalog::validate_item(item, &format!("items[{i}]"))
                .map_err(|e| ClientError::Invalid(e.to_string()))?;
        }
        for (i, set) in sets.iter().enumerate() {
            freshet_proto::catalog::validate_set(set, &format!("sets[{i}]"))
                .map_err(|e| ClientError::Invalid(e.to_string()))?;
        }
        let mut by_shard: BTreeMap<u32, Part> = BTreeMap::new();
        for item in items {
            by_shard
                .entry(shard_for(item.id, self.shard_count))
                .or_default()
                .0
                .push(item.clone());
        }
        for set in sets {
            by_shard
                .entry(dense_shard(&set.name, self.shard_count))
                .or_default()
                .1
                .push(set.clone());
        }
        let calls = by_shard
            .into_iter()
            .map(|(shard, (items, sets))| async move {
                self.call(Some(shard), |ch, timeout| {
                    let mut req = tonic::Request::new(freshet_proto::ps::v1::UpsertItemsRequest {
                        shard,
                        items: items.clone(),
                        sets: sets.clone(),
                    });
                    req.set_timeout(timeout);
                    async move {
                        ParameterServiceClient::new(ch)
                            .upsert_items(req)
                            .await
                            .map(|r| r.into_inner())
                    }
                })
                .await
            });
        for r in futures::future::join_all(calls).await {
            r?;
        }
        self.request_seal().await
    }

    /// Asks the coordinator for an epoch at its next tick even if no frontier moved.
    ///
    /// # Errors
    /// The deadline.
    pub async fn request_seal(&self) -> Result<(), ClientError> {
        self.call(Some(META_GROUP), |ch, timeout| {
            let mut req = tonic::Request::new(freshet_proto::coord::v1::RequestSealRequest {});
            req.set_timeout(timeout);
            async move {
                CoordinatorClient::new(ch)
                    .request_seal(req)
                    .await
                    .map(|_| ())
            }
        })
        .await
    }

    /// Forgets a user: an epoch in which every shard removes the user's rows and
    /// impressions (see the Coordinator's ForgetUser). Safe to retry: a repeat forgets
    /// nothing more.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming `user_id`; the deadline.
    pub async fn forget_user(
        &self,
        user_id: &str,
    ) -> Result<freshet_proto::coord::v1::ForgetUserResponse, ClientError> {
        self.call(Some(META_GROUP), |ch, timeout| {
            let mut req = tonic::Request::new(freshet_proto::coord::v1::ForgetUserRequest {
                user_id: user_id.to_string(),
            });
            req.set_timeout(timeout);
            async move {
                CoordinatorClient::new(ch)
                    .forget_user(req)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }

    /// Changes how long (sealed time) and how much every data shard keeps served
    /// impressions (the Coordinator's SetImpressionRetention): from the answer's epoch.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming `retention.ttl_ms` or `retention.bytes_max_per_shard`;
    /// the deadline.
    pub async fn set_impression_retention(
        &self,
        retention: freshet_proto::ps::v1::ImpressionRetention,
    ) -> Result<freshet_proto::coord::v1::SetImpressionRetentionResponse, ClientError> {
        self.call(Some(META_GROUP), |ch, timeout| {
            let mut req =
                tonic::Request::new(freshet_proto::coord::v1::SetImpressionRetentionRequest {
                    retention: Some(retention),
                });
            req.set_timeout(timeout);
            async move {
                CoordinatorClient::new(ch)
                    .set_impression_retention(req)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_step_is_split_into_parts_that_keep_every_row_once() {
        let req = PushStepRequest {
            shard: 2,
            inc: 7,
            step: 9,
            sparse: vec![
                SparseGrads {
                    table: "a".into(),
                    ids: vec![1, 2, 3, 4, 5],
                    grads: (0..10).map(|g| g as f32).collect(),
                },
                SparseGrads {
                    table: "b".into(),
                    ids: vec![6, 7],
                    grads: vec![0.5, 0.25],
                },
            ],
            dense: vec![DenseGrads {
                name: "w".into(),
                grads: vec![1.0; 4],
            }],
            part: 0,
        };
        let parts = split_rows(req.clone(), 3);
        let rows: Vec<usize> = parts
            .iter()
            .map(|p| p.sparse.iter().map(|s| s.ids.len()).sum())
            .collect();
        assert_eq!(rows, vec![3, 3, 1]);
        for (i, p) in parts.iter().enumerate() {
            assert_eq!((p.shard, p.inc, p.step, p.part), (2, 7, 9, i as u32));
            assert_eq!(
                p.dense.is_empty(),
                i != 0,
                "dense tensors ride in part 0 only"
            );
        }
        // Every (table, id, grads) once, in order.
        let flat = |ps: &[PushStepRequest]| -> Vec<(String, u64, Vec<f32>)> {
            ps.iter()
                .flat_map(|p| p.sparse.iter())
                .flat_map(|s| {
                    let dim = s.grads.len() / s.ids.len();
                    s.ids.iter().enumerate().map(move |(i, id)| {
                        (
                            s.table.clone(),
                            *id,
                            s.grads[i * dim..(i + 1) * dim].to_vec(),
                        )
                    })
                })
                .collect()
        };
        assert_eq!(flat(&parts), flat(std::slice::from_ref(&req)));
        // Within the limit: one call, unchanged.
        assert_eq!(split_rows(req.clone(), 7), vec![req]);
    }
}
