//! Pure helpers behind inflate, deflate and free page reporting requests.
//!
//! Nothing here touches host memory: the functions turn guest-supplied bytes
//! and ranges into validated, merged guest-physical ranges, each inside one
//! memory region, that the device then hands to
//! [`discard_range`](crate::discard::discard_range) one call per range.

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::page_set::PageSet;

/// log2 of the page size the balloon protocol uses for PFNs (always 4 KiB).
pub const BALLOON_PAGE_SHIFT: u32 = 12;
/// The page size the balloon protocol uses for PFNs and `num_pages`.
pub const BALLOON_PAGE_SIZE: u64 = 1 << BALLOON_PAGE_SHIFT;

/// Size in bytes of one PFN entry in an inflate/deflate buffer.
const PFN_ENTRY_SIZE: usize = 4;

/// PFNs decoded from an inflate or deflate buffer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PfnList {
    /// The whole little-endian `u32` PFNs found in the buffer, in order.
    pub pfns: Vec<u32>,
    /// The buffer length was not a multiple of 4; trailing bytes were dropped.
    pub malformed: bool,
}

/// Decodes a buffer of little-endian `u32` PFNs.
///
/// Only whole entries are used; a trailing partial entry marks the list
/// as malformed.
pub fn parse_pfns(bytes: &[u8]) -> PfnList {
    let chunks = bytes.chunks_exact(PFN_ENTRY_SIZE);
    let malformed = !chunks.remainder().is_empty();
    let pfns = chunks
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    PfnList { pfns, malformed }
}

/// A run of consecutive 4 KiB guest pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PfnRun {
    /// First page frame number of the run.
    pub start: u32,
    /// Number of pages in the run (at least 1; up to 2^32).
    pub count: u64,
}

impl PfnRun {
    /// Guest-physical address of the first byte of the run.
    pub fn addr(&self) -> GuestAddress {
        GuestAddress(u64::from(self.start) << BALLOON_PAGE_SHIFT)
    }

    /// Length of the run in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.count << BALLOON_PAGE_SHIFT
    }
}

/// Sorts and deduplicates `pfns` and merges consecutive frames into runs.
pub fn merge_runs(pfns: &[u32]) -> Vec<PfnRun> {
    let mut sorted = pfns.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<PfnRun> = Vec::new();
    for pfn in sorted {
        match runs.last_mut() {
            Some(run) if u64::from(run.start) + run.count == u64::from(pfn) => run.count += 1,
            _ => runs.push(PfnRun {
                start: pfn,
                count: 1,
            }),
        }
    }
    runs
}

/// Whether the whole 4 KiB page `pfn` lies inside guest RAM.
pub fn page_in_ram<M: GuestMemoryBackend>(mem: &M, pfn: u32) -> bool {
    let addr = GuestAddress(u64::from(pfn) << BALLOON_PAGE_SHIFT);
    let last = addr.unchecked_add(BALLOON_PAGE_SIZE - 1);
    mem.find_region(addr)
        .is_some_and(|region| region.last_addr() >= last)
}

/// Intersects `[addr, addr + len)` with the regions of `mem`.
///
/// Returns the parts that lie in guest RAM, one entry per region, sorted by
/// address. Parts outside RAM are dropped; the caller computes them from the
/// returned total.
pub fn split_at_regions<M: GuestMemoryBackend>(
    mem: &M,
    addr: GuestAddress,
    len: u64,
) -> Vec<(GuestAddress, u64)> {
    let start = addr.raw_value();
    let end = start.saturating_add(len);
    let mut parts: Vec<(GuestAddress, u64)> = mem
        .iter()
        .filter_map(|region| {
            let r_start = region.start_addr().raw_value();
            let r_end = r_start.saturating_add(region.len());
            let s = start.max(r_start);
            let e = end.min(r_end);
            (s < e).then(|| (GuestAddress(s), e - s))
        })
        .collect();
    parts.sort_unstable_by_key(|(a, _)| *a);
    parts
}

/// Counters produced while validating an inflate request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InflateOutcome {
    /// Pages newly added to the balloon.
    pub accepted: u64,
    /// PFNs whose page is not (entirely) in guest RAM.
    pub out_of_range: u64,
    /// PFNs already in the balloon (including repeats within the request).
    pub repeated: u64,
}

