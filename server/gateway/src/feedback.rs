//! Feedback: joined to the impression it answers, handed to a worker as complete
//! training examples, acknowledged only once the step carrying them is within a
//! committed seal.
//!
//! - Impressions are read from their shards ([`ImpressionLog::lookup`]): any gateway joins
//!   any feedback.
//! - The worker claims every event for a step on the impression's shard and answers, per
//!   event, with the (inc, step) that carries it (its own, or one an earlier attempt
//!   through any gateway got).
//! - [`SealTracker`] learns committed cuts and fences from the shards' change sets (and,
//!   to cover epochs a re-bootstrap skipped, from Admin/ListSeals), and resolves each
//!   wait as sealed (step <= cut) or fenced (the incarnation's cut froze below the step).
//! - A fence makes the gateway send the examples again (to another incarnation); so does
//!   a failed or timed-out Train call, which is safe because the claim on the shard
//!   decides where an event trains: an event id of a retained impression trains once,
//!   whichever gateways and workers its attempts went through. The work runs detached
//!   from the RPC, so a caller that gives up and retries waits for the same outcome.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_proto::gateway::v1::{FeedbackEvent, FeedbackResponse, RewardKind};
use freshet_proto::ps::v1::{AssignStatus, ChangeSet, Cut, Seal, StoredImpression};
use freshet_proto::worker::v1::{worker_client::WorkerClient, Candidate, Example, TrainRequest};
use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};
use tonic::{Response, Status};

use freshet_client::PsClient;
use std::sync::atomic::AtomicBool;

use super::impressions::{now_ms, ImpressionLog, LOOKUP_WAIT};
use super::replica::{serving, Published, Version};
use super::{GatewayConfig, GatewayError};
use freshet_proto::FieldError;

/// Events one Feedback call may carry.
pub const EVENTS_PER_CALL_MAX: usize = 10_000;
/// Default reward weights.
const CLICK_WEIGHT: f32 = 1.0;
const PURCHASE_WEIGHT: f32 = 5.0;
const REWARD_MAX: f32 = 100.0;
/// How long the gateway keeps trying to get a batch sealed before the call fails (the
/// work goes on; a retry of the same event ids waits for it).
const FEEDBACK_DEADLINE: Duration = Duration::from_secs(30);
/// How long a detached training attempt goes on from its start (the caller waits
/// [`FEEDBACK_DEADLINE`] of it).
const TRAIN_GIVE_UP: Duration = Duration::from_secs(90);

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    Sealed(u64),
    Fenced,
}

/// Fenced incarnations a gateway remembers; older ones are forgotten (see
/// [`Tracker::prune`]).
const FENCED_KEPT: usize = 1024;

#[derive(Default)]
struct Tracker {
    epoch: u64,
    cuts: HashMap<u64, u64>,
    fenced: BTreeSet<u64>,
    /// Every incarnation at or below this one that has no cut here was fenced and
    /// forgotten.
    forgotten_upto: u64,
    waiters: Vec<(u64, u64, oneshot::Sender<StepOutcome>)>,
}

impl Tracker {
    /// Where (inc, step) stands: sealed, fenced below it, or still open (None).
    fn outcome(&self, inc: u64, step: u64) -> Option<StepOutcome> {
        match self.cuts.get(&inc) {
            Some(&cut) if cut >= step => Some(StepOutcome::Sealed(self.epoch)),
            _ if self.fenced.contains(&inc) => Some(StepOutcome::Fenced),
            None if inc <= self.forgotten_upto => Some(StepOutcome::Fenced),
            _ => None,
        }
    }

    /// Keeps at most [`FENCED_KEPT`] fenced incarnations: the oldest go, with their
    /// cuts, but only those below every live incarnation with a cut. A step of a
    /// forgotten incarnation then reads as fenced: the gateway sends its examples again,
    /// and the event claims on the impressions' shards say where they trained (a claim
    /// the shard reports sealed is taken as sealed), so nothing trains twice. A live
    /// incarnation with no cut yet, numbered below a forgotten one, also reads as fenced
    /// until its first seal: its events are re-sent and wait on their claims meanwhile.
    fn prune(&mut self) {
        let live_min = self
            .cuts
            .keys()
            .filter(|i| !self.fenced.contains(i))
            .min()
            .copied()
            .unwrap_or(u64::MAX);
        while self.fenced.len() > FENCED_KEPT {
            match self.fenced.first().copied() {
                Some(oldest) if oldest < live_min => {
                    self.fenced.remove(&oldest);
                    self.cuts.remove(&oldest);
                    self.forgotten_upto = self.forgotten_upto.max(oldest);
                }
                _ => break,
            }
        }
    }
}

