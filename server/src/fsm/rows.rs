//! A table's rows (value and optimizer slots side by side, with the row's id and update
//! time) in fixed-size chunks shared copy-on-write.
//!
//! Why chunks: a background snapshot needs the state as of one applied index while the
//! group goes on applying. Cloning the whole table for it (what a flat `Vec` allows)
//! doubles a shard's memory at the moment it is largest. Cloning a [`Rows`] clones only
//! the chunk pointers; a write to a chunk that a snapshot still holds copies that one
//! chunk first ([`Arc::make_mut`]), so a snapshot costs the chunks written while it is
//! being encoded, never a second copy of the rest. Chunks hold about 16 KiB of values:
//! small enough that a write copies little, large enough that the per-chunk overhead
//! (about 150 bytes) is ~1 byte per dim-16 Adagrad row.
//!
//! The slot layout (which row lives where) differs between replicas that restored from
//! snapshots at different times; nothing replicated depends on it (snapshots and
//! checksums walk ids in sorted order).

use std::sync::Arc;

/// Bytes of values a chunk aims at.
const CHUNK_BYTES: usize = 16 * 1024;

#[derive(Debug, Default)]
struct Chunk {
    ids: Vec<u64>,
    touched: Vec<u64>,
    data: Vec<f32>,
}

/// A copy keeps the original's capacity: the last chunk, copied while a snapshot holds
/// it, still takes rows up to its size without reallocating (a derived clone would leave
/// it exactly full, and the next push would double it).
impl Clone for Chunk {
    fn clone(&self) -> Self {
        fn keep<T: Copy>(v: &[T], capacity: usize) -> Vec<T> {
            let mut out = Vec::with_capacity(capacity);
            out.extend_from_slice(v);
            out
        }
        Chunk {
            ids: keep(&self.ids, self.ids.capacity()),
            touched: keep(&self.touched, self.touched.capacity()),
            data: keep(&self.data, self.data.capacity()),
        }
    }
}

/// Rows of one table, addressed by slot (`0..len`).
#[derive(Debug, Clone)]
pub struct Rows {
    stride: usize,
    chunk_rows: usize,
    chunks: Vec<Arc<Chunk>>,
    len: usize,
    /// Chunks copied because a snapshot still held them (status only, not replicated).
    copied: u64,
}

impl Rows {
    /// Rows of `stride` floats each (a row of a dense tensor may be much larger than a
    /// chunk: then every chunk holds one row).
    pub fn new(stride: usize) -> Self {
        let stride = stride.max(1);
        Rows {
            stride,
            chunk_rows: (CHUNK_BYTES / (stride * 4)).max(1),
            chunks: Vec::new(),
            len: 0,
            copied: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Chunks copied on write since this replica started (snapshot cost).
    pub fn copied_chunks(&self) -> u64 {
        self.copied
    }

    /// Bytes one chunk of values holds (what a copy-on-write costs).
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_rows * (self.stride * 4 + 16)
    }

    fn at(&self, slot: usize) -> (usize, usize) {
        debug_assert!(slot < self.len, "slot {slot} of {}", self.len);
        (slot / self.chunk_rows, slot % self.chunk_rows)
    }

    /// The chunk holding `slot`, for writing: copied first if a snapshot shares it.
    fn chunk_mut(&mut self, c: usize) -> &mut Chunk {
        if Arc::strong_count(&self.chunks[c]) > 1 {
            self.copied += 1;
            metrics::counter!(crate::metrics::SNAPSHOT_COPIES).increment(1);
        }
        Arc::make_mut(&mut self.chunks[c])
    }

    pub fn id(&self, slot: usize) -> u64 {
        let (c, i) = self.at(slot);
        self.chunks[c].ids[i]
    }

    pub fn touched(&self, slot: usize) -> u64 {
        let (c, i) = self.at(slot);
        self.chunks[c].touched[i]
    }

    pub fn set_touched(&mut self, slot: usize, t: u64) {
        let (c, i) = self.at(slot);
        self.chunk_mut(c).touched[i] = t;
    }

    /// Every row's time set to `t`.
    pub fn touch_all(&mut self, t: u64) {
        for c in 0..self.chunks.len() {
            self.chunk_mut(c).touched.iter_mut().for_each(|x| *x = t);
        }
    }

    /// The row's `stride` floats.
    pub fn row(&self, slot: usize) -> &[f32] {
        let (c, i) = self.at(slot);
        &self.chunks[c].data[i * self.stride..(i + 1) * self.stride]
    }

    pub fn row_mut(&mut self, slot: usize) -> &mut [f32] {
        let (c, i) = self.at(slot);
        let stride = self.stride;
        &mut self.chunk_mut(c).data[i * stride..(i + 1) * stride]
    }

    /// Appends a zeroed row for `id`; returns its slot.
    pub fn push(&mut self, id: u64, touched: u64) -> usize {
        if self.len == self.chunks.len() * self.chunk_rows {
            self.chunks.push(Arc::new(Chunk {
                ids: Vec::with_capacity(self.chunk_rows),
                touched: Vec::with_capacity(self.chunk_rows),
                data: Vec::with_capacity(self.chunk_rows * self.stride),
            }));
        }
        let last = self.chunks.len() - 1;
        let stride = self.stride;
        let chunk = self.chunk_mut(last);
        chunk.ids.push(id);
        chunk.touched.push(touched);
        chunk.data.resize(chunk.data.len() + stride, 0.0);
        self.len += 1;
        self.len - 1
    }

    /// Removes the row at `slot`: the last row moves into its place. Returns the id of
    /// the row that moved (None when `slot` was the last).
    pub fn swap_remove(&mut self, slot: usize) -> Option<u64> {
        let last = self.len - 1;
        let moved = if slot == last {
            None
        } else {
            let (id, t) = (self.id(last), self.touched(last));
            let values = self.row(last).to_vec();
            self.row_mut(slot).copy_from_slice(&values);
            let (c, i) = self.at(slot);
            let chunk = self.chunk_mut(c);
            chunk.ids[i] = id;
            chunk.touched[i] = t;
            Some(id)
        };
        let (c, _) = self.at(last);
        if self.chunks[c].ids.len() == 1 {
            // Its only row goes: drop the chunk, never copy it first.
            self.chunks.pop();
        } else {
            let stride = self.stride;
            let chunk = self.chunk_mut(c);
            chunk.ids.pop();
            chunk.touched.pop();
            chunk.data.truncate(chunk.data.len() - stride);
        }
        self.len -= 1;
        moved
    }

    /// (id, time) of every row, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.chunks
            .iter()
            .flat_map(|c| c.ids.iter().copied().zip(c.touched.iter().copied()))
    }

