//! Ring tests: Linux-shaped traffic, wrap-around both ways, full and empty
//! rings, signalling rules, and hostile indices and descriptors.
#![allow(clippy::cast_possible_truncation)] // Test PRNG output cut to size.

use super::*;
use crate::hyperv::vmbus::ring_memory::BufferRingMemory;

const PAGES: usize = 5; // hv_balloon: 16 KiB of data per ring.
const DATA: u32 = 4 * 4096;

fn control(memory: &BufferRingMemory, offset: u64) -> u32 {
    memory.read_u32(offset).unwrap()
}

fn set_control(memory: &BufferRingMemory, offset: u64, value: u32) {
    memory.write_u32(offset, value).unwrap();
}

/// Writes raw bytes into the data area at `index`, wrapping.
fn put_data(memory: &BufferRingMemory, index: u32, bytes: &[u8]) {
    write_data(memory, DATA, index, bytes).unwrap();
}

/// A descriptor with arbitrary fields.
fn descriptor(packet_type: u16, offset8: u16, len8: u16, flags: u16, id: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    for field in [packet_type, offset8, len8, flags] {
        bytes.extend_from_slice(&field.to_le_bytes());
    }
    bytes.extend_from_slice(&id.to_le_bytes());
    bytes
}

/// A ring whose indices both start at `index` (as if `index` bytes had
/// already gone through it).
fn ring_at(index: u32) -> BufferRingMemory {
    let memory = BufferRingMemory::new(PAGES);
    set_control(&memory, WRITE_INDEX, index);
    set_control(&memory, READ_INDEX, index);
    memory
}

/// The guest side, writing packets the way Linux does. The ring format is
/// symmetric, so the host's writer serves as the guest's.
fn guest_writer(memory: &BufferRingMemory) -> OutgoingRing {
    OutgoingRing::open(memory).unwrap()
}

fn written(outcome: WriteOutcome) -> bool {
    match outcome {
        WriteOutcome::Written { signal_guest } => signal_guest,
        WriteOutcome::Full { .. } => panic!("ring full"),
    }
}

#[test]
fn inband_packet_round_trip() {
    let memory = ring_at(0);
    let mut guest = guest_writer(&memory);
    let mut host = IncomingRing::open(&memory).unwrap();
    assert_eq!(host.data_size(), DATA);
    assert_eq!(host.read_packet(&memory), Ok(None));

    written(
        guest
            .write_packet(&memory, PacketType::DataInband, 0, 0, &[1, 2, 3, 4, 5])
            .unwrap(),
    );
    assert_eq!(host.bytes_available(&memory), Ok(16 + 8 + 8));
    let packet = host.read_packet(&memory).unwrap().unwrap();
    assert_eq!(packet.packet_type, PacketType::DataInband);
    assert_eq!(packet.flags, 0);
    assert_eq!(packet.transaction_id, 0);
    assert_eq!(packet.payload, vec![1, 2, 3, 4, 5, 0, 0, 0], "padded to 8");
    assert_eq!(host.read_packet(&memory), Ok(None));
    // Not handed back until committed.
    assert_eq!(control(&memory, READ_INDEX), 0);
    assert_eq!(host.commit_read(&memory), Ok(false));
    assert_eq!(control(&memory, READ_INDEX), 32);
    assert_eq!(
        host.commit_read(&memory),
        Ok(false),
        "nothing new to commit"
    );
}

