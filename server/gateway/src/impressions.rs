//! Bounded, time-limited retention of served impressions (for joining feedback).
//!
//! At most `max` impressions for at most `ttl` each; the oldest go first. Feedback for an
//! impression no longer here gets NOT_FOUND.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use freshet_model::UserInput;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a Rank served, kept to join feedback to (see [`super::GatewayConfig`] for the
/// retention bounds).
#[derive(Debug, Clone)]
pub struct Impression {
    pub created: Instant,
    pub epoch: u64,
    pub input: UserInput,
    pub candidates: Vec<u64>,
    /// (item, position, propensity) per shown slot.
    pub shown: Vec<(u64, u32, f64)>,
}

struct Inner {
    map: HashMap<String, Impression>,
    order: VecDeque<(Instant, String)>,
}

pub struct Impressions {
    inner: Mutex<Inner>,
    max: usize,
    ttl: Duration,
}

impl Impressions {
    pub fn new(max: usize, ttl: Duration) -> Self {
        Impressions {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            max,
            ttl,
        }
    }

    pub fn insert(&self, id: String, imp: Impression) {
        let now = Instant::now();
        let mut g = self.inner.lock();
        g.order.push_back((now, id.clone()));
        g.map.insert(id, imp);
        while let Some((at, _)) = g.order.front() {
            if g.map.len() > self.max || now.duration_since(*at) > self.ttl {
                let (_, old) = g.order.pop_front().expect("non-empty");
                g.map.remove(&old);
            } else {
                break;
            }
        }
    }

    /// The impression, if still retained.
    pub fn get(&self, id: &str) -> Option<Impression> {
        let g = self.inner.lock();
        g.map
            .get(id)
            .filter(|imp| imp.created.elapsed() <= self.ttl)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
