//! Peer transport behind a narrow trait, so the same node code runs over gRPC and, in
//! tests, behind a wrapper that injects faults (the test crate's `FaultyTransport`).
//!
//! Sending never blocks a group: each peer has a bounded queue drained by its own task
//! over one long-lived client stream; when the queue is full or the peer is down,
//! messages are dropped (Raft retransmits). Snapshots go over a separate streaming call
//! in chunks, and the outcome is reported back to the sending group.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use freshet_proto::raft::v1::{
    raft_transport_client::RaftTransportClient, RaftBatch, RaftEnvelope, SnapshotChunk,
};
use parking_lot::{Mutex, RwLock};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE_MAX: usize = 8192;
/// Bytes of entries queued per peer before new messages are dropped. A count alone
/// does not bound memory: raft-rs lets a leader have 256 appends of up to 4 MiB in
/// flight to each follower of each group, and a follower that falls behind (busy
/// writing a snapshot) got them queued here by the thousand.
pub const PEER_QUEUE_BYTES_MAX: usize = 64 << 20;
/// Messages per batch on the wire...
const BATCH_MSGS_MAX: usize = 512;
/// ...and bytes of entries per batch.
const BATCH_BYTES_MAX: usize = 4 << 20;
/// Batches handed to a peer's stream and not yet sent (beyond it, dropped).
const BATCHES_IN_FLIGHT: usize = 8;
/// Snapshot chunk size.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Largest snapshot a node accepts (bounds reassembly memory).
pub const SNAPSHOT_BYTES_MAX: usize = 8 << 30;
/// Largest encoded raft batch (bounds decoding).
pub const RAFT_MESSAGE_BYTES_MAX: usize = 256 << 20;

/// Delivers Raft messages to peer nodes.
pub trait Transport: Send + Sync + 'static {
    /// Queues `msg` (addressed by `msg.to`) for group `shard`. Never blocks; may drop.
    fn send(&self, shard: u32, msg: Message);
}

/// Told whether a snapshot reached its destination.
pub type SnapshotReporter = Arc<dyn Fn(u32, u64, bool) + Send + Sync>;

/// Shared, mutable address book of the cluster: node id → gRPC address.
pub type AddressBook = Arc<RwLock<BTreeMap<u64, String>>>;

/// Raft over the `freshet.raft.v1.RaftTransport` gRPC service.
pub struct GrpcTransport {
    self_id: u64,
    self_addr: String,
    addrs: AddressBook,
    peers: Mutex<HashMap<u64, Peer>>,
    reporter: SnapshotReporter,
}

impl GrpcTransport {
    pub fn new(
        self_id: u64,
        self_addr: String,
        addrs: AddressBook,
        reporter: SnapshotReporter,
    ) -> Self {
        GrpcTransport {
            self_id,
            self_addr,
            addrs,
            peers: Mutex::new(HashMap::new()),
            reporter,
        }
    }

    fn peer_queue(&self, to: u64) -> Peer {
        let mut peers = self.peers.lock();
        if let Some(p) = peers.get(&to) {
            if !p.tx.is_closed() {
                return p.clone();
            }
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
        let peer = Peer {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
        };
        tokio::spawn(peer_loop(
            self.self_id,
            self.self_addr.clone(),
            to,
            Arc::clone(&self.addrs),
            rx,
            Arc::clone(&peer.queued),
        ));
        peers.insert(to, peer.clone());
        peer
    }

    fn send_snapshot(&self, shard: u32, msg: Message) {
        let to = msg.to;
        let addr = self.addrs.read().get(&to).cloned();
        let reporter = Arc::clone(&self.reporter);
        let from = self.self_id;
        tokio::spawn(async move {
            let ok = match addr {
                Some(addr) => match send_snapshot(from, &addr, shard, msg).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(shard, to, error = %e, "snapshot send failed");
                        false
                    }
                },
                None => false,
            };
            reporter(shard, to, ok);
        });
    }
}

impl Transport for GrpcTransport {
    fn send(&self, shard: u32, msg: Message) {
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            self.send_snapshot(shard, msg);
            return;
        }
        let peer = self.peer_queue(msg.to);
        let size = queued_size(&msg);
        if !admit(&peer.queued, size) {
            metrics::counter!(crate::metrics::RAFT_DROPPED).increment(1);
            return;
        }
        if peer.tx.try_send((shard, msg, size)).is_err() {
            peer.queued.fetch_sub(size, Ordering::Relaxed);
            metrics::counter!(crate::metrics::RAFT_DROPPED).increment(1);
        }
    }
}

pub use freshet_runtime::grpc::endpoint;

async fn connect(addr: &str) -> Result<RaftTransportClient<Channel>, tonic::transport::Error> {
    let ch = endpoint(addr)?.connect().await?;
    Ok(RaftTransportClient::new(ch)
        .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX))
}

/// One peer's queue: the messages and the bytes of entries they carry.
#[derive(Clone)]
struct Peer {
    tx: mpsc::Sender<(u32, Message, usize)>,
    queued: Arc<AtomicUsize>,
}

/// Counts `size` more bytes into a peer's queue unless that passes
/// [`PEER_QUEUE_BYTES_MAX`]: then the message is dropped like one over the count bound
/// (Raft retransmits; the follower is probed again). A message alone larger than the
/// bound still goes when nothing else is queued.
fn admit(queued: &AtomicUsize, size: usize) -> bool {
    let before = queued.fetch_add(size, Ordering::Relaxed);
    if before > 0 && before + size > PEER_QUEUE_BYTES_MAX {
        queued.fetch_sub(size, Ordering::Relaxed);
        return false;
    }
    true
}