/// Validates an inflate request and records the accepted pages in `inflated`.
///
/// Returns the ranges to discard (merged runs, split at region boundaries)
/// and what happened to each PFN.
pub fn plan_inflate<M: GuestMemoryBackend>(
    mem: &M,
    inflated: &mut PageSet,
    pfns: &[u32],
) -> (Vec<(GuestAddress, u64)>, InflateOutcome) {
    let mut outcome = InflateOutcome::default();
    let mut accepted = Vec::with_capacity(pfns.len());
    for &pfn in pfns {
        if !page_in_ram(mem, pfn) {
            outcome.out_of_range += 1;
        } else if !inflated.insert(pfn) {
            outcome.repeated += 1;
        } else {
            outcome.accepted += 1;
            accepted.push(pfn);
        }
    }
    let ranges = merge_runs(&accepted)
        .iter()
        .flat_map(|run| split_at_regions(mem, run.addr(), run.len_bytes()))
        .collect();
    (ranges, outcome)
}

/// Counters produced by a deflate request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeflateOutcome {
    /// Pages removed from the balloon.
    pub released: u64,
    /// PFNs that were not in the balloon.
    pub unknown: u64,
}

/// Removes the deflated PFNs from `inflated`. No host action is needed: the
/// pages fault back in (zeroed) when the guest touches them.
pub fn apply_deflate(inflated: &mut PageSet, pfns: &[u32]) -> DeflateOutcome {
    let mut outcome = DeflateOutcome::default();
    for &pfn in pfns {
        if inflated.remove(pfn) {
            outcome.released += 1;
        } else {
            outcome.unknown += 1;
        }
    }
    outcome
}

/// Ranges to discard for a free page report, and what was dropped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReportPlan {
    /// Ranges inside guest RAM, 4 KiB aligned, merged, one region each.
    pub ranges: Vec<(GuestAddress, u64)>,
    /// Bytes of the reported ranges that were outside RAM or not whole pages.
    pub ignored_bytes: u64,
}

