//! Target `dm_protocol`: sequences of guest messages through
//! `dm::DmProtocol::handle_guest_message`, interleaved with the VMM's
//! calls (new targets, hot-add mappings done or failed, resets), the VMM
//! performing every action the protocol asks for.
//!
//! Invariants checked:
//! - no panic, no arithmetic overflow;
//! - every host message is at most 4096 bytes and decodes;
//! - guest memory == boot RAM + hot-added − ballooned − orphaned;
//! - the protocol discards only RAM (boot or hot-added) that is not
//!   already discarded and not returned since; it returns (unballoons) only
//!   pages it discarded; hot-add mappings lie in the hotplug window and
//!   outside what was already added;
//! - afterwards a new driver's VERSION_REQUEST 2.0 is accepted.

use std::time::Instant;

use devices::hyperv::dm::{
    parse_host_message, DmAction, DmConfig, DmOutput, DmProtocol, DmReset, DmVersion,
    GuestCapabilities, GuestDmMessage, HostDmMessage, PageRange, RangeSet,
};

use crate::input::{Bytes, Seed};

/// Boot RAM: 0..3 GiB and 4..5 GiB (a hole for MMIO), in pages.
const BOOT: [(u64, u64); 2] = [(0, 0xc_0000), (0x10_0000, 0x4_0000)];
/// The hotplug window: 8..16 GiB.
const WINDOW: (u64, u64) = (0x20_0000, 0x20_0000);

struct Vmm {
    boot: RangeSet,
    discarded: RangeSet,
    pending_map: Option<PageRange>,
}

