//! A PS node: hosts many shard replicas (multi-raft), one owner task per group, one
//! shared WAL and one shared transport.
//!
//! Data dir layout:
//! - `node.json`: node id, shard count, advertised address (written on first start);
//! - `peers.json`: the address book (rewritten when a member is added);
//! - `wal/`: the node-wide log (see [`crate::raft::wal`]);
//! - `snap/<shard>/`: snapshot files; a shard replica exists on this node exactly when
//!   its directory holds a snapshot file (a bootstrap snapshot at index 0 to begin with).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfState, Message, MessageType, SnapshotMetadata,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use freshet_proto::command::v1::{command::Op, Command};
use freshet_proto::ps::v1::TableSpec;
use freshet_proto::META_GROUP;

use crate::config::{NodeAddr, PsConfig, NODE_META_FILE};
use crate::error::PsError;
use crate::fsm::{Outcome, ShardState};
use crate::ps::seals::{AckRecorder, LeaderWork, SealCopier};
use crate::raft::core::{GroupCore, RaftOptions};
use crate::raft::group::{
    run_group, GroupEnv, GroupHandle, GroupMsg, GroupStatus, GroupWiring, LeaderDuty,
};
use crate::raft::storage::{list_snapshots, read_snapshot_file, write_snapshot_file, GroupStorage};
use crate::raft::transport::{AddressBook, Transport};
use crate::raft::wal::{RecoveredGroup, Wal, WalOptions};
use crate::raft::StateMachine as _;

const PEERS_FILE: &str = "peers.json";
/// Requests queued per group before callers get RESOURCE_EXHAUSTED.
const GROUP_MAILBOX_MAX: usize = 8192;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeMeta {
    node_id: u64,
    shard_count: u32,
    advertise: String,
}

/// Builds the transport once the node exists (the transport reports snapshot outcomes
/// back into the node's groups).
pub type TransportFactory = Box<
    dyn FnOnce(
            u64,
            String,
            AddressBook,
            crate::raft::transport::SnapshotReporter,
        ) -> Arc<dyn Transport>
        + Send,
>;

/// A running PS node.
pub struct Node {
    pub id: u64,
    pub addr: String,
    pub shard_count: u32,
    pub cfg: PsConfig,
    opts: RaftOptions,
    data_dir: PathBuf,
    groups: RwLock<HashMap<u32, GroupHandle<ShardState>>>,
    addrs: AddressBook,
    transport: Arc<dyn Transport>,
    wal: Wal,
    shutdown_tx: watch::Sender<bool>,
    /// Set once a group's task died (panicked, or its storage failed): the node must
    /// stop rather than keep looking alive with a dead replica.
    fatal: watch::Sender<Option<String>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    removed: Mutex<HashSet<u32>>,
    /// Last epoch committed by the local meta replica; shard leaders wake on it to copy
    /// new seals into their own logs.
    meta_sealed: watch::Sender<u64>,
    self_ref: Weak<Node>,
}

struct Env(Weak<Node>);

impl GroupEnv<ShardState> for Env {
    fn send(&self, shard: u32, msgs: Vec<Message>) {
        if let Some(node) = self.0.upgrade() {
            for m in msgs {
                node.transport.send(shard, m);
            }
        }
    }
    #[cfg(feature = "failpoints")]
    fn fault_scope(&self) -> bool {
        self.0
            .upgrade()
            .is_some_and(|n| crate::failpoints::in_scope(&n.data_dir))
    }
    fn peer_added(&self, node_id: u64, addr: String) {
        if let Some(node) = self.0.upgrade() {
            node.learn_peer(node_id, addr);
        }
    }
    fn group_removed(&self, shard: u32) {
        if let Some(node) = self.0.upgrade() {
            node.groups.write().remove(&shard);
            node.removed.lock().insert(shard);
        }
    }
    fn applied(&self, core: &GroupCore<ShardState>) {
        if core.shard != META_GROUP {
            return;
        }
        let last_sealed = core.state().read().meta.last_sealed;
        if let Some(node) = self.0.upgrade() {
            node.meta_sealed.send_if_modified(|v| {
                let moved = last_sealed > *v;
                *v = (*v).max(last_sealed);
                moved
            });
        }
    }
    fn leader_duty(
        &self,
        shard: u32,
    ) -> Option<(Box<dyn LeaderDuty<ShardState>>, watch::Receiver<u64>)> {
        let node = self.0.upgrade()?;
        let seals = (shard != META_GROUP).then(|| {
            SealCopier::new(
                {
                    let node = self.0.clone();
                    Box::new(move || node.upgrade().and_then(|n| n.meta_state()))
                },
                node.cfg.data_dir.clone(),
            )
        });
        Some((
            Box::new(LeaderWork {
                seals,
                acks: AckRecorder::default(),
            }),
            // The meta group's duty wakes with its own seals too (harmless: it also
            // runs after every batch of messages).
            node.meta_sealed.subscribe(),
        ))
    }
}

