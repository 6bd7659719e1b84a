//! What Rank served goes to the shards, not into this gateway's memory.
//!
//! [`ImpressionLog`] is a write-behind queue: Rank enqueues the impression and answers at
//! once; one task takes what has queued (up to [`BATCH_MAX`], waiting at most
//! [`FLUSH_WAIT`] after the first), splits it by the shard that owns each impression id
//! (consecutive ids share a shard in blocks: [`freshet_proto::impression_id`], so a batch
//! is one or two appends, not one per shard)
//! and appends each part through Raft (`ParameterService/AppendImpressions`), all shards
//! at once; the next batch gathers while one is being committed (group commit). An
//! impression is durable once its append is acknowledged; the time from the Rank answer
//! to that acknowledgement is the durability window, measured per impression
//! ([`crate::metrics::IMPRESSION_DURABLE_SECONDS`], `Status.impression_durable_*`). A
//! graceful stop drains the queue before the gateway exits; a kill -9 loses what was
//! queued or in flight (the window), and Feedback for such an impression gets NOT_FOUND
//! from every gateway, never a wrong join.
//!
//! Feedback reads impressions back with [`ImpressionLog::lookup`]: this gateway's own
//! from its cache of the ones it made durable, waiting for its writer when one is still
//! queued or in flight (a client that sends Feedback right after Rank), and any other
//! from the shards (linearizable reads), waiting up to [`LOOKUP_WAIT`] for one that is
//! still in flight from another gateway.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use freshet_client::PsClient;
use freshet_proto::ps::v1::{ImpressionRecord, StoredImpression};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Impressions waiting to be appended; a Rank beyond it answers RESOURCE_EXHAUSTED.
pub const QUEUE_MAX: usize = 65_536;
/// Impressions per append batch (all shards together).
pub const BATCH_MAX: usize = 4_096;
/// How long a batch waits for more after its first impression (fewer, larger Raft
/// entries: each append is a commit with an fsync on a majority).
pub const FLUSH_WAIT: Duration = Duration::from_millis(5);
/// Impressions this gateway made durable that it keeps to join feedback without a read
/// (a cache: what a restart loses is read from the shards again).
pub const RECENT_MAX: usize = 16_384;
/// How long Feedback waits for an impression that is not on its shard yet.
pub const LOOKUP_WAIT: Duration = Duration::from_secs(1);
/// Attempts to append one batch before its impressions are given up (each attempt runs
/// under the client's own deadline and retries).
const APPEND_ATTEMPTS: u32 = 3;
/// How long a graceful stop waits for the queue to drain.
pub const DRAIN_MAX: Duration = Duration::from_secs(10);

struct Queued {
    record: ImpressionRecord,
    answered: Instant,
}

/// Durability windows of the last impressions (ms), newest last.
#[derive(Default)]
struct Windows(VecDeque<f64>);

/// This gateway's own impressions, once durable, newest last (bounded by [`RECENT_MAX`]).
#[derive(Default)]
struct Recent {
    map: HashMap<String, ImpressionRecord>,
    order: VecDeque<String>,
    /// Users forgotten lately (the last [`RECENT_MAX`]), newest last: an append still in
    /// flight when a user was forgotten is not cached (the shard may have dropped it;
    /// Feedback on it then reads the shard, which knows).
    forgotten: std::collections::HashSet<u64>,
    forgotten_order: VecDeque<u64>,
}

impl Recent {
    fn forget_users(&mut self, users: &[u64]) {
        self.map
            .retain(|_, r| !(r.has_user_id && users.contains(&r.user_id_row)));
        let map = &self.map;
        self.order.retain(|id| map.contains_key(id));
        for &u in users {
            if self.forgotten.insert(u) {
                self.forgotten_order.push_back(u);
            }
            while self.forgotten_order.len() > RECENT_MAX {
                if let Some(old) = self.forgotten_order.pop_front() {
                    self.forgotten.remove(&old);
                }
            }
        }
    }

