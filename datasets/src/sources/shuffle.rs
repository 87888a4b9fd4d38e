//! Seeded shuffling that gives the same order on every machine and every run.
//!
//! Both helpers draw from ChaCha8 keyed by the seed, with the epoch as the ChaCha stream, so
//! epochs get independent orders without any seed arithmetic. rand's `shuffle` and
//! `random_range` sample indices portably (as `u32` where they fit), so the order does not
//! depend on the platform's word size.

use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn seeded_rng(seed: u64, epoch: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    rng
}

pub(super) fn shuffle_seeded<T>(items: &mut [T], seed: u64, epoch: u64) {
    items.shuffle(&mut seeded_rng(seed, epoch));
}

/// Shuffles WebDataset shards for one epoch, as open_clip's `detshuffle2` does before
/// streaming them: the first level of shuffling, with [`ShuffleBuffer`] the second.
pub fn shuffle_shards(shards: &mut [PathBuf], seed: u64, epoch: u64) {
    shuffle_seeded(shards, seed, epoch);
}

/// Shuffles a stream through a buffer of `size` items, as WebDataset's `shuffle(bufsize)`:
/// the buffer is filled, then each item yielded is drawn at random from it and its slot
/// refilled from the stream. Memory is `size` items; an item moves at most about `size`
/// places from where the stream had it, so shard-level shuffling is still needed.
pub struct ShuffleBuffer<I: Iterator> {
    inner: std::iter::Fuse<I>,
    buffer: Vec<I::Item>,
    size: usize,
    rng: ChaCha8Rng,
}

impl<I: Iterator> ShuffleBuffer<I> {
    /// A `size` of 0 or 1 passes the stream through unchanged.
    pub fn new(inner: I, size: usize, seed: u64, epoch: u64) -> Self {
        let size = size.max(1);
        Self {
            inner: inner.fuse(),
            buffer: Vec::with_capacity(size),
            size,
            rng: seeded_rng(seed, epoch),
        }
    }
}

impl<I: Iterator> Iterator for ShuffleBuffer<I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        while self.buffer.len() < self.size {
            match self.inner.next() {
                Some(item) => self.buffer.push(item),
                None => break,
            }
        }
        if self.buffer.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..self.buffer.len());
        Some(self.buffer.swap_remove(i))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let (low, high) = self.inner.size_hint();
        let buffered = self.buffer.len();
        (
            low.saturating_add(buffered),
            high.and_then(|h| h.checked_add(buffered)),
        )
    }
}
