use super::super::codec::parse_host_message;
use super::super::message::StatusReport;
use super::*;

const GIB: u64 = 1 << 30;
/// Pages per GiB.
const PG: u64 = GIB / DM_PAGE_SIZE;
/// 128 MiB blocks: hot_add_alignment 7.
const BLOCK: u64 = 32768;
/// Boot RAM: 3 GiB below the MMIO gap, 1 GiB above 4 GiB.
const LOW: PageRange = PageRange::new(0, 3 * PG);
const HIGH: PageRange = PageRange::new(4 * PG, PG);
/// Hotplug window: 4 GiB at 16 GiB.
const WINDOW: PageRange = PageRange::new(16 * PG, 4 * PG);

fn r(start: u64, count: u64) -> PageRange {
    PageRange::new(start, count)
}

/// The host under test plus a guest that numbers its messages like Linux.
struct Guest {
    dm: DmProtocol,
    trans_id: u32,
}

impl Guest {
    fn new() -> Self {
        let config = DmConfig::new(vec![LOW, HIGH], Some(WINDOW));
        Self {
            dm: DmProtocol::new(config).unwrap(),
            trans_id: 0,
        }
    }

    fn send(&mut self, msg: GuestDmMessage) -> Result<DmOutput, ProtocolError> {
        self.trans_id += 1;
        let bytes = msg.encode(self.trans_id).unwrap();
        self.dm.handle_guest_message(&bytes, Instant::now())
    }

    /// Linux 6.12 bring-up: version 2.0, then caps with hot_add and 128 MiB
    /// alignment.
    fn bring_up(&mut self) -> DmOutput {
        let out = self.send(version(DmVersion::V2_0, false)).unwrap();
        assert_eq!(
            host(&out),
            [HostDmMessage::VersionResponse { accepted: true }]
        );
        self.send(caps(0x1f)).unwrap()
    }

    fn balloon_response(&mut self, more_pages: bool, ranges: Vec<PageRange>) -> DmOutput {
        self.send(GuestDmMessage::BalloonResponse { more_pages, ranges })
            .unwrap()
    }

    fn hot_add_response(&mut self, page_count: u64, result: u32) -> DmOutput {
        self.send(GuestDmMessage::HotAddResponse {
            page_count: u32::try_from(page_count).unwrap(),
            result,
        })
        .unwrap()
    }
}

fn version(version: DmVersion, is_last_attempt: bool) -> GuestDmMessage {
    GuestDmMessage::VersionRequest {
        version,
        is_last_attempt,
    }
}

fn caps(bits: u64) -> GuestDmMessage {
    GuestDmMessage::CapabilitiesReport {
        caps: GuestCapabilities::from_bits(bits),
        min_page_count: 0,
        max_page_number: u64::MAX,
    }
}

/// Decodes the host messages of an output (checking the size limit).
fn host(out: &DmOutput) -> Vec<HostDmMessage> {
    out.messages
        .iter()
        .map(|m| {
            assert!(m.len() <= 4096);
            parse_host_message(m).unwrap()
        })
        .collect()
}

fn discards(out: &DmOutput) -> Vec<PageRange> {
    out.actions
        .iter()
        .flat_map(|a| match a {
            DmAction::DiscardRanges(r) => r.clone(),
            _ => Vec::new(),
        })
        .collect()
}

/// Balloons `pages` (a multiple of 512) as contiguous 2 MiB ranges from
/// `start`, answering the outstanding request in one response.
fn give_2m(g: &mut Guest, start: u64, pages: u64) -> DmOutput {
    let ranges = (0..pages / 512).map(|i| r(start + i * 512, 512)).collect();
    g.balloon_response(false, ranges)
}

