//! Unit tests of the shard state machine.

use freshet_proto::command::v1::{command::Op, Command, StepPush};
use freshet_proto::ps::v1::{optimizer_config, OptimizerConfig, Seal, TableKind, TableSpec};
use freshet_proto::META_GROUP;

use super::epoch::{MetaOutcome, StepCheck};
use super::*;
use freshet_proto::command::v1::{DensePush, SparsePush};
use freshet_proto::ps::v1::{AdagradConfig, AdamConfig, CountsConfig, FtrlConfig, SgdConfig};

pub(crate) fn spec(name: &str, dim: u32, opt: optimizer_config::Kind) -> TableSpec {
    TableSpec {
        name: name.into(),
        kind: TableKind::Sparse as i32,
        dim,
        optimizer: Some(OptimizerConfig { kind: Some(opt) }),
        init_scale: 0.01,
        seed: 7,
        limits: None,
    }
}

fn create(s: &mut ShardState, spec: TableSpec) {
    let cmd = Command {
        op: Some(Op::CreateTable(spec)),
        ..Default::default()
    };
    assert_eq!(s.apply(&cmd, 1, 1), Outcome::TableCreated(true));
}

fn push(client: u64, seq: u64, table: &str, ids: Vec<u64>, grads: Vec<f32>) -> Command {
    Command {
        proposal_id: 0,
        client_id: client,
        seq,
        op: Some(Op::Push(SparsePush {
            table: table.into(),
            ids,
            grads,
        })),
    }
}

#[test]
fn update_table_changes_rates_only() {
    let mut s = ShardState::new(0);
    let sgd = |lr| spec("t", 2, optimizer_config::Kind::Sgd(SgdConfig { lr }));
    create(&mut s, sgd(0.5));
    let update = |spec: TableSpec| Command {
        op: Some(Op::UpdateTable(spec)),
        ..Default::default()
    };
    let mut w = [0.0f32; 2];
    s.table("t").unwrap().read_into(5, &mut w);
    assert_eq!(
        s.apply(&push(1, 1, "t", vec![5], vec![1.0, 1.0]), 2, 1),
        Outcome::Applied
    );
    assert_eq!(
        s.apply(&update(sgd(0.25)), 3, 1),
        Outcome::TableCreated(true)
    );
    assert_eq!(
        s.apply(&update(sgd(0.25)), 4, 1),
        Outcome::TableCreated(false)
    );
    assert_eq!(
        s.apply(&push(1, 2, "t", vec![5], vec![1.0, 1.0]), 5, 1),
        Outcome::Applied
    );
    let mut after = [0.0f32; 2];
    s.table("t").unwrap().read_into(5, &mut after);
    assert_eq!(after[0], w[0] - 0.5 - 0.25);
    // Layout, initialiser and optimizer kind are fixed; the rate must be valid; a
    // refused update changes nothing.
    let mut wider = sgd(0.1);
    wider.dim = 3;
    let mut reseeded = sgd(0.1);
    reseeded.seed = 8;
    let adagrad = spec(
        "t",
        2,
        optimizer_config::Kind::Adagrad(AdagradConfig {
            lr: 0.1,
            initial_accumulator: 0.1,
            eps: 1e-8,
        }),
    );
    let missing = spec("u", 2, optimizer_config::Kind::Sgd(SgdConfig { lr: 0.1 }));
    for (bad, want) in [
        (wider, "spec.dim"),
        (reseeded, "spec.seed"),
        (adagrad, "spec.optimizer"),
        (sgd(f32::NAN), "spec.optimizer.sgd.lr"),
        (missing, "no table"),
    ] {
        match s.apply(&update(bad), 6, 1) {
            Outcome::Rejected(r) => assert!(r.to_string().contains(want), "{want}: {r}"),
            other => panic!("{want}: {other:?}"),
        }
    }
    assert_eq!(s.table("t").unwrap().spec, sgd(0.25));
}

#[test]
fn lazy_init_is_deterministic_and_in_range() {
    let a = init_value(7, name_hash("t"), 42, 3, 0.01);
    let b = init_value(7, name_hash("t"), 42, 3, 0.01);
    assert_eq!(a.to_bits(), b.to_bits());
    assert!(a.abs() <= 0.01);
    assert_ne!(a, init_value(7, name_hash("t"), 43, 3, 0.01));
    assert_ne!(a, init_value(8, name_hash("t"), 42, 3, 0.01));
}

#[test]
fn sgd_and_adagrad_math() {
    let mut s = ShardState::new(0);
    create(
        &mut s,
        spec("sgd", 2, optimizer_config::Kind::Sgd(SgdConfig { lr: 0.5 })),
    );
    create(
        &mut s,
        spec(
            "ada",
            1,
            optimizer_config::Kind::Adagrad(AdagradConfig {
                lr: 1.0,
                initial_accumulator: 0.0,
                eps: 1e-8,
            }),
        ),
    );
    let mut before = [0.0f32; 2];
    s.table("sgd").unwrap().read_into(5, &mut before);
    assert_eq!(
        s.apply(&push(1, 1, "sgd", vec![5], vec![1.0, -2.0]), 2, 1),
        Outcome::Applied
    );
    let mut after = [0.0f32; 2];
    s.table("sgd").unwrap().read_into(5, &mut after);
    assert_eq!(after[0], before[0] - 0.5);
    assert_eq!(after[1], before[1] + 1.0);

    let mut w0 = [0.0f32];
    s.table("ada").unwrap().read_into(9, &mut w0);
    s.apply(&push(1, 2, "ada", vec![9], vec![2.0]), 3, 1);
    let mut w1 = [0.0f32];
    s.table("ada").unwrap().read_into(9, &mut w1);
    // accumulator 4, step = 1 * 2 / 2 = 1.
    assert!((w1[0] - (w0[0] - 1.0)).abs() < 1e-6);
}

#[test]
fn adam_and_ftrl_move_against_the_gradient() {
    let mut s = ShardState::new(0);
    create(
        &mut s,
        spec(
            "adam",
            3,
            optimizer_config::Kind::Adam(AdamConfig {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            }),
        ),
    );
    create(
        &mut s,
        spec(
            "ftrl",
            3,
            optimizer_config::Kind::Ftrl(FtrlConfig {
                alpha: 0.1,
                beta: 1.0,
                l1: 0.0,
                l2: 0.0,
            }),
        ),
    );
    for (seq, t) in [(1, "adam"), (2, "ftrl")] {
        let mut w0 = [0.0f32; 3];
        s.table(t).unwrap().read_into(1, &mut w0);
        s.apply(&push(1, seq, t, vec![1], vec![1.0, -1.0, 0.0]), seq + 1, 1);
        let mut w1 = [0.0f32; 3];
        s.table(t).unwrap().read_into(1, &mut w1);
        assert!(
            w1[0] < w0[0] || t == "ftrl" && w1[0] < 0.0,
            "{t}: {w0:?} -> {w1:?}"
        );
        assert!(
            w1[1] > w0[1] || t == "ftrl" && w1[1] > 0.0,
            "{t}: {w0:?} -> {w1:?}"
        );
    }
    // Adam's first step is ~lr in magnitude.
    let mut w = [0.0f32; 3];
    s.table("adam").unwrap().read_into(1, &mut w);
    let init = init_value(7, name_hash("adam"), 1, 0, 0.01);
    assert!(((init - w[0]) - 0.1).abs() < 1e-4);
}

#[test]
fn adam_weight_decay_shrinks_the_row_after_each_step() {
    let adam = |weight_decay| {
        optimizer_config::Kind::Adam(AdamConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        })
    };
    let mut s = ShardState::new(0);
    create(&mut s, spec("plain", 1, adam(0.0)));
    create(&mut s, spec("decayed", 1, adam(0.25)));
    s.apply(&push(1, 1, "plain", vec![1], vec![-1.0]), 2, 1);
    s.apply(&push(1, 2, "decayed", vec![1], vec![-1.0]), 3, 1);
    let read = |t: &str| {
        let mut w = [0.0f32];
        s.table(t).unwrap().read_into(1, &mut w);
        w[0]
    };
    // The same Adam step from the same start (the init is a function of the table
    // name: compare each to its own), then 3/4 of it kept.
    let step = |t: &str| init_value(7, name_hash(t), 1, 0, 0.01) + 0.1;
    assert!((read("plain") - step("plain")).abs() < 1e-4);
    assert!((read("decayed") - 0.75 * step("decayed")).abs() < 1e-4);
    let bad = spec("bad", 1, adam(1.0));
    assert_eq!(
        validate_spec(&bad).unwrap_err().field,
        "spec.optimizer.adam.weight_decay"
    );
}