/// Committed cuts and fences as seen by this gateway.
#[derive(Default)]
pub struct SealTracker {
    inner: Mutex<Tracker>,
}

impl SealTracker {
    /// Last epoch whose seal this tracker has seen.
    pub fn epoch(&self) -> u64 {
        self.inner.lock().epoch
    }

    pub fn has_waiters(&self) -> bool {
        !self.inner.lock().waiters.is_empty()
    }

    pub fn observe_change(&self, cs: &ChangeSet) {
        self.observe(cs.first_epoch, cs.epoch, &cs.cuts, &cs.fenced);
    }

    pub fn observe_seal(&self, s: &Seal) {
        self.observe(s.first_epoch, s.epoch, &s.cuts, &s.fenced);
    }

    /// Records the commit decisions of epochs `first..=epoch`. Cuts are absolute and
    /// fences final, so any seal's information is correct on its own; `epoch` only
    /// advances over contiguous records (ListSeals fills what a re-bootstrap skipped).
    fn observe(&self, first: u64, epoch: u64, cuts: &[Cut], fenced: &[u64]) {
        {
            let mut t = self.inner.lock();
            for c in cuts {
                let e = t.cuts.entry(c.inc).or_insert(0);
                *e = (*e).max(c.step);
            }
            t.fenced.extend(fenced.iter().copied());
            if first <= t.epoch + 1 && epoch > t.epoch {
                t.epoch = epoch;
            }
            t.prune();
        }
        self.resolve(epoch);
    }

    fn resolve(&self, epoch: u64) {
        let mut t = self.inner.lock();
        let mut keep = Vec::with_capacity(t.waiters.len());
        let waiters = std::mem::take(&mut t.waiters);
        for (inc, step, tx) in waiters {
            match t.outcome(inc, step) {
                Some(StepOutcome::Sealed(_)) => {
                    let _ = tx.send(StepOutcome::Sealed(epoch));
                }
                Some(o) => {
                    let _ = tx.send(o);
                }
                None if !tx.is_closed() => keep.push((inc, step, tx)),
                None => {}
            }
        }
        t.waiters = keep;
    }

    /// Waits for (inc, step) to be sealed or its incarnation fenced below it.
    pub fn wait(&self, inc: u64, step: u64) -> oneshot::Receiver<StepOutcome> {
        let (tx, rx) = oneshot::channel();
        let mut t = self.inner.lock();
        match t.outcome(inc, step) {
            Some(o) => {
                let _ = tx.send(o);
            }
            None => t.waiters.push((inc, step, tx)),
        }
        rx
    }
}

/// How a call's fresh events ended: sealed, in these steps.
#[derive(Debug, Default)]
struct Trained {
    sealed_epoch: u64,
    steps: Vec<Cut>,
    /// Events trained by this call's claims; the rest were already in a step.
    accepted: u32,
    duplicates: u32,
}

/// Resolves with (sealed epoch, step) once an event's step is sealed.
type Outcome = watch::Sender<Option<(u64, Cut)>>;
type OutcomeRx = watch::Receiver<Option<(u64, Cut)>>;
/// When the worker list was fetched, and (inc, addr) per live worker.
type WorkerList = (Option<Instant>, Vec<(u64, String)>);

/// Where an event id stands.
#[derive(Clone)]
enum EventState {
    /// Being trained: the watch resolves with (sealed epoch, step).
    InFlight(OutcomeRx),
    Done(u64, Cut),
}

struct EventsInner {
    map: HashMap<String, EventState>,
    order: VecDeque<(Instant, String)>,
}

/// Event ids seen within the retention window (bounded like the impressions).
pub struct EventLog {
    inner: Mutex<EventsInner>,
    max: usize,
    ttl: Duration,
}

enum Begin {
    New(Outcome),
    Seen(EventState),
}

