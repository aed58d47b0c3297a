//! Hyper-V enlightenments of the vCPU: the CPUID leaves a guest needs to
//! see Hyper-V (and not KVM), the SynIC message and event-flag page
//! layouts, hypercall input decoding, the ACPI VMBus device, and the GSI
//! routes that let the VMM assert a synthetic interrupt (SINT).
//!
//! Everything here is a pure function over values or page buffers, apart
//! from [`supported_features`], a thin wrapper of
//! `KVM_GET_SUPPORTED_HV_CPUID`. Layouts follow the Hyper-V TLFS as Linux
//! 6.12 uses it (`include/asm-generic/hyperv-tlfs.h`).

use std::sync::atomic::{AtomicU64, Ordering};

use acpi_tables::aml::{Device, Name, Path, ResourceTemplate};
use acpi_tables::{Aml, AmlSink};
use kvm_bindings::{
    kvm_cpuid2, kvm_cpuid_entry2, kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1,
    kvm_irq_routing_hv_sint, kvm_irq_routing_irqchip, CpuId, KVM_CAP_SYS_HYPERV_CPUID,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_HV_SINT,
    KVM_IRQ_ROUTING_IRQCHIP,
};
use kvm_ioctls::Kvm;
use vmm_sys_util::{ioctl::ioctl_with_mut_ptr, ioctl_iowr_nr};

// ---------------------------------------------------------------------------
// CPUID
// ---------------------------------------------------------------------------

/// Leaf 0x40000000: highest Hyper-V leaf and the vendor "Microsoft Hv".
pub const LEAF_VENDOR: u32 = 0x4000_0000;
/// Leaf 0x40000001: interface signature "Hv#1".
pub const LEAF_INTERFACE: u32 = 0x4000_0001;
/// Leaf 0x40000002: hypervisor version (printed by the guest).
pub const LEAF_VERSION: u32 = 0x4000_0002;
/// Leaf 0x40000003: partition privileges and features.
pub const LEAF_FEATURES: u32 = 0x4000_0003;
/// Leaf 0x40000004: enlightenment recommendations.
pub const LEAF_ENLIGHTENMENTS: u32 = 0x4000_0004;
/// Leaf 0x40000005: implementation limits; the highest leaf offered.
pub const LEAF_LIMITS: u32 = 0x4000_0005;
/// "Microsoft Hv" in EBX, ECX, EDX.
pub const VENDOR_SIGNATURE: [u32; 3] = [0x7263_694d, 0x666f_736f, 0x7648_2074];
/// "Hv#1" in EAX of leaf 0x40000001: without it KVM keeps its Hyper-V
/// emulation off for the vCPU.
pub const INTERFACE_SIGNATURE: u32 = 0x3123_7648;
/// Host build reported in leaf 0x40000002 (10.0.14393, what QEMU reports).
const VERSION_BUILD: u32 = 14393;
/// Major.minor 10.0 in leaf 0x40000002 EBX.
const VERSION_MAJOR_MINOR: u32 = 0x000a_0000;
/// Logical processors reported in leaf 0x40000005 EBX.
const MAX_LOGICAL_PROCESSORS: u32 = 64;

/// 0x40000003 EAX: partition reference counter (TIME_REF_COUNT MSR).
pub const EAX_TIME_REF_COUNT: u32 = 1 << 1;
/// 0x40000003 EAX: synthetic interrupt controller MSRs.
pub const EAX_SYNIC: u32 = 1 << 2;
/// 0x40000003 EAX: APIC access MSRs (and the VP assist page Linux always writes).
pub const EAX_APIC_ACCESS: u32 = 1 << 4;
/// 0x40000003 EAX: hypercall MSRs (GUEST_OS_ID, HYPERCALL).
pub const EAX_HYPERCALL: u32 = 1 << 5;
/// 0x40000003 EAX: VP_INDEX MSR.
pub const EAX_VP_INDEX: u32 = 1 << 6;
/// 0x40000003 EAX: reference TSC page.
pub const EAX_REFERENCE_TSC: u32 = 1 << 9;
/// 0x40000003 EAX: TSC and APIC frequency MSRs.
pub const EAX_ACCESS_FREQUENCY_MSRS: u32 = 1 << 11;
/// 0x40000003 EBX: HvPostMessage allowed.
pub const EBX_POST_MESSAGES: u32 = 1 << 4;
/// 0x40000003 EBX: HvSignalEvent allowed.
pub const EBX_SIGNAL_EVENTS: u32 = 1 << 5;
/// 0x40000003 EDX: the frequency MSRs hold valid values.
pub const EDX_FREQUENCY_MSRS_AVAILABLE: u32 = 1 << 8;
/// 0x40000004 EAX: relaxed timing (no watchdogs on missed ticks).
pub const HINT_RELAXED_TIMING: u32 = 1 << 5;
/// 0x40000004 EAX: do not use AutoEOI (keeps APICv usable; Linux then EOIs SINTs).
pub const HINT_DEPRECATING_AEOI: u32 = 1 << 9;
/// 0x40000004 EBX: never notify long spin waits.
const SPIN_RETRIES_NEVER: u32 = 0xffff_ffff;