fn counts_spec(forget: f32) -> TableSpec {
    TableSpec {
        init_scale: 0.0,
        ..spec(
            "counts",
            5,
            optimizer_config::Kind::Counts(CountsConfig { forget }),
        )
    }
}

/// The counts optimizer adds clicks and shown slots to both windows, forgets the short
/// one by (1 - forget)^passed first, a restart sets the long window to the short one
/// (idempotent: two workers' restarts in one step give what one gives), the rate is set
/// to the push's passed-weighted mean, and a long window past 2^20 slots halves.
#[test]
fn counts_add_forget_and_restart() {
    let mut s = ShardState::new(0);
    create(&mut s, counts_spec(0.5));
    let read = |s: &ShardState, id: u64| {
        let mut w = [0.0f32; 5];
        s.table("counts").unwrap().read_into(id, &mut w);
        w
    };
    assert_eq!(read(&s, 3), [0.0; 5], "a counts row starts at 0");
    let counts = |seq, g: [f32; 5]| push(1, seq, "counts", vec![3], g.to_vec());
    s.apply(&counts(1, [2.0, 10.0, 0.0, 0.0, 0.0]), 2, 1);
    assert_eq!(read(&s, 3), [2.0, 10.0, 2.0, 10.0, 0.0]);
    // Two slots passed: the short window keeps 1/4, then adds; the rate is set to
    // 0.25 / 2.
    s.apply(&counts(2, [1.0, 2.0, 2.0, 0.0, 0.25]), 3, 1);
    assert_eq!(read(&s, 3), [3.0, 12.0, 1.5, 4.5, 0.125]);
    // A restart: long := short (after this push's counts); the rate set again, not added.
    s.apply(&counts(3, [0.0, 1.0, 1.0, 1.0, 0.5]), 4, 1);
    assert_eq!(read(&s, 3), [0.75, 3.25, 0.75, 3.25, 0.5]);
    // Two restarts summed in one push are one restart; two rates, their weighted mean.
    let mut t = ShardState::new(0);
    create(&mut t, counts_spec(0.5));
    t.apply(&counts(1, [2.0, 10.0, 0.0, 0.0, 0.0]), 2, 1);
    t.apply(&counts(2, [4.0, 8.0, 0.0, 0.0, 0.0]), 3, 1);
    t.apply(
        &counts(3, [0.0, 0.0, 2.0, 2.0, 1.0 * 0.25 + 1.0 * 0.75]),
        4,
        1,
    );
    assert_eq!(read(&t, 3), [1.5, 4.5, 1.5, 4.5, 0.5]);
    // Past 2^20 shown slots the long window halves; the short one is left alone. (A
    // push's values are capped at 10^6, so two pushes get there.)
    for (seq, g) in [
        (4, [2.0, 600_000.0, 0.0, 0.0, 0.0]),
        (5, [0.0, 600_000.0, 0.0, 0.0, 0.0]),
    ] {
        t.apply(&push(1, seq, "counts", vec![8], g.to_vec()), seq + 1, 1);
    }
    assert_eq!(read(&t, 8), [1.0, 600_000.0, 2.0, 1_200_000.0, 0.0]);
    // Negative counts are refused, naming the value, and change nothing.
    let before = s.checksum();
    for (seq, ids, grads, field) in [
        (4, vec![3], vec![0.0, -1.0, 0.0, 0.0, 0.0], "grads[1]"),
        (
            5,
            vec![3, 4],
            vec![0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, -0.5],
            "grads[9]",
        ),
    ] {
        match s.apply(&push(1, seq, "counts", ids, grads), seq + 1, 1) {
            Outcome::Rejected(r) => assert!(format!("{r:?}").contains(field), "{r:?}"),
            o => panic!("{o:?}"),
        }
    }
    assert_eq!(s.checksum(), before);
    // A counts table is sparse, 5 wide and starts at 0.
    for bad in [
        TableSpec {
            dim: 4,
            ..counts_spec(0.5)
        },
        TableSpec {
            init_scale: 0.01,
            ..counts_spec(0.5)
        },
        TableSpec {
            kind: TableKind::Dense as i32,
            ..counts_spec(0.5)
        },
    ] {
        assert_eq!(
            validate_spec(&bad).unwrap_err().field,
            "spec.optimizer.counts"
        );
    }
    assert_eq!(
        validate_spec(&counts_spec(1.0)).unwrap_err().field,
        "spec.optimizer.counts.forget"
    );
}

#[test]
fn exactly_once_is_exact_under_reordering() {
    let mut s = ShardState::new(0);
    create(
        &mut s,
        spec("t", 1, optimizer_config::Kind::Sgd(SgdConfig { lr: 1.0 })),
    );
    // Seqs 3, 1, 3 (retry), 2, 1 (retry): each applied once.
    let order = [3u64, 1, 3, 2, 1];
    let mut outcomes = vec![];
    for (i, seq) in order.iter().enumerate() {
        outcomes.push(s.apply(&push(9, *seq, "t", vec![1], vec![1.0]), 10 + i as u64, 1));
    }
    use Outcome::*;
    assert_eq!(
        outcomes,
        vec![Applied, Applied, Duplicate, Applied, Duplicate]
    );
    let sess = s.session(9).unwrap();
    assert_eq!(sess.floor, 3);
    assert!(sess.above.is_empty());
    let mut w = [0.0f32];
    s.table("t").unwrap().read_into(1, &mut w);
    let init = init_value(7, name_hash("t"), 1, 0, 0.01);
    assert_eq!(w[0], ((init - 1.0) - 1.0) - 1.0);
}

#[test]
fn duplicate_ids_in_one_push_are_summed() {
    let mut a = ShardState::new(0);
    let mut b = ShardState::new(0);
    for s in [&mut a, &mut b] {
        create(
            s,
            spec("t", 2, optimizer_config::Kind::Sgd(SgdConfig { lr: 1.0 })),
        );
    }
    a.apply(&push(1, 1, "t", vec![4, 4], vec![1.0, 2.0, 3.0, 4.0]), 2, 1);
    b.apply(&push(1, 1, "t", vec![4], vec![4.0, 6.0]), 2, 1);
    assert_eq!(a.checksum(), b.checksum());
}

#[test]
fn bad_commands_are_rejected_without_change() {
    let mut s = ShardState::new(0);
    create(
        &mut s,
        spec("t", 2, optimizer_config::Kind::Sgd(SgdConfig { lr: 1.0 })),
    );
    let before = s.checksum();
    for cmd in [
        push(1, 1, "nope", vec![1], vec![1.0, 1.0]),
        push(1, 1, "t", vec![1], vec![1.0]),
        push(1, 1, "t", vec![1], vec![f32::NAN, 1.0]),
        push(1, 1, "t", vec![], vec![]),
        push(1, 0, "t", vec![1], vec![1.0, 1.0]),
        push(1, SESSION_WINDOW + 5, "t", vec![1], vec![1.0, 1.0]),
    ] {
        assert!(
            matches!(s.apply(&cmd, 5, 1), Outcome::Rejected(_)),
            "{cmd:?}"
        );
    }
    let mut different = spec("t", 3, optimizer_config::Kind::Sgd(SgdConfig { lr: 1.0 }));
    let cmd = Command {
        op: Some(Op::CreateTable(different.clone())),
        ..Default::default()
    };
    assert!(matches!(s.apply(&cmd, 6, 1), Outcome::Rejected(_)));
    different.dim = 2;
    let cmd = Command {
        op: Some(Op::CreateTable(different)),
        ..Default::default()
    };
    assert_eq!(s.apply(&cmd, 7, 1), Outcome::TableCreated(false));
    assert_eq!(s.checksum(), before);
}

