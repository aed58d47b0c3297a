//! Target `balloon_pfns`: the balloon's pure request helpers: PFN list
//! decoding, run merging, inflate planning against guest RAM, deflate, and
//! free page report planning.
//!
//! Input: a sequence of operations: inflate (a PFN buffer), deflate (a PFN
//! buffer), report (`(addr, len)` pairs).
//!
//! Invariants checked:
//! - no panic, no arithmetic overflow;
//! - `parse_pfns` keeps every whole entry in order and flags a partial one;
//! - `merge_runs` covers exactly the distinct PFNs, sorted, non-adjacent;
//! - an inflate plan discards only whole pages of RAM that were not yet in
//!   the balloon, each range inside one region, and its counters add up
//!   to the PFNs given; the set grows by `accepted`;
//! - a deflate releases exactly the PFNs that were in the set;
//! - a report plan discards page-aligned, sorted, disjoint ranges inside
//!   RAM, each inside one region, covering only reported bytes, and
//!   ignored + kept == reported.

use std::collections::BTreeSet;

use devices::virtio::balloon::page_set::PageSet;
use devices::virtio::balloon::request::{
    apply_deflate, merge_runs, page_in_ram, parse_pfns, plan_inflate, plan_report,
};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::guest::{memory, REGIONS};
use crate::input::{Bytes, Seed};

fn one_region(mem: &GuestMemoryMmap, a: GuestAddress, len: u64) -> bool {
    mem.find_region(a)
        .is_some_and(|r| a.0 + len <= r.start_addr().0 + r.len())
}

fn check_pfns(bytes: &[u8]) -> Vec<u32> {
    let list = parse_pfns(bytes);
    assert_eq!(list.malformed, !bytes.len().is_multiple_of(4));
    assert_eq!(list.pfns.len(), bytes.len() / 4);
    for (i, pfn) in list.pfns.iter().enumerate() {
        assert_eq!(pfn.to_le_bytes(), bytes[4 * i..4 * i + 4]);
    }
    let runs = merge_runs(&list.pfns);
    let distinct: BTreeSet<u32> = list.pfns.iter().copied().collect();
    let covered: u64 = runs.iter().map(|r| r.count).sum();
    assert_eq!(
        covered,
        distinct.len() as u64,
        "runs cover the distinct PFNs"
    );
    for w in runs.windows(2) {
        assert!(
            u64::from(w[0].start) + w[0].count < u64::from(w[1].start),
            "{w:?}"
        );
    }
    for r in &runs {
        assert!(r.count >= 1);
        assert!((0..r.count).all(|i| distinct.contains(&(r.start + i as u32))));
    }
    list.pfns
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let mem = memory();
    let mut set = PageSet::default();
    let mut model: BTreeSet<u32> = BTreeSet::new();
    while !b.is_empty() {
        match b.u8() % 3 {
            0 => {
                let pfns = check_pfns(b.blob());
                let before = set.len();
                let (ranges, out) = plan_inflate(&mem, &mut set, &pfns);
                assert_eq!(
                    out.accepted + out.out_of_range + out.repeated,
                    pfns.len() as u64
                );
                assert_eq!(set.len(), before + out.accepted);
                let mut discarded = 0;
                for &(a, len) in &ranges {
                    assert!(
                        a.0 % 4096 == 0 && len % 4096 == 0 && len > 0,
                        "{a:?}+{len:#x}"
                    );
                    assert!(one_region(&mem, a, len), "{a:?}+{len:#x} spans regions");
                    for p in (a.0 >> 12)..((a.0 + len) >> 12) {
                        let p = u32::try_from(p).expect("32-bit PFN");
                        assert!(model.insert(p), "PFN {p:#x} discarded twice");
                    }
                    discarded += len >> 12;
                }
                assert_eq!(discarded, out.accepted);
                for &p in &pfns {
                    assert_eq!(set.contains(p), page_in_ram(&mem, p));
                }
            }
            1 => {
                let pfns = check_pfns(b.blob());
                let before = set.len();
                let out = apply_deflate(&mut set, &pfns);
                assert_eq!(out.released + out.unknown, pfns.len() as u64);
                assert_eq!(set.len(), before - out.released);
                for p in &pfns {
                    model.remove(p);
                    assert!(!set.contains(*p));
                }
            }
            _ => {
                let n = b.u8() % 16;
                let bufs: Vec<(u64, u64)> = (0..n)
                    .map(|_| (crate::guest::addr(&mut b), u64::from(b.u32())))
                    .collect();
                let plan = plan_report(&mem, &bufs);
                let reported = bufs.iter().fold(0u64, |t, (_, l)| t.saturating_add(*l));
                let kept: u64 = plan.ranges.iter().map(|r| r.1).sum();
                assert_eq!(plan.ignored_bytes, reported.saturating_sub(kept));
                for w in plan.ranges.windows(2) {
                    assert!(w[0].0 .0 + w[0].1 <= w[1].0 .0, "unsorted or overlapping");
                }
                for &(a, len) in &plan.ranges {
                    assert!(a.0 % 4096 == 0 && len % 4096 == 0 && len > 0);
                    assert!(one_region(&mem, a, len));
                    let inside = bufs
                        .iter()
                        .any(|&(s, l)| s <= a.0 && a.0 < s.saturating_add(l));
                    assert!(inside, "{a:?} was not reported");
                }
            }
        }
        assert_eq!(set.len(), model.len() as u64, "page set vs model");
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let pfns = |l: &[u32]| -> Vec<u8> { l.iter().flat_map(|p| p.to_le_bytes()).collect() };
    let mut s = Seed::new();
    s.u8(0)
        .blob(&pfns(&[0xe, 0xf, 0x10, 0x11, 0x10, 0x30, 0x40, u32::MAX]));
    s.u8(1).blob(&pfns(&[0xf, 0x12]));
    s.u8(0).blob(&[1, 0, 0, 0, 2, 0]);
    let mut r = Seed::new();
    r.u8(2).u8(3);
    for (a, l) in [
        (0x2000u64, 0x2000u32),
        (0xf800, 0x2800),
        (REGIONS[2].0, 0x9000),
    ] {
        crate::guest::seed_addr(&mut r, a);
        r.u32(l);
    }
    vec![s.finish(), r.finish()]
}