#[test]
fn host_packet_layout() {
    let memory = ring_at(0);
    let mut host = OutgoingRing::open(&memory).unwrap();
    assert_eq!(control(&memory, FEATURE_BITS), FEATURE_PENDING_SEND_SIZE);
    let outcome = host
        .write_packet(&memory, PacketType::DataInband, 0, 0x1122, &[0xaa; 12])
        .unwrap();
    assert_eq!(
        outcome,
        WriteOutcome::Written { signal_guest: true },
        "empty ring, mask clear"
    );
    let bytes = memory.to_bytes();
    let data = &bytes[4096..];
    assert_eq!(data[..16], descriptor(6, 2, 4, 0, 0x1122)[..]);
    assert_eq!(data[16..28], [0xaa; 12]);
    assert_eq!(data[28..32], [0; 4], "zero padding");
    assert_eq!(
        data[32..40],
        0u64.to_le_bytes(),
        "trailer: old write index << 32"
    );
    assert_eq!(control(&memory, WRITE_INDEX), 40);

    host.write_packet(&memory, PacketType::Completion, 0, 7, &[])
        .unwrap();
    let bytes = memory.to_bytes();
    assert_eq!(bytes[4096 + 40..4096 + 56], descriptor(11, 2, 2, 0, 7)[..]);
    assert_eq!(
        bytes[4096 + 56..4096 + 64],
        (40u64 << 32).to_le_bytes(),
        "trailer of the second packet"
    );
}

#[test]
fn packets_wrap_around_the_end_both_ways() {
    for start in (DATA - 64..DATA).step_by(8) {
        // Guest → host: the host reads a packet split at the end.
        let memory = ring_at(start);
        let mut guest = guest_writer(&memory);
        let mut host = IncomingRing::open(&memory).unwrap();
        let payload: Vec<u8> = (0..100).collect();
        written(
            guest
                .write_packet(&memory, PacketType::DataInband, 1, 9, &payload)
                .unwrap(),
        );
        let packet = host.read_packet(&memory).unwrap().unwrap();
        assert_eq!(packet.payload[..100], payload[..], "start {start}");
        assert_eq!(packet.flags, PACKET_FLAG_COMPLETION_REQUESTED);
        assert_eq!(packet.transaction_id, 9);
        host.commit_read(&memory).unwrap();
        let expected = (start + 16 + 104 + 8) % DATA;
        assert_eq!(control(&memory, READ_INDEX), expected);
        assert_eq!(control(&memory, WRITE_INDEX), expected);

        // Host → guest: what the host wrote across the end reads back.
        let memory = ring_at(start);
        let mut host = OutgoingRing::open(&memory).unwrap();
        host.write_packet(&memory, PacketType::DataInband, 0, 3, &payload)
            .unwrap();
        let mut guest = IncomingRing::open(&memory).unwrap();
        let packet = guest.read_packet(&memory).unwrap().unwrap();
        assert_eq!(packet.payload[..100], payload[..]);
        assert_eq!(packet.transaction_id, 3);
    }
}

#[test]
fn random_traffic_stays_in_order() {
    let memory = ring_at(0);
    let mut writer = guest_writer(&memory);
    let mut reader = IncomingRing::open(&memory).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut sent = std::collections::VecDeque::new();
    let mut received = 0usize;
    for round in 0..5_000u64 {
        if next() % 3 != 0 {
            let len = (next() % 2000) as usize;
            let payload: Vec<u8> = (0..len).map(|i| (i as u64 ^ round) as u8).collect();
            match writer
                .write_packet(&memory, PacketType::DataInband, 0, round, &payload)
                .unwrap()
            {
                WriteOutcome::Written { .. } => sent.push_back((round, payload)),
                WriteOutcome::Full { bytes_needed } => {
                    assert!(writer.bytes_free(&memory).unwrap() <= bytes_needed);
                    assert_eq!(control(&memory, PENDING_SEND_SIZE), bytes_needed);
                }
            }
        } else {
            while let Some(packet) = reader.read_packet(&memory).unwrap() {
                let (id, payload) = sent.pop_front().unwrap();
                assert_eq!(packet.transaction_id, id);
                assert_eq!(packet.payload[..payload.len()], payload[..]);
                received += 1;
            }
            reader.commit_read(&memory).unwrap();
        }
    }
    assert!(received > 1_000, "the ring wrapped many times: {received}");
}

