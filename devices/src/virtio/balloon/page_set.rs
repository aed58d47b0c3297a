//! The set of 4 KiB guest pages currently held by the balloon.
//!
//! A sparse bitmap: the 2^32 PFN space is cut into chunks of 32768 pages
//! (128 MiB of guest memory, 4 KiB of bitmap) allocated on first use and
//! freed when they empty, so the cost follows the inflated memory, not the
//! size of the guest.

use std::collections::BTreeMap;

/// log2 of the number of pages per chunk.
const CHUNK_SHIFT: u32 = 15;
/// Number of `u64` words in a chunk bitmap.
const CHUNK_WORDS: usize = 1 << (CHUNK_SHIFT - 6);

#[derive(Debug)]
struct Chunk {
    bits: Box<[u64; CHUNK_WORDS]>,
    count: u32,
}

/// A set of page frame numbers.
#[derive(Debug, Default)]
pub struct PageSet {
    chunks: BTreeMap<u32, Chunk>,
    len: u64,
}

/// Splits a PFN into its chunk key, word index and bit mask.
fn locate(pfn: u32) -> (u32, usize, u64) {
    let key = pfn >> CHUNK_SHIFT;
    let bit = pfn & ((1 << CHUNK_SHIFT) - 1);
    // `bit >> 6` is below CHUNK_WORDS, so the conversion cannot fail.
    let word = usize::try_from(bit >> 6).unwrap_or(0);
    (key, word, 1u64 << (bit & 63))
}

impl PageSet {
    /// Adds `pfn`; returns false if it was already present.
    pub fn insert(&mut self, pfn: u32) -> bool {
        let (key, word, mask) = locate(pfn);
        let chunk = self.chunks.entry(key).or_insert_with(|| Chunk {
            bits: Box::new([0; CHUNK_WORDS]),
            count: 0,
        });
        if chunk.bits[word] & mask != 0 {
            return false;
        }
        chunk.bits[word] |= mask;
        chunk.count += 1;
        self.len += 1;
        true
    }

    /// Removes `pfn`; returns false if it was not present.
    pub fn remove(&mut self, pfn: u32) -> bool {
        let (key, word, mask) = locate(pfn);
        let Some(chunk) = self.chunks.get_mut(&key) else {
            return false;
        };
        if chunk.bits[word] & mask == 0 {
            return false;
        }
        chunk.bits[word] &= !mask;
        chunk.count -= 1;
        if chunk.count == 0 {
            self.chunks.remove(&key);
        }
        self.len -= 1;
        true
    }

    /// Whether `pfn` is in the set.
    pub fn contains(&self, pfn: u32) -> bool {
        let (key, word, mask) = locate(pfn);
        self.chunks
            .get(&key)
            .is_some_and(|chunk| chunk.bits[word] & mask != 0)
    }

    /// Number of pages in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes every page.
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_contains() {
        let mut set = PageSet::default();
        assert!(set.is_empty());
        for pfn in [0, 63, 64, 32767, 32768, u32::MAX] {
            assert!(set.insert(pfn));
            assert!(!set.insert(pfn));
            assert!(set.contains(pfn));
        }
        assert_eq!(set.len(), 6);
        assert!(!set.contains(1));
        assert!(!set.remove(1));
        assert!(set.remove(u32::MAX));
        assert!(!set.contains(u32::MAX));
        assert_eq!(set.chunks.len(), 2);
        assert!(set.remove(32768));
        assert_eq!(set.chunks.len(), 1);
        set.clear();
        assert!(set.is_empty());
        assert!(!set.contains(0));
    }
}
