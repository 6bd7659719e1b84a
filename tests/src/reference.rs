//! The reference every replica must equal: acknowledged pushes (or the steps within the
//! committed cuts) replayed into fresh state machines; and pushers that record what was
//! acknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_proto::command::v1::{command::Op, Command as Cmd, SparsePush};
use freshet_proto::ps::v1::TableSpec;
use freshet_server::fsm::ShardState;
use tokio::task::JoinHandle;

/// One acknowledged push, as the client prepared it.
#[derive(Debug, Clone)]
pub struct AckedPush {
    pub shard: u32,
    pub table: String,
    pub client_id: u64,
    pub seq: u64,
    pub ids: Vec<u64>,
    pub grads: Vec<f32>,
}

/// Replays acknowledged pushes, per client in seq order, into fresh state machines.
/// Valid when clients touch disjoint ids and push sequentially: then each row sees its
/// updates in the same order as in any replica's log.
pub struct Reference {
    pub shards: Vec<ShardState>,
}

impl Reference {
    pub fn new(shard_count: u32, tables: &[TableSpec]) -> Self {
        let shards = (0..shard_count)
            .map(|s| {
                let mut st = ShardState::new(s);
                for t in tables {
                    st.apply(
                        &Cmd {
                            op: Some(Op::CreateTable(t.clone())),
                            ..Default::default()
                        },
                        0,
                        0,
                    );
                }
                st
            })
            .collect();
        Reference { shards }
    }

    pub fn replay(&mut self, acked: &[AckedPush]) {
        let mut sorted: Vec<&AckedPush> = acked.iter().collect();
        sorted.sort_by_key(|p| (p.client_id, p.seq, p.shard));
        for (i, p) in sorted.into_iter().enumerate() {
            self.shards[p.shard as usize].apply(
                &Cmd {
                    proposal_id: 0,
                    client_id: p.client_id,
                    seq: p.seq,
                    op: Some(Op::Push(SparsePush {
                        table: p.table.clone(),
                        ids: p.ids.clone(),
                        grads: p.grads.clone(),
                    })),
                },
                i as u64 + 1,
                1,
            );
        }
    }

    pub fn checksums(&self) -> BTreeMap<u32, u64> {
        self.shards
            .iter()
            .map(|s| (s.shard, s.checksum()))
            .collect()
    }
}

/// The checksum every replica of each shard must have at the last of `seals`: the
/// logged steps (every part any worker had acknowledged, in any order) buffered into
/// fresh state machines, then the committed seals applied in epoch order. Only the steps
/// within the committed cuts change the tables, exactly as on the replicas.
pub fn sealed_reference(
    shard_count: u32,
    tables: &[TableSpec],
    parts: &[freshet_proto::ps::v1::PushStepRequest],
    seals: &[freshet_proto::ps::v1::Seal],
) -> BTreeMap<u32, u64> {
    use freshet_proto::command::v1::{ShardSeal, StepPush};
    let mut r = Reference::new(shard_count, tables);
    for p in parts {
        let out = r.shards[p.shard as usize].apply(
            &Cmd {
                op: Some(Op::PushStep(StepPush {
                    inc: p.inc,
                    step: p.step,
                    sparse: p.sparse.clone(),
                    dense: p.dense.clone(),
                    part: p.part,
                })),
                ..Default::default()
            },
            1,
            1,
        );
        assert!(
            matches!(
                out,
                freshet_server::fsm::Outcome::Applied | freshet_server::fsm::Outcome::Duplicate
            ),
            "{out:?}"
        );
    }
    for st in &mut r.shards {
        st.apply(
            &Cmd {
                op: Some(Op::ShardSeal(ShardSeal {
                    seals: seals.to_vec(),
                })),
                ..Default::default()
            },
            2,
            1,
        );
    }
    r.checksums()
}

/// Clients pushing continuously, each to its own id range, one push at a time; every
/// part is retried under the same (client_id, seq) until acknowledged, never abandoned.
pub struct Pushers {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<JoinHandle<Vec<AckedPush>>>,
    pub acked: Arc<std::sync::atomic::AtomicU64>,
}

impl Pushers {
    pub async fn start(
        seeds: &[String],
        clients: usize,
        table: &str,
        dim: usize,
        ids_per_push: usize,
    ) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for ci in 0..clients {
            let opts = freshet_client::ClientOptions {
                deadline: Duration::from_secs(5),
                attempt_timeout: Duration::from_secs(1),
                ..Default::default()
            };
            let client = freshet_client::PsClient::connect(seeds, opts)
                .await
                .expect("connect");
            let stop = Arc::clone(&stop);
            let acked = Arc::clone(&acked);
            let table = table.to_string();
            tasks.push(tokio::spawn(async move {
                let mut log = Vec::new();
                let mut k: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    // Disjoint ranges per client; repeats inside a push test summing.
                    let base = (ci as u64 + 1) * 1_000_000;
                    let mut s = k.wrapping_mul(0x9E37_79B9) ^ ci as u64;
                    let ids: Vec<u64> = (0..ids_per_push)
                        .map(|_| {
                            s = freshet_proto::splitmix64(s);
                            base + s % 5_000
                        })
                        .collect();
                    let grads: Vec<f32> = (0..ids_per_push * dim)
                        .map(|j| ((j as u64 + k) % 7) as f32 * 0.1 - 0.3)
                        .collect();
                    let parts = client.prepare_push(&table, &ids, &grads).expect("prepare");
                    for p in &parts {
                        loop {
                            match client.send_push(p).await {
                                Ok(_) => break,
                                Err(freshet_client::ClientError::Status(s)) => {
                                    panic!("push rejected: {s:?}")
                                }
                                Err(e) => tracing::info!(error = %e, "push retry"),
                            }
                        }
                        log.push(AckedPush {
                            shard: p.shard,
                            table: table.clone(),
                            client_id: p.request.client_id,
                            seq: p.request.seq,
                            ids: p.request.ids.clone(),
                            grads: p.request.grads.clone(),
                        });
                    }
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                log
            }));
        }
        Pushers { stop, tasks, acked }
    }

    pub fn count(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `n` more pushes are acknowledged (or panics after `timeout`).
    pub async fn wait_more(&self, n: u64, timeout: Duration) {
        let target = self.count() + n;
        let deadline = Instant::now() + timeout;
        while self.count() < target {
            assert!(
                Instant::now() < deadline,
                "pushes stalled at {}",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(self) -> Vec<AckedPush> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.expect("pusher task"));
        }
        all
    }
}