#[test]
fn host_writer_full_ring_and_pending_send_size() {
    let memory = ring_at(0);
    let mut host = OutgoingRing::open(&memory).unwrap();
    let payload = vec![0x55u8; 4000]; // 4024 bytes a packet: 4 fit in 16 KiB.
    let mut written_packets = 0;
    let needed = loop {
        match host
            .write_packet(&memory, PacketType::DataInband, 0, 0, &payload)
            .unwrap()
        {
            WriteOutcome::Written { .. } => written_packets += 1,
            WriteOutcome::Full { bytes_needed } => break bytes_needed,
        }
    };
    assert_eq!(written_packets, 4);
    assert_eq!(needed, 4024);
    assert_eq!(control(&memory, PENDING_SEND_SIZE), 4024);

    // The guest reads one packet: now there is room, pending is cleared.
    let mut guest = IncomingRing::open(&memory).unwrap();
    guest.read_packet(&memory).unwrap().unwrap();
    guest.commit_read(&memory).unwrap();
    let outcome = host
        .write_packet(&memory, PacketType::DataInband, 0, 0, &payload)
        .unwrap();
    // The guest has not drained the ring: no signal needed.
    assert_eq!(
        outcome,
        WriteOutcome::Written {
            signal_guest: false
        }
    );
    assert_eq!(control(&memory, PENDING_SEND_SIZE), 0);
}

#[test]
fn one_byte_always_stays_free() {
    // An empty packet takes 24 bytes (descriptor and trailer) and needs
    // strictly more than that free. The read index is put just ahead of the
    // write index (0), so `free` bytes are free.
    for (free, fits) in [(24u32, false), (32, true)] {
        let memory = ring_at(0);
        set_control(&memory, READ_INDEX, free);
        let mut host = OutgoingRing::open(&memory).unwrap();
        assert_eq!(host.bytes_free(&memory), Ok(free));
        let outcome = host
            .write_packet(&memory, PacketType::DataInband, 0, 0, &[])
            .unwrap();
        assert_eq!(matches!(outcome, WriteOutcome::Written { .. }), fits);
    }
}

#[test]
fn host_signals_only_on_empty_to_non_empty_with_mask_clear() {
    let memory = ring_at(0);
    let mut host = OutgoingRing::open(&memory).unwrap();
    let mut guest = IncomingRing::open(&memory).unwrap();
    let send = |host: &mut OutgoingRing| {
        written(
            host.write_packet(&memory, PacketType::DataInband, 0, 0, &[1; 8])
                .unwrap(),
        )
    };
    assert!(send(&mut host), "empty → non-empty");
    assert!(!send(&mut host), "guest has not read yet");
    while guest.read_packet(&memory).unwrap().is_some() {}
    guest.commit_read(&memory).unwrap();
    assert!(send(&mut host), "drained ring, again empty → non-empty");
    while guest.read_packet(&memory).unwrap().is_some() {}
    guest.commit_read(&memory).unwrap();
    set_control(&memory, INTERRUPT_MASK, 1);
    assert!(!send(&mut host), "guest masked: it is draining already");
}

#[test]
fn host_reader_signals_a_guest_waiting_for_room() {
    let memory = ring_at(0);
    let mut guest = guest_writer(&memory);
    let mut host = IncomingRing::open(&memory).unwrap();
    for _ in 0..4 {
        written(
            guest
                .write_packet(&memory, PacketType::DataInband, 0, 0, &[0; 4000])
                .unwrap(),
        );
    }
    // 16384 - 4 * 4024 = 288 bytes free; the guest wants 4024.
    set_control(&memory, PENDING_SEND_SIZE, 4024);
    host.read_packet(&memory).unwrap().unwrap();
    assert_eq!(host.commit_read(&memory), Ok(true), "now 4312 > 4024 free");
    host.read_packet(&memory).unwrap().unwrap();
    assert_eq!(
        host.commit_read(&memory),
        Ok(false),
        "there was room already before this read"
    );

    // A request that one read does not satisfy: no false hope.
    let memory = ring_at(0);
    let mut guest = guest_writer(&memory);
    let mut host = IncomingRing::open(&memory).unwrap();
    for _ in 0..4 {
        written(
            guest
                .write_packet(&memory, PacketType::DataInband, 0, 0, &[0; 4000])
                .unwrap(),
        );
    }
    set_control(&memory, PENDING_SEND_SIZE, 9000);
    for free_after in [4312, 8336] {
        host.read_packet(&memory).unwrap().unwrap();
        assert_eq!(host.commit_read(&memory), Ok(false), "{free_after} free");
    }
    host.read_packet(&memory).unwrap().unwrap();
    assert_eq!(host.commit_read(&memory), Ok(true), "12360 free");

    host.set_interrupt_mask(&memory, true).unwrap();
    assert_eq!(control(&memory, INTERRUPT_MASK), 1);
    host.set_interrupt_mask(&memory, false).unwrap();
    assert_eq!(control(&memory, INTERRUPT_MASK), 0);
}