    fn insert(&mut self, records: Vec<ImpressionRecord>) {
        for r in records {
            if r.has_user_id && self.forgotten.contains(&r.user_id_row) {
                continue;
            }
            self.order.push_back(r.id.clone());
            self.map.insert(r.id.clone(), r);
            while self.order.len() > RECENT_MAX {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}

/// What the writer task updates and the log reads.
#[derive(Default)]
struct Shared {
    /// Impressions queued or being appended.
    queued: AtomicUsize,
    windows: Mutex<Windows>,
    lost: AtomicUsize,
    recent: Mutex<Recent>,
}

/// The write-behind log of served impressions (see the module docs).
pub struct ImpressionLog {
    tx: mpsc::Sender<Queued>,
    client: Arc<PsClient>,
    shared: Arc<Shared>,
    /// This gateway's impression ids are `{gateway:016x}:{n:x}`, `gateway` random per
    /// start (a restarted gateway never reuses an id) and `n` the impression's place in
    /// the queue: [`Self::push`] numbers and queues under this lock, so `n` counts the
    /// impressions queued before it.
    gateway: u64,
    queued_total: Mutex<u64>,
    /// `{gateway:016x}:`, the prefix of this gateway's own ids.
    own_prefix: String,
    /// How many impressions, in queue order, the writer has finished with: made durable
    /// (into `recent`) or given up. Own impression `n` is finished once this passes `n`.
    finished: watch::Receiver<u64>,
    /// Impression ids Feedback asked the shards for since start (each re-ask counted).
    shard_reads: AtomicU64,
}

impl ImpressionLog {
    /// Drops this gateway's cached impressions of forgotten users (a forget's change
    /// set): Feedback on them is then read from the shards, which removed them.
    pub fn forget_users(&self, users: &[u64]) {
        self.shared.recent.lock().forget_users(users);
    }

    /// The log and its writer task, which runs until `stop` turns true and the queue
    /// is drained.
    pub fn start(
        client: Arc<PsClient>,
        stop: watch::Receiver<bool>,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        let (finished_tx, finished) = watch::channel(0);
        let gateway: u64 = rand::random();
        let log = Arc::new(ImpressionLog {
            tx,
            client: Arc::clone(&client),
            shared: Arc::default(),
            gateway,
            queued_total: Mutex::new(0),
            own_prefix: format!("{gateway:016x}:"),
            finished,
            shard_reads: AtomicU64::new(0),
        });
        let task = tokio::spawn(writer(
            client,
            rx,
            stop,
            Arc::clone(&log.shared),
            finished_tx,
        ));
        (log, task)
    }

    /// Impression ids Feedback asked the shards for since start, each re-ask counted (this
    /// gateway's own are joined from its cache, after waiting for its writer if need be).
    pub fn shard_reads(&self) -> u64 {
        self.shard_reads.load(Ordering::Relaxed)
    }

    /// Queues an impression (called as Rank answers) under this gateway's next id, which
    /// it returns (the record's own `id` is overwritten).
    ///
    /// # Errors
    /// The queue is full (the shards fall behind) or the gateway is stopping.
    pub fn push(&self, mut record: ImpressionRecord) -> Result<String, &'static str> {
        let id = {
            // Numbered and queued together, so that an id's number is its place in the
            // queue (see `queued_total`); an id whose send failed is never answered, and
            // its number is given to the next.
            let mut total = self.queued_total.lock();
            let id = freshet_proto::impression_id(self.gateway, *total);
            record.id.clone_from(&id);
            self.tx
                .try_send(Queued {
                    record,
                    answered: Instant::now(),
                })
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => "the impression log is full",
                    mpsc::error::TrySendError::Closed(_) => "the gateway is stopping",
                })?;
            *total += 1;
            id
        };
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// Impressions queued or being appended.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// Impressions given up after failed appends since start.
    pub fn lost(&self) -> usize {
        self.shared.lost.load(Ordering::Relaxed)
    }

    /// Median and largest durability window (ms) of the last 1,000 impressions.
    pub fn window_ms(&self) -> (f64, f64) {
        let w = self.shared.windows.lock();
        if w.0.is_empty() {
            return (0.0, 0.0);
        }
        let mut v: Vec<f64> = w.0.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[v.len() - 1])
    }