/// What a queued message holds beyond its fixed fields (its entries' payloads), plus a
/// small constant for the rest.
fn queued_size(msg: &Message) -> usize {
    64 + msg
        .get_entries()
        .iter()
        .map(|e| e.data.len() + e.context.len() + 32)
        .sum::<usize>()
}

async fn peer_loop(
    self_id: u64,
    self_addr: String,
    to: u64,
    addrs: AddressBook,
    mut rx: mpsc::Receiver<(u32, Message, usize)>,
    queued: Arc<AtomicUsize>,
) {
    // Messages leave the byte count when they are taken off the queue (into a batch,
    // or dropped).
    let drain = |rx: &mut mpsc::Receiver<(u32, Message, usize)>| {
        while let Ok((_, _, size)) = rx.try_recv() {
            queued.fetch_sub(size, Ordering::Relaxed);
        }
    };
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(addr) = addrs.read().get(&to).cloned() else {
            // Unknown peer: drop what is queued and wait for the address book.
            drain(&mut rx);
            tokio::time::sleep(Duration::from_millis(500)).await;
            if rx.is_closed() {
                return;
            }
            continue;
        };
        let mut client = match connect(&addr).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(to, %addr, error = %e, "peer connect failed");
                drain(&mut rx);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                if rx.is_closed() {
                    return;
                }
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let (btx, brx) = mpsc::channel::<RaftBatch>(BATCHES_IN_FLIGHT);
        let call = client.send(tokio_stream::wrappers::ReceiverStream::new(brx));
        tokio::pin!(call);
        loop {
            tokio::select! {
                r = &mut call => {
                    tracing::debug!(to, result = ?r.map(|_| ()), "peer stream ended");
                    break;
                }
                m = rx.recv() => {
                    let Some((shard, msg, size)) = m else { return };
                    let mut batch = RaftBatch {
                        from_node: self_id,
                        from_addr: self_addr.clone(),
                        messages: Vec::with_capacity(16),
                    };
                    queued.fetch_sub(size, Ordering::Relaxed);
                    let mut bytes = size;
                    push_envelope(&mut batch, (shard, msg));
                    while batch.messages.len() < BATCH_MSGS_MAX && bytes < BATCH_BYTES_MAX {
                        match rx.try_recv() {
                            Ok((shard, msg, size)) => {
                                queued.fetch_sub(size, Ordering::Relaxed);
                                bytes += size;
                                push_envelope(&mut batch, (shard, msg));
                            }
                            Err(_) => break,
                        }
                    }
                    metrics::gauge!(crate::metrics::RAFT_QUEUED_BYTES, "peer" => to.to_string())
                        .set(queued.load(Ordering::Relaxed) as f64);
                    // Never await here: the call future must keep being polled to drain.
                    let n = batch.messages.len() as u64;
                    if let Err(e) = btx.try_send(batch) {
                        // Full (or closed): the batch is dropped; Raft retransmits.
                        metrics::counter!(crate::metrics::RAFT_DROPPED).increment(n);
                        if matches!(e, mpsc::error::TrySendError::Closed(_)) {
                            break;
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn push_envelope(batch: &mut RaftBatch, (shard, msg): (u32, Message)) {
    match msg.write_to_bytes() {
        Ok(b) => batch.messages.push(RaftEnvelope {
            group: u64::from(shard),
            message: Bytes::from(b),
        }),
        Err(e) => tracing::error!(error = %e, "raft message encode failed"),
    }
}

async fn send_snapshot(from: u64, addr: &str, shard: u32, msg: Message) -> anyhow::Result<()> {
    let mut header = msg.clone();
    let data = header.mut_snapshot().data.clone();
    header.mut_snapshot().data = Bytes::new();
    let header = Bytes::from(header.write_to_bytes()?);
    let mut chunks = Vec::with_capacity(data.len() / SNAPSHOT_CHUNK_BYTES + 1);
    let mut offset = 0;
    loop {
        let end = (offset + SNAPSHOT_CHUNK_BYTES).min(data.len());
        chunks.push(SnapshotChunk {
            from_node: from,
            group: u64::from(shard),
            header: if offset == 0 {
                header.clone()
            } else {
                Bytes::new()
            },
            data: data.slice(offset..end),
            last: end == data.len(),
        });
        offset = end;
        if offset >= data.len() {
            break;
        }
    }
    let mut client = connect(addr).await?;
    tokio::time::timeout(
        Duration::from_secs(600),
        client.send_snapshot(tokio_stream::iter(chunks)),
    )
    .await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer's queue takes messages until their entries pass the byte bound, then drops
    /// until the peer loop takes some off; one message larger than the bound still goes
    /// alone. The size counts the entries a message carries.
    #[test]
    fn a_peer_queue_is_bounded_by_bytes() {
        let mut m = Message::default();
        let mut e = raft::eraftpb::Entry::default();
        e.data = vec![0u8; 1 << 20].into();
        m.set_entries(vec![e.clone(), e].into());
        let size = queued_size(&m);
        assert!(size > 2 << 20 && size < (2 << 20) + 1024, "{size}");
        let q = AtomicUsize::new(0);
        let fit = PEER_QUEUE_BYTES_MAX / size;
        assert!((0..fit).all(|_| admit(&q, size)));
        assert!(!admit(&q, size), "over the bound: dropped");
        assert_eq!(
            q.load(Ordering::Relaxed),
            fit * size,
            "a drop counts nothing"
        );
        q.fetch_sub(size, Ordering::Relaxed);
        assert!(admit(&q, size), "room again once the loop took one");
        let empty = AtomicUsize::new(0);
        assert!(
            admit(&empty, PEER_QUEUE_BYTES_MAX * 2),
            "alone, any size goes"
        );
        assert!(!admit(&empty, 100));
    }
}
