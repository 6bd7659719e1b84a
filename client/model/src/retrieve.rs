//! Retrieval: the top-N items of a catalog by the policy's own score, exactly.
//!
//! score(s, a) = u · (r_a + mean_f F_f) + β_a = u · r_a + mean_f (u · F_f) + β_a, so a
//! feature row shared by many items is read and multiplied once per call, not once per
//! item; each item then costs its own row, its bias and a mean over cached dot products.
//! The result is the same ordering Rank's scores give (up to float rounding of the
//! reassociated sum); Rank's sampler then rescores the retrieved set with [`crate::score`].
//! The gateway retrieves from its own flat item index with the same [`TopN`]; this
//! function over [`Params`] is the reference its tests compare against.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::{dot, item_bias, ModelSpec, Params, UserState, FEATURE_TABLE, ITEM_TABLE};

/// A retrieved item and its score; ordered so that a max-heap pops the *worst* first
/// (lowest score, then highest id), which keeps the best `n` in a bounded heap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub item: u64,
    pub score: f32,
}

impl Eq for Scored {}

impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed score (so the heap's top is the lowest), ties: the higher id is worse.
        other
            .score
            .total_cmp(&self.score)
            .then(self.item.cmp(&other.item))
    }
}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The best `n` of the items offered, by score (ties: the lower id), in a bounded heap
/// whose top is the worst kept.
#[derive(Debug)]
pub struct TopN {
    n: usize,
    heap: BinaryHeap<Scored>,
}

impl TopN {
    pub fn new(n: usize) -> Self {
        TopN {
            n,
            heap: BinaryHeap::with_capacity(n + 1),
        }
    }

    pub fn offer(&mut self, item: u64, score: f32) {
        let cand = Scored { item, score };
        if self.heap.len() < self.n {
            self.heap.push(cand);
        } else if let Some(mut worst) = self.heap.peek_mut() {
            // `cand < worst` in this order means cand is better; replacing the top in
            // place sifts once instead of a pop and a push.
            if cand < *worst {
                *worst = cand;
            }
        }
    }

    /// Once `n` items are kept, the score the worst of them has (an item must beat it to
    /// get in); `None` while fewer are kept.
    pub fn floor(&self) -> Option<f32> {
        (self.heap.len() >= self.n)
            .then(|| self.heap.peek().map(|w| w.score))
            .flatten()
    }

    /// The kept items, best first.
    pub fn into_best(self) -> Vec<Scored> {
        let mut best = self.heap.into_vec();
        best.sort_unstable();
        best
    }
}

/// The `n` best `items` (id, sorted feature ids) for `user` by score, best first; ties
/// go to the lower id, so the answer does not depend on the order `items` come in.
pub fn top_by_score<'a>(
    spec: &ModelSpec,
    p: &impl Params,
    user: &UserState,
    items: impl IntoIterator<Item = (u64, &'a [u64])>,
    n: usize,
) -> Vec<Scored> {
    let d = spec.dim;
    let mut row = vec![0.0f32; d];
    let mut feature_dot: HashMap<u64, f32> = HashMap::new();
    let mut top = TopN::new(n);
    for (item, features) in items {
        p.read(ITEM_TABLE, item, &mut row);
        let mut s = dot(&user.u, &row);
        if !features.is_empty() {
            let mut f_sum = 0.0f32;
            for f in features {
                f_sum += *feature_dot.entry(*f).or_insert_with(|| {
                    p.read(FEATURE_TABLE, *f, &mut row);
                    dot(&user.u, &row)
                });
            }
            s += f_sum / features.len() as f32;
        }
        s += item_bias(spec, p, item);
        top.offer(item, s);
    }
    top.into_best()
}
