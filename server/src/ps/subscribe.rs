//! `ParameterService/Subscribe`: a shard replica's sealed state as a stream, for gateways.
//!
//! The stream is a snapshot of the replica's sealed state (when the subscriber holds
//! nothing, or its epoch fell out of the replica's change log) followed by every epoch's
//! change set, in order, as the replica seals it. It never goes backwards: a subscriber
//! that resumes after epoch e gets epochs > e only (from this replica or any other,
//! since all replicas seal the same epochs identically). A slow subscriber is
//! backpressured by the bounded channel; if it falls out of the log meanwhile it gets a
//! fresh snapshot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use freshet_proto::ps::v1::{subscribe_response::Event, ShardSnapshotPart, SubscribeResponse};
use parking_lot::Mutex;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::fsm::changes::Since;
use crate::fsm::ShardState;
use crate::raft::group::GroupHandle;

/// Rows (or items) per snapshot part.
const PART_ROWS: usize = 8192;
/// Messages buffered per subscriber.
const STREAM_BUFFER: usize = 32;
/// Change sets read from the log at once.
const SETS_PER_READ: usize = 64;
/// Concurrent subscriptions per node.
pub const SUBSCRIBERS_MAX: usize = 1024;
/// Concurrent subscriptions one caller (remote IP address) may hold: a gateway holds one
/// per shard, plus a few while it reconnects; no single caller can take every slot.
pub const SUBSCRIBERS_PER_CALLER_MAX: usize = 128;

pub type SubscribeStream = ReceiverStream<Result<SubscribeResponse, Status>>;

/// The node's subscription slots: [`SUBSCRIBERS_MAX`] in all, at most
/// [`SUBSCRIBERS_PER_CALLER_MAX`] per remote address. The per-caller map holds only
/// callers with a slot, so it is bounded by the slots.
pub struct Subscribers {
    total: Arc<Semaphore>,
    per_caller: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Default for Subscribers {
    fn default() -> Self {
        Subscribers {
            total: Arc::new(Semaphore::new(SUBSCRIBERS_MAX)),
            per_caller: Arc::default(),
        }
    }
}

/// One held slot; released when the stream's task ends.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    caller: Option<IpAddr>,
    per_caller: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(ip) = self.caller else { return };
        let mut m = self.per_caller.lock();
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

impl Subscribers {
    /// A slot for `caller` (None: the address is unknown, e.g. in-process transports).
    ///
    /// # Errors
    /// RESOURCE_EXHAUSTED when the caller or the node holds its maximum.
    pub fn acquire(&self, caller: Option<IpAddr>) -> Result<Slot, Status> {
        let mut m = self.per_caller.lock();
        if let Some(ip) = caller {
            let held = m.get(&ip).copied().unwrap_or(0);
            if held >= SUBSCRIBERS_PER_CALLER_MAX {
                return Err(Status::resource_exhausted(format!(
                    "subscriptions from {ip}: at most {SUBSCRIBERS_PER_CALLER_MAX} per caller"
                )));
            }
        }
        let permit = Arc::clone(&self.total)
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many subscriptions on this node"))?;
        if let Some(ip) = caller {
            *m.entry(ip).or_insert(0) += 1;
        }
        Ok(Slot {
            _permit: permit,
            caller,
            per_caller: Arc::clone(&self.per_caller),
        })
    }
}

/// Starts streaming `g` after `after_epoch`; `slot` is released when the stream ends.
pub fn start(
    g: GroupHandle<ShardState>,
    after_epoch: u64,
    slot: Slot,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<SubscribeStream, Status> {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(e) = feed(g, after_epoch, &tx, shutdown).await {
            tracing::debug!(error = %e, "subscription ended");
        }
    });
    Ok(ReceiverStream::new(rx))
}

type Tx = mpsc::Sender<Result<SubscribeResponse, Status>>;

async fn send(tx: &Tx, event: Event) -> Result<(), &'static str> {
    tx.send(Ok(SubscribeResponse { event: Some(event) }))
        .await
        .map_err(|_| "subscriber went away")
}

