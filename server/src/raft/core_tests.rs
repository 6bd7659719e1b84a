//! Three cores driven by hand: tick, deliver, persist instantly.
use super::*;
use crate::fsm::{Outcome, ShardState};
use crate::raft::storage::{read_snapshot_file, write_snapshot_file};
use freshet_proto::command::v1::{command::Op, Command, SparsePush};
use freshet_proto::ps::v1::ChangeSet;
use freshet_proto::ps::v1::{optimizer_config, OptimizerConfig, SgdConfig, TableKind, TableSpec};
use std::collections::HashMap;
use std::collections::{HashSet, VecDeque};

struct Harness {
    cores: HashMap<u64, GroupCore<ShardState>>,
    down: HashSet<u64>,
    events: HashMap<u64, Vec<Event<Outcome, ChangeSet>>>,
    _dirs: Vec<tempfile::TempDir>,
}

fn opts() -> RaftOptions {
    RaftOptions {
        snapshot_interval_entries: u64::MAX,
        snapshot_log_bytes: u64::MAX,
        ..Default::default()
    }
}

impl Harness {
    fn new(ids: &[u64]) -> Self {
        let mut cores = HashMap::new();
        let mut dirs = Vec::new();
        for &id in ids {
            let dir = tempfile::tempdir().unwrap();
            let mut storage = GroupStorage::new(dir.path().to_path_buf());
            storage.initialize(ConfState::from((ids.to_vec(), vec![])));
            let state = Arc::new(RwLock::new(ShardState::new(0)));
            cores.insert(id, GroupCore::new(&opts(), id, 0, storage, state).unwrap());
            dirs.push(dir);
        }
        Harness {
            cores,
            down: HashSet::new(),
            events: HashMap::new(),
            _dirs: dirs,
        }
    }

    /// Runs Ready rounds and delivers messages until the network is quiet.
    fn settle(&mut self) {
        let mut queue: VecDeque<Message> = VecDeque::new();
        for _ in 0..10_000 {
            let mut progressed = false;
            let ids: Vec<u64> = self.cores.keys().copied().collect();
            for id in ids {
                let core = self.cores.get_mut(&id).unwrap();
                while let Some(work) = core.begin_ready().unwrap() {
                    progressed = true;
                    core.finish_ready(work);
                }
                queue.extend(core.take_outbox());
                self.events
                    .entry(id)
                    .or_default()
                    .extend(core.take_events());
                // What the owner task does off its loop: read the snapshot raft-rs asked for.
                if let Some(path) = core.storage().take_load_wanted() {
                    core.storage()
                        .set_loaded(read_snapshot_file(&path).expect("snapshot file"));
                }
            }
            while let Some(m) = queue.pop_front() {
                progressed = true;
                if self.down.contains(&m.to) || self.down.contains(&m.from) {
                    continue;
                }
                if let Some(c) = self.cores.get_mut(&m.to) {
                    c.step(m).unwrap();
                }
            }
            if !progressed {
                return;
            }
        }
        panic!("network never settled");
    }

    fn tick_all(&mut self, n: usize) {
        for _ in 0..n {
            for (id, c) in self.cores.iter_mut() {
                if !self.down.contains(id) {
                    c.tick();
                }
            }
            self.settle();
        }
    }

    /// Proposes on core `id`, which must be the leader.
    fn propose(&mut self, id: u64, cmd: &Command) {
        let mut cmd = cmd.clone();
        let proposal_id = cmd.proposal_id;
        let core = self.cores.get_mut(&id).unwrap();
        core.propose(&mut cmd, proposal_id).unwrap();
    }

    /// Ticks until some live core leads (randomised timeouts can split votes).
    fn elect(&mut self) -> u64 {
        for _ in 0..500 {
            if let Some(l) = self.leader() {
                return l;
            }
            self.tick_all(1);
        }
        panic!("no leader after 500 ticks");
    }

    fn leader(&self) -> Option<u64> {
        self.cores
            .iter()
            .find(|(id, c)| !self.down.contains(id) && c.is_leader())
            .map(|(id, _)| *id)
    }
}

fn table_cmd() -> Command {
    Command {
        proposal_id: 1,
        op: Some(Op::CreateTable(TableSpec {
            name: "t".into(),
            kind: TableKind::Sparse as i32,
            dim: 2,
            optimizer: Some(OptimizerConfig {
                kind: Some(optimizer_config::Kind::Sgd(SgdConfig { lr: 0.1 })),
            }),
            init_scale: 0.1,
            seed: 1,
            limits: None,
        })),
        ..Default::default()
    }
}

fn push_cmd(id: u64, seq: u64) -> Command {
    Command {
        proposal_id: 100 + seq,
        client_id: 5,
        seq,
        op: Some(Op::Push(SparsePush {
            table: "t".into(),
            ids: vec![seq % 7, 100 + seq],
            grads: vec![1.0, 2.0, 3.0, 4.0],
        })),
    }
    .tap(|c| c.proposal_id = id)
}

trait Tap: Sized {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}
impl Tap for Command {}