#[test]
fn bad_ring_sizes() {
    for bytes in [0usize, 4096, 4097, 8191, 8193, 3 * 4096 + 8] {
        let memory = BufferRingMemory::from_bytes(vec![0; bytes]);
        assert_eq!(
            IncomingRing::open(&memory).unwrap_err(),
            RingError::BadRingSize(bytes as u64)
        );
        assert!(OutgoingRing::open(&memory).is_err());
    }
    assert!(IncomingRing::open(&BufferRingMemory::new(2)).is_ok());
}

#[test]
fn hostile_indices() {
    for bad in [DATA, DATA + 8, u32::MAX, 4, 12, DATA - 1] {
        for field in [WRITE_INDEX, READ_INDEX] {
            let memory = ring_at(0);
            set_control(&memory, field, bad);
            assert!(
                matches!(
                    IncomingRing::open(&memory),
                    Err(RingError::BadIndex { value, .. }) if value == bad
                ),
                "{bad:#x}"
            );
            assert!(OutgoingRing::open(&memory).is_err());
        }
        // Corrupted after open.
        let memory = ring_at(0);
        let mut host_reader = IncomingRing::open(&memory).unwrap();
        let mut host_writer = OutgoingRing::open(&memory).unwrap();
        set_control(&memory, WRITE_INDEX, bad);
        set_control(&memory, READ_INDEX, bad);
        assert!(matches!(
            host_reader.read_packet(&memory),
            Err(RingError::BadIndex {
                index: RingIndex::Write,
                ..
            })
        ));
        assert!(matches!(
            host_writer.write_packet(&memory, PacketType::DataInband, 0, 0, &[]),
            Err(RingError::BadIndex {
                index: RingIndex::Read,
                ..
            })
        ));
    }
}

/// Publishes `bytes` as the ring's content from index `start`.
fn publish(start: u32, bytes: &[u8]) -> (BufferRingMemory, IncomingRing) {
    let memory = ring_at(start);
    let host = IncomingRing::open(&memory).unwrap();
    put_data(&memory, start, bytes);
    let end = (start + u32::try_from(bytes.len()).unwrap()) % DATA;
    set_control(&memory, WRITE_INDEX, end);
    (memory, host)
}

#[test]
fn hostile_descriptors() {
    let with_room = |mut packet: Vec<u8>, total: usize| {
        packet.resize(total, 0);
        packet
    };
    let cases: Vec<(Vec<u8>, RingError)> = vec![
        (vec![0; 16], RingError::Truncated(16)),
        (
            with_room(descriptor(6, 2, 1, 0, 0), 24),
            RingError::BadDescriptor {
                offset8: 2,
                len8: 1,
                available: 24,
            },
        ),
        (
            with_room(descriptor(6, 1, 2, 0, 0), 24),
            RingError::BadDescriptor {
                offset8: 1,
                len8: 2,
                available: 24,
            },
        ),
        (
            with_room(descriptor(6, 4, 3, 0, 0), 32),
            RingError::BadDescriptor {
                offset8: 4,
                len8: 3,
                available: 32,
            },
        ),
        // Longer than what is published (the trailer does not fit).
        (
            with_room(descriptor(6, 2, 3, 0, 0), 24),
            RingError::BadDescriptor {
                offset8: 2,
                len8: 3,
                available: 24,
            },
        ),
        // Longer than the ring itself.
        (
            with_room(descriptor(6, 2, u16::MAX, 0, 0), 64),
            RingError::BadDescriptor {
                offset8: 2,
                len8: u16::MAX,
                available: 64,
            },
        ),
        (
            with_room(descriptor(0, 2, 2, 0, 0), 24),
            RingError::UnknownPacketType(0),
        ),
        (
            with_room(descriptor(14, 2, 2, 0, 0), 24),
            RingError::UnknownPacketType(14),
        ),
        (
            with_room(descriptor(6, 2, 2, 2, 0), 24),
            RingError::UnknownFlags(2),
        ),
    ];
    for start in [0, DATA - 8] {
        for (bytes, error) in &cases {
            let (memory, mut host) = publish(start, bytes);
            assert_eq!(host.read_packet(&memory), Err(*error), "{bytes:x?}");
            // Nothing consumed: the same error again, no index moved.
            assert_eq!(host.read_packet(&memory), Err(*error));
            assert_eq!(host.commit_read(&memory), Ok(false));
            assert_eq!(control(&memory, READ_INDEX), start);
        }
    }
}