/// Features of leaf 0x40000003 that the guest needs: `hv_vmbus` needs the
/// hypercall page, VP indexes and the SynIC; Linux detects Hyper-V only
/// with HYPERCALL and VP_INDEX.
pub const REQUIRED_EAX: u32 = EAX_HYPERCALL | EAX_VP_INDEX | EAX_SYNIC;

/// The Hyper-V features offered in leaf 0x40000003 (EAX privileges, EBX
/// hypercall permissions, EDX misc features).
///
/// Left out on purpose: synthetic timers (message mode shares SINT 2 with
/// VMBus), crash MSRs, extended hypercalls, partition id, CPU management,
/// isolation, reenlightenment and invariant-TSC control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HypervFeatures {
    /// Leaf 0x40000003 EAX.
    pub eax: u32,
    /// Leaf 0x40000003 EBX.
    pub ebx: u32,
    /// Leaf 0x40000003 EDX.
    pub edx: u32,
}

impl Default for HypervFeatures {
    /// What tidevm offers when KVM supports all of it.
    fn default() -> Self {
        Self {
            eax: EAX_TIME_REF_COUNT
                | EAX_SYNIC
                | EAX_APIC_ACCESS
                | EAX_HYPERCALL
                | EAX_VP_INDEX
                | EAX_REFERENCE_TSC
                | EAX_ACCESS_FREQUENCY_MSRS,
            ebx: EBX_POST_MESSAGES | EBX_SIGNAL_EVENTS,
            edx: EDX_FREQUENCY_MSRS_AVAILABLE,
        }
    }
}

impl HypervFeatures {
    /// Keeps only the features KVM reports in its own leaf 0x40000003
    /// (`kvm_supported`, from `KVM_GET_SUPPORTED_HV_CPUID`), and checks
    /// that the required ones are left.
    pub fn masked_by(self, kvm_supported: &[kvm_cpuid_entry2]) -> Result<Self> {
        let Some(kvm) = kvm_supported.iter().find(|e| e.function == LEAF_FEATURES) else {
            return Err(HypervError::Missing(REQUIRED_EAX));
        };
        let masked = Self {
            eax: self.eax & kvm.eax,
            ebx: self.ebx & kvm.ebx,
            edx: self.edx & kvm.edx,
        };
        let missing = REQUIRED_EAX & !masked.eax;
        if missing != 0 {
            return Err(HypervError::Missing(missing));
        }
        Ok(masked)
    }
}

