//! Per-vCPU CPUID, derived from `KVM_GET_SUPPORTED_CPUID`.
//!
//! Topology presented to the guest: one socket, `num_cpus` cores, one
//! thread per core; the (x2)APIC id of vCPU `n` is `n`.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use kvm_ioctls::VcpuFd;

/// First hypervisor CPUID leaf.
pub const HYPERVISOR_LEAF_BASE: u32 = 0x4000_0000;
/// Last leaf of the hypervisor CPUID range.
pub const HYPERVISOR_LEAF_LAST: u32 = 0x4000_00ff;
/// Last leaf a guest scans for hypervisor signatures (Linux looks for
/// KVM's in steps of 0x100 up to here).
const HYPERVISOR_RANGE_LAST: u32 = 0x4000_ffff;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_THERMAL_POWER: u32 = 0x6;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

/// Leaf 1 ECX: TSC-deadline mode of the LAPIC timer.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: hypervisor present.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: multi-threading (logical processor count valid).
const EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE_SIZE: u32 = 8;
/// Topology level types of leaves 0xb / 0x1f.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Which hypervisor identification leaves (0x40000000..) the guest sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HypervisorLeaves {
    /// KVM's own paravirt leaves (`KVMKVMKVM`, kvmclock, ...), as KVM reports them.
    #[default]
    Kvm,
    /// Hyper-V leaves (`Microsoft Hv`, `Hv#1`) offering these features,
    /// instead of KVM's: see [`crate::hyperv::cpuid_leaves`].
    HyperV(crate::hyperv::HypervFeatures),
}

/// Options of CPUID normalization.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidOptions {
    /// Hypervisor leaves to expose.
    pub hypervisor: HypervisorLeaves,
    /// Offer the TSC-deadline LAPIC timer. KVM emulates it when it has
    /// `KVM_CAP_TSC_DEADLINE_TIMER`, but KVM_GET_SUPPORTED_CPUID does not
    /// report it, so the VMM must ask for it.
    pub tsc_deadline: bool,
}

/// Errors of CPUID setup.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// A VM needs at least one vCPU.
    #[error("the number of vCPUs must be at least 1")]
    NoCpus,
    /// The vCPU index is out of range.
    #[error("vCPU id {cpu_id} is out of range for a VM with {num_cpus} vCPUs")]
    CpuIdOutOfRange {
        /// vCPU index.
        cpu_id: u8,
        /// vCPU count.
        num_cpus: u8,
    },
    /// Too many CPUID entries for KVM.
    #[error("too many CPUID entries for KVM: {0:?}")]
    TooManyEntries(vmm_sys_util::fam::Error),
    /// KVM_SET_CPUID2 failed.
    #[error("cannot set the vCPU CPUID (KVM_SET_CPUID2): {0}")]
    SetCpuid(#[source] kvm_ioctls::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, CpuidError>;

/// Number of APIC id bits for the core level (enough for `num_cpus`).
fn core_bits(num_cpus: u8) -> u32 {
    if num_cpus <= 1 {
        0
    } else {
        u8::BITS - (num_cpus - 1).leading_zeros()
    }
}

fn topology_entry(
    function: u32,
    index: u32,
    eax: u32,
    ebx: u32,
    level_type: u32,
    x2apic_id: u32,
) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | (index & 0xff),
        edx: x2apic_id,
        ..Default::default()
    }
}

/// Replaces all entries of topology leaf `function` (0xb or 0x1f) with our
/// two levels (thread, core) and the terminating invalid level.
fn set_topology_leaf(
    cpuid: &mut CpuId,
    function: u32,
    cpu_id: u32,
    num_cpus: u32,
    bits: u32,
) -> Result<()> {
    cpuid.retain(|e| e.function != function);
    for e in [
        topology_entry(function, 0, 0, 1, LEVEL_TYPE_SMT, cpu_id),
        topology_entry(function, 1, bits, num_cpus, LEVEL_TYPE_CORE, cpu_id),
        topology_entry(function, 2, 0, 0, 0, cpu_id),
    ] {
        cpuid.push(e).map_err(CpuidError::TooManyEntries)?;
    }
    Ok(())
}

