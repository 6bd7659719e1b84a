//! The test transport: wraps a node's real peer transport and applies fault rules shared
//! by every node of an in-process cluster. Out of the production path: the node only
//! knows the `Transport` trait.
//!
//! - Global knobs: isolate nodes (both directions), drop a share of all messages, delay
//!   all messages.
//! - [`Rule`]s: per link (from → to, either side optional) and per Raft message type,
//!   drop or delay; [`Faults::partition`] and [`Faults::one_way`] build the common ones.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use freshet_server::raft::transport::Transport;
use parking_lot::{Mutex, RwLock};
use raft::eraftpb::{Message, MessageType};

/// What a matching rule does to a message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    Drop,
    Delay(Duration),
}

/// A fault on the messages that match: sent by `from` (any node when None) to `to` (any
/// when None), of one of `kinds` (any when empty).
#[derive(Debug, Clone)]
pub struct Rule {
    pub from: Option<u64>,
    pub to: Option<u64>,
    pub kinds: Vec<MessageType>,
    pub action: Action,
}

impl Rule {
    fn matches(&self, from: u64, msg: &Message) -> bool {
        self.from.is_none_or(|f| f == from)
            && self.to.is_none_or(|t| t == msg.to)
            && (self.kinds.is_empty() || self.kinds.contains(&msg.get_msg_type()))
    }
}

/// Fault rules shared by every node of an in-process test cluster.
#[derive(Default)]
pub struct Faults {
    /// Nodes cut off from everyone (both directions).
    pub isolated: RwLock<HashSet<u64>>,
    /// Probability in [0, 1] of dropping each message.
    pub drop_rate: RwLock<f64>,
    /// Extra latency added to each message.
    pub delay: RwLock<Duration>,
    /// Per-link and per-message-type rules; the first that matches applies.
    pub rules: RwLock<Vec<Rule>>,
    pub dropped: AtomicU64,
}

impl Faults {
    pub fn add(&self, rule: Rule) {
        self.rules.write().push(rule);
    }

    /// Drops every message between a node of `a` and a node of `b`, both directions.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        for &x in a {
            for &y in b {
                self.one_way(x, y);
                self.one_way(y, x);
            }
        }
    }

    /// Drops every message from `from` to `to` (the other direction still flows).
    pub fn one_way(&self, from: u64, to: u64) {
        self.add(Rule {
            from: Some(from),
            to: Some(to),
            kinds: vec![],
            action: Action::Drop,
        });
    }

    /// Removes every fault.
    pub fn clear(&self) {
        self.isolated.write().clear();
        *self.drop_rate.write() = 0.0;
        *self.delay.write() = Duration::ZERO;
        self.rules.write().clear();
    }
}

/// Wraps a transport with [`Faults`].
pub struct FaultyTransport {
    pub self_id: u64,
    pub inner: Arc<dyn Transport>,
    pub faults: Arc<Faults>,
    rng: Mutex<u64>,
}

impl FaultyTransport {
    pub fn new(self_id: u64, inner: Arc<dyn Transport>, faults: Arc<Faults>) -> Self {
        FaultyTransport {
            self_id,
            inner,
            faults,
            rng: Mutex::new(self_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
        }
    }

    fn coin(&self) -> f64 {
        let mut s = self.rng.lock();
        *s = freshet_proto::splitmix64(*s);
        (*s >> 11) as f64 / (1u64 << 53) as f64
    }

    fn drop_one(&self) {
        self.faults.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

impl Transport for FaultyTransport {
    fn send(&self, shard: u32, msg: Message) {
        {
            let iso = self.faults.isolated.read();
            if iso.contains(&self.self_id) || iso.contains(&msg.to) {
                return self.drop_one();
            }
        }
        let mut delay = *self.faults.delay.read();
        let rule = self
            .faults
            .rules
            .read()
            .iter()
            .find(|r| r.matches(self.self_id, &msg))
            .map(|r| r.action);
        match rule {
            Some(Action::Drop) => return self.drop_one(),
            Some(Action::Delay(d)) => delay += d,
            None => {}
        }
        let rate = *self.faults.drop_rate.read();
        if rate > 0.0 && self.coin() < rate {
            return self.drop_one();
        }
        if delay.is_zero() {
            self.inner.send(shard, msg);
        } else {
            let inner = Arc::clone(&self.inner);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                inner.send(shard, msg);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what reaches the wrapped transport.
    #[derive(Default)]
    struct Sink(Mutex<Vec<(u64, MessageType)>>);

    impl Transport for Sink {
        fn send(&self, _shard: u32, msg: Message) {
            self.0.lock().push((msg.to, msg.get_msg_type()));
        }
    }

    // rust-protobuf messages have private cached-size fields: no struct literal.
    #[allow(clippy::field_reassign_with_default)]
    fn msg(to: u64, kind: MessageType) -> Message {
        let mut m = Message::default();
        m.to = to;
        m.set_msg_type(kind);
        m
    }

    #[test]
    fn rules_match_links_and_message_types() {
        let faults = Arc::new(Faults::default());
        let sink = Arc::new(Sink::default());
        let t1 = FaultyTransport::new(1, sink.clone(), Arc::clone(&faults));
        let t2 = FaultyTransport::new(2, sink.clone(), Arc::clone(&faults));
        faults.one_way(1, 2);
        faults.add(Rule {
            from: None,
            to: Some(3),
            kinds: vec![MessageType::MsgHeartbeat],
            action: Action::Drop,
        });
        t1.send(0, msg(2, MessageType::MsgAppend)); // dropped: 1 -> 2
        t2.send(0, msg(1, MessageType::MsgAppend)); // flows: 2 -> 1
        t1.send(0, msg(3, MessageType::MsgHeartbeat)); // dropped: heartbeat to 3
        t1.send(0, msg(3, MessageType::MsgAppend)); // flows
        assert_eq!(
            *sink.0.lock(),
            vec![(1, MessageType::MsgAppend), (3, MessageType::MsgAppend)]
        );
        assert_eq!(faults.dropped.load(Ordering::Relaxed), 2);
        faults.clear();
        faults.partition(&[1], &[2, 3]);
        t2.send(0, msg(1, MessageType::MsgRequestVote));
        t1.send(0, msg(3, MessageType::MsgRequestVote));
        assert_eq!(faults.dropped.load(Ordering::Relaxed), 4);
    }
}
