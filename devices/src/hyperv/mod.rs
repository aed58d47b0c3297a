//! Hyper-V synthetic devices: the VMBus host and the Dynamic Memory device.
//!
//! A Linux guest that sees the Hyper-V CPUID leaves loads `hv_vmbus`, which
//! talks to the host through SynIC messages (channel management) and shared
//! ring buffers (one pair per channel). tidevm offers exactly one channel,
//! the Dynamic Memory (hot-add and balloon) device that `hv_balloon` binds.
//!
//! - [`vmbus`]: the pure, VM-independent VMBus layers (messages, GPADLs,
//!   rings, the channel-management state machine). Nothing there touches
//!   KVM, threads or files.
//! - [`dm`]: the Dynamic Memory protocol spoken over the channel's rings.
//! - [`device`]: [`device::DynamicMemoryDevice`], the two on the event loop:
//!   guest memory, the SynIC (through [`device::SynicPort`]) and the
//!   hotplug region (through virtio-mem's `MemoryBackend`).

pub mod device;
pub mod dm;
mod event_handler;
pub mod vmbus;