/// Errors of Hyper-V setup.
#[derive(Debug, thiserror::Error)]
pub enum HypervError {
    /// KVM lacks Hyper-V features the guest needs.
    #[error("KVM does not support the Hyper-V features {0:#x} of CPUID 0x40000003 EAX (hypercall, VP index, SynIC); use a host kernel with CONFIG_KVM_HYPERV")]
    Missing(u32),
    /// KVM_GET_SUPPORTED_HV_CPUID failed.
    #[error("KVM_GET_SUPPORTED_HV_CPUID failed: {0}")]
    SupportedCpuid(#[source] std::io::Error),
    /// A CPUID buffer could not be allocated.
    #[error("cannot allocate a CPUID buffer: {0:?}")]
    Buffer(vmm_sys_util::fam::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, HypervError>;

const KVMIO: u32 = 0xae;
ioctl_iowr_nr!(KVM_GET_SUPPORTED_HV_CPUID, KVMIO, 0xc1, kvm_cpuid2);

/// The Hyper-V CPUID leaves KVM can emulate (`KVM_GET_SUPPORTED_HV_CPUID`
/// on the system fd), or `None` when KVM lacks the system ioctl. Use them
/// only as a capability mask ([`HypervFeatures::masked_by`]): they carry
/// KVM's own vendor string and bits a guest must not see.
pub fn supported_cpuid(kvm: &Kvm) -> Result<Option<Vec<kvm_cpuid_entry2>>> {
    let cap = std::os::raw::c_ulong::from(KVM_CAP_SYS_HYPERV_CPUID);
    if kvm.check_extension_raw(cap) <= 0 {
        return Ok(None);
    }
    // KVM answers E2BIG without saying how many entries it has.
    let mut nent = 16;
    loop {
        let mut cpuid = CpuId::new(nent).map_err(HypervError::Buffer)?;
        // SAFETY: `kvm` is a KVM system fd and the buffer holds a
        // kvm_cpuid2 header with room for `nent` entries, which KVM does
        // not write past; the return value is checked.
        let ret = unsafe {
            ioctl_with_mut_ptr(
                kvm,
                KVM_GET_SUPPORTED_HV_CPUID(),
                cpuid.as_mut_fam_struct_ptr(),
            )
        };
        if ret == 0 {
            return Ok(Some(cpuid.as_slice().to_vec()));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::E2BIG) || nent >= 256 {
            return Err(HypervError::SupportedCpuid(err));
        }
        nent *= 2;
    }
}

/// The features to offer on this host: [`HypervFeatures::default`] masked
/// by what KVM reports; unmasked when KVM cannot report (the vCPU will
/// then refuse what it lacks).
pub fn supported_features(kvm: &Kvm) -> Result<HypervFeatures> {
    match supported_cpuid(kvm)? {
        Some(entries) => HypervFeatures::default().masked_by(&entries),
        None => Ok(HypervFeatures::default()),
    }
}

fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

/// The Hyper-V leaves 0x40000000..=0x40000005 for a VM of `num_cpus`
/// vCPUs offering `features`. They must be the only hypervisor leaves the
/// guest sees: Linux prefers KVM when both signatures are present.
pub fn cpuid_leaves(num_cpus: u8, features: HypervFeatures) -> Vec<kvm_cpuid_entry2> {
    let [b, c, d] = VENDOR_SIGNATURE;
    vec![
        leaf(LEAF_VENDOR, LEAF_LIMITS, b, c, d),
        leaf(LEAF_INTERFACE, INTERFACE_SIGNATURE, 0, 0, 0),
        leaf(LEAF_VERSION, VERSION_BUILD, VERSION_MAJOR_MINOR, 0, 0),
        leaf(LEAF_FEATURES, features.eax, features.ebx, 0, features.edx),
        leaf(
            LEAF_ENLIGHTENMENTS,
            HINT_RELAXED_TIMING | HINT_DEPRECATING_AEOI,
            SPIN_RETRIES_NEVER,
            0,
            0,
        ),
        leaf(
            LEAF_LIMITS,
            u32::from(num_cpus),
            MAX_LOGICAL_PROCESSORS,
            0,
            0,
        ),
    ]
}

// ---------------------------------------------------------------------------
// SynIC
// ---------------------------------------------------------------------------

/// SCONTROL MSR (bit 0: SynIC enabled).
pub const MSR_SCONTROL: u32 = 0x4000_0080;
/// SIEFP MSR: event flags page (bit 0 enable, bits 12.. GPA).
pub const MSR_SIEFP: u32 = 0x4000_0082;
/// SIMP MSR: message page (bit 0 enable, bits 12.. GPA).
pub const MSR_SIMP: u32 = 0x4000_0083;
/// Enable bit of SCONTROL, SIMP and SIEFP.
const SYNIC_ENABLE: u64 = 1;
/// Synthetic interrupt sources per VP.
pub const SINT_COUNT: u8 = 16;
/// The SINT VMBus uses (Linux `VMBUS_MESSAGE_SINT`).
pub const VMBUS_SINT: u8 = 2;
/// Size of a SynIC page.
pub const SYNIC_PAGE_SIZE: u64 = 4096;
/// A SynIC message or event-flags page as 64-bit words, as the guest and
/// the host access it concurrently.
pub type SynicPage = [AtomicU64; 512];
/// Words per 256-byte slot (one slot per SINT).
const SLOT_WORDS: usize = 32;
/// Largest message payload.
pub const MESSAGE_PAYLOAD_MAX: usize = 240;
/// Message type of a VMBus channel message (`HVMSG_...` type 1).
pub const MESSAGE_TYPE_VMBUS: u32 = 1;
/// Message header, word 0: msg_pending (bit 0 of the flags byte, byte 5).
const HEADER_MSG_PENDING: u64 = 1 << 40;
/// Event flags in one slot (2048 bits).
pub const EVENT_FLAGS_PER_SINT: u32 = 2048;

/// The SynIC registers of one VP as the guest last wrote them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynicRegs {
    /// SCONTROL.
    pub scontrol: u64,
    /// SIMP.
    pub simp: u64,
    /// SIEFP.
    pub siefp: u64,
}

impl SynicRegs {
    fn page(&self, msr: u64) -> Option<u64> {
        let on = self.scontrol & SYNIC_ENABLE != 0 && msr & SYNIC_ENABLE != 0;
        on.then_some(msr & !(SYNIC_PAGE_SIZE - 1))
    }

    /// GPA of the message page, when the SynIC and the page are enabled.
    pub fn message_page(&self) -> Option<u64> {
        self.page(self.simp)
    }

    /// GPA of the event-flags page, when the SynIC and the page are enabled.
    pub fn event_flags_page(&self) -> Option<u64> {
        self.page(self.siefp)
    }
}

/// A message for one SIMP slot: its type and up to 240 payload bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SynicMessage {
    message_type: u32,
    len: u8,
    payload: [u8; MESSAGE_PAYLOAD_MAX],
}

impl std::fmt::Debug for SynicMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SynicMessage")
            .field("message_type", &self.message_type)
            .field("payload", &self.payload())
            .finish()
    }
}