fn step(inc: u64, step: u64, ids: Vec<u64>) -> Command {
    let n = ids.len();
    Command {
        op: Some(Op::PushStep(StepPush {
            inc,
            step,
            sparse: vec![freshet_proto::ps::v1::SparseGrads {
                table: "t".into(),
                ids,
                grads: (0..n * 2).map(|k| k as f32 * 0.1 - 0.3).collect(),
            }],
            dense: vec![],
            part: 0,
        })),
        ..Default::default()
    }
}

fn seal_cmd(first: u64, epoch: u64, cuts: &[(u64, u64)], fenced: &[u64]) -> Command {
    Command {
        op: Some(Op::ShardSeal(freshet_proto::command::v1::ShardSeal {
            seals: vec![Seal {
                first_epoch: first,
                epoch,
                cuts: cuts
                    .iter()
                    .map(|&(inc, step)| freshet_proto::ps::v1::Cut { inc, step })
                    .collect(),
                fenced: fenced.to_vec(),
                proposed_at_ms: 0,
                ..Default::default()
            }],
        })),
        ..Default::default()
    }
}

/// A follower restored from a snapshot and promoted before the seal still holds the
/// buffered steps, floors, fences and catalog upserts, and seals exactly like the
/// replica the snapshot came from.
#[test]
fn buffered_steps_survive_a_snapshot_and_seal_identically() {
    let mut a = ShardState::new(0);
    create(
        &mut a,
        spec("t", 2, optimizer_config::Kind::Sgd(SgdConfig { lr: 0.5 })),
    );
    assert_eq!(a.apply(&step(1, 1, vec![5, 6]), 2, 1), Outcome::Applied);
    assert_eq!(a.apply(&step(1, 2, vec![6]), 3, 1), Outcome::Applied);
    assert_eq!(a.apply(&step(2, 1, vec![5]), 4, 1), Outcome::Applied);
    assert_eq!(a.apply(&step(1, 2, vec![6]), 5, 1), Outcome::Duplicate);
    assert_eq!(
        a.apply(&seal_cmd(1, 1, &[(1, 1)], &[]), 6, 1),
        Outcome::Applied
    );
    let items = Command {
        op: Some(Op::UpsertItems(freshet_proto::command::v1::ItemUpsert {
            items: vec![freshet_proto::ps::v1::Item {
                id: 9,
                features: vec!["c=1".into()],
                active: true,
                title: "Red shoe".into(),
            }],
            sets: vec![freshet_proto::ps::v1::CandidateSet {
                name: "s".into(),
                items: vec![9],
            }],
        })),
        ..Default::default()
    };
    assert_eq!(a.apply(&items, 7, 1), Outcome::Applied);
    a.take_emitted();
    let mut b = ShardState::decode(&a.encode()).unwrap();
    assert_eq!(a.checksum(), b.checksum());
    assert_eq!(b.steps.pending_steps, 2);
    assert_eq!(b.steps.check(1, 1, 0), StepCheck::Duplicate);
    // Epoch 2 seals inc 1 step 2 and fences inc 2 (its step 1 is dropped).
    let next = seal_cmd(2, 2, &[(1, 2)], &[2]);
    assert_eq!(a.apply(&next, 8, 1), Outcome::Applied);
    assert_eq!(b.apply(&next, 8, 1), Outcome::Applied);
    assert_eq!(a.checksum(), b.checksum());
    assert_eq!(a.take_emitted(), b.take_emitted());
    assert_eq!(b.steps.pending_steps, 0);
    assert_eq!(b.steps.check(2, 7, 0), StepCheck::Fenced);
    assert_eq!(b.steps.items.len(), 1);
    assert_eq!(b.steps.sets["s"], vec![9]);
    // A gap is refused deterministically; a repeat changes nothing.
    assert!(matches!(
        b.apply(&seal_cmd(4, 4, &[], &[]), 9, 1),
        Outcome::Rejected(_)
    ));
    assert_eq!(b.apply(&next, 10, 1), Outcome::Duplicate);
}

#[test]
fn meta_registry_and_seals_survive_a_snapshot() {
    let mut m = ShardState::new(META_GROUP);
    let reg = Command {
        op: Some(Op::RegisterWorker(
            freshet_proto::command::v1::RegisterWorker {
                name: "w".into(),
                addr: "127.0.0.1:1".into(),
            },
        )),
        ..Default::default()
    };
    assert_eq!(
        m.apply(&reg, 1, 1),
        Outcome::Meta(MetaOutcome::Registered(1))
    );
    let seal = Command {
        op: Some(Op::Seal(freshet_proto::command::v1::SealCuts {
            cuts: vec![freshet_proto::ps::v1::Cut { inc: 1, step: 4 }],
            proposed_at_ms: 5,
            force: false,
        })),
        ..Default::default()
    };
    assert_eq!(m.apply(&seal, 2, 1), Outcome::Meta(MetaOutcome::Sealed(1)));
    m.meta.model = Some(freshet_proto::ps::v1::ModelConfig {
        dim: 4,
        tower: "residual_tanh".into(),
        clip: 3.0,
        ..Default::default()
    });
    let mut r = ShardState::decode(&m.encode()).unwrap();
    r.shard = META_GROUP;
    assert_eq!(r.checksum(), m.checksum());
    assert_eq!(
        r.meta.model, m.meta.model,
        "the model spec travels in snapshots"
    );
    assert_eq!(r.meta.last_sealed, 1);
    assert_eq!(r.meta.worker(1).unwrap().addr, "127.0.0.1:1");
    // The next incarnation and epoch continue from the snapshot.
    assert_eq!(
        r.apply(&reg, 3, 1),
        Outcome::Meta(MetaOutcome::Registered(2))
    );
    assert_eq!(r.apply(&seal, 4, 1), Outcome::Meta(MetaOutcome::Unchanged));
}