impl EventLog {
    pub fn new(max: usize, ttl: Duration) -> Self {
        EventLog {
            inner: Mutex::new(EventsInner {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            max,
            ttl,
        }
    }

    fn begin(&self, id: &str) -> Begin {
        let now = Instant::now();
        let mut g = self.inner.lock();
        while let Some((at, _)) = g.order.front() {
            if g.map.len() > self.max || now.duration_since(*at) > self.ttl {
                let (_, old) = g.order.pop_front().expect("non-empty");
                g.map.remove(&old);
            } else {
                break;
            }
        }
        match g.map.get(id) {
            // The attempt that owned it gave up (its sender is gone, nothing recorded):
            // the retry starts afresh instead of waiting on it forever.
            Some(EventState::InFlight(rx))
                if rx.has_changed().is_err() && rx.borrow().is_none() => {}
            Some(s) => return Begin::Seen(s.clone()),
            None => {}
        }
        let (tx, rx) = watch::channel(None);
        g.map.insert(id.to_string(), EventState::InFlight(rx));
        g.order.push_back((now, id.to_string()));
        Begin::New(tx)
    }

    fn finish(&self, id: &str, epoch: u64, step: Cut) {
        if let Some(s) = self.inner.lock().map.get_mut(id) {
            *s = EventState::Done(epoch, step);
        }
    }
}

/// Live workers, refreshed from the coordinator's registry.
#[derive(Default)]
pub struct Workers {
    list: Mutex<WorkerList>,
    next: AtomicUsize,
    channels: Mutex<HashMap<String, tonic::transport::Channel>>,
}

impl Workers {
    async fn pick(&self, client: &PsClient, avoid: &HashSet<u64>) -> Option<(u64, String)> {
        let stale = {
            let l = self.list.lock();
            l.0.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) || l.1.is_empty()
        };
        if stale {
            if let Ok(ws) = client.list_workers().await {
                let live: Vec<(u64, String)> = ws.into_iter().map(|w| (w.inc, w.addr)).collect();
                // Channels to workers no longer registered go (the map stays as small
                // as the registry).
                self.channels
                    .lock()
                    .retain(|addr, _| live.iter().any(|(_, a)| a == addr));
                *self.list.lock() = (Some(Instant::now()), live);
            }
        }
        let l = self.list.lock();
        let candidates: Vec<&(u64, String)> =
            l.1.iter().filter(|(inc, _)| !avoid.contains(inc)).collect();
        if candidates.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % candidates.len();
        Some(candidates[i].clone())
    }

    fn channel(&self, addr: &str) -> Result<tonic::transport::Channel, Status> {
        let mut c = self.channels.lock();
        if let Some(ch) = c.get(addr) {
            return Ok(ch.clone());
        }
        let ch = freshet_runtime::grpc::endpoint(addr)
            .map_err(|e| Status::from(GatewayError::unavailable(format!("worker {addr}: {e}"))))?
            .connect_lazy();
        c.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    fn forget(&self, inc: u64) {
        self.list.lock().1.retain(|(i, _)| *i != inc);
    }
}

fn invalid(field: String, reason: impl Into<String>) -> Status {
    Status::from(GatewayError::Invalid(FieldError::new(field, reason)))
}

/// The feedback pipeline: joins events to impressions, drops duplicates, hands the
/// examples to a worker and acknowledges once the step that carries them is sealed.
/// Cheap to clone (shared state behind `Arc`s).
#[derive(Clone)]
pub struct FeedbackPipeline {
    client: Arc<PsClient>,
    published: Arc<Published>,
    impressions: Arc<ImpressionLog>,
    events: Arc<EventLog>,
    seals: Arc<SealTracker>,
    workers: Arc<Workers>,
    /// Freshness of recent feedback calls (ms), newest last, bounded.
    pub(crate) freshness: Arc<Mutex<VecDeque<f64>>>,
    stopping: Arc<AtomicBool>,
}

impl FeedbackPipeline {
    pub(crate) fn new(
        cfg: Arc<GatewayConfig>,
        client: Arc<PsClient>,
        published: Arc<Published>,
        impressions: Arc<ImpressionLog>,
        seals: Arc<SealTracker>,
        stopping: Arc<AtomicBool>,
    ) -> Self {
        FeedbackPipeline {
            events: Arc::new(EventLog::new(
                cfg.impressions_max,
                Duration::from_millis(cfg.impression_ttl_ms),
            )),
            workers: Arc::new(Workers::default()),
            freshness: Arc::default(),
            client,
            published,
            impressions,
            seals,
            stopping,
        }
    }

    fn version(&self) -> Result<Arc<Version>, Status> {
        serving(&self.published, &self.stopping)
    }

    /// Turns validated events into training examples (one per event), joined to the
    /// impressions read from their shards.
    fn examples(
        &self,
        events: &[(usize, &FeedbackEvent)],
        found: &HashMap<String, StoredImpression>,
        arrived_at_ms: u64,
    ) -> Result<Vec<Example>, Status> {
        let version = self.version()?;
        let mut out = Vec::with_capacity(events.len());
        for (i, ev) in events {
            let field = |f: &str| format!("events[{i}].{f}");
            let imp = found
                .get(&ev.impression_id)
                .and_then(|s| s.record.as_ref())
                .ok_or_else(|| {
                    Status::from(GatewayError::not_found(format!(
                        "{}: impression {:?} is unknown, expired or was never made durable",
                        field("impression_id"),
                        ev.impression_id,
                    )))
                })?;
            let Some(slot) = imp.shown.iter().position(|s| s.item_id == ev.item_id) else {
                return Err(invalid(
                    field("item_id"),
                    format!("item {} was not shown in this impression", ev.item_id),
                ));
            };
            let (position, propensity) = (imp.shown[slot].position, imp.shown[slot].propensity);
            if ev.position != 0 && ev.position != position {
                return Err(invalid(
                    field("position"),
                    format!("item {} was shown at position {position}", ev.item_id),
                ));
            }
            let mut reward = 0.0f32;
            for (k, r) in ev.rewards.iter().enumerate() {
                let kind = RewardKind::try_from(r.kind).map_err(|_| {
                    invalid(
                        format!("events[{i}].rewards[{k}].kind"),
                        "unknown reward kind",
                    )
                })?;
                if !r.weight.is_finite() || r.weight < 0.0 || r.weight > REWARD_MAX {
                    return Err(invalid(
                        format!("events[{i}].rewards[{k}].weight"),
                        format!("must be in [0, {REWARD_MAX}]"),
                    ));
                }
                reward += if r.weight > 0.0 {
                    r.weight
                } else {
                    match kind {
                        RewardKind::Click => CLICK_WEIGHT,
                        RewardKind::Purchase => PURCHASE_WEIGHT,
                    }
                };
            }
            // The candidates still available at this slot: the items not shown earlier.
            let earlier: HashSet<u64> = imp.shown[..slot].iter().map(|s| s.item_id).collect();
            let mut shown_index = 0;
            let mut candidates = Vec::with_capacity(imp.candidates.len());
            for (c, id) in imp.candidates.iter().enumerate() {
                if earlier.contains(id) {
                    continue;
                }
                if *id == ev.item_id {
                    shown_index = candidates.len() as u32;
                }
                candidates.push(Candidate {
                    item_id: *id,
                    feature_ids: version
                        .item(*id)
                        .map(|it| it.feature_ids.clone())
                        .unwrap_or_default(),
                    // As the Rank computed it (the title may have changed since).
                    lexical: imp.lexical.get(c).copied().map_or(0, u32::from),
                });
            }
            out.push(Example {
                user_feature_ids: imp.user_feature_ids.clone(),
                user_id_row: imp.user_id_row,
                has_user_id: imp.has_user_id,
                numeric: imp.numeric.clone(),
                history: imp.history.clone(),
                query_terms: imp.query_terms.clone(),
                candidates,
                shown: shown_index,
                position,
                propensity,
                reward: reward.min(REWARD_MAX),
                served_epoch: imp.epoch,
                arrived_at_ms,
                event_id: ev.event_id.clone(),
                impression_id: ev.impression_id.clone(),
            });
        }
        Ok(out)
    }

    pub(crate) async fn handle_feedback(
        &self,
        events: Vec<FeedbackEvent>,
    ) -> Result<Response<FeedbackResponse>, Status> {
        let arrived = Instant::now();
        let arrived_at_ms = now_ms();
        if events.is_empty() || events.len() > EVENTS_PER_CALL_MAX {
            return Err(invalid(
                "events".into(),
                format!("must hold 1..={EVENTS_PER_CALL_MAX} events"),
            ));
        }
        let mut ids = HashSet::new();
        for (i, ev) in events.iter().enumerate() {
            if ev.event_id.is_empty() || ev.event_id.len() > 128 {
                return Err(invalid(
                    format!("events[{i}].event_id"),
                    "must be 1..=128 bytes",
                ));
            }
            if !ids.insert(ev.event_id.as_str()) {
                return Err(invalid(
                    format!("events[{i}].event_id"),
                    "listed twice in one call",
                ));
            }
        }
        // Validate everything before recording any event id: bad input changes nothing.
        let ids: Vec<&str> = events.iter().map(|e| e.impression_id.as_str()).collect();
        if let Some(i) = ids.iter().position(|id| id.is_empty() || id.len() > 128) {
            return Err(invalid(
                format!("events[{i}].impression_id"),
                "must be 1..=128 bytes (as Rank returned it)",
            ));
        }
        let found = self
            .impressions
            .lookup(&ids, LOOKUP_WAIT)
            .await
            .map_err(|e| {
                Status::from(GatewayError::unavailable(format!(
                    "reading impressions: {e}"
                )))
            })?;
        let all: Vec<(usize, &FeedbackEvent)> = events.iter().enumerate().collect();
        let examples = self.examples(&all, &found, arrived_at_ms)?;
        let mut fresh: Vec<Example> = Vec::new();
        let mut fresh_ids: Vec<(String, Outcome)> = Vec::new();
        let mut waits: Vec<OutcomeRx> = Vec::new();
        let mut done: Vec<(u64, Cut)> = Vec::new();
        for (ev, ex) in events.iter().zip(examples) {
            match self.events.begin(&ev.event_id) {
                Begin::New(tx) => {
                    fresh.push(ex);
                    fresh_ids.push((ev.event_id.clone(), tx));
                }
                Begin::Seen(EventState::InFlight(rx)) => waits.push(rx),
                Begin::Seen(EventState::Done(e, c)) => done.push((e, c)),
            }
        }
        let duplicates = (waits.len() + done.len()) as u32;
        let mut result = FeedbackResponse {
            duplicates,
            ..Default::default()
        };
        if !fresh.is_empty() {
            // Detached: the outcome is recorded even if this caller goes away.
            let this = self.clone();
            let task = tokio::spawn(async move { this.train_until_sealed(fresh, fresh_ids).await });
            let trained = match tokio::time::timeout(FEEDBACK_DEADLINE, task).await {
                Ok(Ok(Ok(r))) => r,
                Ok(Ok(Err(s))) => return Err(s),
                Ok(Err(e)) => return Err(Status::from(GatewayError::internal(format!("feedback task: {e}")))),
                Err(_) => {
                    return Err(Status::from(GatewayError::deadline_exceeded(
                        "the step carrying these events is not sealed yet; retry with the same event ids",
                    )))
                }
            };
            let epoch = trained.sealed_epoch;
            result.sealed_epoch = epoch;
            result.accepted = trained.accepted;
            result.duplicates += trained.duplicates;
            for s in trained.steps {
                if !result.steps.contains(&s) {
                    result.steps.push(s);
                }
            }
            metrics::counter!(crate::metrics::FEEDBACK_EVENTS)
                .increment(u64::from(result.accepted));
            // Freshness: arrival until a served version contains the update.
            let published = Arc::clone(&self.published);
            let recent = Arc::clone(&self.freshness);
            tokio::spawn(async move {
                let mut rx = published.watch();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                while *rx.borrow() < epoch {
                    if tokio::time::timeout_at(deadline, rx.changed())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let secs = arrived.elapsed().as_secs_f64();
                metrics::histogram!(crate::metrics::FRESHNESS_SECONDS).record(secs);
                let mut r = recent.lock();
                r.push_back(secs * 1e3);
                if r.len() > 1000 {
                    r.pop_front();
                }
            });
        }
        for mut rx in waits {
            let r = tokio::time::timeout(FEEDBACK_DEADLINE, async {
                loop {
                    if let Some(v) = *rx.borrow() {
                        return Some(v);
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            })
            .await;
            match r {
                Ok(Some(v)) => done.push(v),
                _ => {
                    return Err(Status::from(GatewayError::deadline_exceeded(
                        "an earlier attempt with these event ids is not sealed yet; retry",
                    )))
                }
            }
        }
        for (e, c) in done {
            result.sealed_epoch = result.sealed_epoch.max(e);
            if !result.steps.contains(&c) {
                result.steps.push(c);
            }
        }
        Ok(Response::new(result))
    }

    /// Sends the examples to a worker and waits until the step carrying each event is
    /// sealed. Each event goes where its claim on the impression's shard says (this
    /// attempt's step, or the step an earlier attempt got); an event whose step is fenced
    /// below it, or whose Train call failed or timed out, is sent again.
    async fn train_until_sealed(
        &self,
        examples: Vec<Example>,
        ids: Vec<(String, Outcome)>,
    ) -> Result<Trained, Status> {
        let mut avoid: HashSet<u64> = HashSet::new();
        let mut backoff = Duration::from_millis(20);
        // Per example: its sealed (epoch, step), and whether this call's claim put it there.
        let mut placed: Vec<Option<(u64, Cut, bool)>> = vec![None; examples.len()];
        let mut todo: Vec<usize> = (0..examples.len()).collect();
        let give_up = Instant::now() + TRAIN_GIVE_UP;
        while !todo.is_empty() {
            if Instant::now() > give_up {
                // Nobody waits any more (the caller's deadline passed long ago): stop
                // rather than loop while no worker takes them. A retry with the same
                // event ids starts afresh (see EventLog::begin); claims keep it once.
                return Err(Status::from(GatewayError::unavailable(format!(
                    "no worker trained these events within {} s; retry with the same event ids",
                    TRAIN_GIVE_UP.as_secs()
                ))));
            }
            let Some((inc, addr)) = self.workers.pick(&self.client, &avoid).await else {
                avoid.clear();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            };
            let mut client =
                WorkerClient::new(self.workers.channel(&addr)?).max_encoding_message_size(64 << 20);
            let mut req = tonic::Request::new(TrainRequest {
                examples: todo.iter().map(|&i| examples[i].clone()).collect(),
            });
            req.set_timeout(Duration::from_secs(2));
            let resp = match client.train(req).await {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    return Err(Status::from(GatewayError::Upstream(s)))
                }
                Err(s) => {
                    // Unreachable, overloaded or slow: whatever that worker claimed, the
                    // next attempt's claim finds and waits for; nothing trains twice.
                    tracing::debug!(inc, addr, error = %s, "train call failed");
                    avoid.insert(inc);
                    self.workers.forget(inc);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                    continue;
                }
            };
            // Where each sent example trains: (inc, step, claimed by this attempt).
            let mut steps: Vec<(usize, u64, u64, bool)> = Vec::with_capacity(todo.len());
            for (k, &i) in todo.iter().enumerate() {
                let Some(r) = resp.events.get(k) else {
                    steps.push((i, resp.inc, resp.step, true));
                    continue;
                };
                match AssignStatus::try_from(r.status) {
                    Ok(AssignStatus::Assigned) => steps.push((i, r.inc, r.step, true)),
                    Ok(AssignStatus::Pending | AssignStatus::Sealed) => {
                        steps.push((i, r.inc, r.step, false));
                    }
                    Ok(AssignStatus::NoImpression) => {
                        return Err(Status::from(GatewayError::not_found(format!(
                            "impression {:?} expired before its event {:?} could train",
                            examples[i].impression_id, examples[i].event_id
                        ))))
                    }
                    Ok(AssignStatus::Full) | Err(_) => {
                        return Err(Status::from(GatewayError::Overloaded(format!(
                            "impression {:?} holds the most event ids it may",
                            examples[i].impression_id
                        ))))
                    }
                }
            }
            // Steps the impressions' shards already know sealed: their word stands even
            // when this gateway's tracker forgot the incarnation (it would read fenced).
            let claimed_sealed: HashSet<(u64, u64)> = todo
                .iter()
                .enumerate()
                .filter_map(|(k, _)| resp.events.get(k))
                .filter(|r| AssignStatus::try_from(r.status) == Ok(AssignStatus::Sealed))
                .map(|r| (r.inc, r.step))
                .collect();
            let mut distinct: Vec<(u64, u64)> = steps.iter().map(|s| (s.1, s.2)).collect();
            distinct.sort_unstable();
            distinct.dedup();
            let outcomes = futures::future::join_all(
                distinct
                    .iter()
                    .map(|&(inc, step)| self.seals.wait(inc, step)),
            )
            .await;
            let mut fenced: HashSet<(u64, u64)> = HashSet::new();
            let mut sealed: HashMap<(u64, u64), u64> = HashMap::new();
            for (&key, o) in distinct.iter().zip(outcomes) {
                match o {
                    Ok(StepOutcome::Sealed(epoch)) => {
                        sealed.insert(key, epoch);
                    }
                    Ok(StepOutcome::Fenced) if claimed_sealed.contains(&key) => {
                        // Sealed before this gateway's tracker forgot its incarnation:
                        // every epoch it has seen since holds it.
                        sealed.insert(key, self.seals.epoch());
                    }
                    Ok(StepOutcome::Fenced) => {
                        tracing::info!(
                            inc = key.0,
                            step = key.1,
                            "step fenced; re-sending its examples"
                        );
                        avoid.insert(key.0);
                        self.workers.forget(key.0);
                        fenced.insert(key);
                    }
                    Err(_) => {
                        return Err(Status::from(GatewayError::unavailable("gateway stopping")))
                    }
                }
            }
            if !fenced.is_empty() {
                // Re-sending at once would spin while the claims still name the fenced
                // step; back off like the other retry paths.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            todo.clear();
            for (i, inc, step, ours) in steps {
                match sealed.get(&(inc, step)) {
                    Some(&epoch) => placed[i] = Some((epoch, Cut { inc, step }, ours)),
                    None => todo.push(i),
                }
            }
        }
        let mut out = Trained::default();
        for ((id, tx), p) in ids.iter().zip(&placed) {
            let (epoch, step, ours) = p.expect("every example placed");
            self.events.finish(id, epoch, step);
            let _ = tx.send(Some((epoch, step)));
            out.sealed_epoch = out.sealed_epoch.max(epoch);
            if !out.steps.contains(&step) {
                out.steps.push(step);
            }
            if ours {
                out.accepted += 1;
            } else {
                out.duplicates += 1;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(t: &SealTracker, epoch: u64, inc: u64) {
        t.observe(epoch, epoch, &[], &[inc]);
    }

    #[test]
    fn the_tracker_forgets_old_fenced_incarnations_but_never_a_live_one() {
        let t = SealTracker::default();
        // A live incarnation with a cut, older than every fenced one but the first.
        t.observe(1, 1, &[Cut { inc: 5, step: 3 }], &[1]);
        let mut epoch = 1;
        for inc in 6..6 + FENCED_KEPT as u64 + 10 {
            epoch += 1;
            t.observe(epoch, epoch, &[Cut { inc, step: 1 }], &[]);
            fence(&t, epoch, inc);
        }
        {
            let g = t.inner.lock();
            // Inc 1 (below the live 5) is forgotten; the rest stay: none is below 5.
            assert!(!g.fenced.contains(&1));
            assert_eq!(g.forgotten_upto, 1);
            assert_eq!(g.fenced.len(), FENCED_KEPT + 10);
        }
        assert_eq!(t.wait(1, 9).try_recv(), Ok(StepOutcome::Fenced));
        assert_eq!(t.wait(5, 3).try_recv(), Ok(StepOutcome::Sealed(epoch)));
        // The live incarnation fenced at last: now the old ones can go, down to the bound.
        epoch += 1;
        fence(&t, epoch, 5);
        {
            let g = t.inner.lock();
            assert_eq!(g.fenced.len(), FENCED_KEPT);
            assert!(g.cuts.len() <= FENCED_KEPT);
        }
        // A forgotten incarnation reads as fenced (its examples are sent again and the
        // claims say where they trained); a newer one still waits.
        assert_eq!(t.wait(6, 1).try_recv(), Ok(StepOutcome::Fenced));
        let mut open = t.wait(100_000, 1);
        assert!(open.try_recv().is_err());
    }

    #[test]
    fn an_event_whose_attempt_gave_up_starts_afresh() {
        let log = EventLog::new(16, Duration::from_secs(60));
        let Begin::New(tx) = log.begin("e1") else {
            panic!("a new event")
        };
        // While the attempt runs, a retry waits on it.
        assert!(matches!(
            log.begin("e1"),
            Begin::Seen(EventState::InFlight(_))
        ));
        // The attempt gave up (sender dropped, nothing recorded): a retry owns it anew.
        drop(tx);
        assert!(matches!(log.begin("e1"), Begin::New(_)));
        // A recorded outcome stays.
        log.finish("e1", 4, Cut { inc: 1, step: 2 });
        assert!(matches!(
            log.begin("e1"),
            Begin::Seen(EventState::Done(4, _))
        ));
    }
}