impl Vmm {
    fn perform(&mut self, dm: &DmProtocol, out: &DmOutput) {
        for a in &out.actions {
            match a {
                DmAction::DiscardRanges(ranges) => {
                    for &r in ranges {
                        let hot: RangeSet = dm.hot_added_ranges().collect();
                        let ram = self.boot.overlap_pages(r) + hot.overlap_pages(r);
                        assert_eq!(ram, r.count, "discard of non-RAM {r:?}");
                        assert_eq!(self.discarded.overlap_pages(r), 0, "{r:?} discarded twice");
                        self.discarded.insert(r);
                    }
                }
                DmAction::MapForHotAdd { pfn, count } => {
                    let r = PageRange::new(*pfn, *count);
                    assert!(
                        r.start >= WINDOW.0 && r.end() <= WINDOW.0 + WINDOW.1,
                        "{r:?}"
                    );
                    let hot: RangeSet = dm.hot_added_ranges().collect();
                    assert!(!hot.overlaps(r), "{r:?} already hot-added");
                    self.pending_map = Some(r);
                }
                DmAction::ReleaseHotAdd { pfn, count } => {
                    // E.g. a new driver's VERSION_REQUEST resets the
                    // protocol while the VMM is mapping: the mapping is
                    // no longer wanted.
                    if self.pending_map == Some(PageRange::new(*pfn, *count)) {
                        self.pending_map = None;
                    }
                }
            }
        }
        for m in &out.messages {
            assert!(m.len() <= 4096);
            if let HostDmMessage::UnballoonRequest { ranges, .. } =
                parse_host_message(m).expect("host message decodes")
            {
                for r in ranges {
                    assert_eq!(self.discarded.overlap_pages(r), r.count, "unballoon {r:?}");
                    self.discarded.remove(r);
                }
            }
        }
        let rep = dm.report();
        let boot = self.boot.total_pages() * 4096;
        assert_eq!(
            rep.guest_bytes + rep.ballooned_bytes + rep.orphaned_bytes,
            boot + rep.hot_added_bytes,
            "{rep:?}"
        );
        assert_eq!(
            self.discarded.total_pages() * 4096,
            rep.ballooned_bytes + rep.orphaned_bytes,
            "discarded pages vs ballooned + orphaned"
        );
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let boot: Vec<PageRange> = BOOT.iter().map(|&(s, c)| PageRange::new(s, c)).collect();
    let mut config = DmConfig::new(boot.clone(), Some(PageRange::new(WINDOW.0, WINDOW.1)));
    config.announce_max_memory = true;
    let mut dm = DmProtocol::new(config).expect("config");
    let mut vmm = Vmm {
        boot: boot.into_iter().collect(),
        discarded: RangeSet::new(),
        pending_map: None,
    };
    let mut b = Bytes::new(data);
    while !b.is_empty() {
        let op = b.u8();
        let out = match op % 8 {
            0..=3 => dm
                .handle_guest_message(b.blob(), Instant::now())
                .unwrap_or_default(),
            4 => dm.set_target(b.u64() % (32 << 30)),
            5 => match vmm.pending_map.take() {
                Some(r) => dm.hot_add_mapped(r).expect("pending mapping"),
                None => continue,
            },
            6 => match vmm.pending_map.take() {
                Some(r) => dm.hot_add_map_failed(r).expect("pending mapping"),
                None => continue,
            },
            _ => {
                let kind = if b.bool() {
                    DmReset::GuestRestarted
                } else {
                    DmReset::ChannelReopened
                };
                vmm.pending_map = None;
                if kind == DmReset::GuestRestarted {
                    vmm.discarded.clear();
                }
                dm.reset(kind)
            }
        };
        vmm.perform(&dm, &out);
    }
    let hello = GuestDmMessage::VersionRequest {
        version: DmVersion::V2_0,
        is_last_attempt: false,
    }
    .encode(1)
    .expect("encode");
    let out = dm
        .handle_guest_message(&hello, Instant::now())
        .expect("version");
    vmm.perform(&dm, &out);
    let answer = parse_host_message(out.messages.last().expect("an answer")).expect("decodes");
    assert_eq!(answer, HostDmMessage::VersionResponse { accepted: true });
}

/// Seed inputs: Linux's bring-up, a balloon of 1 GiB answered in two
/// responses, then a target above boot RAM (unballoon, then hot-add).
pub fn seeds() -> Vec<Vec<u8>> {
    let msg = |m: GuestDmMessage| m.encode(9).expect("encode");
    let hello = msg(GuestDmMessage::VersionRequest {
        version: DmVersion::V2_0,
        is_last_attempt: false,
    });
    let caps = msg(GuestDmMessage::CapabilitiesReport {
        caps: GuestCapabilities {
            balloon: true,
            hot_add: true,
            hot_add_alignment: 7,
        },
        min_page_count: 0,
        max_page_number: u64::MAX,
    });
    let target = |bytes: u64| (4u8, bytes.to_le_bytes().to_vec());
    let balloon = |start: u64, count: u64, more: bool| {
        msg(GuestDmMessage::BalloonResponse {
            more_pages: more,
            ranges: vec![PageRange::new(start, count)],
        })
    };
    let mut list = vec![(0u8, hello.clone()), (0, caps.clone()), target(3 << 30)];
    list.push((0, balloon(0x1000, 0x2_0000, true)));
    list.push((0, balloon(0x8_0000, 0x2_0000, false)));
    // Guest messages are blobs; targets a u64, resets one byte; mapping
    // completions nothing.
    let raw = |list: Vec<(u8, Vec<u8>)>| {
        let mut s = Seed::new();
        for (op, bytes) in list {
            match op {
                0..=3 => s.u8(op).blob(&bytes),
                _ => s.u8(op).bytes(&bytes),
            };
        }
        s.finish()
    };
    let mut grow = list.clone();
    grow.push(target(6 << 30));
    grow.push((0, msg(GuestDmMessage::UnballoonResponse)));
    grow.push((5, Vec::new()));
    grow.push((
        0,
        msg(GuestDmMessage::HotAddResponse {
            page_count: 0x4_0000,
            result: 1,
        }),
    ));
    let reset = vec![(0u8, hello), (0, caps), target(1 << 30), (7, vec![0])];
    vec![raw(list), raw(grow), raw(reset)]
}