/// Issue 16: the members a leader saw acknowledge entries are replicated state in every
/// group (data shards and meta), bounded, kept by snapshots, and left out of the
/// checksum (Raft membership, not the model: reference replays know only the pushes).
#[test]
fn acknowledged_members_are_kept_by_every_group_and_its_snapshots() {
    let acked = |ids: &[u64]| Command {
        op: Some(Op::MembersAcknowledged(
            freshet_proto::command::v1::MembersAcknowledged {
                node_ids: ids.to_vec(),
            },
        )),
        ..Default::default()
    };
    for group in [0, META_GROUP] {
        let mut s = ShardState::new(group);
        let before = s.checksum();
        assert_eq!(s.apply(&acked(&[3, 1]), 1, 1), Outcome::Applied);
        assert_eq!(s.apply(&acked(&[1, 2]), 2, 1), Outcome::Applied);
        assert_eq!(
            s.acked_members.iter().copied().collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(s.checksum(), before, "not part of the checksum");
        let mut r = ShardState::decode(&s.encode()).unwrap();
        r.shard = group;
        assert_eq!(r.acked_members, s.acked_members, "group {group}");
    }
    // Bounded: past the limit, further ids are not recorded.
    let mut s = ShardState::new(0);
    let many: Vec<u64> = (1..=shard::ACKED_MEMBERS_MAX as u64 + 10).collect();
    assert_eq!(s.apply(&acked(&many), 1, 1), Outcome::Applied);
    assert_eq!(s.acked_members.len(), shard::ACKED_MEMBERS_MAX);
    assert!(!s
        .acked_members
        .contains(&(shard::ACKED_MEMBERS_MAX as u64 + 1)));
}

#[test]
fn snapshot_round_trip_preserves_checksum_and_sessions() {
    let mut s = ShardState::new(3);
    create(
        &mut s,
        spec(
            "t",
            4,
            optimizer_config::Kind::Adam(AdamConfig {
                lr: 0.01,
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
                weight_decay: 0.0,
            }),
        ),
    );
    let mut dense = spec("d", 5, optimizer_config::Kind::Sgd(SgdConfig { lr: 0.1 }));
    dense.kind = TableKind::Dense as i32;
    create(&mut s, dense);
    for seq in 1..50u64 {
        let ids: Vec<u64> = (0..10).map(|i| (seq * 31 + i * 7) % 97).collect();
        let grads: Vec<f32> = (0..40).map(|k| ((seq + k) % 5) as f32 - 2.0).collect();
        s.apply(&push(11, seq, "t", ids, grads), seq + 1, 2);
    }
    let dense_push = Command {
        client_id: 12,
        seq: 2,
        op: Some(Op::PushDense(DensePush {
            name: "d".into(),
            grads: vec![1.0; 5],
        })),
        ..Default::default()
    };
    assert_eq!(s.apply(&dense_push, 60, 2), Outcome::Applied);
    let bytes = s.encode();
    let r = ShardState::decode(&bytes).unwrap();
    assert_eq!(r.checksum(), s.checksum());
    assert_eq!(r.applied_index, 60);
    assert_eq!(r.session(12).unwrap().above.len(), 1);
    let mut corrupt = bytes.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 1;
    assert!(ShardState::decode(&corrupt).is_err());
    assert!(ShardState::decode(&bytes[..10]).is_err());
}

/// A frozen state is the snapshot of the moment it was taken, however the live state
/// goes on (pushes to old rows, new rows, removals), and taking it copies no row: only
/// the chunks written while it is held are copied, once each.
#[test]
fn a_frozen_snapshot_keeps_its_moment_and_copies_only_written_chunks() {
    let mut s = ShardState::new(0);
    create(&mut s, spec("t", 16, adagrad_kind()));
    let n = 20_000u64;
    for seq in 0..n / 1000 {
        let ids: Vec<u64> = (seq * 1000..(seq + 1) * 1000).collect();
        s.apply(&push(1, seq + 1, "t", ids, vec![0.5; 16_000]), seq + 2, 1);
    }
    let expected = s.clone().encode();
    let before = s.checksum();
    let frozen = s.freeze();
    assert_eq!(s.table("t").unwrap().snapshot_copies(), 0);
    // Writes to 3 old rows (ids 0 and 1 share a chunk) and 100 new rows (the first go
    // into the last, partly filled chunk).
    s.apply(
        &push(1, 100, "t", vec![0, 1, 15_000], vec![1.0; 48]),
        200,
        1,
    );
    s.apply(
        &push(1, 101, "t", (n..n + 100).collect(), vec![1.0; 1600]),
        201,
        1,
    );
    assert_ne!(s.checksum(), before);
    let mut bytes = Vec::new();
    frozen.write(&mut bytes).unwrap();
    assert_eq!(
        bytes, expected,
        "the frozen bytes are those of the moment it was taken"
    );
    let restored = ShardState::decode(&bytes).unwrap();
    assert_eq!(restored.checksum(), before);
    let t = s.table("t").unwrap();
    let chunk_rows = (16 * 1024 / (32 * 4)) as u64;
    let copies = t.snapshot_copies();
    assert_eq!(
        copies,
        3,
        "chunks copied of {}: those of ids 0 and 1, of 15,000, the last one",
        n.div_ceil(chunk_rows)
    );
    drop(frozen);
    s.apply(&push(1, 102, "t", vec![2], vec![1.0; 16]), 202, 1);
    assert_eq!(
        s.table("t").unwrap().snapshot_copies(),
        copies,
        "nothing holds it now"
    );
}

fn impression(id: &str, items: &[u64]) -> freshet_proto::ps::v1::ImpressionRecord {
    freshet_proto::ps::v1::ImpressionRecord {
        id: id.into(),
        epoch: 3,
        user_feature_ids: vec![11, 12],
        candidates: items.to_vec(),
        shown: items
            .iter()
            .enumerate()
            .map(|(i, item)| freshet_proto::ps::v1::ShownSlot {
                item_id: *item,
                position: i as u32 + 1,
                propensity: 0.5,
            })
            .collect(),
        created_ms: 1,
        ..Default::default()
    }
}

fn append(ids: &[&str]) -> Command {
    Command {
        op: Some(Op::AppendImpressions(
            freshet_proto::command::v1::ImpressionAppend {
                impressions: ids.iter().map(|id| impression(id, &[1, 2, 3])).collect(),
            },
        )),
        ..Default::default()
    }
}

fn assign(inc: u64, step: u64, events: &[(&str, &str)]) -> Command {
    Command {
        op: Some(Op::AssignEvents(freshet_proto::command::v1::EventAssign {
            inc,
            step,
            events: events
                .iter()
                .map(|(imp, ev)| freshet_proto::ps::v1::EventRef {
                    impression_id: (*imp).into(),
                    event_id: (*ev).into(),
                })
                .collect(),
        })),
        ..Default::default()
    }
}

/// (status, inc, step) per event of an AssignEvents outcome.
fn assigned(o: Outcome) -> Vec<(AssignStatus, u64, u64)> {
    let Outcome::Assigned(rs) = o else {
        panic!("not an assignment: {o:?}")
    };
    rs.into_iter()
        .map(|r| (AssignStatus::try_from(r.status).unwrap(), r.inc, r.step))
        .collect()
}

use freshet_proto::ps::v1::AssignStatus;

/// An event is claimed by one step; another attempt learns where it went (pending, then
/// sealed); a step fenced below the claim releases it; a re-sent batch changes nothing.
#[test]
fn events_train_in_one_step_whoever_sends_them() {
    use AssignStatus::*;
    let mut s = ShardState::new(0);
    assert_eq!(s.apply(&append(&["a", "b"]), 1, 1), Outcome::Appended(2));
    // The same batch again (a retried append): nothing new.
    assert_eq!(s.apply(&append(&["a", "b"]), 2, 1), Outcome::Appended(0));
    assert_eq!(s.impressions.len(), 2);
    let o = s.apply(
        &assign(7, 1, &[("a", "e1"), ("b", "e2"), ("zz", "e3")]),
        3,
        1,
    );
    assert_eq!(
        assigned(o),
        vec![(Assigned, 7, 1), (Assigned, 7, 1), (NoImpression, 0, 0)]
    );
    // The same claim again (a re-proposal): still ours.
    assert_eq!(
        assigned(s.apply(&assign(7, 1, &[("a", "e1")]), 4, 1)),
        vec![(Assigned, 7, 1)]
    );
    // Another worker (or gateway) with the same event: pending in (7, 1).
    assert_eq!(
        assigned(s.apply(&assign(8, 4, &[("a", "e1")]), 5, 1)),
        vec![(Pending, 7, 1)]
    );
    // The same event id on another impression is another event.
    assert_eq!(
        assigned(s.apply(&assign(8, 4, &[("b", "e1")]), 6, 1)),
        vec![(Assigned, 8, 4)]
    );
    // (7, 1) sealed: a duplicate from now on.
    assert_eq!(
        s.apply(&seal_cmd(1, 1, &[(7, 1)], &[]), 7, 1),
        Outcome::Applied
    );
    assert_eq!(
        assigned(s.apply(&assign(9, 2, &[("a", "e1")]), 8, 1)),
        vec![(Sealed, 7, 1)]
    );
    // (8, 4) fenced below its step (cut 3): released, claimed again by the next attempt.
    assert_eq!(
        s.apply(&seal_cmd(2, 2, &[(8, 3)], &[8]), 9, 1),
        Outcome::Applied
    );
    assert_eq!(
        assigned(s.apply(&assign(9, 2, &[("b", "e1")]), 10, 1)),
        vec![(Assigned, 9, 2)]
    );
    // e2 stays where it was (inc 7 sealed through 1).
    assert_eq!(
        assigned(s.apply(&assign(9, 2, &[("b", "e2")]), 11, 1)),
        vec![(Sealed, 7, 1)]
    );
    // Replicas agree, through a snapshot too (retention included).
    s.impressions.retention.ttl_ms = 42_000;
    let restored = ShardState::decode(&s.encode()).unwrap();
    assert_eq!(restored.impressions.retention.ttl_ms, 42_000);
    assert_eq!(restored.checksum(), s.checksum());
    assert_eq!(restored.impressions.get("b"), s.impressions.get("b"));
    // Bad input: named, nothing changed.
    let before = s.checksum();
    let o = s.apply(&assign(0, 1, &[("a", "x")]), 12, 1);
    assert!(
        matches!(o, Outcome::Rejected(Rejection::Invalid(_))),
        "{o:?}"
    );
    let mut bad = append(&["c"]);
    if let Some(Op::AppendImpressions(a)) = &mut bad.op {
        a.impressions[0].shown[0].propensity = 0.0;
    }
    match s.apply(&bad, 13, 1) {
        Outcome::Rejected(Rejection::Invalid(f)) => {
            assert_eq!(f.field, "impressions[0].shown[0].propensity");
        }
        o => panic!("{o:?}"),
    }
    // Lexical levels: under a query, one per candidate, each at most LEXICAL_LEVELS.
    for (lexical, query) in [
        (vec![1, 2], vec![5]),
        (vec![1, 2, 17], vec![5]),
        (vec![1, 2, 3], vec![]),
    ] {
        let mut bad = append(&["c"]);
        if let Some(Op::AppendImpressions(a)) = &mut bad.op {
            a.impressions[0].lexical = lexical;
            a.impressions[0].query_terms = query;
        }
        match s.apply(&bad, 13, 1) {
            Outcome::Rejected(Rejection::Invalid(f)) => {
                assert_eq!(f.field, "impressions[0].lexical");
            }
            o => panic!("{o:?}"),
        }
    }
    s.applied_index = 11;
    assert_eq!(s.checksum(), before);
}

/// Impressions expire by sealed time (the seals' proposal times, never a replica's
/// clock) and, beyond the byte bound, oldest first.
#[test]
fn impressions_expire_by_sealed_time_and_bytes() {
    let mut s = ShardState::new(0);
    s.impressions.retention.ttl_ms = 1_000;
    let seal_at = |epoch: u64, ms: u64| {
        let mut c = seal_cmd(epoch, epoch, &[], &[]);
        if let Some(Op::ShardSeal(ss)) = &mut c.op {
            ss.seals[0].proposed_at_ms = ms;
        }
        c
    };
    assert_eq!(s.apply(&seal_at(1, 10_000), 1, 1), Outcome::Applied);
    s.apply(&append(&["old"]), 2, 1);
    assert_eq!(s.apply(&seal_at(2, 10_600), 3, 1), Outcome::Applied);
    s.apply(&append(&["new"]), 4, 1);
    // 10,000 + 1,000 is not yet passed at 11,000; at 11,001 "old" goes, "new" stays.
    s.apply(&seal_at(3, 11_000), 5, 1);
    assert!(s.impressions.get("old").is_some());
    s.apply(&seal_at(4, 11_001), 6, 1);
    assert!(s.impressions.get("old").is_none());
    assert!(s.impressions.get("new").is_some());
    // Byte bound: room for about two; the oldest go first.
    let one = s.impressions.bytes();
    s.impressions.retention.bytes_max = 2 * one + one / 2;
    s.apply(&append(&["x", "y"]), 7, 1);
    assert!(s.impressions.get("new").is_none());
    assert!(s.impressions.get("x").is_some() && s.impressions.get("y").is_some());
    assert!(s.impressions.bytes() <= s.impressions.retention.bytes_max);
}

/// Duplicate ids of one push are summed in f32; a sum that overflows saturates instead
/// of leaving inf or NaN in a row or its optimizer slots (on every replica alike).
#[test]
fn overflowing_gradient_sums_saturate_and_rows_stay_finite() {
    let mut s = ShardState::new(0);
    create(&mut s, spec("t", 2, adagrad_kind()));
    let big = vec![3e38f32; 4];
    assert_eq!(
        s.apply(&push(1, 1, "t", vec![5, 5], big), 2, 1),
        Outcome::Applied
    );
    let t = s.table("t").unwrap();
    let slots = t.sorted_slots();
    let (_, slot) = slots.iter().find(|(id, _)| *id == 5).copied().unwrap();
    let row = t.row(slot);
    assert!(row.iter().all(|v| v.is_finite()), "{row:?}");
    // The row moved by Adagrad's first step on a saturated gradient: about -lr.
    let mut w = [0.0f32; 2];
    t.read_into(5, &mut w);
    let mut init = [0.0f32; 2];
    super::table::fill_init(7, super::table::name_hash("t"), 0.01, 5, &mut init);
    for j in 0..2 {
        assert!((w[j] - (init[j] - 0.1)).abs() < 1e-3, "{w:?} from {init:?}");
    }
    // A replica that applied the same log holds the same bits.
    let mut r = ShardState::new(0);
    create(&mut r, spec("t", 2, adagrad_kind()));
    r.apply(&push(1, 1, "t", vec![5, 5], vec![3e38f32; 4]), 2, 1);
    assert_eq!(r.checksum(), s.checksum());
}

fn adagrad_kind() -> optimizer_config::Kind {
    optimizer_config::Kind::Adagrad(AdagradConfig {
        lr: 0.1,
        initial_accumulator: 0.1,
        eps: 1e-8,
    })
}

fn seal_at(epoch: u64, cuts: &[(u64, u64)], ms: u64) -> Command {
    let mut c = seal_cmd(epoch, epoch, cuts, &[]);
    if let Some(Op::ShardSeal(ss)) = &mut c.op {
        ss.seals[0].proposed_at_ms = ms;
    }
    c
}

fn row(s: &ShardState, id: u64) -> Vec<f32> {
    let mut w = vec![0.0; 2];
    s.table("t").unwrap().read_into(id, &mut w);
    w
}

/// Issue 17: a table's row limits remove the same rows on every replica (one restored
/// from a snapshot mid-way included) in the epoch that decides it, the change set
/// carries them, and an id that comes back starts from its initial value with fresh
/// optimizer state.
#[test]
fn row_limits_evict_and_expire_identically_and_a_returning_id_starts_fresh() {
    let mut t = spec("t", 2, adagrad_kind());
    t.limits = Some(freshet_proto::ps::v1::RowLimits {
        ttl_ms: 10_000,
        rows_max: 8,
        ..Default::default()
    });
    let mut a = ShardState::new(0);
    create(&mut a, t.clone());
    let mut log: Vec<Command> = Vec::new();
    // Epoch e trains ids 10e..10e+3 at sealed time 1,000e.
    for e in 1..=4u64 {
        log.push(step(1, e, (e * 10..e * 10 + 4).collect()));
        log.push(seal_at(e, &[(1, e)], e * 1000));
    }
    // Everything expires 10 s of sealed time later; then id 10 comes back.
    log.push(seal_at(5, &[], 20_000));
    log.push(step(1, 6, vec![10]));
    log.push(seal_at(6, &[(1, 6)], 21_000));
    let mut b: Option<ShardState> = None;
    let mut removed: Vec<(u64, Vec<u64>)> = Vec::new();
    for (k, cmd) in log.iter().enumerate() {
        let index = k as u64 + 2;
        assert!(matches!(a.apply(cmd, index, 1), Outcome::Applied));
        for cs in a.take_emitted() {
            for r in cs.removed {
                assert_eq!(r.table, "t");
                removed.push((cs.epoch, r.ids));
            }
            // A removed row is never also sent as changed in the same epoch.
            for rows in &cs.rows {
                assert!(removed
                    .iter()
                    .filter(|(e, _)| *e == cs.epoch)
                    .all(|(_, ids)| rows.ids.iter().all(|id| !ids.contains(id))));
            }
        }
        if let Some(b) = b.as_mut() {
            b.apply(cmd, index, 1);
        }
        if k == 3 {
            // A replica restored from a snapshot after epoch 2 follows the same log.
            let mut r = ShardState::decode(&a.encode()).unwrap();
            r.applied_index = a.applied_index;
            b = Some(r);
        }
    }
    // Epoch 3 holds 12 rows, over 8: down to 7, oldest first (ties: lower id).
    // Epoch 4: 11 again, the 4 oldest go. Epoch 5: the ttl sweep takes the rest.
    assert_eq!(
        removed,
        vec![
            (3, vec![10, 11, 12, 13, 20]),
            (4, vec![21, 22, 23, 30]),
            (5, vec![31, 32, 33, 40, 41, 42, 43]),
        ]
    );
    let b = b.unwrap();
    assert_eq!(a.checksum(), b.checksum(), "replicas remove identically");
    assert_eq!(a.table("t").unwrap().rows(), 1);
    // Id 10 was trained, evicted, trained once more: exactly what a table that never
    // saw it holds after that one step (value and Adagrad accumulator both fresh).
    let mut fresh = ShardState::new(0);
    create(&mut fresh, t);
    fresh.apply(&step(1, 1, vec![10]), 2, 1);
    fresh.apply(&seal_at(1, &[(1, 1)], 1000), 3, 1);
    assert_eq!(row(&a, 10), row(&fresh, 10));
    // A removed id reads as its initial value.
    let mut init = vec![0.0; 2];
    a.table("t").unwrap().init_row(33, &mut init);
    assert_eq!(row(&a, 33), init);
}

#[test]
fn bad_row_limits_name_the_field() {
    let with = |ttl_ms, rows_max| {
        let mut t = spec("t", 2, adagrad_kind());
        t.limits = Some(freshet_proto::ps::v1::RowLimits {
            ttl_ms,
            rows_max,
            ..Default::default()
        });
        t
    };
    for (t, field) in [
        (with(0, 0), "spec.limits"),
        (with(5, 0), "spec.limits.ttl_ms"),
        (with(0, 3), "spec.limits.rows_max"),
        (with(0, u64::MAX), "spec.limits.rows_max"),
    ] {
        assert_eq!(validate_spec(&t).unwrap_err().field, field);
        let mut s = ShardState::new(0);
        let cmd = Command {
            op: Some(Op::CreateTable(t)),
            ..Default::default()
        };
        assert!(matches!(s.apply(&cmd, 1, 1), Outcome::Rejected(_)));
        assert!(s.table("t").is_none(), "a refused table changes nothing");
    }
    let mut dense = with(1000, 0);
    dense.kind = TableKind::Dense as i32;
    assert_eq!(validate_spec(&dense).unwrap_err().field, "spec.limits");
}

/// Rows a direct push loads between seals take the next seal's time (a bulk load on a
/// fresh shard, whose sealed clock is 0, must not expire at the first seal); an update
/// that names no limits keeps them; limits turned on later count from that moment.
#[test]
fn bulk_loaded_rows_and_limit_updates_keep_rows_that_are_not_old() {
    let limited = |ttl_ms| {
        let mut t = spec("t", 2, adagrad_kind());
        t.limits = Some(freshet_proto::ps::v1::RowLimits {
            ttl_ms,
            rows_max: 0,
            ..Default::default()
        });
        t
    };
    let mut a = ShardState::new(0);
    create(&mut a, limited(10_000));
    let n = 5usize;
    let ids: Vec<u64> = (1..=n as u64).collect();
    assert_eq!(
        a.apply(&push(1, 1, "t", ids.clone(), vec![0.1; n * 2]), 2, 1),
        Outcome::Applied
    );
    assert_eq!(a.apply(&seal_at(1, &[], 1_000_000), 3, 1), Outcome::Applied);
    assert_eq!(
        a.table("t").unwrap().rows(),
        n,
        "loaded rows stamped, not expired"
    );
    let removed: usize = a
        .take_emitted()
        .iter()
        .flat_map(|cs| cs.removed.iter().map(|r| r.ids.len()))
        .sum();
    assert_eq!(removed, 0);
    // A rate change whose spec names no limits keeps them.
    let update = |spec: TableSpec| Command {
        op: Some(Op::UpdateTable(spec)),
        ..Default::default()
    };
    let mut rates = limited(0);
    rates.limits = None;
    assert!(matches!(
        a.apply(&update(rates), 4, 1),
        Outcome::TableCreated(_)
    ));
    assert_eq!(a.table("t").unwrap().spec.limits, limited(10_000).limits);
    // 11 s of sealed time later the loaded rows expire.
    a.apply(&seal_at(2, &[], 1_011_000), 5, 1);
    assert_eq!(a.table("t").unwrap().rows(), 0);

    // A table without limits gets them late: its rows count from that moment.
    let mut b = ShardState::new(0);
    let mut plain = limited(0);
    plain.limits = None;
    create(&mut b, plain);
    b.apply(&step(1, 1, vec![7]), 2, 1);
    b.apply(&seal_at(1, &[(1, 1)], 1_000), 3, 1);
    b.apply(&seal_at(2, &[], 100_000), 4, 1);
    assert_eq!(b.table("t").unwrap().rows(), 1, "no limits: nothing goes");
    assert!(matches!(
        b.apply(&update(limited(10_000)), 5, 1),
        Outcome::TableCreated(true)
    ));
    b.apply(&seal_at(3, &[], 105_000), 6, 1);
    assert_eq!(
        b.table("t").unwrap().rows(),
        1,
        "times restarted when limits came"
    );
    b.apply(&seal_at(4, &[], 111_000), 7, 1);
    assert_eq!(b.table("t").unwrap().rows(), 0);
}

fn admitting(admit_after: u32, admit_window_ms: u64) -> TableSpec {
    let mut t = spec("t", 2, adagrad_kind());
    t.limits = Some(freshet_proto::ps::v1::RowLimits {
        admit_after,
        admit_window_ms,
        ..Default::default()
    });
    t
}

/// Issue 17, admission: an id becomes a row at its third gradient within a 10 s window of
/// sealed time, not before (earlier gradients dropped, the id reads as initial, no change
/// set carries it); the window's end forgets sightings; a replica restored from a
/// snapshot mid-way counts the same (equal checksums), and the admitted row equals one
/// step on a fresh table: the dropped gradients left nothing behind.
#[test]
fn admission_makes_a_row_only_at_the_nth_sighting_in_a_window_on_every_replica() {
    let mut a = ShardState::new(0);
    create(&mut a, admitting(3, 10_000));
    let mut log: Vec<Command> = Vec::new();
    // Id 7 is in steps 1, 2, 3 (admitted at 3); id 8 in steps 1 and 2, then (after the
    // window at 10 s ends) in steps 4 and 5: two sightings per window, never admitted.
    let ids = [vec![7, 8], vec![7, 8], vec![7], vec![8], vec![8]];
    let times = [1_000u64, 2_000, 3_000, 11_000, 12_000];
    for (e, (ids, ms)) in ids.iter().zip(times).enumerate() {
        let e = e as u64 + 1;
        log.push(step(1, e, ids.clone()));
        log.push(seal_at(e, &[(1, e)], ms));
    }
    let mut b: Option<ShardState> = None;
    let mut changed: Vec<(u64, Vec<u64>)> = Vec::new();
    for (k, cmd) in log.iter().enumerate() {
        let index = k as u64 + 2;
        assert!(matches!(a.apply(cmd, index, 1), Outcome::Applied));
        for cs in a.take_emitted() {
            let ids: Vec<u64> = cs.rows.iter().flat_map(|r| r.ids.clone()).collect();
            changed.push((cs.epoch, ids));
        }
        if let Some(b) = b.as_mut() {
            b.apply(cmd, index, 1);
        }
        if k == 1 {
            let mut r = ShardState::decode(&a.encode()).unwrap();
            r.applied_index = a.applied_index;
            b = Some(r);
        }
    }
    assert_eq!(
        changed,
        vec![
            (1, vec![]),
            (2, vec![]),
            (3, vec![7]),
            (4, vec![]),
            (5, vec![])
        ]
    );
    let t = a.table("t").unwrap();
    assert_eq!(t.rows(), 1);
    assert_eq!((t.admitted, t.dropped), (1, 6));
    let mut init = vec![0.0; 2];
    t.init_row(8, &mut init);
    assert_eq!(row(&a, 8), init, "an id not admitted reads as initial");
    assert_eq!(
        a.checksum(),
        b.unwrap().checksum(),
        "replicas count identically"
    );
    let mut fresh = ShardState::new(0);
    let mut plain = admitting(0, 0);
    plain.limits = None;
    create(&mut fresh, plain);
    fresh.apply(&step(1, 1, vec![7]), 2, 1);
    fresh.apply(&seal_at(1, &[(1, 1)], 1000), 3, 1);
    assert_eq!(row(&a, 7), row(&fresh, 7));
    // Sightings are replicated state: a different count gives a different checksum.
    let mut c = ShardState::new(0);
    create(&mut c, admitting(3, 10_000));
    let before = c.checksum();
    c.apply(&step(1, 1, vec![99]), 2, 1);
    c.apply(&seal_at(1, &[(1, 1)], 1000), 3, 1);
    assert_ne!(c.checksum(), before);
}

#[test]
fn bad_admission_names_the_field() {
    for (t, field) in [
        (admitting(2, 0), "spec.limits.admit_window_ms"),
        (admitting(2, 999), "spec.limits.admit_window_ms"),
        (admitting(1, 5_000), "spec.limits.admit_window_ms"),
        (admitting(5000, 5_000), "spec.limits.admit_after"),
        (admitting(1, 0), "spec.limits"),
    ] {
        assert_eq!(validate_spec(&t).unwrap_err().field, field);
    }
    assert!(validate_spec(&admitting(2, 1000)).is_ok());
}

fn forget_seal(epoch: u64, users: &[u64], ms: u64) -> Command {
    let mut c = seal_at(epoch, &[], ms);
    if let Some(Op::ShardSeal(ss)) = &mut c.op {
        ss.seals[0].forget = users.to_vec();
    }
    c
}

fn served_to(id: &str, user_row: u64) -> Command {
    let mut record = impression(id, &[1, 2]);
    record.has_user_id = true;
    record.user_id_row = user_row;
    Command {
        op: Some(Op::AppendImpressions(
            freshet_proto::command::v1::ImpressionAppend {
                impressions: vec![record],
            },
        )),
        ..Default::default()
    }
}

/// Issue 17, forgetting a user: the forget seal removes the user's row in every table
/// and every impression served to them, in that epoch's change set, identically on a
/// replica restored from a snapshot; a step claimed before the forget and sealed after it
/// does not write the row again while the guard lasts; after the guard the user starts
/// fresh; a repeated forget changes nothing more; the shard asks for a snapshot.
#[test]
fn forgetting_a_user_removes_their_rows_and_impressions_in_one_epoch() {
    let user = 77u64;
    let other = 78u64;
    let mut a = ShardState::new(0);
    create(&mut a, spec("t", 2, adagrad_kind()));
    let mut log = vec![
        step(1, 1, vec![user, other]),
        seal_at(1, &[(1, 1)], 1_000),
        served_to("imp-u", user),
        served_to("imp-o", other),
        // Step 2 (claimed before the forget, sealed after it) trains the user's row.
        step(1, 2, vec![user, other]),
        forget_seal(2, &[user], 2_000),
        seal_at(3, &[(1, 2)], 3_000),
    ];
    let mut b: Option<ShardState> = None;
    let mut removed = Vec::new();
    for (k, cmd) in log.drain(..).enumerate() {
        let index = k as u64 + 2;
        let out = a.apply(&cmd, index, 1);
        assert!(!matches!(out, Outcome::Rejected(_)), "{k}: {out:?}");
        for cs in a.take_emitted() {
            for r in &cs.removed {
                removed.push((cs.epoch, r.table.clone(), r.ids.clone()));
            }
            if cs.epoch == 3 {
                let ids: Vec<u64> = cs.rows.iter().flat_map(|r| r.ids.clone()).collect();
                assert_eq!(ids, vec![other], "the guarded row is not written again");
            }
        }
        if let Some(b) = b.as_mut() {
            b.apply(&cmd, index, 1);
        }
        if k == 3 {
            let mut r = ShardState::decode(&a.encode()).unwrap();
            r.applied_index = a.applied_index;
            b = Some(r);
        }
    }
    assert_eq!(removed, vec![(2, "t".to_string(), vec![user])]);
    let mut init = vec![0.0; 2];
    a.table("t").unwrap().init_row(user, &mut init);
    assert_eq!(row(&a, user), init, "the user's row reads as initial");
    assert!(
        a.impressions.get("imp-u").is_none(),
        "their impression is gone"
    );
    assert!(a.impressions.get("imp-o").is_some(), "others' stay");
    let b = b.unwrap();
    assert_eq!(a.checksum(), b.checksum(), "replicas forget identically");
    assert!(crate::raft::StateMachine::take_snapshot_request(&mut a));
    assert!(!crate::raft::StateMachine::take_snapshot_request(&mut a));
    // A repeated forget removes nothing more.
    let sum = a.checksum();
    a.apply(&forget_seal(4, &[user], 4_000), 20, 1);
    assert!(a.take_emitted().iter().all(|cs| cs.removed.is_empty()));
    assert_ne!(a.checksum(), sum, "the guard restarted (replicated state)");
    // After the guard (60 s of sealed time) the user's gradients train a fresh row.
    a.apply(&step(1, 3, vec![user]), 21, 1);
    a.apply(&seal_at(5, &[(1, 3)], 70_000), 22, 1);
    let mut fresh = ShardState::new(0);
    create(&mut fresh, spec("t", 2, adagrad_kind()));
    fresh.apply(&step(1, 1, vec![user]), 2, 1);
    fresh.apply(&seal_at(1, &[(1, 1)], 1000), 3, 1);
    assert_eq!(
        row(&a, user),
        row(&fresh, user),
        "a returning user starts fresh"
    );
}

#[test]
fn the_meta_group_records_a_forget_as_an_epoch_of_its_own() {
    let mut m = crate::fsm::epoch::MetaState::default();
    assert_eq!(m.forget(&[5, 3, 5], 1234), MetaOutcome::Sealed(1));
    let s = &m.seals[0];
    assert_eq!((s.forget.clone(), s.proposed_at_ms), (vec![3, 5], 1234));
    assert!(matches!(m.forget(&[], 0), MetaOutcome::Refused(_)));
    // Folded into the cumulative record when the window moves on.
    for _ in 0..crate::fsm::epoch::SEALS_KEPT {
        m.seal(&[], 0, true);
    }
    let first = &m.seals_after(0, 1)[0];
    assert!(
        first.forget.contains(&3) && first.forget.contains(&5),
        "{first:?}"
    );
}

/// Issue 17: limits marked `off` in a table update remove the table's limits (rows stay,
/// nothing more is evicted or refused admission), identically on a replica restored from
/// a snapshot; `off` with another limit names the field.
#[test]
fn row_limits_turned_off_keep_every_row_from_then_on() {
    let mut t = spec("t", 2, adagrad_kind());
    t.limits = Some(freshet_proto::ps::v1::RowLimits {
        rows_max: 8,
        admit_after: 2,
        admit_window_ms: 3_600_000,
        ..Default::default()
    });
    let mut a = ShardState::new(0);
    create(&mut a, t.clone());
    let update = |limits| {
        let mut u = t.clone();
        u.limits = Some(limits);
        Command {
            op: Some(Op::UpdateTable(u)),
            ..Default::default()
        }
    };
    // Ids 1..=20 twice (admitted at the second), capped at 8 then 7.
    let log = [
        step(1, 1, (1..=20).collect()),
        step(1, 2, (1..=20).collect()),
        seal_at(1, &[(1, 2)], 1_000),
        update(freshet_proto::ps::v1::RowLimits {
            off: true,
            ..Default::default()
        }),
        // With limits off, ids 21..=40 are rows at their first gradient and none go.
        step(1, 3, (21..=40).collect()),
        seal_at(2, &[(1, 3)], 2_000),
    ];
    let mut b: Option<ShardState> = None;
    for (k, cmd) in log.iter().enumerate() {
        let index = k as u64 + 2;
        let out = a.apply(cmd, index, 1);
        assert!(!matches!(out, Outcome::Rejected(_)), "{k}: {out:?}");
        if k == 2 {
            assert_eq!(
                a.table("t").unwrap().rows(),
                7,
                "capped while limits are on"
            );
        }
        if let Some(b) = b.as_mut() {
            b.apply(cmd, index, 1);
        }
        if k == 3 {
            let mut r = ShardState::decode(&a.encode()).unwrap();
            r.applied_index = a.applied_index;
            b = Some(r);
        }
    }
    let t_now = a.table("t").unwrap();
    assert_eq!(t_now.spec.limits, None);
    assert_eq!(t_now.rows(), 27, "7 kept and 20 new, none removed");
    assert_eq!(a.checksum(), b.unwrap().checksum());
    let mut bad = t.clone();
    bad.limits = Some(freshet_proto::ps::v1::RowLimits {
        off: true,
        rows_max: 8,
        ..Default::default()
    });
    assert_eq!(validate_spec(&bad).unwrap_err().field, "spec.limits.off");
}

/// The slot index stays exact through appends, re-pushes and removals in any order (the
/// moved last row is found in its new slot): checked against a plain map of each id's
/// expected row after every operation, on rows that span many chunks.
#[test]
fn the_slot_index_follows_rows_through_removals() {
    use rand::{Rng, SeedableRng};
    let spec = spec("t", 2, optimizer_config::Kind::Sgd(SgdConfig { lr: 1.0 }));
    let opt = super::optimizer::validate_spec(&spec).unwrap();
    let mut t = super::table::Table::new(spec, opt);
    let mut want: std::collections::HashMap<u64, [f32; 2]> = std::collections::HashMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for step in 0..20_000u32 {
        let id = rng.random_range(0..3_000u64);
        if rng.random_bool(0.3) {
            assert_eq!(t.forget(id), want.remove(&id).is_some(), "step {step}");
        } else {
            let before = *want.entry(id).or_insert_with(|| {
                let mut w = [0.0; 2];
                t.read_into(id, &mut w);
                w
            });
            let g = [1.0, -2.0];
            assert!(t.apply_grad(id, &g, 5));
            want.insert(id, [before[0] - 1.0, before[1] + 2.0]);
        }
        if step % 997 == 0 || step == 19_999 {
            assert_eq!(t.rows(), want.len());
            for (&id, w) in &want {
                let mut got = [0.0; 2];
                t.read_into(id, &mut got);
                assert_eq!(&got, w, "id {id} at step {step}");
                assert!(t.contains(id));
            }
        }
    }
}

/// A retention change is a meta epoch whose seal carries it: bad values are refused
/// naming the field (nothing committed); a data shard applying that seal takes the new
/// retention before the seal's expiry (a shorter ttl expires older impressions in that
/// very epoch, a smaller bound evicts the oldest), and a shard catching up past the
/// retained seals takes it from the cumulative record.
#[test]
fn a_retention_change_applies_in_its_epoch_on_every_shard() {
    use freshet_proto::command::v1::SetRetention;
    use freshet_proto::ps::v1::ImpressionRetention;
    let set = |ttl_ms: u64, bytes: u64| Command {
        op: Some(Op::SetRetention(SetRetention {
            retention: Some(ImpressionRetention {
                ttl_ms,
                bytes_max_per_shard: bytes,
            }),
            proposed_at_ms: 20_000,
        })),
        ..Default::default()
    };
    let mut m = ShardState::new(META_GROUP);
    for (bad, field) in [
        (set(10, 1 << 20), "retention.ttl_ms"),
        (set(60_000, 1000), "retention.bytes_max_per_shard"),
    ] {
        match m.apply(&bad, 2, 1) {
            Outcome::Meta(MetaOutcome::Refused(r)) => assert!(r.contains(field), "{r}"),
            o => panic!("{o:?}"),
        }
    }
    assert_eq!(m.meta.last_sealed, 0, "a refused change commits no epoch");
    assert_eq!(
        m.apply(&set(5_000, 1 << 20), 3, 1),
        Outcome::Meta(MetaOutcome::Sealed(1))
    );
    let seal = m.meta.seals_after(0, 10).remove(0);
    assert_eq!(seal.retention.unwrap().ttl_ms, 5_000);
    // A data shard sent to the meta group's command refuses it.
    let mut s = ShardState::new(0);
    assert!(matches!(
        s.apply(&set(5_000, 1 << 20), 1, 1),
        Outcome::Rejected(_)
    ));
    // Impressions appended at 10,000 and 16,000 (sealed time); the default ttl keeps both.
    let mut plain = seal_cmd(1, 1, &[], &[]);
    if let Some(Op::ShardSeal(ss)) = &mut plain.op {
        ss.seals[0].proposed_at_ms = 10_000;
    }
    s.apply(&plain, 2, 1);
    s.apply(&append(&["old"]), 3, 1);
    let mut later = seal_cmd(2, 2, &[], &[]);
    if let Some(Op::ShardSeal(ss)) = &mut later.op {
        ss.seals[0].proposed_at_ms = 16_000;
    }
    s.apply(&later, 4, 1);
    s.apply(&append(&["new"]), 5, 1);
    let mut r = ShardState::decode(&s.encode()).unwrap();
    // The change's seal at 20,000 with a 5 s ttl: "old" (10,000) goes in that epoch.
    let mut change = seal_cmd(3, 3, &[], &[]);
    if let Some(Op::ShardSeal(ss)) = &mut change.op {
        ss.seals[0] = Seal {
            first_epoch: 3,
            epoch: 3,
            ..seal.clone()
        };
    }
    assert_eq!(s.apply(&change, 6, 1), Outcome::Applied);
    assert_eq!(s.impressions.retention.ttl_ms, 5_000);
    assert!(s.impressions.get("old").is_none());
    assert!(s.impressions.get("new").is_some());
    // Every replica alike (the retention is in the checksum).
    assert_eq!(r.apply(&change, 6, 1), Outcome::Applied);
    assert_eq!(r.checksum(), s.checksum());
    // Folded into the base record past the retained window, it still reaches a shard
    // that catches up with the cumulative record.
    for k in 0..super::epoch::SEALS_KEPT as u64 {
        m.meta.seal(&[], 30_000 + k, true);
    }
    let catch_up = m.meta.seals_after(0, 1).remove(0);
    assert_eq!(catch_up.first_epoch, 1);
    assert_eq!(catch_up.retention.unwrap().ttl_ms, 5_000);
}

/// Impressions in a frozen snapshot keep their moment (a later claim copies the record
/// it changes, a later append is not in it), and the streamed entries are byte for byte
/// what prost writes for the same `EpochSnapshot.impressions`.
#[test]
fn frozen_impressions_keep_their_moment_and_stream_as_prost_writes_them() {
    let mut s = ShardState::new(0);
    let mut first = seal_cmd(1, 1, &[], &[]);
    if let Some(Op::ShardSeal(ss)) = &mut first.op {
        ss.seals[0].proposed_at_ms = 5_000;
    }
    s.apply(&first, 1, 1);
    s.apply(&append(&["a", "b"]), 2, 1);
    assert_eq!(
        assigned(s.apply(&assign(1, 1, &[("a", "e1")]), 3, 1)),
        vec![(AssignStatus::Assigned, 1, 1)]
    );
    let at_freeze = s.impressions.encode();
    let frozen = s.freeze();
    assigned(s.apply(&assign(1, 1, &[("a", "e2")]), 4, 1));
    s.apply(&append(&["c"]), 5, 1);
    assert_eq!(s.impressions.get("a").unwrap().events.len(), 2);
    let mut bytes = Vec::new();
    frozen.write(&mut bytes).unwrap();
    let r = ShardState::decode(&bytes).unwrap();
    assert_eq!(r.impressions.encode(), at_freeze);
    assert_eq!(r.impressions.get("a").unwrap().events.len(), 1);
    assert!(r.impressions.get("c").is_none());
    use prost::Message as _;
    let prost_bytes = freshet_proto::command::v1::EpochSnapshot {
        impressions: s.impressions.encode(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut streamed: Vec<u8> = Vec::new();
    for (seq, ms, stored) in s.impressions.freeze() {
        let before = streamed.len();
        super::impressions::encode_entry(seq, ms, &stored, &mut streamed);
        assert_eq!(
            streamed.len() - before,
            super::impressions::entry_encoded_len(seq, ms, &stored)
        );
    }
    assert_eq!(streamed, prost_bytes);
}