#[test]
fn elects_a_leader_replicates_and_applies_identically() {
    let mut h = Harness::new(&[1, 2, 3]);
    let leader = h.elect();
    h.propose(leader, &table_cmd());
    for seq in 1..=20 {
        h.propose(leader, &push_cmd(1000 + seq, seq));
    }
    h.settle();
    h.tick_all(3);
    let sums: Vec<u64> = h
        .cores
        .values()
        .map(|c| c.state().read().checksum())
        .collect();
    assert!(sums.windows(2).all(|w| w[0] == w[1]), "{sums:?}");
    let applied: Vec<u64> = h.cores.values().map(|c| c.applied_index()).collect();
    assert!(applied.windows(2).all(|w| w[0] == w[1]), "{applied:?}");
    // The leader reported every proposal's outcome, matched by id.
    let evs = &h.events[&leader];
    let ids: HashSet<u64> = evs
        .iter()
        .filter_map(|e| match e {
            Event::Applied {
                proposal_id,
                outcome: Outcome::Applied,
                ..
            } => Some(*proposal_id),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 20);
}

#[test]
fn survives_leader_loss_and_retried_push_applies_once() {
    let mut h = Harness::new(&[1, 2, 3]);
    let old = h.elect();
    h.propose(old, &table_cmd());
    h.propose(old, &push_cmd(11, 1));
    h.settle();
    h.down.insert(old);
    let new = h.elect();
    assert_ne!(new, old);
    // Retry of seq 1 (outcome unknown to the client) plus a new seq 2.
    h.propose(new, &push_cmd(21, 1));
    h.propose(new, &push_cmd(22, 2));
    h.settle();
    let evs = &h.events[&new];
    assert!(evs.contains(&Event::Applied {
        proposal_id: 21,
        outcome: Outcome::Duplicate,
        index: h.cores[&new].applied_index() - 1,
    }));
    // The old leader comes back and converges.
    h.down.remove(&old);
    h.tick_all(20);
    let sums: Vec<u64> = h
        .cores
        .values()
        .map(|c| c.state().read().checksum())
        .collect();
    assert!(sums.windows(2).all(|w| w[0] == w[1]), "{sums:?}");
}

#[test]
fn leadership_moves_to_the_preferred_replica_once_it_is_caught_up() {
    let mut h = Harness::new(&[1, 2, 3]);
    let leader = h.elect();
    h.propose(leader, &table_cmd());
    h.tick_all(5);
    // Shard 0 prefers the first voter, node 1.
    let ready = h.cores[&leader].preferred_leader_ready();
    if leader == 1 {
        assert_eq!(ready, None);
        return;
    }
    assert_eq!(ready, Some(1));
    h.cores.get_mut(&leader).unwrap().transfer_leader(1);
    h.tick_all(5);
    assert_eq!(h.leader(), Some(1));
    assert_eq!(h.cores[&1].preferred_leader_ready(), None);
}

#[test]
fn read_index_confirms_on_the_leader_only() {
    let mut h = Harness::new(&[1, 2, 3]);
    let leader = h.elect();
    h.cores.get_mut(&leader).unwrap().read_index(77);
    h.settle();
    assert!(h.events[&leader]
        .iter()
        .any(|e| matches!(e, Event::ReadReady { ctx: 77, .. })));
    let follower = *h.cores.keys().find(|id| **id != leader).unwrap();
    assert!(matches!(
        h.cores.get_mut(&follower).unwrap().propose(&mut table_cmd(), 0),
        Err(PsError::NotLeader { leader_id, .. }) if leader_id == leader
    ));
}

#[test]
fn snapshot_brings_a_new_member_up_to_date() {
    let mut h = Harness::new(&[1, 2, 3]);
    let leader = h.elect();
    h.propose(leader, &table_cmd());
    for seq in 1..=10 {
        h.propose(leader, &push_cmd(500 + seq, seq));
    }
    h.settle();
    // Snapshot and compact every replica's log.
    for c in h.cores.values_mut() {
        let meta = c.snapshot_meta();
        let data = c.state().read().encode();
        write_snapshot_file(c.storage().snap_dir(), &meta, &data).unwrap();
        c.snapshot_written(meta);
    }
    // Add node 4 (empty, uninitialised) as a voter.
    let dir = tempfile::tempdir().unwrap();
    let storage = GroupStorage::new(dir.path().to_path_buf());
    let state = Arc::new(RwLock::new(ShardState::new(0)));
    h.cores
        .insert(4, GroupCore::new(&opts(), 4, 0, storage, state).unwrap());
    h._dirs.push(dir);
    let mut cc = ConfChange::default();
    cc.set_change_type(ConfChangeType::AddNode);
    cc.node_id = 4;
    cc.id = 9;
    cc.context = b"127.0.0.1:1".to_vec().into();
    h.cores
        .get_mut(&leader)
        .unwrap()
        .propose_conf_change(cc)
        .unwrap();
    // The old snapshot predates node 4's membership: the leader asks for a new one,
    // which its owner (here: the test) builds.
    let mut rebuilt = false;
    for _ in 0..20 {
        h.tick_all(1);
        let c = h.cores.get_mut(&leader).unwrap();
        if c.storage().take_snapshot_wanted() {
            let meta = c.snapshot_meta();
            let data = c.state().read().encode();
            write_snapshot_file(c.storage().snap_dir(), &meta, &data).unwrap();
            c.snapshot_written(meta);
            rebuilt = true;
        }
    }
    assert!(rebuilt);
    let snap4 = h.cores[&4].storage().snapshot_index();
    assert!(snap4 > 0, "node 4 caught up by snapshot");
    let sums: HashSet<u64> = h
        .cores
        .values()
        .map(|c| c.state().read().checksum())
        .collect();
    assert_eq!(sums.len(), 1);
    assert_eq!(h.cores[&4].voters(), vec![1, 2, 3, 4]);
    assert!(h.events[&leader].contains(&Event::PeerAdded {
        node_id: 4,
        addr: "127.0.0.1:1".into()
    }));
}
