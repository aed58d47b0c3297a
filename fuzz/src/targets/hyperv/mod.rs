//! Targets for the Hyper-V VMBus and Dynamic Memory parsers
//! (`devices::hyperv`), built only with the `hyperv` feature: they need
//! the hyperv module in `devices`.

pub mod dm_message;
pub mod dm_protocol;
pub mod vmbus_gpadl;
pub mod vmbus_message;
pub mod vmbus_post_message;
pub mod vmbus_ring;
pub mod vmbus_server;

use devices::hyperv::vmbus::message::message_type;

use crate::input::Seed;

/// A guest VMBus message: type, then `fields` as little-endian `u32`s,
/// padded with zeros to `size` bytes.
pub(crate) fn vmbus_msg(ty: u32, fields: &[u32], size: usize) -> Vec<u8> {
    let mut m = ty.to_le_bytes().to_vec();
    m.extend_from_slice(&[0; 4]);
    for f in fields {
        m.extend_from_slice(&f.to_le_bytes());
    }
    m.resize(size.max(m.len()), 0);
    m
}

/// INITIATE_CONTACT for `version`, messages to VP 0.
pub(crate) fn initiate_contact(version: u32) -> Vec<u8> {
    vmbus_msg(message_type::INITIATE_CONTACT, &[version, 0], 40)
}

/// GPADL_HEADER of one page-aligned range of `pages` PFNs from 0x100.
pub(crate) fn gpadl_header(relid: u32, gpadl_id: u32, pages: u32) -> Vec<u8> {
    let buflen = 8 + 8 * pages;
    let mut m = vmbus_msg(message_type::GPADL_HEADER, &[relid, gpadl_id], 16);
    m.extend_from_slice(&(buflen as u16).to_le_bytes());
    m.extend_from_slice(&1u16.to_le_bytes());
    m.extend_from_slice(&(pages * 4096).to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    for pfn in 0x100..0x100 + u64::from(pages) {
        m.extend_from_slice(&pfn.to_le_bytes());
    }
    m
}

/// A sequence of blobs (each with a u16 length) preceded by an op byte.
pub(crate) fn ops(list: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut s = Seed::new();
    for (op, blob) in list {
        s.u8(*op).blob(blob);
    }
    s.finish()
}
