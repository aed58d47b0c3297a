//! The state of every block of a virtio-mem region: one bit per block,
//! set when the block is plugged.
//!
//! Pure data structure (no I/O), so it can be fuzzed and tested directly.

use std::ops::Range;

const WORD_BITS: usize = 64;

/// A fixed-size bitmap of plugged blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockBitmap {
    words: Vec<u64>,
    nbits: usize,
    ones: usize,
}

/// Bits `[lo, hi)` of one word, `lo < hi <= 64`.
fn word_mask(lo: usize, hi: usize) -> u64 {
    let upper = if hi >= WORD_BITS {
        u64::MAX
    } else {
        (1u64 << hi) - 1
    };
    upper & !((1u64 << lo) - 1)
}

impl BlockBitmap {
    /// A bitmap of `nbits` cleared (unplugged) blocks.
    pub fn new(nbits: usize) -> Self {
        Self {
            words: vec![0; nbits.div_ceil(WORD_BITS)],
            nbits,
            ones: 0,
        }
    }

    /// Number of blocks tracked.
    pub fn len(&self) -> usize {
        self.nbits
    }

    /// True when the bitmap tracks no block.
    pub fn is_empty(&self) -> bool {
        self.nbits == 0
    }

    /// Number of set (plugged) blocks.
    pub fn count_ones(&self) -> usize {
        self.ones
    }

    /// Whether block `bit` is set; false beyond the end.
    pub fn get(&self, bit: usize) -> bool {
        bit < self.nbits && self.words[bit / WORD_BITS] & (1u64 << (bit % WORD_BITS)) != 0
    }

    /// Calls `f(word_index, mask)` for every word `range` touches.
    fn for_each_word(range: &Range<usize>, mut f: impl FnMut(usize, u64)) {
        let mut pos = range.start;
        while pos < range.end {
            let word = pos / WORD_BITS;
            let lo = pos % WORD_BITS;
            let hi = (range.end - word * WORD_BITS).min(WORD_BITS);
            f(word, word_mask(lo, hi));
            pos = (word + 1) * WORD_BITS;
        }
    }

    /// Number of set blocks inside `range` (clamped to the bitmap).
    pub fn count_ones_in(&self, range: Range<usize>) -> usize {
        let range = range.start.min(self.nbits)..range.end.min(self.nbits);
        let mut count = 0usize;
        Self::for_each_word(&range, |w, mask| {
            count += (self.words[w] & mask).count_ones() as usize;
        });
        count
    }

    /// Sets (`value == true`) or clears every block of `range` (clamped).
    pub fn set_range(&mut self, range: Range<usize>, value: bool) {
        let range = range.start.min(self.nbits)..range.end.min(self.nbits);
        let words = &mut self.words;
        let mut ones = self.ones;
        Self::for_each_word(&range, |w, mask| {
            let before = (words[w] & mask).count_ones() as usize;
            if value {
                words[w] |= mask;
                ones += mask.count_ones() as usize - before;
            } else {
                words[w] &= !mask;
                ones -= before;
            }
        });
        self.ones = ones;
    }

    /// First block at or after `from` whose state is `value`.
    fn next_with(&self, from: usize, value: bool) -> Option<usize> {
        if from >= self.nbits {
            return None;
        }
        let load = |w: usize| if value { self.words[w] } else { !self.words[w] };
        let mut w = from / WORD_BITS;
        let mut bits = load(w) & word_mask(from % WORD_BITS, WORD_BITS);
        while bits == 0 {
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            bits = load(w);
        }
        let bit = w * WORD_BITS + bits.trailing_zeros() as usize;
        (bit < self.nbits).then_some(bit)
    }

    /// The maximal runs of contiguous set blocks, in increasing order.
    pub fn set_runs(&self) -> SetRuns<'_> {
        SetRuns {
            bitmap: self,
            pos: 0,
        }
    }
}

/// Iterator over the maximal runs of set blocks of a [`BlockBitmap`].
#[derive(Debug)]
pub struct SetRuns<'a> {
    bitmap: &'a BlockBitmap,
    pos: usize,
}

impl Iterator for SetRuns<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        let start = self.bitmap.next_with(self.pos, true)?;
        let end = self
            .bitmap
            .next_with(start, false)
            .unwrap_or(self.bitmap.nbits);
        self.pos = end;
        Some(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference model: a Vec<bool>.
    fn runs_of(v: &[bool]) -> Vec<Range<usize>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < v.len() {
            if v[i] {
                let s = i;
                while i < v.len() && v[i] {
                    i += 1;
                }
                out.push(s..i);
            } else {
                i += 1;
            }
        }
        out
    }

    #[test]
    fn matches_a_bool_vector_model() {
        for nbits in [0usize, 1, 63, 64, 65, 130, 200] {
            let mut bm = BlockBitmap::new(nbits);
            let mut model = vec![false; nbits];
            // Deterministic pseudo-random ranges.
            let mut x: usize = 0x7f4a_7c15 ^ nbits;
            for _ in 0..200 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x &= 0xffff_ffff;
                let a = x % (nbits + 1);
                let b = (x >> 20) % (nbits + 1);
                let (s, e) = (a.min(b), a.max(b));
                let val = x & 1 == 1;
                bm.set_range(s..e, val);
                model[s..e].iter_mut().for_each(|m| *m = val);
                assert_eq!(bm.count_ones(), model.iter().filter(|m| **m).count());
                assert_eq!(bm.count_ones_in(s..e), if val { e - s } else { 0 });
                assert_eq!(bm.set_runs().collect::<Vec<_>>(), runs_of(&model));
                for (i, m) in model.iter().enumerate() {
                    assert_eq!(bm.get(i), *m);
                }
            }
        }
    }

    #[test]
    fn ranges_are_clamped() {
        let mut bm = BlockBitmap::new(10);
        bm.set_range(8..100, true);
        assert_eq!(bm.count_ones(), 2);
        assert_eq!(bm.count_ones_in(0..1000), 2);
        assert_eq!(bm.set_runs().collect::<Vec<_>>(), vec![8..10]);
        assert!(!bm.get(10));
    }
}