#[test]
fn linux_bring_up_and_status() {
    let mut g = Guest::new();
    assert_eq!(g.dm.report().phase, Phase::AwaitingVersion);
    let out = g.bring_up();
    assert_eq!(
        host(&out),
        [HostDmMessage::CapabilitiesResponse { accepted: true }]
    );
    // Replies echo the guest's transaction id.
    assert_eq!(
        u32::from_le_bytes(out.messages[0][4..8].try_into().unwrap()),
        2
    );
    let rep = g.dm.report();
    assert_eq!(rep.phase, Phase::Ready);
    assert_eq!(rep.version, Some(DmVersion::V2_0));
    assert_eq!(rep.capabilities.unwrap().hot_add_alignment, 7);
    assert_eq!(rep.guest_bytes, 4 * GIB);
    assert!(!rep.busy && rep.last_status.is_none());

    let before = Instant::now();
    let status = StatusReport {
        num_avail: 500_000,
        num_committed: 300_000,
        ..Default::default()
    };
    let out = g.send(GuestDmMessage::StatusReport(status)).unwrap();
    assert_eq!(out, DmOutput::default());
    let sample = g.dm.report().last_status.unwrap();
    assert_eq!(sample.report, status);
    assert!(sample.at >= before);
    assert_eq!(g.dm.report().counters.status_reports, 1);
}

#[test]
fn version_fallback_and_out_of_phase_messages() {
    let mut g = Guest::new();
    // Capabilities before a version: refused, counted, no reply.
    assert!(matches!(
        g.send(caps(0x1f)),
        Err(ProtocolError::UnexpectedInPhase { .. })
    ));
    // An unknown version is refused so the guest falls back.
    let out = g.send(version(DmVersion(0x0003_0000), false)).unwrap();
    assert_eq!(
        host(&out),
        [HostDmMessage::VersionResponse { accepted: false }]
    );
    for v in [DmVersion::V1_0, DmVersion::V0_3] {
        let mut g = Guest::new();
        let out = g.send(version(v, v == DmVersion::V0_3)).unwrap();
        assert_eq!(
            host(&out),
            [HostDmMessage::VersionResponse { accepted: true }]
        );
        assert_eq!(g.dm.report().version, Some(v));
    }
    let counters = g.dm.report().counters;
    assert_eq!(counters.versions_refused, 1);
    assert_eq!(counters.unexpected_messages, 1);
    // Responses nobody asked for.
    g.bring_up();
    assert_eq!(
        g.send(GuestDmMessage::UnballoonResponse),
        Err(ProtocolError::Unsolicited("UNBALLOON_RESPONSE"))
    );
    assert!(g
        .send(GuestDmMessage::HotAddResponse {
            page_count: 1,
            result: 1
        })
        .is_err());
    assert!(g.send(caps(0x1f)).is_err());
    assert_eq!(g.dm.report().counters.unexpected_messages, 4);
    assert_eq!(g.dm.report().hot_added_bytes, 0);
}

