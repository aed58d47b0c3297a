//! Sets of guest page ranges.
//!
//! The DM protocol speaks in ranges of 4 KiB guest pages (a start PFN and a
//! page count). The host keeps what the guest gave up in a [`RangeSet`]:
//! inserting merges neighbours, removing splits, and the queries answer
//! "how much of this range is already in the set", which is how reported
//! ranges are checked against guest RAM and against earlier reports.
//!
//! The virtio balloon's `PageSet` is a bitmap of 32-bit PFNs, one bit per
//! page; DM ranges carry 40-bit PFNs and up to 2^24 pages each, so a map of
//! disjoint intervals fits better here.

use std::collections::BTreeMap;

/// A range of 4 KiB guest pages: `count` pages from page frame `start`.
///
/// Ranges whose end would overflow `u64` are treated as ending at
/// `u64::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageRange {
    /// First page frame number.
    pub start: u64,
    /// Number of pages.
    pub count: u64,
}

impl PageRange {
    /// The range of `count` pages from `start`.
    pub const fn new(start: u64, count: u64) -> Self {
        Self { start, count }
    }

    /// One past the last page frame number (saturating).
    pub const fn end(&self) -> u64 {
        self.start.saturating_add(self.count)
    }

    /// Whether the range holds no page.
    pub const fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn from_bounds(start: u64, end: u64) -> Self {
        Self {
            start,
            count: end.saturating_sub(start),
        }
    }
}