impl SynicMessage {
    /// A message of `message_type` (non-zero) carrying `payload`; `None`
    /// when the type is 0 (a free slot) or the payload exceeds 240 bytes.
    pub fn new(message_type: u32, payload: &[u8]) -> Option<Self> {
        if message_type == 0 || payload.len() > MESSAGE_PAYLOAD_MAX {
            return None;
        }
        let mut buf = [0u8; MESSAGE_PAYLOAD_MAX];
        buf[..payload.len()].copy_from_slice(payload);
        Some(Self {
            message_type,
            len: u8::try_from(payload.len()).ok()?,
            payload: buf,
        })
    }

    /// The message type.
    pub fn message_type(&self) -> u32 {
        self.message_type
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.payload[..usize::from(self.len)]
    }
}

/// What [`write_message`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotWrite {
    /// The message is in the slot; assert the SINT.
    Written,
    /// The slot holds an unconsumed message. msg_pending is now set, so
    /// the guest writes EOM once it frees the slot: try again then.
    Busy,
}

fn slot(page: &SynicPage, sint: u8) -> &[AtomicU64] {
    let base = usize::from(sint % SINT_COUNT) * SLOT_WORDS;
    &page[base..base + SLOT_WORDS]
}

/// Writes `msg` into the slot of `sint` (taken modulo 16) of the message
/// page `page`, or marks the occupied slot msg_pending.
///
/// The caller must be the only host-side writer of this slot (one
/// outstanding message per SINT, no message-mode synthetic timers). The
/// guest frees a slot by compare-exchanging its type to 0 and then writes
/// EOM if msg_pending was set; setting msg_pending with an atomic OR that
/// also returns the type closes the race with that: either the OR sees the
/// slot still full (the guest will see the flag and EOM) or already free.
pub fn write_message(page: &SynicPage, sint: u8, msg: &SynicMessage) -> SlotWrite {
    let slot = slot(page, sint);
    let header = &slot[0];
    if header.load(Ordering::Acquire) & 0xffff_ffff != 0 {
        let old = header.fetch_or(HEADER_MSG_PENDING, Ordering::AcqRel);
        if old & 0xffff_ffff != 0 {
            return SlotWrite::Busy;
        }
    }
    // The slot is free and only we fill it: payload first, then the header
    // with the type, so the guest never sees a type before its payload.
    slot[1].store(0, Ordering::Relaxed); // sender / port
    for (word, chunk) in slot[2..].iter().zip(msg.payload.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        word.store(u64::from_le_bytes(b), Ordering::Relaxed);
    }
    let value = u64::from(msg.message_type) | (u64::from(msg.len) << 32);
    header.store(value, Ordering::Release);
    SlotWrite::Written
}

/// Sets event flag `flag` in the slot of `sint` of the event-flags page
/// `page`. Returns true when the flag was clear (assert the SINT), false
/// when it was already set or is out of range (nothing to do).
pub fn set_event_flag(page: &SynicPage, sint: u8, flag: u32) -> bool {
    if flag >= EVENT_FLAGS_PER_SINT {
        return false;
    }
    let Ok(word) = usize::try_from(flag / 64) else {
        return false;
    };
    let bit = 1u64 << (flag % 64);
    slot(page, sint)[word].fetch_or(bit, Ordering::AcqRel) & bit == 0
}