impl Node {
    /// Opens the data dir (bootstrapping it on first start), recovers every hosted group
    /// from its snapshot and the WAL, and starts the group tasks.
    ///
    /// # Errors
    /// Invalid config, or storage that cannot be read.
    pub fn start(
        cfg: PsConfig,
        bound_addr: String,
        transport: TransportFactory,
    ) -> Result<Arc<Node>, PsError> {
        cfg.validate()?;
        let data_dir = cfg.data_dir.clone();
        std::fs::create_dir_all(&data_dir)?;
        let meta_path = data_dir.join(NODE_META_FILE);
        let fresh = !meta_path.exists();
        let meta = if fresh {
            let Some(cluster) = &cfg.cluster else {
                return Err(PsError::invalid(
                    "cluster",
                    "an empty data dir needs the cluster config",
                ));
            };
            NodeMeta {
                node_id: cfg.node_id,
                shard_count: cluster.shards,
                advertise: cfg.advertise.clone().unwrap_or_else(|| bound_addr.clone()),
            }
        } else {
            let m: NodeMeta = serde_json::from_slice(&std::fs::read(&meta_path)?)
                .map_err(|e| PsError::Corrupt(format!("{}: {e}", meta_path.display())))?;
            if cfg.node_id != 0 && cfg.node_id != m.node_id {
                return Err(PsError::invalid(
                    "node_id",
                    format!("data dir belongs to node {}", m.node_id),
                ));
            }
            m
        };
        let mut addrs: BTreeMap<u64, String> = BTreeMap::new();
        let peers_path = data_dir.join(PEERS_FILE);
        if peers_path.exists() {
            let list: Vec<NodeAddr> = serde_json::from_slice(&std::fs::read(&peers_path)?)
                .map_err(|e| PsError::Corrupt(format!("{}: {e}", peers_path.display())))?;
            for p in list {
                addrs.insert(p.id, p.addr);
            }
        }
        if let Some(c) = &cfg.cluster {
            for n in &c.nodes {
                addrs.entry(n.id).or_insert_with(|| n.addr.clone());
            }
        }
        // This node's own address is what it advertises now (ports may change on restart).
        let advertise = cfg.advertise.clone().unwrap_or_else(|| bound_addr.clone());
        addrs.insert(meta.node_id, advertise.clone());

        let (wal, mut recovered) = Wal::open(
            &data_dir.join("wal"),
            WalOptions {
                segment_bytes_max: cfg.wal_segment_bytes_max,
                fsync: cfg.fsync,
            },
        )?;

        let shard_count = meta.shard_count;
        if fresh {
            if let (Some(b), false) = (&cfg.cluster, cfg.join) {
                // Bootstrap snapshot at index 0: initial voters and the configured tables,
                // identical on every initial replica.
                for shard in 0..b.shards {
                    let voters = b.placement(shard);
                    if !voters.contains(&meta.node_id) {
                        continue;
                    }
                    let mut st = ShardState::new(shard);
                    st.impressions.retention = b.impressions.retention();
                    for t in &b.tables {
                        let cmd = Command {
                            op: Some(Op::CreateTable(t.to_spec())),
                            ..Default::default()
                        };
                        let out = st.apply(&cmd, 0, 0);
                        assert!(
                            matches!(out, Outcome::TableCreated(true)),
                            "validated config"
                        );
                    }
                    let mut m = SnapshotMetadata::default();
                    m.set_conf_state(ConfState::from((voters, vec![])));
                    write_snapshot_file(&snap_dir(&data_dir, shard), &m, &st.encode())?;
                }
                let voters = b.meta_placement();
                if voters.contains(&meta.node_id) {
                    let mut st = ShardState::new(META_GROUP);
                    st.meta.model = b.model.as_ref().map(|m| m.to_proto(&b.tables));
                    let mut m = SnapshotMetadata::default();
                    m.set_conf_state(ConfState::from((voters, vec![])));
                    write_snapshot_file(&snap_dir(&data_dir, META_GROUP), &m, &st.encode())?;
                }
            }
            write_json(&meta_path, &meta)?;
        }
        let addrs: AddressBook = Arc::new(RwLock::new(addrs));
        write_peers(&data_dir, &addrs.read())?;

        let (shutdown_tx, _) = watch::channel(false);
        let node = Arc::new_cyclic(|weak: &Weak<Node>| {
            let w = weak.clone();
            let reporter: crate::raft::transport::SnapshotReporter =
                Arc::new(move |shard, to, ok| {
                    if let Some(n) = w.upgrade() {
                        if let Some(g) = n.group(shard) {
                            let _ = g.tx.try_send(GroupMsg::SnapshotReport { to, ok });
                        }
                    }
                });
            let transport = transport(
                meta.node_id,
                advertise.clone(),
                Arc::clone(&addrs),
                reporter,
            );
            Node {
                id: meta.node_id,
                addr: advertise.clone(),
                shard_count,
                opts: cfg.raft_options(),
                cfg,
                data_dir: data_dir.clone(),
                groups: RwLock::new(HashMap::new()),
                addrs,
                transport,
                wal,
                shutdown_tx,
                fatal: watch::channel(None).0,
                tasks: Mutex::new(Vec::new()),
                removed: Mutex::new(HashSet::new()),
                meta_sealed: watch::channel(0).0,
                self_ref: weak.clone(),
            }
        });

        // Recover every group that has a snapshot dir.
        let snap_root = data_dir.join("snap");
        if snap_root.exists() {
            for e in std::fs::read_dir(&snap_root)? {
                let e = e?;
                let Some(shard) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let rec = recovered.remove(&u64::from(shard)).unwrap_or_default();
                node.recover_group(shard, rec)?;
            }
        }
        for (g, rec) in recovered {
            if rec.tombstoned {
                node.removed.lock().insert(g as u32);
            }
        }
        tracing::info!(node = node.id, addr = %node.addr, groups = node.groups.read().len(), "ps node started");
        Ok(node)
    }