/// A set of guest pages kept as disjoint, non-adjacent ranges.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeSet {
    /// Start PFN → end PFN (exclusive); intervals never touch.
    map: BTreeMap<u64, u64>,
    pages: u64,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of pages in the set.
    pub fn total_pages(&self) -> u64 {
        self.pages
    }

    /// Whether the set holds no page.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Number of disjoint ranges the set is made of.
    pub fn range_count(&self) -> usize {
        self.map.len()
    }

    /// The ranges of the set, in ascending order, maximally merged.
    pub fn iter(&self) -> impl Iterator<Item = PageRange> + '_ {
        self.map
            .iter()
            .map(|(&start, &end)| PageRange::from_bounds(start, end))
    }

    /// Removes every page.
    pub fn clear(&mut self) {
        self.map.clear();
        self.pages = 0;
    }

    /// Adds the pages of `range`, merging with neighbours; returns how many
    /// of them were not in the set before.
    pub fn insert(&mut self, range: PageRange) -> u64 {
        let (mut start, mut end) = (range.start, range.end());
        if start == end {
            return 0;
        }
        let added_before = self.overlap_pages(range);
        // Every interval that overlaps or touches [start, end).
        let touching: Vec<(u64, u64)> = self
            .map
            .range(..=end)
            .rev()
            .take_while(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.map.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.map.insert(start, end);
        let added = (range.end() - range.start) - added_before;
        self.pages += added;
        added
    }

    /// Removes the pages of `range`, splitting ranges as needed; returns how
    /// many of them were in the set.
    pub fn remove(&mut self, range: PageRange) -> u64 {
        let (start, end) = (range.start, range.end());
        if start == end {
            return 0;
        }
        let overlapping: Vec<(u64, u64)> = self
            .map
            .range(..end)
            .rev()
            .take_while(|(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        let mut removed = 0;
        for (s, e) in overlapping {
            self.map.remove(&s);
            if s < start {
                self.map.insert(s, start);
            }
            if e > end {
                self.map.insert(end, e);
            }
            removed += e.min(end) - s.max(start);
        }
        self.pages -= removed;
        removed
    }

    /// Number of pages of `range` that are in the set.
    pub fn overlap_pages(&self, range: PageRange) -> u64 {
        self.intersection(range).iter().map(|r| r.count).sum()
    }

    /// Whether any page of `range` is in the set.
    pub fn overlaps(&self, range: PageRange) -> bool {
        let (start, end) = (range.start, range.end());
        start < end
            && self
                .map
                .range(..end)
                .next_back()
                .is_some_and(|(_, &e)| e > start)
    }

    /// Whether every page of `range` is in the set (true for an empty
    /// range).
    pub fn contains(&self, range: PageRange) -> bool {
        let (start, end) = (range.start, range.end());
        start == end
            || self
                .map
                .range(..=start)
                .next_back()
                .is_some_and(|(_, &e)| e >= end)
    }

    /// The parts of `range` that are in the set, in ascending order.
    pub fn intersection(&self, range: PageRange) -> Vec<PageRange> {
        let (start, end) = (range.start, range.end());
        if start == end {
            return Vec::new();
        }
        let mut parts: Vec<PageRange> = self
            .map
            .range(..end)
            .rev()
            .take_while(|(_, &e)| e > start)
            .map(|(&s, &e)| PageRange::from_bounds(s.max(start), e.min(end)))
            .collect();
        parts.reverse();
        parts
    }

    /// The parts of `range` that are not in the set, in ascending order.
    pub fn difference(&self, range: PageRange) -> Vec<PageRange> {
        let mut parts = Vec::new();
        let mut cursor = range.start;
        for inside in self.intersection(range) {
            if inside.start > cursor {
                parts.push(PageRange::from_bounds(cursor, inside.start));
            }
            cursor = inside.end();
        }
        if cursor < range.end() {
            parts.push(PageRange::from_bounds(cursor, range.end()));
        }
        parts
    }

    /// Removes up to `max_pages` pages from the lowest ranges of the set and
    /// returns them, in ascending order.
    pub fn take_lowest(&mut self, max_pages: u64) -> Vec<PageRange> {
        let mut taken = Vec::new();
        let mut left = max_pages;
        while left > 0 {
            let Some((&s, &e)) = self.map.iter().next() else {
                break;
            };
            let part = PageRange::new(s, (e - s).min(left));
            self.remove(part);
            left -= part.count;
            taken.push(part);
        }
        taken
    }
}

impl FromIterator<PageRange> for RangeSet {
    fn from_iter<I: IntoIterator<Item = PageRange>>(iter: I) -> Self {
        let mut set = RangeSet::new();
        for range in iter {
            set.insert(range);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, count: u64) -> PageRange {
        PageRange::new(start, count)
    }

    fn ranges(set: &RangeSet) -> Vec<(u64, u64)> {
        set.iter().map(|r| (r.start, r.count)).collect()
    }

    #[test]
    fn insert_merges_overlapping_and_adjacent() {
        let mut set = RangeSet::new();
        assert_eq!(set.insert(r(10, 5)), 5);
        assert_eq!(set.insert(r(20, 5)), 5);
        assert_eq!(ranges(&set), [(10, 5), (20, 5)]);
        // Adjacent on the left of the second range.
        assert_eq!(set.insert(r(15, 2)), 2);
        assert_eq!(ranges(&set), [(10, 7), (20, 5)]);
        // Bridges the gap and overlaps both.
        assert_eq!(set.insert(r(12, 10)), 3);
        assert_eq!(ranges(&set), [(10, 15)]);
        // Fully inside: nothing new.
        assert_eq!(set.insert(r(11, 3)), 0);
        // Empty range.
        assert_eq!(set.insert(r(100, 0)), 0);
        // Covers everything and more on both sides.
        assert_eq!(set.insert(r(0, 40)), 25);
        assert_eq!(ranges(&set), [(0, 40)]);
        assert_eq!(set.total_pages(), 40);
        assert_eq!(set.range_count(), 1);
    }

    #[test]
    fn remove_splits() {
        let mut set: RangeSet = [r(0, 100), r(200, 10)].into_iter().collect();
        assert_eq!(set.remove(r(10, 10)), 10);
        assert_eq!(ranges(&set), [(0, 10), (20, 80), (200, 10)]);
        assert_eq!(set.remove(r(95, 110)), 10);
        assert_eq!(ranges(&set), [(0, 10), (20, 75), (205, 5)]);
        assert_eq!(set.remove(r(500, 5)), 0);
        assert_eq!(set.remove(r(0, 0)), 0);
        assert_eq!(set.total_pages(), 90);
        assert_eq!(set.remove(r(0, u64::MAX)), 90);
        assert!(set.is_empty());
        assert_eq!(set.range_count(), 0);
    }

    #[test]
    fn queries() {
        let set: RangeSet = [r(10, 10), r(30, 10)].into_iter().collect();
        assert!(set.contains(r(10, 10)));
        assert!(set.contains(r(12, 3)));
        assert!(set.contains(r(50, 0)));
        assert!(!set.contains(r(15, 10)));
        assert!(!set.contains(r(19, 12)));
        assert!(set.overlaps(r(19, 1)));
        assert!(set.overlaps(r(0, 11)));
        assert!(!set.overlaps(r(20, 10)));
        assert!(!set.overlaps(r(40, 100)));
        assert!(!set.overlaps(r(15, 0)));
        assert_eq!(set.overlap_pages(r(0, 100)), 20);
        assert_eq!(set.overlap_pages(r(15, 20)), 10);
        assert_eq!(set.intersection(r(15, 20)), [r(15, 5), r(30, 5)]);
        assert_eq!(set.difference(r(5, 40)), [r(5, 5), r(20, 10), r(40, 5)]);
        assert_eq!(set.difference(r(10, 10)), []);
        assert_eq!(set.difference(r(0, 5)), [r(0, 5)]);
    }

    #[test]
    fn take_lowest_pops_in_order() {
        let mut set: RangeSet = [r(100, 10), r(0, 5), r(50, 20)].into_iter().collect();
        assert_eq!(set.take_lowest(12), [r(0, 5), r(50, 7)]);
        assert_eq!(ranges(&set), [(57, 13), (100, 10)]);
        assert_eq!(set.take_lowest(1000), [r(57, 13), r(100, 10)]);
        assert!(set.is_empty());
        assert_eq!(set.take_lowest(5), []);
    }

    #[test]
    fn huge_and_saturating_ranges() {
        let mut set = RangeSet::new();
        assert_eq!(set.insert(r(u64::MAX - 10, 100)), 10);
        assert_eq!(set.total_pages(), 10);
        assert!(set.contains(r(u64::MAX - 10, 10)));
        assert_eq!(set.insert(r(0, 1 << 40)), 1 << 40);
        assert_eq!(set.remove(r(1, u64::MAX)), (1 << 40) - 1 + 10);
        assert_eq!(ranges(&set), [(0, 1)]);
    }

    #[test]
    fn matches_a_page_by_page_model() {
        // A small deterministic pseudo-random walk against a bitmap.
        let mut set = RangeSet::new();
        let mut model = [false; 256];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let start = seed % 240;
            let count = (seed >> 8) % 17;
            let range = r(start, count);
            let lo = usize::try_from(start).unwrap();
            let hi = usize::try_from(start + count).unwrap();
            let before = model[lo..hi].iter().filter(|&&b| b).count() as u64;
            assert_eq!(set.overlap_pages(range), before);
            if seed & (1 << 40) != 0 {
                assert_eq!(set.insert(range), count - before);
                model[lo..hi].iter_mut().for_each(|b| *b = true);
            } else {
                assert_eq!(set.remove(range), before);
                model[lo..hi].iter_mut().for_each(|b| *b = false);
            }
            assert_eq!(
                set.total_pages(),
                model.iter().filter(|&&b| b).count() as u64
            );
            // Ranges stay disjoint and never touch.
            let all: Vec<_> = set.iter().collect();
            for pair in all.windows(2) {
                assert!(pair[0].end() < pair[1].start);
            }
        }
    }
}
