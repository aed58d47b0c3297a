//! Target `virtio_mem_request`: decoding of `virtio_mem_req` and the
//! request semantics of the device, without queues.
//!
//! Input: first the whole input goes through `parse_request`; then it is
//! read as a sequence of operations on one device: requests (24 raw bytes),
//! VMM resizes, and backend failure modes.
//!
//! Invariants checked:
//! - no panic, no arithmetic overflow (debug assertions are on);
//! - `parse_request` accepts exactly the inputs of at least 24 bytes with a
//!   known type, and decodes the fields the spec places;
//! - every backend call is block aligned, inside the region, and plugs only
//!   unplugged (unplugs only plugged) blocks; device and backend agree on
//!   the plugged blocks after every request;
//! - `bytes_plugged - bytes_unplugged == plugged_size`; an ACKed PLUG
//!   leaves `plugged_size <= requested_size` and the blocks plugged, an
//!   ACKed UNPLUG leaves them unplugged, an ACKed UNPLUG_ALL leaves nothing
//!   plugged; only an ACKed STATE carries a state;
//! - afterwards the device, reset and re-activated, answers a valid STATE
//!   request with the right state.

use devices::virtio::mem::request::{parse_request, RequestError, REQUEST_SIZE};
use devices::virtio::mem::{BlockState, MemRequest, ResponseType};

use crate::devices::{check_mem, mem_answers, mem_device, FailMode, MEM_BLOCK, MEM_REGION};
use crate::guest::memory;
use crate::input::{Bytes, Seed};

fn check_parse(bytes: &[u8]) {
    let parsed = parse_request(bytes);
    if bytes.len() < REQUEST_SIZE {
        assert_eq!(parsed, Err(RequestError::TooShort(bytes.len())));
        return;
    }
    let ty = u16::from_le_bytes([bytes[0], bytes[1]]);
    let addr = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let nb_blocks = u16::from_le_bytes([bytes[16], bytes[17]]);
    let expected = match ty {
        0 => Ok(MemRequest::Plug { addr, nb_blocks }),
        1 => Ok(MemRequest::Unplug { addr, nb_blocks }),
        2 => Ok(MemRequest::UnplugAll),
        3 => Ok(MemRequest::State { addr, nb_blocks }),
        other => Err(RequestError::UnknownType(other)),
    };
    assert_eq!(parsed, expected);
}

/// Runs one input.
pub fn run(data: &[u8]) {
    check_parse(data);
    let (mut dev, backend) = mem_device();
    let mut b = Bytes::new(data);
    while !b.is_empty() {
        match b.u8() % 4 {
            0 | 1 => {
                let raw = b.take(REQUEST_SIZE);
                check_parse(raw);
                let Ok(req) = parse_request(raw) else {
                    continue;
                };
                let resp = dev.handle_request(req);
                check_mem(&dev, &backend);
                assert_eq!(
                    resp.state.is_some(),
                    matches!(req, MemRequest::State { .. }) && resp.resp_type == ResponseType::Ack,
                    "{req:?} -> {resp:?}"
                );
                if resp.resp_type != ResponseType::Ack {
                    continue;
                }
                match req {
                    MemRequest::Plug { addr, nb_blocks }
                    | MemRequest::Unplug { addr, nb_blocks } => {
                        let plug = matches!(req, MemRequest::Plug { .. });
                        let state = dev.handle_request(MemRequest::State { addr, nb_blocks });
                        let want = if plug {
                            BlockState::Plugged
                        } else {
                            BlockState::Unplugged
                        };
                        assert_eq!(
                            state.state,
                            Some(want),
                            "{req:?} ACKed but state is {state:?}"
                        );
                        if plug {
                            assert!(dev.plugged_size() <= dev.requested_size());
                        }
                    }
                    MemRequest::UnplugAll => assert_eq!(dev.plugged_size(), 0),
                    MemRequest::State { .. } => {}
                }
            }
            2 => {
                let size = u64::from(b.u16()) * (MEM_BLOCK / 2);
                let ok = dev.set_requested_size(size).is_ok();
                assert_eq!(
                    ok,
                    size.is_multiple_of(MEM_BLOCK) && size <= dev.usable_region_size(),
                    "set_requested_size({size:#x})"
                );
            }
            _ => backend.set_fail(match b.u8() % 3 {
                0 => FailMode::None,
                1 => FailMode::Busy,
                _ => FailMode::Failed,
            }),
        }
    }
    backend.set_fail(FailMode::None);
    mem_answers(&mut dev, &backend, &memory());
}

fn request(s: &mut Seed, ty: u16, block: u64, nb_blocks: u16) {
    let mut raw = [0u8; REQUEST_SIZE];
    raw[0..2].copy_from_slice(&ty.to_le_bytes());
    raw[8..16].copy_from_slice(&(MEM_REGION + block * MEM_BLOCK).to_le_bytes());
    raw[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
    s.u8(0).bytes(&raw);
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut resize = Seed::new();
    resize.u8(2).u16(16); // 8 blocks
    let mut s = resize.clone();
    request(&mut s, 0, 0, 2);
    request(&mut s, 3, 0, 4);
    request(&mut s, 1, 1, 1);
    request(&mut s, 2, 0, 0);
    let mut busy = resize.clone();
    busy.u8(3).u8(1);
    request(&mut busy, 0, 4, 4);
    busy.u8(3).u8(0);
    request(&mut busy, 0, 4, 4);
    let mut bad = Seed::new();
    request(&mut bad, 0, 63, 2); // past the region
    request(&mut bad, 7, 0, 1); // unknown type
    vec![s.finish(), busy.finish(), bad.finish()]
}