    /// Bytes allocated for the rows: every chunk's buffers at their capacity, its
    /// header and reference counts, and the chunk list.
    pub fn allocated_bytes(&self) -> usize {
        let per_chunk = std::mem::size_of::<Chunk>() + 16;
        self.chunks.capacity() * std::mem::size_of::<Arc<Chunk>>()
            + self
                .chunks
                .iter()
                .map(|c| {
                    per_chunk
                        + c.ids.capacity() * 8
                        + c.touched.capacity() * 8
                        + c.data.capacity() * 4
                })
                .sum::<usize>()
    }

    pub fn reserve(&mut self, rows: usize) {
        self.chunks.reserve(rows.div_ceil(self.chunk_rows));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(n: usize) -> Rows {
        let mut r = Rows::new(3);
        for id in 0..n as u64 {
            let s = r.push(id, id * 10);
            r.row_mut(s).copy_from_slice(&[id as f32, 1.0, 2.0]);
        }
        r
    }

    #[test]
    fn rows_span_chunks_and_swap_remove_keeps_the_rest() {
        let n = Rows::new(3).chunk_rows * 2 + 5;
        let mut r = filled(n);
        assert_eq!(r.len(), n);
        assert_eq!(r.chunks.len(), 3);
        assert_eq!(r.row(n - 1)[0], (n - 1) as f32);
        // Removing slot 1 moves the last row there.
        assert_eq!(r.swap_remove(1), Some(n as u64 - 1));
        assert_eq!((r.id(1), r.touched(1)), (n as u64 - 1, (n as u64 - 1) * 10));
        assert_eq!(r.row(1)[0], (n - 1) as f32);
        // Emptying the last chunk drops it.
        for _ in 0..4 {
            r.swap_remove(r.len() - 1);
        }
        assert_eq!(r.chunks.len(), 2);
        let ids: Vec<u64> = r.iter().map(|(id, _)| id).collect();
        assert_eq!(ids.len(), r.len());
        assert!(!ids.contains(&(n as u64 - 1)) || r.id(1) == n as u64 - 1);
    }

    /// A clone is a snapshot: writes after it copy only the chunks they touch, and the
    /// clone keeps the values it was taken with.
    #[test]
    fn a_clone_shares_chunks_until_a_write_copies_one() {
        let mut r = filled(Rows::new(3).chunk_rows * 4);
        let frozen = r.clone();
        assert_eq!(r.copied_chunks(), 0);
        r.row_mut(0)[0] = 99.0;
        r.row_mut(1)[0] = 98.0;
        r.set_touched(2, 7);
        assert_eq!(
            r.copied_chunks(),
            1,
            "three writes to one chunk copy it once"
        );
        assert_eq!(frozen.row(0)[0], 0.0);
        assert_eq!(frozen.touched(2), 20);
        assert_eq!(r.row(0)[0], 99.0);
        for c in 1..4 {
            assert!(Arc::ptr_eq(&r.chunks[c], &frozen.chunks[c]));
        }
        drop(frozen);
        r.row_mut(r.len() - 1)[0] = 1.0;
        assert_eq!(
            r.copied_chunks(),
            1,
            "no copy once no snapshot holds the chunk"
        );
    }

    /// The last chunk copied while a snapshot holds it keeps room for its rows; a shared
    /// chunk whose only row goes is dropped, not copied.
    #[test]
    fn copies_keep_capacity_and_a_last_lone_row_is_not_copied() {
        let per = Rows::new(3).chunk_rows;
        let mut r = filled(per + 2);
        let frozen = r.clone();
        r.push(99, 0);
        assert_eq!(r.copied_chunks(), 1);
        assert_eq!(
            r.chunks[1].data.capacity(),
            per * 3,
            "room kept after the copy"
        );
        let mut r = filled(per + 1);
        let frozen2 = r.clone();
        assert_eq!(r.swap_remove(per), None);
        assert_eq!(
            r.copied_chunks(),
            0,
            "the lone row's chunk is dropped, not copied"
        );
        assert_eq!(r.chunks.len(), 1);
        assert_eq!(frozen2.len(), per + 1);
        drop(frozen);
    }
}