#[test]
fn malformed_messages_are_counted_and_serving_continues() {
    let mut g = Guest::new();
    for bad in [
        &[][..],
        &[1, 0, 16, 0],
        &[1, 0, 200, 0, 0, 0, 0, 0],
        &[7, 0, 16, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
    ] {
        assert!(matches!(
            g.dm.handle_guest_message(bad, Instant::now()),
            Err(ProtocolError::Malformed(_))
        ));
    }
    assert_eq!(g.dm.report().counters.malformed_messages, 4);
    g.bring_up();
    assert_eq!(g.dm.report().phase, Phase::Ready);
}

#[test]
fn balloon_with_several_responses() {
    let mut g = Guest::new();
    // A target set before the handshake is acted on right after the caps.
    assert_eq!(g.dm.set_target(3 * GIB), DmOutput::default());
    let out = g.bring_up();
    assert_eq!(
        host(&out),
        [
            HostDmMessage::CapabilitiesResponse { accepted: true },
            HostDmMessage::BalloonRequest { num_pages: 262144 },
        ]
    );
    // Linux: 510 2 MiB ranges per message with more_pages, then the rest.
    let first: Vec<PageRange> = (0..510).map(|i| r(0x1000 + i * 512, 512)).collect();
    let out = g.balloon_response(true, first);
    assert!(out.messages.is_empty());
    // Contiguous ranges are discarded as one.
    assert_eq!(discards(&out), [r(0x1000, 510 * 512)]);
    let rest: Vec<PageRange> = (0..1024).map(|i| r(4 * PG + i * 2, 1)).collect();
    let out = g.balloon_response(false, rest);
    assert_eq!(discards(&out).len(), 1024);
    assert!(out.messages.is_empty(), "target reached");
    let rep = g.dm.report();
    assert_eq!(rep.ballooned_bytes, GIB);
    assert_eq!(rep.guest_bytes, 3 * GIB);
    assert!(!rep.busy);
    assert_eq!(rep.counters.ballooned_pages, PG);
    assert_eq!(rep.counters.balloon_requests, 1);
}

#[test]
fn balloon_in_chunks_and_stall_at_the_floor() {
    let mut g = Guest::new();
    g.bring_up();
    let out = g.dm.set_target(GIB + GIB / 2);
    assert_eq!(
        host(&out),
        [HostDmMessage::BalloonRequest { num_pages: 262144 }]
    );
    // Another target while ballooning: nothing until the response is done.
    assert!(g.dm.set_target(GIB).messages.is_empty());
    let out = give_2m(&mut g, 0, PG);
    assert_eq!(
        host(&out),
        [HostDmMessage::BalloonRequest { num_pages: 262144 }]
    );
    // The guest hits its floor: 1024 pages instead of 262144.
    let out = give_2m(&mut g, 2 * PG, 1024);
    assert!(out.messages.is_empty(), "no retry at the floor");
    assert_eq!(g.dm.report().guest_bytes, 3 * GIB - 1024 * DM_PAGE_SIZE);
    // A new target asks again.
    let out = g.dm.set_target(3 * GIB - 2048 * DM_PAGE_SIZE);
    assert_eq!(
        host(&out),
        [HostDmMessage::BalloonRequest { num_pages: 1024 }]
    );
}

#[test]
fn hostile_balloon_responses() {
    let mut g = Guest::new();
    g.bring_up();
    g.dm.set_target(4 * GIB - 4096 * DM_PAGE_SIZE);
    let out = g.balloon_response(
        true,
        vec![
            r(3 * PG, 100),        // MMIO gap
            r(3 * PG - 10, 20),    // straddles the end of low RAM
            r(WINDOW.start, 512),  // hotplug window, nothing hot-added
            r(1 << 39, 0xff_ffff), // far beyond RAM
            r(5000, 0),            // empty
            r(100, 50),
            r(120, 50), // overlaps the previous range
        ],
    );
    assert_eq!(discards(&out), [r(100, 70), r(3 * PG - 10, 10)]);
    let c = g.dm.report().counters;
    assert_eq!(c.rejected_outside_ram, 100 + 10 + 512 + 0xff_ffff);
    assert_eq!(c.rejected_already_ballooned, 30);
    // Reported again: duplicates only.
    let out = g.balloon_response(true, vec![r(100, 70)]);
    assert!(discards(&out).is_empty());
    assert_eq!(g.dm.report().counters.rejected_already_ballooned, 100);
    // More than asked: 4096 − 80 pages are still outstanding.
    let out = g.balloon_response(false, vec![r(PG, 8192)]);
    assert_eq!(discards(&out), [r(PG, 4096 - 80)]);
    let c = g.dm.report().counters;
    assert_eq!(c.rejected_exceeds_request, 8192 - 4016);
    assert_eq!(g.dm.report().ballooned_bytes, 4096 * DM_PAGE_SIZE);
    // A response with no request outstanding: rejected, nothing discarded.
    let err = g.send(GuestDmMessage::BalloonResponse {
        more_pages: false,
        ranges: vec![r(2 * PG, 512)],
    });
    assert_eq!(err, Err(ProtocolError::Unsolicited("BALLOON_RESPONSE")));
    let c = g.dm.report().counters;
    assert_eq!(c.rejected_unsolicited, 512);
    assert_eq!(g.dm.report().ballooned_bytes, 4096 * DM_PAGE_SIZE);
    // Only ballooned pages are ever discarded.
    assert_eq!(c.ballooned_pages, 4096);
}

#[test]
fn unballoon_returns_only_ballooned_pages_in_bounded_transactions() {
    let mut g = Guest::new();
    g.bring_up();
    // 2000 scattered single pages.
    g.dm.set_target(4 * GIB - 2000 * DM_PAGE_SIZE);
    let scattered: Vec<PageRange> = (0..2000).map(|i| r(0x8000 + i * 3, 1)).collect();
    g.balloon_response(false, scattered.clone());
    assert_eq!(g.dm.report().ballooned_bytes, 2000 * DM_PAGE_SIZE);

    let out = g.dm.set_target(4 * GIB);
    let msgs = host(&out);
    assert_eq!(msgs.len(), UNBALLOON_MESSAGES_PER_TRANSACTION);
    let mut returned = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let HostDmMessage::UnballoonRequest { more_pages, ranges } = m else {
            panic!("expected UNBALLOON_REQUEST, got {m:?}");
        };
        assert_eq!(*more_pages, i + 1 < msgs.len());
        assert_eq!(ranges.len(), 510);
        returned.extend_from_slice(ranges);
    }
    // Linux answers once, after the last message of the transaction.
    let out = g.send(GuestDmMessage::UnballoonResponse).unwrap();
    let msgs = host(&out);
    assert_eq!(msgs.len(), 1);
    let HostDmMessage::UnballoonRequest { more_pages, ranges } = &msgs[0] else {
        panic!("expected UNBALLOON_REQUEST");
    };
    assert!(!more_pages);
    returned.extend_from_slice(ranges);
    assert_eq!(returned, scattered);
    let out = g.send(GuestDmMessage::UnballoonResponse).unwrap();
    assert_eq!(out, DmOutput::default(), "target reached, no hot-add");
    let rep = g.dm.report();
    assert_eq!(rep.ballooned_bytes, 0);
    assert_eq!(rep.guest_bytes, 4 * GIB);
    assert_eq!(rep.counters.unballoon_messages, 4);
    assert_eq!(rep.counters.unballooned_pages, 2000);
}