    fn recover_group(&self, shard: u32, rec: RecoveredGroup) -> Result<(), PsError> {
        let dir = snap_dir(&self.data_dir, shard);
        if rec.tombstoned {
            let _ = std::fs::remove_dir_all(&dir);
            self.removed.lock().insert(shard);
            return Ok(());
        }
        let snaps = list_snapshots(&dir)?;
        let Some((_, path)) = snaps.last() else {
            // Created for an incoming message but never initialised: nothing to keep.
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(());
        };
        let snap = read_snapshot_file(path)?;
        let meta = snap.get_metadata().clone();
        let state = ShardState::restore(shard, &snap.data, meta.index, meta.term)?;
        if shard == META_GROUP {
            self.meta_sealed.send_replace(state.meta.last_sealed);
        }
        let storage = GroupStorage::recover(dir, Some(meta), rec.hard_state, rec.entries);
        self.spawn_group(shard, storage, state)
    }

    fn spawn_group(
        &self,
        shard: u32,
        storage: GroupStorage,
        state: ShardState,
    ) -> Result<(), PsError> {
        let state = Arc::new(RwLock::new(state));
        let core = GroupCore::new(&self.opts, self.id, shard, storage, Arc::clone(&state))?;
        let (tx, rx) = mpsc::channel(GROUP_MAILBOX_MAX);
        let status = Arc::new(Mutex::new(GroupStatus::default()));
        let feed = Arc::new(crate::fsm::changes::ChangeLog::default());
        let handle = GroupHandle {
            shard,
            tx: tx.clone(),
            state,
            status: Arc::clone(&status),
            feed: Arc::clone(&feed),
        };
        let env: Arc<dyn GroupEnv<ShardState>> = Arc::new(Env(self.self_ref.clone()));
        let group = tokio::spawn(run_group(
            core,
            GroupWiring {
                opts: self.opts.clone(),
                rx,
                self_tx: tx,
                status,
                feed,
                wal: self.wal.clone(),
                env,
                shutdown: self.shutdown_tx.subscribe(),
            },
        ));
        // The watcher turns a dead group task into the node's fatal error.
        let node = self.self_ref.clone();
        let task = tokio::spawn(async move {
            let why = match group.await {
                Ok(true) => return,
                Ok(false) => format!("shard {shard}: the replica's storage failed"),
                Err(e) if e.is_panic() => {
                    let p = e.into_panic();
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    format!("shard {shard}: the raft group task panicked: {msg}")
                }
                Err(_) => return, // cancelled at shutdown
            };
            tracing::error!(
                shard,
                "{why}; stopping the node so its supervisor restarts it"
            );
            if let Some(n) = node.upgrade() {
                n.fatal.send_replace(Some(why));
            }
        });
        self.groups.write().insert(shard, handle);
        self.tasks.lock().push(task);
        Ok(())
    }

