//! CPUID as the guest sees it: KVM's supported set, normalised per vCPU so that the
//! topology (APIC ids, logical processor counts) matches the vCPUs we create and the
//! guest knows it runs on a hypervisor.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_AMD_CMP_LEGACY: u32 = 1 << 1;

/// Bits needed to hold `n` distinct ids.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Rewrites one entry for vCPU `cpu_id` of `num_cpus`: one socket, one thread per
/// core, `num_cpus` cores.
pub fn normalize_entry(entry: &mut kvm_cpuid_entry2, cpu_id: u8, num_cpus: u8) {
    let n = u32::from(num_cpus);
    let id = u32::from(cpu_id);
    match entry.function {
        LEAF_FEATURES => {
            // EBX: [31:24] initial APIC id, [23:16] logical processors per package.
            entry.ebx = (entry.ebx & 0x0000_ffff) | (id << 24) | (n << 16);
            entry.ecx |= ECX_HYPERVISOR;
            if n > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX: [31:26] cores per package - 1; [25:14] threads sharing this cache - 1.
            let cores_minus_1 = n.saturating_sub(1) & 0x3f;
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { n.saturating_sub(1) } else { 0 } & 0xfff;
            entry.eax = (entry.eax & 0x3fff) | (cores_minus_1 << 26) | (sharing << 14);
        }
        LEAF_EXT_TOPOLOGY => {
            // Sub-leaf 0: the thread level (1 thread per core); 1: the core level.
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = 1 << 8;
                }
                1 => {
                    entry.eax = bits_for(n);
                    entry.ebx = n;
                    entry.ecx = (2 << 8) | 1;
                }
                other => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = other & 0xff;
                }
            }
            entry.edx = id;
        }
        LEAF_V2_EXT_TOPOLOGY => {
            // Same topology as leaf 0xb; zero means "use 0xb".
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = entry.index & 0xff;
            entry.edx = id;
        }
        LEAF_AMD_EXT_FEATURES => {
            if n > 1 {
                entry.ecx |= ECX_AMD_CMP_LEGACY;
            } else {
                entry.ecx &= !ECX_AMD_CMP_LEGACY;
            }
        }
        LEAF_AMD_ADDR_SIZES => {
            // ECX: [15:12] APIC id size, [7:0] cores - 1.
            entry.ecx = (entry.ecx & !0xf0ff) | (bits_for(n) << 12) | (n.saturating_sub(1) & 0xff);
        }
        LEAF_AMD_TOPOLOGY => {
            entry.eax = id;
            entry.ebx = id & 0xff; // compute unit id, one thread per unit
            entry.ecx = 0; // node 0, one node per processor
            entry.edx = 0;
        }
        _ => {}
    }
}

/// Normalises every entry of `cpuid` for vCPU `cpu_id` of `num_cpus`.
pub fn normalize(cpuid: &mut CpuId, cpu_id: u8, num_cpus: u8) {
    for entry in cpuid.as_mut_slice() {
        normalize_entry(entry, cpu_id, num_cpus);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_leaf1_reports_apic_id_count_and_hypervisor() {
        let mut e = entry(1, 0);
        normalize_entry(&mut e, 3, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0xffff, "low bits kept");
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
        normalize_entry(&mut e, 0, 1);
        assert_eq!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn cpuid_leaf_b_describes_cores_and_x2apic_id() {
        let mut smt = entry(0xb, 0);
        let mut core = entry(0xb, 1);
        normalize_entry(&mut smt, 1, 2);
        normalize_entry(&mut core, 1, 2);
        assert_eq!((smt.ebx, smt.edx), (1, 1));
        assert_eq!((core.eax, core.ebx, core.edx), (1, 2, 1));
        assert_eq!((core.ecx >> 8) & 0xff, 2, "core level type");
    }

    #[test]
    fn cpuid_bits_for_counts() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
    }
}