#[test]
fn partial_unballoon_then_hot_add_of_whole_blocks() {
    let mut g = Guest::new();
    g.bring_up();
    g.dm.set_target(3 * GIB);
    give_2m(&mut g, 0, PG);
    // Up by 1 GiB + 300 MiB: unballoon 1 GiB first (as one range), then
    // hot-add two 128 MiB blocks (the 44 MiB rest is below one block).
    let out = g.dm.set_target(4 * GIB + 300 * (1 << 20));
    assert_eq!(
        host(&out),
        [HostDmMessage::UnballoonRequest {
            more_pages: false,
            ranges: vec![r(0, PG)]
        }]
    );
    let out = g.send(GuestDmMessage::UnballoonResponse).unwrap();
    assert!(out.messages.is_empty(), "mapping comes before the request");
    assert_eq!(
        out.actions,
        [DmAction::MapForHotAdd {
            pfn: WINDOW.start,
            count: 2 * BLOCK
        }]
    );
    let range = r(WINDOW.start, 2 * BLOCK);
    // A response before the request is sent is unsolicited.
    assert!(g
        .send(GuestDmMessage::HotAddResponse {
            page_count: 1,
            result: 1
        })
        .is_err());
    let out = g.dm.hot_add_mapped(range).unwrap();
    assert_eq!(
        host(&out),
        [HostDmMessage::HotAddRequest {
            range,
            region: Some(range)
        }]
    );
    assert_eq!(out.messages[0].len(), 24);
    let out = g.hot_add_response(2 * BLOCK, 1);
    assert_eq!(out, DmOutput::default());
    let rep = g.dm.report();
    assert_eq!(rep.hot_added_bytes, 256 << 20);
    assert_eq!(rep.guest_bytes, 4 * GIB + (256 << 20));
    assert_eq!(g.dm.hot_added_ranges().collect::<Vec<_>>(), [range]);
    // Hot-added pages can be ballooned; window pages beyond them cannot.
    g.dm.set_target(4 * GIB);
    let out = g.balloon_response(false, vec![r(WINDOW.start + 2 * BLOCK - 512, 1024)]);
    assert_eq!(discards(&out), [r(WINDOW.start + 2 * BLOCK - 512, 512)]);
    assert_eq!(g.dm.report().counters.rejected_outside_ram, 512);
}