// ---------------------------------------------------------------------------
// Hypercalls
// ---------------------------------------------------------------------------

/// HvPostMessage.
pub const HVCALL_POST_MESSAGE: u16 = 0x005c;
/// HvSignalEvent.
pub const HVCALL_SIGNAL_EVENT: u16 = 0x005d;
/// Size of the HvPostMessage input block.
pub const POST_MESSAGE_INPUT_SIZE: usize = 16 + MESSAGE_PAYLOAD_MAX;
/// Connection ids are 24 bits.
pub const CONNECTION_ID_MASK: u32 = 0x00ff_ffff;
/// Hypercall input and output GPAs must be 8-byte aligned (TLFS).
const PARAM_ALIGN: u64 = 8;

/// Hypercall status codes (RAX bits 0-15).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum HvStatus {
    /// Success.
    Success = 0,
    /// Unknown or unsupported hypercall.
    InvalidHypercallCode = 2,
    /// Malformed input (reserved bits, sizes).
    InvalidHypercallInput = 3,
    /// A GPA is not aligned or crosses a page.
    InvalidAlignment = 4,
    /// An argument is out of range.
    InvalidParameter = 5,
    /// The caller may not do this.
    AccessDenied = 6,
    /// The host cannot take the input now (memory).
    InsufficientMemory = 11,
    /// An event flag number out of range.
    InvalidPortId = 17,
    /// No one listens on this connection id.
    InvalidConnectionId = 18,
    /// The connection's message queue is full; the guest retries.
    InsufficientBuffers = 19,
}

impl HvStatus {
    /// The value to return in RAX.
    pub fn result(self) -> u64 {
        self as u64
    }
}

/// The hypercall control word (RCX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HypercallControl {
    /// Call code (bits 0-15).
    pub code: u16,
    /// Fast (register) calling convention (bit 16).
    pub fast: bool,
    /// Variable header size in 8-byte units (bits 17-26).
    pub var_header_size: u16,
    /// Rep count (bits 32-43).
    pub rep_count: u16,
    /// Rep start index (bits 48-59).
    pub rep_start: u16,
}

impl HypercallControl {
    /// Decodes RCX.
    pub fn decode(rcx: u64) -> Self {
        let field = |shift: u32, mask: u64| u16::try_from((rcx >> shift) & mask).unwrap_or(0);
        Self {
            code: field(0, 0xffff),
            fast: rcx & (1 << 16) != 0,
            var_header_size: field(17, 0x3ff),
            rep_count: field(32, 0xfff),
            rep_start: field(48, 0xfff),
        }
    }

    /// Whether this is a simple (not rep, no variable header) call.
    pub fn is_simple(&self) -> bool {
        self.var_header_size == 0 && self.rep_count == 0 && self.rep_start == 0
    }
}

/// Checks a hypercall input GPA for `len` bytes: 8-byte aligned and not
/// crossing a page.
pub fn check_input_gpa(gpa: u64, len: u64) -> std::result::Result<(), HvStatus> {
    let offset = gpa & (SYNIC_PAGE_SIZE - 1);
    if !gpa.is_multiple_of(PARAM_ALIGN) || offset + len > SYNIC_PAGE_SIZE {
        return Err(HvStatus::InvalidAlignment);
    }
    Ok(())
}

/// A validated HvPostMessage input block.
#[derive(Clone, PartialEq, Eq)]
pub struct PostMessage {
    /// Connection id (24 bits).
    pub connection_id: u32,
    /// Message: the guest's message type and payload.
    pub message: SynicMessage,
}

impl std::fmt::Debug for PostMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostMessage")
            .field("connection_id", &self.connection_id)
            .field("message", &self.message)
            .finish()
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(v)
}

/// Parses the 256-byte HvPostMessage input block: connection id @0
/// (low 24 bits), reserved @4, message type @8, payload size @12, payload
/// @16. The payload size must be at most 240 and the message type non-zero
/// and not one of the hypervisor's own (bit 31).
pub fn parse_post_message(
    input: &[u8; POST_MESSAGE_INPUT_SIZE],
) -> std::result::Result<PostMessage, HvStatus> {
    let connection_id = u32_at(input, 0) & CONNECTION_ID_MASK;
    let message_type = u32_at(input, 8);
    let size = usize::try_from(u32_at(input, 12)).map_err(|_| HvStatus::InvalidHypercallInput)?;
    if size > MESSAGE_PAYLOAD_MAX || message_type == 0 || message_type & (1 << 31) != 0 {
        return Err(HvStatus::InvalidHypercallInput);
    }
    let message = SynicMessage::new(message_type, &input[16..16 + size])
        .ok_or(HvStatus::InvalidHypercallInput)?;
    Ok(PostMessage {
        connection_id,
        message,
    })
}