    /// Resolves with the reason once a group's task died.
    pub async fn fatal(&self) -> String {
        let mut rx = self.fatal.subscribe();
        loop {
            let why = rx.borrow_and_update().clone();
            if let Some(why) = why {
                return why;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The local replica of `shard`, if this node hosts one.
    pub fn group(&self, shard: u32) -> Option<GroupHandle<ShardState>> {
        self.groups.read().get(&shard).cloned()
    }

    /// Flips to true when the node starts shutting down.
    pub fn shutdown_watch(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    /// The local meta replica's state, when this node hosts one.
    pub fn meta_state(&self) -> Option<Arc<RwLock<ShardState>>> {
        self.group(META_GROUP).map(|g| g.state)
    }

    /// Data shards and the meta group are the groups a node may host.
    pub fn valid_group(&self, shard: u32) -> bool {
        shard < self.shard_count || shard == META_GROUP
    }

    /// Data shards hosted here (the meta group excluded), in order.
    pub fn data_shards(&self) -> Vec<u32> {
        let mut v = self.shards();
        v.retain(|s| *s != META_GROUP);
        v
    }

    /// Every group hosted here (the meta group last), in order.
    pub fn shards(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.groups.read().keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn addr_of(&self, node: u64) -> Option<String> {
        self.addrs.read().get(&node).cloned()
    }

    pub fn address_book(&self) -> BTreeMap<u64, String> {
        self.addrs.read().clone()
    }

    fn learn_peer(&self, node_id: u64, addr: String) {
        let changed = {
            let mut a = self.addrs.write();
            a.insert(node_id, addr.clone()) != Some(addr)
        };
        if changed {
            if let Err(e) = write_peers(&self.data_dir, &self.addrs.read()) {
                tracing::warn!(error = %e, "failed to persist peers");
            }
        }
    }

    /// Routes a message from a peer to its group, creating an empty replica when a
    /// leader contacts this node for a group it was just added to.
    pub fn on_raft_message(&self, shard: u32, msg: Message) {
        if msg.to != self.id {
            return;
        }
        if let Some(g) = self.group(shard) {
            // A full mailbox drops the message; Raft retransmits.
            let _ = g.tx.try_send(GroupMsg::Raft(Box::new(msg)));
            return;
        }
        // A leader's append or snapshot creates a replica, and so does its heartbeat
        // when it carries commit 0 (what a leader sends a member it has never matched):
        // the leader pauses a new member after its first append until a heartbeat is
        // answered, so ignoring it would stall the member forever if that append was
        // lost. A heartbeat with a commit index would make raft-rs panic on an empty log.
        let from_leader = match msg.get_msg_type() {
            MessageType::MsgAppend | MessageType::MsgSnapshot => true,
            MessageType::MsgHeartbeat => msg.commit == 0,
            _ => false,
        };
        if !from_leader
            || *self.shutdown_tx.borrow()
            || !self.valid_group(shard)
            || self.removed.lock().contains(&shard)
        {
            return;
        }
        let dir = snap_dir(&self.data_dir, shard);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(shard, error = %e, "cannot create replica dir");
            return;
        }
        tracing::info!(
            shard,
            from = msg.from,
            "creating replica on leader's request"
        );
        let storage = GroupStorage::new(dir);
        if let Err(e) = self.spawn_group(shard, storage, ShardState::new(shard)) {
            tracing::warn!(shard, error = %e, "cannot create replica");
            return;
        }
        if let Some(g) = self.group(shard) {
            let _ = g.tx.try_send(GroupMsg::Raft(Box::new(msg)));
        }
    }

    /// The error a caller gets from a replica that is not the leader.
    pub fn not_leader(&self, shard: u32, leader_id: u64) -> PsError {
        PsError::NotLeader {
            shard,
            leader_id,
            leader_addr: if leader_id != 0 {
                self.addr_of(leader_id)
            } else {
                None
            },
        }
    }

    fn local(&self, shard: u32) -> Result<GroupHandle<ShardState>, PsError> {
        if !self.valid_group(shard) {
            return Err(PsError::invalid(
                "shard",
                format!("must be < {} (the shard count)", self.shard_count),
            ));
        }
        self.group(shard).ok_or(PsError::ShardNotHere(shard))
    }

    /// Routes a request into a group's mailbox without waiting.
    fn enqueue(
        &self,
        g: &GroupHandle<ShardState>,
        msg: GroupMsg<ShardState>,
    ) -> Result<(), PsError> {
        g.tx.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                PsError::Overloaded(format!("shard {} mailbox is full", g.shard))
            }
            mpsc::error::TrySendError::Closed(_) => PsError::ShuttingDown,
        })
    }

    fn fix_hint(&self, e: PsError) -> PsError {
        match e {
            PsError::NotLeader {
                shard,
                leader_id,
                leader_addr: None,
            } => self.not_leader(shard, leader_id),
            other => other,
        }
    }

    /// Waits for a group task's answer under `timeout`, adding the leader's address to
    /// a NotLeader hint.
    async fn await_reply<T>(
        &self,
        rx: oneshot::Receiver<Result<T, PsError>>,
        timeout: Duration,
        what: impl FnOnce() -> String,
    ) -> Result<T, PsError> {
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r.map_err(|e| self.fix_hint(e)),
            Ok(Err(_)) => Err(PsError::ShuttingDown),
            Err(_) => Err(PsError::Timeout(what())),
        }
    }