#[test]
fn hot_add_in_chunks_up_to_the_window() {
    let mut g = Guest::new();
    g.bring_up();
    // Ask for more than the window holds: 2 GiB chunks until it is full.
    let out = g.dm.set_target(100 * GIB);
    let mut next = WINDOW.start;
    let mut actions = out.actions;
    for _ in 0..2 {
        assert_eq!(
            actions,
            [DmAction::MapForHotAdd {
                pfn: next,
                count: 2 * PG
            }]
        );
        let range = r(next, 2 * PG);
        let out = g.dm.hot_add_mapped(range).unwrap();
        assert_eq!(out.messages.len(), 1);
        actions = g.hot_add_response(2 * PG, 1).actions;
        next += 2 * PG;
    }
    assert!(actions.is_empty(), "window full");
    assert_eq!(g.dm.report().hot_added_bytes, 4 * GIB);
    assert_eq!(g.dm.report().counters.hot_add_requests, 2);
}

#[test]
fn hot_add_failures() {
    // Partial: fewer pages than asked stops hot-add and releases the rest.
    let mut g = Guest::new();
    g.bring_up();
    g.dm.set_target(6 * GIB);
    let range = r(WINDOW.start, 2 * PG);
    g.dm.hot_add_mapped(range).unwrap();
    let out = g.hot_add_response(3 * BLOCK, 1);
    assert_eq!(
        out.actions,
        [DmAction::ReleaseHotAdd {
            pfn: WINDOW.start + 3 * BLOCK,
            count: 2 * PG - 3 * BLOCK
        }]
    );
    assert!(out.messages.is_empty());
    assert_eq!(g.dm.report().hot_add, HotAddState::Stopped);
    assert_eq!(g.dm.report().hot_added_bytes, 3 * BLOCK * DM_PAGE_SIZE);
    assert_eq!(g.dm.set_target(7 * GIB), DmOutput::default());

    // Permanent: result 1 with no page (hot_add=0, S4, -EEXIST).
    let mut g = Guest::new();
    g.bring_up();
    g.dm.set_target(5 * GIB);
    g.dm.hot_add_mapped(r(WINDOW.start, PG)).unwrap();
    let out = g.hot_add_response(0, 1);
    assert_eq!(out.actions, [release(r(WINDOW.start, PG))]);
    assert_eq!(g.dm.report().hot_add, HotAddState::Stopped);
    assert_eq!(g.dm.set_target(5 * GIB), DmOutput::default());

    // Transient: result 0 with no page; retried after the next target.
    let mut g = Guest::new();
    g.bring_up();
    g.dm.set_target(5 * GIB);
    g.dm.hot_add_mapped(r(WINDOW.start, PG)).unwrap();
    g.hot_add_response(0, 0);
    assert_eq!(g.dm.report().hot_add, HotAddState::Paused);
    let out = g.dm.set_target(5 * GIB);
    assert_eq!(
        out.actions,
        [DmAction::MapForHotAdd {
            pfn: WINDOW.start,
            count: PG
        }]
    );
    // The VMM cannot map: paused again; wrong ranges are refused.
    assert_eq!(
        g.dm.hot_add_map_failed(r(WINDOW.start, 1)),
        Err(ProtocolError::NoHotAddPending(r(WINDOW.start, 1)))
    );
    assert!(g.dm.hot_add_mapped(r(WINDOW.start, 1)).is_err());
    g.dm.hot_add_map_failed(r(WINDOW.start, PG)).unwrap();
    assert_eq!(g.dm.report().hot_add, HotAddState::Paused);
    assert!(!g.dm.report().busy);

    // A guest claiming more than asked, or a partial block: clamped to
    // whole blocks, counted.
    let mut g = Guest::new();
    g.bring_up();
    g.dm.set_target(5 * GIB);
    g.dm.hot_add_mapped(r(WINDOW.start, PG)).unwrap();
    g.hot_add_response(PG + 1, 1);
    assert_eq!(g.dm.report().hot_added_bytes, GIB);
    let mut g = Guest::new();
    g.bring_up();
    g.dm.set_target(5 * GIB);
    g.dm.hot_add_mapped(r(WINDOW.start, PG)).unwrap();
    let out = g.hot_add_response(BLOCK + 1, 1);
    assert_eq!(
        out.actions,
        [release(r(WINDOW.start + 2 * BLOCK, PG - 2 * BLOCK))]
    );
    assert_eq!(g.dm.report().counters.hot_add_anomalies, 1);
}

