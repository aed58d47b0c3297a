//! Hyper-V Dynamic Memory: the protocol `hv_balloon` speaks on its channel.
//!
//! Pure and VM-independent: byte slices in, byte vectors and actions out,
//! so unit tests and fuzz targets drive it without a VM.
//!
//! - [`message`]: message types, header, constants, the page-range wire
//!   format (40-bit PFN, 24-bit count).
//! - [`codec`]: [`parse_guest_message`] and the host encoders
//!   ([`HostDmMessage::encode`], [`split_unballoon`]).
//! - [`ranges`]: [`RangeSet`], the merged set of guest page ranges.
//! - [`protocol`]: [`DmProtocol`], the host's state machine (handshake,
//!   status, balloon, unballoon, hot-add) and the [`DmAction`]s it asks the
//!   VMM to perform.
//!
//! Layouts follow Linux 6.12 `drivers/hv/hv_balloon.c`; behaviour on the
//! host side is modelled on QEMU's `hw/hyperv/hv-balloon.c`.

pub mod codec;
pub mod message;
pub mod protocol;
pub mod ranges;

pub use codec::{parse_guest_message, parse_header, parse_host_message, split_unballoon};
pub use message::{
    DmError, DmHeader, DmVersion, GuestCapabilities, GuestDmMessage, HostDmMessage, StatusReport,
};
pub use protocol::{
    ConfigError, DmAction, DmConfig, DmCounters, DmOutput, DmProtocol, DmReport, DmReset,
    HotAddState, Phase, ProtocolError, RejectReason, StatusSample,
};
pub use ranges::{PageRange, RangeSet};