async fn feed(
    g: GroupHandle<ShardState>,
    mut after: u64,
    tx: &Tx,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), &'static str> {
    let mut newest = g.feed.watch();
    let mut need_snapshot = after == 0;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        if !need_snapshot {
            match g.feed.since(after, SETS_PER_READ) {
                Since::Gap => need_snapshot = true,
                Since::Sets(sets) if !sets.is_empty() => {
                    for cs in sets {
                        if cs.first_epoch != after + 1 {
                            need_snapshot = true;
                            break;
                        }
                        after = cs.epoch;
                        send(tx, Event::Change((*cs).clone())).await?;
                    }
                    continue;
                }
                Since::Sets(_) => {
                    // Nothing newer in the log: either the subscriber is current, or this
                    // replica sealed past `after` without a log to show it (it was
                    // restored from a snapshot).
                    let sealed = g.state.read().steps.last_sealed;
                    let resumable = g.feed.oldest_resumable().is_some_and(|o| after >= o);
                    if sealed > after && !resumable {
                        need_snapshot = true;
                    }
                }
            }
        }
        if need_snapshot {
            after = send_snapshot(&g, tx).await?;
            need_snapshot = false;
            continue;
        }
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            r = newest.changed() => if r.is_err() { return Ok(()) },
            // Bounded wait: also notices the subscriber leaving and a restored replica.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if tx.is_closed() {
                    return Err("subscriber went away");
                }
            }
        }
    }
}

/// Streams the replica's sealed state in parts; returns its epoch.
async fn send_snapshot(g: &GroupHandle<ShardState>, tx: &Tx) -> Result<u64, &'static str> {
    let state = Arc::clone(&g.state);
    let (epoch, specs, rows, dense, items, sets) = tokio::task::spawn_blocking(move || {
        let st = state.read();
        let (specs, rows, dense) = st.sealed_rows();
        let items: Vec<_> = st.steps.items.values().cloned().collect();
        let sets: Vec<_> = st
            .steps
            .sets
            .iter()
            .map(|(name, items)| freshet_proto::ps::v1::CandidateSet {
                name: name.clone(),
                items: items.clone(),
            })
            .collect();
        (st.steps.last_sealed, specs, rows, dense, items, sets)
    })
    .await
    .map_err(|_| "snapshot task failed")?;
    let shard = g.shard;
    let mut parts = vec![ShardSnapshotPart {
        shard,
        epoch,
        tables: specs,
        dense,
        sets,
        ..Default::default()
    }];
    for t in rows {
        let dim = t.dim as usize;
        for (k, ids) in t.ids.chunks(PART_ROWS).enumerate() {
            let start = k * PART_ROWS * dim;
            parts.push(ShardSnapshotPart {
                shard,
                epoch,
                rows: vec![freshet_proto::ps::v1::TableRows {
                    table: t.table.clone(),
                    dim: t.dim,
                    ids: ids.to_vec(),
                    values: t.values[start..start + ids.len() * dim].to_vec(),
                }],
                ..Default::default()
            });
        }
    }
    for chunk in items.chunks(PART_ROWS) {
        parts.push(ShardSnapshotPart {
            shard,
            epoch,
            items: chunk.to_vec(),
            ..Default::default()
        });
    }
    parts.last_mut().expect("at least the header").last = true;
    for p in parts {
        send(tx, Event::Snapshot(p)).await?;
    }
    Ok(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_caller_cannot_take_every_subscription_slot() {
        let subs = Subscribers::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mut held: Vec<Slot> = (0..SUBSCRIBERS_PER_CALLER_MAX)
            .map(|_| subs.acquire(Some(a)).unwrap())
            .collect();
        let e = subs.acquire(Some(a)).err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("10.0.0.1"), "{}", e.message());
        // Another caller still gets one; a released slot is the caller's again.
        let other = subs.acquire(Some(b)).unwrap();
        held.pop();
        held.push(subs.acquire(Some(a)).unwrap());
        drop(held);
        drop(other);
        assert!(subs.per_caller.lock().is_empty(), "no entry without a slot");
        // The node's total still bounds everyone together.
        let many: Vec<Slot> = (0..SUBSCRIBERS_MAX)
            .map(|i| {
                let ip: IpAddr = format!("10.1.{}.{}", i / 200, i % 200).parse().unwrap();
                subs.acquire(Some(ip)).unwrap()
            })
            .collect();
        assert!(subs.acquire(Some(b)).is_err());
        assert!(subs.acquire(None).is_err());
        drop(many);
        assert!(subs.acquire(None).is_ok());
    }
}