    /// The impressions `ids` name: this gateway's own from its cache of the ones it made
    /// durable (when one is still queued or being appended, after waiting up to `wait`
    /// for its writer), the rest read from their shards. An id not found is asked again
    /// until `wait` passed since the shards first answered (it may still be in flight
    /// from a gateway); what is still missing then is left out of the map. The wait starts at
    /// the first answer, not at the call: a read that waited out a shard's leader change
    /// (the client retries within its deadline) would otherwise have used up the time
    /// in which a draining gateway's append to that same shard lands (a test that stops
    /// a gateway and crashes a shard leader together saw such an event refused). So a
    /// call takes at most `wait` for the writer, then the shards' first answer, then
    /// `wait` more (2 s in all with [`LOOKUP_WAIT`], only when appends are that slow).
    ///
    /// # Errors
    /// A shard did not answer (UNAVAILABLE for the caller).
    pub async fn lookup(
        &self,
        ids: &[&str],
        wait: Duration,
    ) -> Result<HashMap<String, StoredImpression>, freshet_client::ClientError> {
        let mut deadline: Option<Instant> = None;
        let mut found: HashMap<String, StoredImpression> = HashMap::new();
        let mut missing: Vec<String> = ids.iter().map(|id| (*id).to_string()).collect();
        missing.sort_unstable();
        missing.dedup();
        // This gateway's own durable impressions need no read.
        self.take_recent(&mut missing, &mut found);
        // Its own still queued or being appended (Feedback sent right after Rank): wait
        // for the writer to finish with it (the writer works in queue order, and an own
        // id's number is its place in the queue), then look again. Polling the shard
        // instead cost a read per try and up to one back-off step of latency after the
        // append had landed. An own id the writer has finished with and the cache lacks
        // (given up, or pushed out of the cache) or never queued waits for nothing; what
        // is still missing is read from the shards below.
        let total = *self.queued_total.lock();
        let last_queued = missing
            .iter()
            .filter_map(|id| id.strip_prefix(&self.own_prefix))
            .filter_map(|n| u64::from_str_radix(n, 16).ok())
            .filter(|&n| n < total && n >= *self.finished.borrow())
            .max();
        if let Some(n) = last_queued {
            let mut finished = self.finished.clone();
            let _ = tokio::time::timeout(wait, finished.wait_for(|f| *f > n)).await;
            self.take_recent(&mut missing, &mut found);
        }
        if missing.is_empty() {
            return Ok(found);
        }
        let mut pause = Duration::from_millis(5);
        loop {
            let mut by_shard: BTreeMap<u32, Vec<String>> = BTreeMap::new();
            for id in &missing {
                by_shard
                    .entry(self.client.impression_shard(id))
                    .or_default()
                    .push(id.clone());
            }
            self.shard_reads
                .fetch_add(missing.len() as u64, Ordering::Relaxed);
            let reads = by_shard
                .iter()
                .map(|(shard, ids)| self.client.get_impressions(*shard, ids));
            for r in futures::future::join_all(reads).await {
                for s in r? {
                    if let Some(rec) = &s.record {
                        found.insert(rec.id.clone(), s);
                    }
                }
            }
            missing.retain(|id| !found.contains_key(id));
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + wait);
            if missing.is_empty() || Instant::now() >= deadline {
                return Ok(found);
            }
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Moves the ids of `missing` that this gateway's cache holds into `found`.
    fn take_recent(
        &self,
        missing: &mut Vec<String>,
        found: &mut HashMap<String, StoredImpression>,
    ) {
        let recent = self.shared.recent.lock();
        missing.retain(|id| match recent.map.get(id) {
            Some(r) => {
                found.insert(
                    id.clone(),
                    StoredImpression {
                        record: Some(r.clone()),
                        events: Vec::new(),
                    },
                );
                false
            }
            None => true,
        });
    }
}

async fn writer(
    client: Arc<PsClient>,
    mut rx: mpsc::Receiver<Queued>,
    mut stop: watch::Receiver<bool>,
    shared: Arc<Shared>,
    finished: watch::Sender<u64>,
) {
    loop {
        let stopping = async {
            let _ = stop.wait_for(|s| *s).await;
        };
        let first = tokio::select! {
            m = rx.recv() => m,
            () = stopping => {
                // No new impressions (Rank has stopped); drain what is queued.
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { return };
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + FLUSH_WAIT;
        while batch.len() < BATCH_MAX {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(q)) => batch.push(q),
                _ => break,
            }
        }
        let n = batch.len();
        let mut by_shard: BTreeMap<u32, (Vec<ImpressionRecord>, Vec<Instant>)> = BTreeMap::new();
        for q in batch {
            let part = by_shard
                .entry(client.impression_shard(&q.record.id))
                .or_default();
            part.0.push(q.record);
            part.1.push(q.answered);
        }
        let appends = by_shard.into_iter().map(|(shard, (records, answered))| {
            let client = &client;
            async move {
                for attempt in 1..=APPEND_ATTEMPTS {
                    match client.append_impressions(shard, &records).await {
                        // Moved into the cache, not copied (at 10,000 Ranks/s the copy
                        // showed in the profile).
                        Ok(_) => return Ok((records, answered)),
                        Err(e) if attempt == APPEND_ATTEMPTS => return Err((e, records.len())),
                        Err(e) => {
                            tracing::debug!(shard, error = %e, "impression append failed; retrying")
                        }
                    }
                }
                unreachable!("the last attempt returns")
            }
        });
        for r in futures::future::join_all(appends).await {
            match r {
                Ok((records, answered)) => {
                    shared.recent.lock().insert(records);
                    let mut w = shared.windows.lock();
                    for at in answered {
                        let secs = at.elapsed().as_secs_f64();
                        ::metrics::histogram!(crate::metrics::IMPRESSION_DURABLE_SECONDS)
                            .record(secs);
                        w.0.push_back(secs * 1e3);
                        if w.0.len() > 1000 {
                            w.0.pop_front();
                        }
                    }
                }
                Err((e, k)) => {
                    // Feedback for these gets NOT_FOUND; counted, never joined wrongly.
                    tracing::warn!(error = %e, impressions = k, "impressions not made durable");
                    ::metrics::counter!(crate::metrics::IMPRESSIONS_LOST).increment(k as u64);
                    shared.lost.fetch_add(k, Ordering::Relaxed);
                }
            }
        }
        shared.queued.fetch_sub(n, Ordering::Relaxed);
        // After `recent` took them: a Feedback waiting for these finds them there.
        finished.send_modify(|f| *f += n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, user: Option<u64>) -> ImpressionRecord {
        ImpressionRecord {
            id: id.into(),
            has_user_id: user.is_some(),
            user_id_row: user.unwrap_or(0),
            ..Default::default()
        }
    }

    /// An append that was in flight when its user was forgotten lands after the forget:
    /// the cache must not take it (the shard may have dropped it), so Feedback on it
    /// reads the shard; other users' impressions are cached as before, and the memory of
    /// forgotten users is bounded.
    #[test]
    fn the_cache_takes_no_impression_of_a_user_forgotten_while_it_was_in_flight() {
        let mut r = Recent::default();
        r.insert(vec![record("a", Some(7)), record("b", Some(8))]);
        r.forget_users(&[7]);
        assert!(!r.map.contains_key("a") && r.map.contains_key("b"));
        r.insert(vec![
            record("c", Some(7)),
            record("d", Some(8)),
            record("e", None),
        ]);
        assert!(!r.map.contains_key("c"));
        assert!(r.map.contains_key("d") && r.map.contains_key("e"));
        assert_eq!(r.order.len(), r.map.len());
        let many: Vec<u64> = (1_000..1_000 + RECENT_MAX as u64 + 5).collect();
        r.forget_users(&many);
        assert_eq!(r.forgotten.len(), RECENT_MAX);
        assert_eq!(r.forgotten_order.len(), RECENT_MAX);
        // The oldest forgotten users left the bounded memory first.
        assert!(!r.forgotten.contains(&7) && r.forgotten.contains(&(1_004 + RECENT_MAX as u64)));
    }
}