#[test]
fn hot_add_alignment_and_withdrawn_target() {
    // 2 GiB blocks (alignment 11) in a window starting at 17 GiB: the first
    // request starts at 18 GiB; less than a block is not hot-added.
    let config = DmConfig::new(vec![LOW], Some(r(17 * PG, 4 * PG)));
    let mut g = Guest {
        dm: DmProtocol::new(config).unwrap(),
        trans_id: 0,
    };
    g.send(version(DmVersion::V2_0, false)).unwrap();
    g.send(caps(0x3 | 11 << 2)).unwrap();
    assert_eq!(g.dm.set_target(4 * GIB), DmOutput::default());
    let out = g.dm.set_target(5 * GIB);
    assert_eq!(
        out.actions,
        [DmAction::MapForHotAdd {
            pfn: 18 * PG,
            count: 2 * PG
        }]
    );
    // The target drops before the mapping is confirmed: released, and the
    // excess is ballooned instead.
    g.dm.set_target(2 * GIB);
    let out = g.dm.hot_add_mapped(r(18 * PG, 2 * PG)).unwrap();
    assert_eq!(out.actions, [release(r(18 * PG, 2 * PG))]);
    assert_eq!(
        host(&out),
        [HostDmMessage::BalloonRequest { num_pages: 262144 }]
    );
}

#[test]
fn guest_without_hot_add_or_balloon() {
    let mut g = Guest::new();
    g.send(version(DmVersion::V2_0, false)).unwrap();
    g.send(caps(0)).unwrap();
    assert_eq!(g.dm.set_target(GIB), DmOutput::default());
    assert_eq!(g.dm.set_target(8 * GIB), DmOutput::default());
}

#[test]
fn resets() {
    let mut g = Guest::new();
    g.bring_up();
    g.dm.set_target(5 * GIB);
    g.dm.hot_add_mapped(r(WINDOW.start, PG)).unwrap();
    g.hot_add_response(PG, 1);
    g.dm.set_target(4 * GIB);
    give_2m(&mut g, 0, PG);
    g.dm.set_target(3 * GIB);
    // Reload with a balloon response in flight.
    let mut give = (0..100).map(|i| r(PG + i * 512, 512)).collect::<Vec<_>>();
    g.balloon_response(true, give.clone());
    let out = g.dm.reset(DmReset::ChannelReopened);
    assert_eq!(out, DmOutput::default());
    let rep = g.dm.report();
    assert_eq!(rep.phase, Phase::AwaitingVersion);
    assert_eq!(rep.ballooned_bytes, 0);
    assert_eq!(rep.orphaned_bytes, GIB + 100 * 512 * DM_PAGE_SIZE);
    assert_eq!(rep.hot_added_bytes, GIB);
    assert!(!rep.busy);
    // The new driver balloons again; orphaned pages are duplicates.
    g.bring_up();
    give.push(r(2 * PG, 512));
    let out = g.balloon_response(false, give);
    assert_eq!(discards(&out), [r(2 * PG, 512)]);
    assert_eq!(g.dm.report().counters.rejected_already_ballooned, 51200);
    // Unballooning never returns orphaned pages.
    let out = g.dm.set_target(100 * GIB);
    let HostDmMessage::UnballoonRequest { ranges, .. } = &host(&out)[0] else {
        panic!("expected UNBALLOON_REQUEST");
    };
    assert_eq!(ranges, &[r(2 * PG, 512)]);
    // A version request in the middle of a session restarts it.
    let out = g.send(version(DmVersion::V2_0, false)).unwrap();
    assert_eq!(
        host(&out),
        [HostDmMessage::VersionResponse { accepted: true }]
    );
    assert_eq!(g.dm.report().counters.implicit_resets, 1);
    assert!(g.send(GuestDmMessage::UnballoonResponse).is_err());
    // The stored target is pursued right after the new caps; a pending
    // mapping is released on a channel reset.
    let out = g.send(caps(0x1f)).unwrap();
    assert_eq!(
        out.actions,
        [DmAction::MapForHotAdd {
            pfn: WINDOW.start + PG,
            count: 2 * PG
        }]
    );
    let out = g.dm.reset(DmReset::ChannelReopened);
    assert!(matches!(out.actions[..], [DmAction::ReleaseHotAdd { .. }]));
    // Guest restart: back to boot RAM.
    g.dm.reset(DmReset::GuestRestarted);
    let rep = g.dm.report();
    assert_eq!(rep.guest_bytes, 4 * GIB);
    assert_eq!(rep.orphaned_bytes + rep.hot_added_bytes, 0);
    assert_eq!(rep.target_bytes, None);
}

