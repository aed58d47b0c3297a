//! Devices of tidevm: the I/O buses, legacy PC devices and virtio devices.
//!
//! Every device the guest can reach implements [`bus::BusDevice`] (register
//! access from vCPU threads). Devices with queues also implement
//! `event_manager::MutEventSubscriber`: the VMM event loop owns their I/O.

pub mod bus;
pub mod discard;
pub mod hyperv;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
