//! The host side of VMBus, as far as it can be written without a VM.
//!
//! The layers, bottom up:
//!
//! - [`guid`]: Hyper-V GUIDs (mixed-endian bytes) and the Dynamic Memory ids.
//! - [`message`]: channel-management messages. The host answers through
//!   SynIC message slot 2. [`message::parse_guest_message`] decodes what the
//!   guest posted, [`message::HostMessage::encode`] produces what the host
//!   sends.
//! - [`gpadl`]: assembles guest page lists (GPADLs) from GPADL_HEADER and
//!   GPADL_BODY messages.
//! - [`ring_memory`]: the [`ring_memory::RingMemory`] trait through which
//!   rings reach guest memory, with a `Vec` fake for tests and fuzzing and an
//!   implementation over `vm-memory` and a PFN list.
//! - [`ring`]: the ring buffers of an open channel: reading packets the
//!   guest wrote, writing packets for the guest, and when to signal.
//! - [`server`]: the channel-management state machine for the one channel
//!   tidevm offers. It consumes parsed messages and returns the messages to
//!   send and the actions the VMM must take (open or close the channel).
//!
//! Everything the guest writes (messages, GPADLs, ring indices, packet
//! descriptors) is untrusted: it is bounds-checked, never trusted for an
//! allocation size beyond fixed limits, and errors are typed, not panics.

pub mod gpadl;
pub mod guid;
pub mod message;
pub mod ring;
pub mod ring_memory;
pub mod server;

/// Size of a Hyper-V page: GPADL PFNs, ring pages and SynIC pages all use
/// 4 KiB pages whatever the guest's own page size.
pub const HV_PAGE_SIZE: u64 = 4096;