#[test]
fn bad_configs() {
    let cfg = |ram: Vec<PageRange>, window| DmProtocol::new(DmConfig::new(ram, window));
    assert_eq!(cfg(vec![], None).unwrap_err(), ConfigError::NoBootRam);
    assert!(matches!(
        cfg(vec![LOW], Some(r(PG, PG))),
        Err(ConfigError::WindowOverlapsRam(_))
    ));
    assert!(matches!(
        cfg(vec![LOW], Some(r(PFN_LIMIT - 1, 2))),
        Err(ConfigError::BadWindow(_))
    ));
    assert!(matches!(
        cfg(vec![LOW], Some(r(u64::MAX, 2))),
        Err(ConfigError::BadWindow(_))
    ));
    let mut c = DmConfig::new(vec![LOW], None);
    c.max_balloon_request_pages = 0;
    assert_eq!(DmProtocol::new(c).unwrap_err(), ConfigError::ZeroChunk);
}

#[test]
fn info_message_after_caps() {
    let mut config = DmConfig::new(vec![LOW, HIGH], Some(WINDOW));
    config.announce_max_memory = true;
    let mut g = Guest {
        dm: DmProtocol::new(config).unwrap(),
        trans_id: 0,
    };
    let out = g.bring_up();
    assert_eq!(
        host(&out)[1],
        HostDmMessage::InfoMaxPageCount {
            max_page_count: 8 * PG
        }
    );
}

#[test]
fn random_guest_never_breaks_the_invariants() {
    let mut seed: u64 = 0x853c_49e6_748f_ea9b;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut g = Guest::new();
    let mut discarded = RangeSet::new();
    for step in 0..3000 {
        let out = match next() % 8 {
            0 => Ok(g.dm.set_target((next() % (10 * PG)) * DM_PAGE_SIZE)),
            1 => g.send(version(
                DmVersion(u32::try_from(next() % 4).unwrap() << 16),
                false,
            )),
            2 => g.send(caps(next())),
            3 | 4 => {
                let ranges = (0..next() % 20)
                    .map(|_| r(next() % (6 * PG), next() % 2048))
                    .collect();
                g.send(GuestDmMessage::BalloonResponse {
                    more_pages: next() % 3 == 0,
                    ranges,
                })
            }
            5 => g.send(GuestDmMessage::UnballoonResponse),
            6 => g.send(GuestDmMessage::HotAddResponse {
                page_count: u32::try_from(next() % (3 * PG)).unwrap(),
                result: u32::try_from(next() % 2).unwrap(),
            }),
            _ => {
                let bytes: Vec<u8> = (0..next() % 40).map(|_| next().to_le_bytes()[1]).collect();
                g.dm.handle_guest_message(&bytes, Instant::now())
            }
        };
        let Ok(out) = out else { continue };
        for a in &out.actions {
            match a {
                DmAction::MapForHotAdd { pfn, count } => {
                    let range = r(*pfn, *count);
                    assert!(WINDOW.start <= range.start && range.end() <= WINDOW.end());
                    if step % 5 == 0 {
                        let _ = g.dm.hot_add_map_failed(range);
                    } else {
                        g.dm.hot_add_mapped(range).unwrap();
                    }
                }
                DmAction::DiscardRanges(ranges) => {
                    for &d in ranges {
                        discarded.insert(d);
                    }
                }
                DmAction::ReleaseHotAdd { .. } => {}
            }
        }
        for m in host(&out) {
            if let HostDmMessage::UnballoonRequest { ranges, .. } = m {
                for u in ranges {
                    assert!(discarded.contains(u), "returned pages the guest never gave");
                    discarded.remove(u);
                }
            }
        }
        // Ballooned pages are in RAM: boot RAM or hot-added.
        for b in g.dm.ballooned_ranges() {
            let in_ram = g.dm.boot_ram.overlap_pages(b) + g.dm.hot_added.overlap_pages(b);
            assert_eq!(in_ram, b.count);
        }
    }
}
