//! `ParameterService/Subscribe`: a shard replica's sealed state as a stream, for gateways.
//!
//! The stream is a snapshot of the replica's sealed state (when the subscriber holds
//! nothing, or its epoch fell out of the replica's change log) followed by every epoch's
//! change set, in order, as the replica seals it. It never goes backwards: a subscriber
//! that resumes after epoch e gets epochs > e only (from this replica or any other,
//! since all replicas seal the same epochs identically). A slow subscriber is
//! backpressured by the bounded channel; if it falls out of the log meanwhile it gets a
//! fresh snapshot.

use std::sync::Arc;
use std::time::Duration;

use freshet_proto::ps::v1::{subscribe_response::Event, ShardSnapshotPart, SubscribeResponse};
use tokio::sync::{mpsc, Semaphore};
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

pub type SubscribeStream = ReceiverStream<Result<SubscribeResponse, Status>>;

/// Starts streaming `g` after `after_epoch`. The permit bounds concurrent subscriptions.
pub fn start(
    g: GroupHandle<ShardState>,
    after_epoch: u64,
    permits: &Arc<Semaphore>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<SubscribeStream, Status> {
    let permit = Arc::clone(permits)
        .try_acquire_owned()
        .map_err(|_| Status::resource_exhausted("too many subscriptions on this node"))?;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        let _permit = permit;
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