/// Rewrites `cpuid` (a copy of KVM's supported CPUID) for vCPU `cpu_id` of
/// `num_cpus`.
pub fn normalize_cpuid(
    cpuid: &mut CpuId,
    cpu_id: u8,
    num_cpus: u8,
    opts: &CpuidOptions,
) -> Result<()> {
    if num_cpus == 0 {
        return Err(CpuidError::NoCpus);
    }
    if cpu_id >= num_cpus {
        return Err(CpuidError::CpuIdOutOfRange { cpu_id, num_cpus });
    }
    let bits = core_bits(num_cpus);
    // Addressable core ids per package, a power of two.
    let ids_per_pkg: u32 = 1 << bits;
    let apic_id = u32::from(cpu_id);
    let n = u32::from(num_cpus);

    let max_basic = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);

    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (apic_id << 24) | (ids_per_pkg.min(0xff) << 16) | (CLFLUSH_LINE_SIZE << 8);
                e.ecx |= ECX_HYPERVISOR;
                if opts.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                if n > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                if e.eax & 0x1f == 0 {
                    continue; // No more caches.
                }
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level <= 2 {
                    0
                } else {
                    (ids_per_pkg - 1).min(0xfff)
                };
                e.eax &= !(0xfc00_0000 | 0x03ff_c000);
                e.eax |= ((ids_per_pkg - 1).min(0x3f) << 26) | (sharing << 14);
            }
            LEAF_THERMAL_POWER | LEAF_PMU => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_AMD_ADDR_SIZES => {
                e.ecx = (e.ecx & !0xf0ff) | (bits << 12) | (n - 1);
            }
            LEAF_AMD_CACHE_TOPOLOGY => {
                if e.eax & 0x1f == 0 {
                    continue;
                }
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level <= 2 {
                    0
                } else {
                    (ids_per_pkg - 1).min(0xfff)
                };
                e.eax = (e.eax & !0x03ff_c000) | (sharing << 14);
            }
            LEAF_AMD_EXT_APIC_ID => {
                e.eax = apic_id;
                // Compute unit id = core id, one thread per compute unit.
                e.ebx = apic_id & 0xff;
                // Node 0, one node per processor.
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }

    if max_basic >= LEAF_TOPOLOGY {
        set_topology_leaf(cpuid, LEAF_TOPOLOGY, apic_id, n, bits)?;
    }
    if max_basic >= LEAF_TOPOLOGY_V2
        && cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == LEAF_TOPOLOGY_V2)
    {
        set_topology_leaf(cpuid, LEAF_TOPOLOGY_V2, apic_id, n, bits)?;
    }
    if let HypervisorLeaves::HyperV(features) = opts.hypervisor {
        // Only Hyper-V's leaves: with KVM's also present Linux picks KVM.
        cpuid.retain(|e| !(HYPERVISOR_LEAF_BASE..=HYPERVISOR_RANGE_LAST).contains(&e.function));
        for e in crate::hyperv::cpuid_leaves(num_cpus, features) {
            cpuid.push(e).map_err(CpuidError::TooManyEntries)?;
        }
    }
    // HypervisorLeaves::Kvm: the 0x40000000.. leaves stay as KVM reports them.
    Ok(())
}