/// A validated HvSignalEvent parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalEvent {
    /// Connection id (24 bits).
    pub connection_id: u32,
    /// Flag number (bits 32-47); Linux always sends 0.
    pub flag_number: u16,
}

/// Parses the HvSignalEvent parameter: connection id in bits 0-23, flag
/// number in bits 32-47, everything else reserved. A non-zero flag number
/// is refused with "invalid port id", as QEMU does: VMBus uses none.
pub fn parse_signal_event(param: u64) -> std::result::Result<SignalEvent, HvStatus> {
    let reserved = param & !(u64::from(CONNECTION_ID_MASK) | (0xffff << 32));
    if reserved != 0 {
        return Err(HvStatus::InvalidHypercallInput);
    }
    let flag_number = u16::try_from((param >> 32) & 0xffff).unwrap_or(u16::MAX);
    if flag_number != 0 {
        return Err(HvStatus::InvalidPortId);
    }
    Ok(SignalEvent {
        connection_id: u32::try_from(param & u64::from(CONNECTION_ID_MASK)).unwrap_or(0),
        flag_number,
    })
}

// ---------------------------------------------------------------------------
// ACPI and interrupt routing
// ---------------------------------------------------------------------------

/// The ACPI VMBus device, `\_SB.VMBS` with `_HID "VMBus"`: Linux's
/// hv_vmbus finds the bus only through it. Its `_CRS` is an empty resource
/// template: Linux needs the method to exist, takes MMIO windows from it
/// only for framebuffer/vPCI, and ignores a legacy IRQ on x86.
pub struct VmbusAcpiDevice;

impl Aml for VmbusAcpiDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let hid = Name::new(Path::new("_HID"), &"VMBus");
        let uid = Name::new(Path::new("_UID"), &0u8);
        let ddn = Name::new(Path::new("_DDN"), &"VMBUS");
        let sta = Name::new(Path::new("_STA"), &0x0fu8);
        let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![]));
        Device::new(Path::new("VMBS"), vec![&hid, &uid, &ddn, &sta, &crs]).to_aml_bytes(sink);
    }
}

/// The routes KVM_CREATE_IRQCHIP installs: GSI 0-15 to both the PICs and
/// the IOAPIC pin of the same number, GSI 16-23 to the IOAPIC only.
/// `KVM_SET_GSI_ROUTING` replaces the whole table, so these must go with
/// any route added.
pub fn default_irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    let route = |gsi: u32, irqchip: u32, pin: u32| kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
        ..Default::default()
    };
    let mut routes = Vec::new();
    for gsi in 0..crate::layout::IOAPIC_NUM_PINS {
        routes.push(route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let pic = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(route(gsi, pic, gsi % 8));
        }
    }
    routes
}