#[test]
fn inband_payload_offset_beyond_the_descriptor() {
    // offset8 = 3: 8 bytes of header extension are skipped.
    let mut bytes = descriptor(9, 3, 4, 0, 5);
    bytes.extend_from_slice(&[0xee; 8]);
    bytes.extend_from_slice(&[0x11; 8]);
    bytes.extend_from_slice(&[0; 8]);
    let (memory, mut host) = publish(0, &bytes);
    let packet = host.read_packet(&memory).unwrap().unwrap();
    assert_eq!(packet.packet_type, PacketType::DataUsingGpaDirect);
    assert_eq!(packet.payload, vec![0x11; 8]);
    // An empty payload is a valid packet (offset8 == len8).
    let mut bytes = descriptor(11, 2, 2, 0, 5);
    bytes.extend_from_slice(&[0; 8]);
    let (memory, mut host) = publish(0, &bytes);
    assert!(host
        .read_packet(&memory)
        .unwrap()
        .unwrap()
        .payload
        .is_empty());
}

#[test]
fn oversized_host_packets() {
    let memory = ring_at(0);
    let mut host = OutgoingRing::open(&memory).unwrap();
    for len in [DATA as usize - 24, DATA as usize, 1 << 20] {
        assert!(matches!(
            host.write_packet(&memory, PacketType::DataInband, 0, 0, &vec![0; len]),
            Err(RingError::PacketTooLarge { .. })
        ));
    }
    // The largest packet that fits leaves one 8-byte slot free.
    let largest = DATA as usize - 24 - 8;
    assert!(matches!(
        host.write_packet(&memory, PacketType::DataInband, 0, 0, &vec![0; largest]),
        Ok(WriteOutcome::Written { .. })
    ));
    assert_eq!(OutgoingRing::packet_size(0), Some(24));
    assert_eq!(OutgoingRing::packet_size(1), Some(32));
    assert_eq!(OutgoingRing::packet_size(usize::MAX), None);
    assert_eq!(OutgoingRing::packet_size(u16::MAX as usize * 8), None);
}

#[test]
fn random_ring_contents_never_panic() {
    let mut state = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3_000 {
        let memory = BufferRingMemory::new(2);
        let mut random = vec![0u8; 8192];
        random.iter_mut().for_each(|b| *b = next() as u8);
        memory.write_at(0, &random).unwrap();
        // Mostly valid indices, so the descriptor checks run.
        if next() % 4 != 0 {
            set_control(&memory, WRITE_INDEX, (next() % 4096) as u32 & !7);
            set_control(&memory, READ_INDEX, (next() % 4096) as u32 & !7);
        }
        if let Ok(mut reader) = IncomingRing::open(&memory) {
            for _ in 0..4 {
                let _ = reader.read_packet(&memory);
            }
            let _ = reader.commit_read(&memory);
        }
        if let Ok(mut writer) = OutgoingRing::open(&memory) {
            let _ = writer.write_packet(&memory, PacketType::DataInband, 0, 0, &[1; 100]);
        }
    }
}