/// Turns the `(addr, len)` buffers of a free page report into discardable
/// ranges: each is shrunk to whole 4 KiB pages, overlapping or adjacent
/// buffers are merged, and the result is clipped to guest RAM and split at
/// region boundaries.
pub fn plan_report<M: GuestMemoryBackend>(mem: &M, buffers: &[(u64, u64)]) -> ReportPlan {
    let mask = BALLOON_PAGE_SIZE - 1;
    let mut total: u64 = 0;
    let mut aligned: Vec<(u64, u64)> = Vec::with_capacity(buffers.len());
    for &(addr, len) in buffers {
        total = total.saturating_add(len);
        let end = addr.saturating_add(len) & !mask;
        let Some(start) = addr.checked_add(mask).map(|a| a & !mask) else {
            continue;
        };
        if start < end {
            aligned.push((start, end));
        }
    }
    aligned.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(aligned.len());
    for (start, end) in aligned {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let ranges: Vec<(GuestAddress, u64)> = merged
        .iter()
        .flat_map(|&(start, end)| split_at_regions(mem, GuestAddress(start), end - start))
        .collect();
    let kept: u64 = ranges.iter().map(|(_, len)| len).sum();
    ReportPlan {
        ranges,
        ignored_bytes: total.saturating_sub(kept),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn two_adjacent_regions() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
            (GuestAddress(0x100000), 0x4000),
        ])
        .unwrap()
    }

    #[test]
    fn parse_whole_entries() {
        let bytes = [1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x34, 0x12, 0, 0];
        let list = parse_pfns(&bytes);
        assert_eq!(list.pfns, vec![1, u32::MAX, 0x1234]);
        assert!(!list.malformed);
        assert_eq!(parse_pfns(&[]), PfnList::default());
    }

    #[test]
    fn parse_truncated_buffer_keeps_whole_pfns() {
        let list = parse_pfns(&[2, 0, 0, 0, 3, 0, 0]);
        assert_eq!(list.pfns, vec![2]);
        assert!(list.malformed);
        let list = parse_pfns(&[9]);
        assert!(list.pfns.is_empty());
        assert!(list.malformed);
    }

    #[test]
    fn merge_consecutive_pfns_into_runs() {
        let runs = merge_runs(&[0x12, 0x10, 0x11, 0x20, 0x11, u32::MAX, u32::MAX - 1]);
        assert_eq!(
            runs,
            vec![
                PfnRun {
                    start: 0x10,
                    count: 3
                },
                PfnRun {
                    start: 0x20,
                    count: 1
                },
                PfnRun {
                    start: u32::MAX - 1,
                    count: 2
                },
            ]
        );
        assert_eq!(runs[0].addr(), GuestAddress(0x10000));
        assert_eq!(runs[0].len_bytes(), 0x3000);
        assert_eq!(runs[2].addr(), GuestAddress(0xfff_ffff_e000));
        assert!(merge_runs(&[]).is_empty());
    }

    #[test]
    fn page_in_ram_checks_whole_page() {
        let mem = two_adjacent_regions();
        assert!(page_in_ram(&mem, 0));
        assert!(page_in_ram(&mem, 0x1f));
        assert!(!page_in_ram(&mem, 0x20));
        assert!(page_in_ram(&mem, 0x103));
        assert!(!page_in_ram(&mem, 0x104));
        assert!(!page_in_ram(&mem, u32::MAX));
        // A region that ends inside a page does not hold that page.
        let odd = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1800)]).unwrap();
        assert!(page_in_ram(&odd, 0));
        assert!(!page_in_ram(&odd, 1));
    }

    #[test]
    fn plan_inflate_merges_splits_and_counts() {
        let mem = two_adjacent_regions();
        let mut set = PageSet::default();
        // 0xe..=0x11 crosses the boundary between the two first regions.
        let pfns = [0x11, 0xe, 0xf, 0x10, 0x10, 0x30, 0x100, 0x102, 0x5_0000];
        let (ranges, outcome) = plan_inflate(&mem, &mut set, &pfns);
        assert_eq!(
            ranges,
            vec![
                (GuestAddress(0xe000), 0x2000),
                (GuestAddress(0x10000), 0x2000),
                (GuestAddress(0x100000), 0x1000),
                (GuestAddress(0x102000), 0x1000),
            ]
        );
        assert_eq!(
            outcome,
            InflateOutcome {
                accepted: 6,
                out_of_range: 2,
                repeated: 1
            }
        );
        assert_eq!(set.len(), 6);

        // Inflating the same pages again does nothing.
        let (ranges, outcome) = plan_inflate(&mem, &mut set, &[0xe, 0xf, 0x1]);
        assert_eq!(ranges, vec![(GuestAddress(0x1000), 0x1000)]);
        assert_eq!(outcome.repeated, 2);
        assert_eq!(outcome.accepted, 1);
    }

    #[test]
    fn deflate_removes_known_pages_only() {
        let mut set = PageSet::default();
        for pfn in [1, 2, 3] {
            set.insert(pfn);
        }
        let outcome = apply_deflate(&mut set, &[2, 3, 3, 7]);
        assert_eq!(
            outcome,
            DeflateOutcome {
                released: 2,
                unknown: 2
            }
        );
        assert_eq!(set.len(), 1);
        assert!(set.contains(1));
    }

    #[test]
    fn report_plan_aligns_merges_and_clips() {
        let mem = two_adjacent_regions();
        let plan = plan_report(
            &mem,
            &[
                (0x2000, 0x2000),
                (0x4000, 0x1000),        // adjacent: merged with the first
                (0x3000, 0x800),         // overlap: merged
                (0xf000, 0x2000),        // crosses a region boundary: split
                (0x100800, 0x1800),      // unaligned: only page 0x101000 kept
                (0x1_0000_0000, 0x1000), // outside RAM
                (u64::MAX - 0xfff, 0x1000),
            ],
        );
        assert_eq!(
            plan.ranges,
            vec![
                (GuestAddress(0x2000), 0x3000),
                (GuestAddress(0xf000), 0x1000),
                (GuestAddress(0x10000), 0x1000),
                (GuestAddress(0x101000), 0x1000),
            ]
        );
        let reported = 0x2000 + 0x1000 + 0x800 + 0x2000 + 0x1800 + 0x1000 + 0x1000;
        assert_eq!(plan.ignored_bytes, reported - 0x6000);
        assert_eq!(plan_report(&mem, &[]), ReportPlan::default());
    }
}