/// A route of `gsi` to SINT `sint` of the VP with index `vp`.
pub fn sint_route(gsi: u32, vp: u32, sint: u8) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_HV_SINT,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            hv_sint: kvm_irq_routing_hv_sint {
                vcpu: vp,
                sint: u32::from(sint),
            },
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> Box<SynicPage> {
        Box::new(std::array::from_fn(|_| AtomicU64::new(0)))
    }

    fn bytes(page: &SynicPage) -> Vec<u8> {
        page.iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
            .collect()
    }

    #[test]
    fn leaves_say_hyperv_only() {
        let leaves = cpuid_leaves(4, HypervFeatures::default());
        let get = |f| *leaves.iter().find(|e| e.function == f).unwrap();
        let v = get(LEAF_VENDOR);
        let mut sig = Vec::new();
        for r in [v.ebx, v.ecx, v.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig, b"Microsoft Hv");
        assert_eq!(v.eax, LEAF_LIMITS);
        assert_eq!(&get(LEAF_INTERFACE).eax.to_le_bytes(), b"Hv#1");
        let f = get(LEAF_FEATURES);
        assert_eq!((f.eax, f.ebx, f.edx), (0xa76, 0x30, 0x100));
        assert_eq!(get(LEAF_ENLIGHTENMENTS).eax, 0x220);
        assert_eq!(get(LEAF_LIMITS).eax, 4);
        assert!(leaves
            .iter()
            .all(|e| (LEAF_VENDOR..=LEAF_LIMITS).contains(&e.function)));
    }

    #[test]
    fn features_are_masked_by_kvm() {
        let kvm = [leaf(LEAF_FEATURES, 0x7fff & !EAX_REFERENCE_TSC, 0x30, 0, 0)];
        let f = HypervFeatures::default().masked_by(&kvm).unwrap();
        assert_eq!(f.eax, 0xa76 & !EAX_REFERENCE_TSC);
        assert_eq!(f.edx, 0);
        let no_synic = [leaf(LEAF_FEATURES, 0x7fff & !EAX_SYNIC, 0x30, 0, 0)];
        assert!(matches!(
            HypervFeatures::default().masked_by(&no_synic),
            Err(HypervError::Missing(EAX_SYNIC))
        ));
        assert!(HypervFeatures::default().masked_by(&[]).is_err());
    }

    #[test]
    fn synic_pages_need_scontrol() {
        let mut r = SynicRegs {
            scontrol: 0,
            simp: 0x12_3000 | 1,
            siefp: 0x45_6000,
        };
        assert_eq!(r.message_page(), None);
        r.scontrol = 1;
        assert_eq!(r.message_page(), Some(0x12_3000));
        assert_eq!(r.event_flags_page(), None, "SIEFP not enabled");
    }

    #[test]
    fn message_goes_into_an_empty_slot() {
        let p = page();
        let msg = SynicMessage::new(1, &[0xaa; 16]).unwrap();
        assert_eq!(write_message(&p, 2, &msg), SlotWrite::Written);
        let b = bytes(&p);
        let s = &b[512..768];
        assert_eq!(u32_at(s, 0), 1, "message type");
        assert_eq!(s[4], 16, "payload size");
        assert_eq!(s[5], 0, "flags");
        assert_eq!(&s[16..32], &[0xaa; 16]);
        assert!(s[32..].iter().all(|&x| x == 0));
        assert!(
            b[..512].iter().chain(&b[768..]).all(|&x| x == 0),
            "other slots untouched"
        );
    }

    #[test]
    fn busy_slot_gets_msg_pending() {
        let p = page();
        let first = SynicMessage::new(1, &[1; 8]).unwrap();
        let second = SynicMessage::new(1, &[2; 8]).unwrap();
        assert_eq!(write_message(&p, 2, &first), SlotWrite::Written);
        assert_eq!(write_message(&p, 2, &second), SlotWrite::Busy);
        let b = bytes(&p);
        assert_eq!(b[512 + 5] & 1, 1, "msg_pending set");
        assert_eq!(&b[512 + 16..512 + 24], &[1; 8], "first message intact");

        // The guest consumes: type to 0 (it then sees msg_pending and EOMs).
        let hdr = &p[64];
        let old = hdr.load(Ordering::Relaxed);
        hdr.store(old & !0xffff_ffff, Ordering::Relaxed);
        assert_eq!(write_message(&p, 2, &second), SlotWrite::Written);
        let b = bytes(&p);
        assert_eq!(b[512 + 5], 0, "pending flag cleared by the new header");
        assert_eq!(&b[512 + 16..512 + 24], &[2; 8]);
    }

    #[test]
    fn pending_flag_on_a_slot_freed_meanwhile() {
        // Type 0 but msg_pending left from before: the slot is free.
        let p = page();
        p[64].store(HEADER_MSG_PENDING, Ordering::Relaxed);
        let msg = SynicMessage::new(1, &[]).unwrap();
        assert_eq!(write_message(&p, 2, &msg), SlotWrite::Written);
        assert_eq!(p[64].load(Ordering::Relaxed), 1);
    }

    #[test]
    fn messages_are_checked() {
        assert!(SynicMessage::new(0, &[]).is_none());
        assert!(SynicMessage::new(1, &[0; 241]).is_none());
        assert_eq!(
            SynicMessage::new(1, &[0; 240]).unwrap().payload().len(),
            240
        );
    }

    #[test]
    fn event_flags() {
        let p = page();
        assert!(set_event_flag(&p, 2, 1));
        assert!(!set_event_flag(&p, 2, 1), "already pending");
        assert!(set_event_flag(&p, 2, 2047));
        assert!(!set_event_flag(&p, 2, 2048));
        let b = bytes(&p);
        assert_eq!(b[512], 0b10);
        assert_eq!(b[767], 0x80);
        assert_eq!(b.iter().filter(|&&x| x != 0).count(), 2);
    }

    #[test]
    fn hypercall_control() {
        let c = HypercallControl::decode(0x1005d);
        assert_eq!((c.code, c.fast), (HVCALL_SIGNAL_EVENT, true));
        assert!(c.is_simple());
        let c = HypercallControl::decode(0x0fff_0003_0000_805c | (5 << 17));
        assert_eq!(c.code, 0x805c);
        assert_eq!((c.rep_count, c.rep_start, c.var_header_size), (3, 0xfff, 5));
        assert!(!c.is_simple());
    }

    #[test]
    fn input_gpa_checks() {
        assert_eq!(check_input_gpa(0x1000, 256), Ok(()));
        assert_eq!(check_input_gpa(0x1f00, 256), Ok(()));
        assert_eq!(
            check_input_gpa(0x1f08, 256),
            Err(HvStatus::InvalidAlignment)
        );
        assert_eq!(check_input_gpa(0x1004, 8), Err(HvStatus::InvalidAlignment));
    }

    fn input(conn: u32, ty: u32, size: u32, payload: &[u8]) -> [u8; POST_MESSAGE_INPUT_SIZE] {
        let mut b = [0u8; POST_MESSAGE_INPUT_SIZE];
        b[0..4].copy_from_slice(&conn.to_le_bytes());
        b[8..12].copy_from_slice(&ty.to_le_bytes());
        b[12..16].copy_from_slice(&size.to_le_bytes());
        b[16..16 + payload.len()].copy_from_slice(payload);
        b
    }

    #[test]
    fn post_message_input() {
        let m = parse_post_message(&input(0xff00_0001, 1, 4, &[1, 2, 3, 4, 5])).unwrap();
        assert_eq!(m.connection_id, 1, "reserved top byte ignored");
        assert_eq!(m.message.message_type(), 1);
        assert_eq!(m.message.payload(), &[1, 2, 3, 4]);
        let bad = HvStatus::InvalidHypercallInput;
        assert_eq!(parse_post_message(&input(1, 1, 241, &[])), Err(bad));
        assert_eq!(parse_post_message(&input(1, 1, u32::MAX, &[])), Err(bad));
        assert_eq!(parse_post_message(&input(1, 0, 4, &[])), Err(bad));
        assert_eq!(parse_post_message(&input(1, 0x8000_0001, 4, &[])), Err(bad));
        assert!(parse_post_message(&input(1, 1, 240, &[7; 240])).is_ok());
    }

    #[test]
    fn signal_event_param() {
        assert_eq!(
            parse_signal_event(0x12),
            Ok(SignalEvent {
                connection_id: 0x12,
                flag_number: 0
            })
        );
        assert_eq!(parse_signal_event(1 << 32), Err(HvStatus::InvalidPortId));
        assert_eq!(
            parse_signal_event(1 << 24),
            Err(HvStatus::InvalidHypercallInput)
        );
        assert_eq!(
            parse_signal_event(1 << 63),
            Err(HvStatus::InvalidHypercallInput)
        );
    }

    #[test]
    fn vmbus_aml() {
        let mut b = Vec::new();
        VmbusAcpiDevice.to_aml_bytes(&mut b);
        let has = |n: &[u8]| b.windows(n.len()).any(|w| w == n);
        assert!(has(b"VMBS") && has(b"VMBus\0") && has(b"_CRS") && has(b"_STA"));
        // Empty resource template: end tag 0x79 and a zero checksum.
        assert!(has(&[0x79, 0]));
    }

    #[test]
    fn routes_keep_the_irqchip_defaults() {
        let r = default_irqchip_routes();
        assert_eq!(r.len(), 16 * 2 + 8);
        // SAFETY: these entries are irqchip routes, so `irqchip` is the
        // initialised union member.
        let chip = |e: &kvm_irq_routing_entry| unsafe { e.u.irqchip };
        let gsi9: Vec<_> = r
            .iter()
            .filter(|e| e.gsi == 9)
            .map(|e| (chip(e).irqchip, chip(e).pin))
            .collect();
        assert_eq!(
            gsi9,
            vec![(KVM_IRQCHIP_IOAPIC, 9), (KVM_IRQCHIP_PIC_SLAVE, 1)]
        );
        assert!(r
            .iter()
            .filter(|e| e.gsi >= 16)
            .all(|e| chip(e).irqchip == KVM_IRQCHIP_IOAPIC));
        let s = sint_route(24, 3, VMBUS_SINT);
        // SAFETY: a SINT route, so `hv_sint` is the initialised member.
        let hv = unsafe { s.u.hv_sint };
        assert_eq!(
            (s.gsi, s.type_, hv.vcpu, hv.sint),
            (24, KVM_IRQ_ROUTING_HV_SINT, 3, 2)
        );
    }
}