    /// Proposes a command on the local leader and waits until it is applied.
    ///
    /// # Errors
    /// NotLeader (with hint), Overloaded, Timeout, or the deterministic rejection.
    pub async fn propose(
        &self,
        shard: u32,
        cmd: Command,
        timeout: Duration,
    ) -> Result<(Outcome, u64), PsError> {
        let g = self.local(shard)?;
        {
            let st = g.status.lock();
            if st.role != "leader" {
                return Err(self.not_leader(shard, st.leader_id));
            }
        }
        let (reply, rx) = oneshot::channel();
        self.enqueue(&g, GroupMsg::Propose { cmd, reply })?;
        let r = self
            .await_reply(rx, timeout, || {
                format!("shard {shard} did not commit in time")
            })
            .await?;
        metrics::counter!(crate::metrics::RAFT_PROPOSALS_COMMITTED).increment(1);
        Ok(r)
    }

    /// Waits until a linearizable read of `shard` may be served locally (ReadIndex).
    ///
    /// # Errors
    /// NotLeader (with hint), Overloaded, Timeout.
    pub async fn read_barrier(
        &self,
        shard: u32,
        timeout: Duration,
    ) -> Result<GroupHandle<ShardState>, PsError> {
        let g = self.local(shard)?;
        {
            let st = g.status.lock();
            if st.role != "leader" {
                return Err(self.not_leader(shard, st.leader_id));
            }
        }
        let (reply, rx) = oneshot::channel();
        self.enqueue(&g, GroupMsg::ReadIndex { reply })?;
        self.await_reply(rx, timeout, || {
            format!("shard {shard} read index timed out")
        })
        .await?;
        Ok(g)
    }

    /// A local replica for a possibly stale read.
    ///
    /// # Errors
    /// The shard is not hosted here.
    pub fn local_replica(&self, shard: u32) -> Result<GroupHandle<ShardState>, PsError> {
        self.local(shard)
    }