/// Normalizes a copy of `supported` (from `Kvm::get_supported_cpuid`) for
/// vCPU `cpu_id` of `num_cpus` and sets it with `KVM_SET_CPUID2`.
pub fn setup_cpuid(
    supported: &CpuId,
    vcpu: &VcpuFd,
    cpu_id: u8,
    num_cpus: u8,
    opts: &CpuidOptions,
) -> Result<()> {
    let mut cpuid = supported.clone();
    normalize_cpuid(&mut cpuid, cpu_id, num_cpus, opts)?;
    vcpu.set_cpuid2(&cpuid).map_err(CpuidError::SetCpuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            leaf(0, 0, 0x1f, 0, 0, 0),
            leaf(1, 0, 0x800f12, 0xff00_0000, 0x1, 0),
            leaf(4, 0, 0x121, 0, 0, 0),
            leaf(4, 3, 0x163, 0, 0, 0),
            leaf(4, 4, 0, 0, 0, 0),
            leaf(6, 0, 0x4, 0, 1, 0),
            leaf(0xa, 0, 0x0703_0105, 0, 0, 0),
            leaf(0xb, 0, 1, 2, 0x100, 7),
            leaf(0x1f, 0, 1, 2, 0x100, 7),
            leaf(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            leaf(0x8000_0008, 0, 0x3030, 0, 0xffff, 0),
            leaf(0x8000_001e, 0, 9, 9, 9, 9),
        ])
        .unwrap()
    }

    fn get(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn core_bits_values() {
        assert_eq!(core_bits(1), 0);
        assert_eq!(core_bits(2), 1);
        assert_eq!(core_bits(3), 2);
        assert_eq!(core_bits(4), 2);
        assert_eq!(core_bits(5), 3);
        assert_eq!(core_bits(255), 8);
    }

    #[test]
    fn tsc_deadline_is_offered_on_request() {
        let mut c = sample();
        let opts = CpuidOptions {
            tsc_deadline: true,
            ..Default::default()
        };
        normalize_cpuid(&mut c, 0, 1, &opts).unwrap();
        assert_ne!(get(&c, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn normalizes_topology() {
        let mut c = sample();
        normalize_cpuid(&mut c, 2, 3, &CpuidOptions::default()).unwrap();
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!((l1.ebx >> 8) & 0xff, 8);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(l1.ecx & ECX_TSC_DEADLINE, 0, "only offered when asked");

        assert_eq!(get(&c, 4, 0).eax >> 26, 3);
        assert_eq!((get(&c, 4, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((get(&c, 4, 3).eax >> 14) & 0xfff, 3);
        assert_eq!(get(&c, 4, 4).eax, 0);

        let l6 = get(&c, 6, 0);
        assert_eq!((l6.eax, l6.ecx), (0, 0));
        assert_eq!(get(&c, 0xa, 0).eax, 0);

        for f in [0xb, 0x1f] {
            let smt = get(&c, f, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
            assert_eq!(smt.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
            let core = get(&c, f, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
            let end = get(&c, f, 2);
            assert_eq!((end.ebx, (end.ecx >> 8) & 0xff, end.edx), (0, 0, 2));
        }

        let amd = get(&c, 0x8000_0008, 0);
        assert_eq!(amd.ecx & 0xff, 2);
        assert_eq!((amd.ecx >> 12) & 0xf, 2);
        assert_eq!(get(&c, 0x8000_001e, 0).eax, 2);

        // KVM paravirt leaves untouched.
        assert_eq!(get(&c, 0x4000_0000, 0).ebx, 0x4b4d_564b);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut c = sample();
        normalize_cpuid(&mut c, 0, 1, &CpuidOptions::default()).unwrap();
        assert_eq!(get(&c, 1, 0).edx & EDX_HTT, 0);
        assert_eq!((get(&c, 1, 0).ebx >> 16) & 0xff, 1);
    }

    #[test]
    fn rejects_bad_ids() {
        let mut c = sample();
        assert!(matches!(
            normalize_cpuid(&mut c, 3, 3, &CpuidOptions::default()),
            Err(CpuidError::CpuIdOutOfRange { .. })
        ));
        assert!(matches!(
            normalize_cpuid(&mut c, 0, 0, &CpuidOptions::default()),
            Err(CpuidError::NoCpus)
        ));
    }

    #[test]
    fn hyperv_leaves_replace_kvm_leaves() {
        let mut c = sample();
        c.push(leaf(0x4000_0001, 0, 0x0100_00fb, 0, 0, 0)).unwrap();
        c.push(leaf(
            0x4000_0100,
            0,
            0x4000_0101,
            0x4b4d_564b,
            0x564b_4d56,
            0x4d,
        ))
        .unwrap();
        let hv = CpuidOptions {
            hypervisor: HypervisorLeaves::HyperV(Default::default()),
            ..Default::default()
        };
        normalize_cpuid(&mut c, 1, 2, &hv).unwrap();
        let sig = get(&c, 0x4000_0000, 0);
        assert_eq!(sig.ebx, crate::hyperv::VENDOR_SIGNATURE[0]);
        assert_eq!(
            get(&c, 0x4000_0001, 0).eax,
            crate::hyperv::INTERFACE_SIGNATURE
        );
        assert_eq!(get(&c, 0x4000_0005, 0).eax, 2);
        let hv_leaves = c
            .as_slice()
            .iter()
            .filter(|e| e.function >= 0x4000_0000 && e.function <= 0x4000_ffff)
            .count();
        assert_eq!(hv_leaves, 6, "no KVM leaf is left, at 0x40000000 or above");
        assert_ne!(get(&c, 1, 0).ecx & ECX_HYPERVISOR, 0);
    }
}
