//! The CPUID a vCPU sees: what KVM supports on this host (`KVM_GET_SUPPORTED_CPUID`), normalised
//! for one vCPU of an N-vCPU VM — its APIC id, a flat topology of N cores in one package with
//! one thread each, and the hypervisor bit set.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// CPUID.1:ECX bit 31, "running under a hypervisor".
const HYPERVISOR_BIT: u32 = 1 << 31;
/// CPUID.1:EDX bit 28, "more than one logical processor per package".
const HTT_BIT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes), CPUID.1:EBX bits 15:8.
const CLFLUSH_LINE: u32 = 8;
/// Extended topology level types (CPUID.0xB/0x1F:ECX bits 15:8).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `count` items (the APIC id shift of a topology level).
fn id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

fn normalise_entry(e: &mut kvm_cpuid_entry2, apic_id: u32, vcpus: u32) {
    match e.function {
        0x1 => {
            e.ebx = (apic_id << 24) | ((vcpus & 0xff) << 16) | (CLFLUSH_LINE << 8);
            e.ecx |= HYPERVISOR_BIT;
            if vcpus > 1 {
                e.edx |= HTT_BIT;
            } else {
                e.edx &= !HTT_BIT;
            }
        }
        // Deterministic cache parameters: cores per package, and how many logical processors
        // share each cache (only the last level is shared between our cores).
        0x4 => {
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { vcpus - 1 } else { 0 };
            e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((vcpus - 1) & 0x3f) << 26);
        }
        0xb | 0x1f => {
            e.edx = apic_id;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (LEVEL_SMT << 8) | e.index;
                }
                1 => {
                    e.eax = id_bits(vcpus);
                    e.ebx = vcpus;
                    e.ecx = (LEVEL_CORE << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        // AMD: number of cores (NC) and the APIC id bits that number them.
        0x8000_0008 => {
            e.ecx = (e.ecx & !0xf0ff) | (id_bits(vcpus) << 12) | ((vcpus - 1) & 0xff);
        }
        // AMD: extended APIC id, one core per compute unit, one node.
        0x8000_001e => {
            e.eax = apic_id;
            e.ebx = apic_id & 0xff;
            e.ecx = 0;
        }
        _ => {}
    }
}

/// The CPUID of vCPU `index` (its APIC id) of a VM with `vcpus` vCPUs, from the host's
/// supported CPUID.
pub fn for_vcpu(supported: &CpuId, index: u8, vcpus: u8) -> CpuId {
    let mut cpuid = supported.clone();
    let vcpus = u32::from(vcpus.max(1));
    for e in cpuid.as_mut_slice() {
        normalise_entry(e, u32::from(index), vcpus);
    }
    cpuid
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
            ecx: 0x0000_0001,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .expect("entry")
    }

    #[test]
    fn apic_ids_topology_and_hypervisor_bit() {
        let supported = CpuId::from_entries(&[
            entry(0x1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x8000_001e, 0),
        ])
        .expect("cpuid");
        let c = for_vcpu(&supported, 3, 4);
        let leaf1 = find(&c, 0x1, 0);
        assert_eq!(leaf1.ebx >> 24, 3, "APIC id");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_ne!(leaf1.ecx & HYPERVISOR_BIT, 0);
        assert_eq!(find(&c, 0xb, 0).edx, 3);
        assert_eq!(find(&c, 0xb, 1).ebx, 4);
        assert_eq!(find(&c, 0xb, 1).eax, 2, "4 cores need 2 id bits");
        assert_eq!(find(&c, 0xb, 2).ecx >> 8, 0, "no level beyond cores");
        assert_eq!(find(&c, 0x8000_001e, 0).eax, 3);

        let single = for_vcpu(&supported, 0, 1);
        assert_eq!(find(&single, 0x1, 0).edx & HTT_BIT, 0);
        assert_eq!(find(&single, 0xb, 1).eax, 0);
    }

    #[test]
    fn the_hosts_supported_cpuid_normalises_for_every_vcpu() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("supported cpuid");
        for i in 0..2u8 {
            let c = for_vcpu(&supported, i, 2);
            assert_eq!(c.as_slice().len(), supported.as_slice().len());
            assert_eq!(find(&c, 0x1, 0).ebx >> 24, u32::from(i));
        }
    }
}