    /// Proposes a membership change of `shard` on its local leader.
    ///
    /// # Errors
    /// NotLeader, FAILED_PRECONDITION (change in progress, removing the leader), Timeout.
    pub async fn change_membership(
        &self,
        shard: u32,
        change: ConfChangeType,
        node_id: u64,
        addr: Option<String>,
        timeout: Duration,
    ) -> Result<(), PsError> {
        let g = self.local(shard)?;
        let (role, leader, voters) = {
            let st = g.status.lock();
            (st.role, st.leader_id, st.voters.clone())
        };
        if role != "leader" {
            return Err(self.not_leader(shard, leader));
        }
        match change {
            ConfChangeType::AddNode if voters.contains(&node_id) => return Ok(()),
            ConfChangeType::RemoveNode if !voters.contains(&node_id) => return Ok(()),
            ConfChangeType::RemoveNode if node_id == self.id => {
                return Err(PsError::FailedPrecondition(
                    "cannot remove the shard leader; TransferLeader first".into(),
                ))
            }
            _ => {}
        }
        if let Some(a) = &addr {
            self.learn_peer(node_id, a.clone());
        }
        let mut cc = ConfChange::default();
        cc.set_change_type(change);
        cc.node_id = node_id;
        if let Some(a) = addr {
            cc.context = a.into_bytes().into();
        }
        let (reply, rx) = oneshot::channel();
        self.enqueue(&g, GroupMsg::ConfChange { cc, reply })?;
        self.await_reply(rx, timeout, || {
            "membership change did not commit in time".to_string()
        })
        .await
    }

    /// Asks the local leader of `shard` to hand leadership to `to`.
    ///
    /// # Errors
    /// NotLeader with hint.
    pub async fn transfer_leader(&self, shard: u32, to: u64) -> Result<(), PsError> {
        let g = self.local(shard)?;
        let (reply, rx) = oneshot::channel();
        self.enqueue(&g, GroupMsg::TransferLeader { to, reply })?;
        rx.await
            .map_err(|_| PsError::ShuttingDown)?
            .map_err(|e| self.fix_hint(e))
    }

    /// Table specs as seen by any local replica.
    pub fn table_specs(&self) -> Vec<TableSpec> {
        self.groups
            .read()
            .values()
            .find(|g| g.shard != META_GROUP)
            .map(|g| g.state.read().specs())
            .unwrap_or_default()
    }

    /// Graceful stop: hand off leadership where a peer can take it, then stop the
    /// group tasks (which finish their current Ready) and wait for them.
    pub async fn shutdown(&self) {
        let groups: Vec<GroupHandle<ShardState>> = self.groups.read().values().cloned().collect();
        let mut transferring = false;
        for g in &groups {
            let (role, voters) = {
                let s = g.status.lock();
                (s.role, s.voters.clone())
            };
            if role == "leader" {
                if let Some(&to) = voters.iter().find(|v| **v != self.id) {
                    let (reply, _rx) = oneshot::channel();
                    let _ = g.tx.try_send(GroupMsg::TransferLeader { to, reply });
                    transferring = true;
                }
            }
        }
        if transferring {
            // Bounded wait: a transfer needs one heartbeat round trip.
            let deadline =
                tokio::time::Instant::now() + Duration::from_millis(self.opts.tick_ms * 5);
            while tokio::time::Instant::now() < deadline {
                if groups.iter().all(|g| g.status.lock().role != "leader") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let _ = self.shutdown_tx.send(true);
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *self.tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
        self.groups.write().clear();
        tracing::info!(node = self.id, "ps node stopped");
    }
}

fn snap_dir(data_dir: &Path, shard: u32) -> PathBuf {
    data_dir.join("snap").join(shard.to_string())
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), PsError> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| PsError::Storage(e.to_string()))?;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn write_peers(data_dir: &Path, addrs: &BTreeMap<u64, String>) -> Result<(), PsError> {
    let list: Vec<NodeAddr> = addrs
        .iter()
        .map(|(id, addr)| NodeAddr {
            id: *id,
            addr: addr.clone(),
        })
        .collect();
    write_json(&data_dir.join(PEERS_FILE), &list)
}
