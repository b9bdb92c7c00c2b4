//! A vCPU: its file descriptor, a run loop step that turns KVM exits into plain values the VMM
//! can act on without holding borrows of the vCPU's run structure, and its state as a plain
//! serialisable struct ([`VcpuState`]) captured and restored with the KVM_GET/SET ioctls.

use kvm_bindings::{
    Msrs, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::devices::bus::Bus;
use serde::{Deserialize, Serialize};

/// What can go wrong with a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("KVM {op} on vCPU failed: {source}")]
    Kvm {
        /// The operation that failed.
        op: &'static str,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// KVM read or wrote fewer MSRs than asked for.
    #[error("KVM {op} handled {done} of {wanted} MSRs")]
    Msrs {
        /// The operation.
        op: &'static str,
        /// MSRs handled.
        done: usize,
        /// MSRs asked for.
        wanted: usize,
    },
    /// The MSR list could not be built.
    #[error("MSR list: {0}")]
    MsrList(String),
    /// The state to restore does not fit this vCPU (LAPIC present in one and not the other).
    #[error("vCPU state mismatch: {0}")]
    Mismatch(&'static str),
}

fn kvm<T>(op: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
    r.map_err(|source| VcpuError::Kvm { op, source })
}

/// Why `KVM_RUN` returned, as an owned value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VcpuExitKind {
    /// The guest executed `hlt`.
    Hlt,
    /// The guest wrote `data` to I/O port `port`.
    IoOut {
        /// The port.
        port: u16,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// The guest read `len` bytes from I/O port `port` (answered by the port I/O bus).
    IoIn {
        /// The port.
        port: u16,
        /// Number of bytes read.
        len: usize,
    },
    /// The guest wrote to MMIO address `addr`.
    MmioWrite {
        /// Guest physical address.
        addr: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// The guest read `len` bytes from MMIO address `addr` (answered by the MMIO bus).
    MmioRead {
        /// Guest physical address.
        addr: u64,
        /// Number of bytes read.
        len: usize,
    },
    /// The guest shut down (triple fault or similar).
    Shutdown,
    /// `KVM_RUN` was interrupted (signal or immediate exit).
    Interrupted,
    /// Any other exit, by its debug name.
    Other(String),
}

/// The architectural state of one x86-64 vCPU, in the order it is restored.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU index (APIC id).
    pub index: u8,
    /// Multiprocessing state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (the legacy 4 KiB KVM_GET_XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers, when the VM has an in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    /// Model-specific registers (index and value), those of [`SAVED_MSRS`] KVM supports.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs and SMM state.
    pub events: kvm_vcpu_events,
}

/// MSRs captured with a vCPU when KVM supports them: SYSENTER, syscall, TSC, PAT, misc enable,
/// TSC deadline and TSC_AUX, and KVM's paravirtual clock, async PF, steal time and PV EOI MSRs.
pub const SAVED_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0x6e0,       // IA32_TSC_DEADLINE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x4b56_4d00, // MSR_KVM_WALL_CLOCK_NEW
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
    0x4b56_4d02, // MSR_KVM_ASYNC_PF_EN
    0x4b56_4d03, // MSR_KVM_STEAL_TIME
    0x4b56_4d04, // MSR_KVM_PV_EOI_EN
];

/// A vCPU of a [`super::vm::Vm`].
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    msr_indices: Vec<u32>,
    lapic: bool,
}

impl Vcpu {
    /// Creates vCPU `index` on `vm`.
    /// `msr_indices` are the MSRs its state includes; `lapic` whether the VM has an in-kernel
    /// irqchip (and so a LAPIC to capture).
    pub(crate) fn new(
        vm: &VmFd,
        index: u8,
        msr_indices: Vec<u32>,
        lapic: bool,
    ) -> Result<Self, VcpuError> {
        let fd = kvm("KVM_CREATE_VCPU", vm.create_vcpu(u64::from(index)))?;
        Ok(Self {
            fd,
            index,
            msr_indices,
            lapic,
        })
    }

    /// Captures the vCPU's state. The vCPU must be out of `KVM_RUN` (paused).
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let entries: Vec<kvm_msr_entry> = self
            .msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| VcpuError::MsrList(format!("{e:?}")))?;
        let done = kvm("KVM_GET_MSRS", self.fd.get_msrs(&mut msrs))?;
        if done != entries.len() {
            return Err(VcpuError::Msrs {
                op: "KVM_GET_MSRS",
                done,
                wanted: entries.len(),
            });
        }
        Ok(VcpuState {
            index: self.index,
            mp_state: kvm("KVM_GET_MP_STATE", self.fd.get_mp_state())?,
            regs: kvm("KVM_GET_REGS", self.fd.get_regs())?,
            sregs: kvm("KVM_GET_SREGS", self.fd.get_sregs())?,
            xsave: kvm("KVM_GET_XSAVE", self.fd.get_xsave())?,
            xcrs: kvm("KVM_GET_XCRS", self.fd.get_xcrs())?,
            debugregs: kvm("KVM_GET_DEBUGREGS", self.fd.get_debug_regs())?,
            lapic: if self.lapic {
                Some(kvm("KVM_GET_LAPIC", self.fd.get_lapic())?)
            } else {
                None
            },
            msrs: msrs.as_slice().to_vec(),
            events: kvm("KVM_GET_VCPU_EVENTS", self.fd.get_vcpu_events())?,
        })
    }

    /// Restores captured state into this (fresh) vCPU, in the order KVM needs: MP state,
    /// registers, segment registers, xsave, XCRs, debug registers, LAPIC, MSRs, then events.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        if state.lapic.is_some() != self.lapic {
            return Err(VcpuError::Mismatch(
                "LAPIC present in only one of state and VM",
            ));
        }
        kvm("KVM_SET_MP_STATE", self.fd.set_mp_state(state.mp_state))?;
        kvm("KVM_SET_REGS", self.fd.set_regs(&state.regs))?;
        kvm("KVM_SET_SREGS", self.fd.set_sregs(&state.sregs))?;
        // SAFETY: the xsave area is the fixed-size legacy `kvm_xsave` that KVM_GET_XSAVE filled,
        // so KVM reads no further than the struct.
        kvm("KVM_SET_XSAVE", unsafe { self.fd.set_xsave(&state.xsave) })?;
        kvm("KVM_SET_XCRS", self.fd.set_xcrs(&state.xcrs))?;
        kvm(
            "KVM_SET_DEBUGREGS",
            self.fd.set_debug_regs(&state.debugregs),
        )?;
        if let Some(lapic) = &state.lapic {
            kvm("KVM_SET_LAPIC", self.fd.set_lapic(lapic))?;
        }
        let msrs =
            Msrs::from_entries(&state.msrs).map_err(|e| VcpuError::MsrList(format!("{e:?}")))?;
        let done = kvm("KVM_SET_MSRS", self.fd.set_msrs(&msrs))?;
        if done != state.msrs.len() {
            return Err(VcpuError::Msrs {
                op: "KVM_SET_MSRS",
                done,
                wanted: state.msrs.len(),
            });
        }
        kvm(
            "KVM_SET_VCPU_EVENTS",
            self.fd.set_vcpu_events(&state.events),
        )
    }

    /// The vCPU's index (its APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The vCPU file descriptor.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The vCPU file descriptor, mutably (for the `kvm_run` page).
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Puts the vCPU in real mode with all segment bases 0 and `ip` as the entry point (for tiny
    /// test payloads; Linux boot sets up long mode instead).
    pub fn set_real_mode_entry(&mut self, ip: u16) -> Result<(), VcpuError> {
        self.set_real_mode_entry_at(0, ip)
    }

    /// Puts the vCPU in real mode at `segment:ip`: CS is `segment` (base `segment << 4`), the
    /// data and stack segments are 0.
    pub fn set_real_mode_entry_at(&mut self, segment: u16, ip: u16) -> Result<(), VcpuError> {
        let mut sregs = kvm("KVM_GET_SREGS", self.fd.get_sregs())?;
        let segments = [&mut sregs.ds, &mut sregs.es];
        for seg in segments
            .into_iter()
            .chain([&mut sregs.ss, &mut sregs.fs, &mut sregs.gs])
        {
            (seg.base, seg.selector) = (0, 0);
        }
        (sregs.cs.base, sregs.cs.selector) = (u64::from(segment) << 4, segment);
        kvm("KVM_SET_SREGS", self.fd.set_sregs(&sregs))?;
        let mut regs = kvm("KVM_GET_REGS", self.fd.get_regs())?;
        regs.rip = u64::from(ip);
        regs.rflags = 0x2;
        kvm("KVM_SET_REGS", self.fd.set_regs(&regs))
    }

    /// Runs the vCPU until its next exit, handling port I/O and MMIO through `pio` and `mmio`
    /// (reads are answered before the vCPU continues). The handled exit is still returned so
    /// the caller can count or trace it.
    pub fn run_with_buses(&mut self, pio: &Bus, mmio: &Bus) -> Result<VcpuExitKind, VcpuError> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(VcpuExitKind::Interrupted);
            }
            Err(source) => {
                return Err(VcpuError::Kvm {
                    op: "KVM_RUN",
                    source,
                });
            }
        };
        Ok(match exit {
            VcpuExit::IoIn(port, data) => {
                pio.read(u64::from(port), data);
                VcpuExitKind::IoIn {
                    port,
                    len: data.len(),
                }
            }
            VcpuExit::IoOut(port, data) => {
                pio.write(u64::from(port), data);
                VcpuExitKind::IoOut {
                    port,
                    data: data.to_vec(),
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                mmio.read(addr, data);
                VcpuExitKind::MmioRead {
                    addr,
                    len: data.len(),
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                mmio.write(addr, data);
                VcpuExitKind::MmioWrite {
                    addr,
                    data: data.to_vec(),
                }
            }
            other => Self::convert(other),
        })
    }

    /// Runs the vCPU until its next exit without devices: port and MMIO reads see all ones,
    /// writes are only reported. An interrupted run (`EINTR`) is reported as
    /// [`VcpuExitKind::Interrupted`], not as an error.
    pub fn run(&mut self) -> Result<VcpuExitKind, VcpuError> {
        let empty = Bus::new();
        self.run_with_buses(&empty, &empty)
    }

    /// Converts the exits [`Vcpu::run_with_buses`] does not handle itself.
    fn convert(exit: VcpuExit<'_>) -> VcpuExitKind {
        match exit {
            VcpuExit::Hlt => VcpuExitKind::Hlt,
            VcpuExit::Shutdown => VcpuExitKind::Shutdown,
            VcpuExit::Intr => VcpuExitKind::Interrupted,
            other => VcpuExitKind::Other(format!("{other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm::memory::MemoryLayout;
    use crate::kvm::vm::Vm;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn port_io_exit_carries_the_data() {
        let vm = Vm::new(&MemoryLayout::single(4 * 4096)).expect("vm");
        let mut vcpu = vm.create_vcpu(0).expect("vcpu");
        // mov al, 0x42; out 0x80, al; hlt
        vm.memory()
            .write_slice(&[0xb0, 0x42, 0xe6, 0x80, 0xf4], GuestAddress(0x1000))
            .expect("code");
        vcpu.set_real_mode_entry(0x1000).expect("entry");
        assert_eq!(
            vcpu.run().expect("run"),
            VcpuExitKind::IoOut {
                port: 0x80,
                data: vec![0x42]
            }
        );
        assert_eq!(vcpu.run().expect("run"), VcpuExitKind::Hlt);
        assert_eq!(vcpu.index(), 0);
    }

    /// Real-mode loop: `inc bx; mov [0x3000], bx; mov ax, bx; out 0x80, al; jmp loop`. The
    /// counter lives in a register, so only a faithful vCPU state restore continues it.
    const COUNTER_LOOP: [u8; 11] = [
        0x43, 0x89, 0x1e, 0x00, 0x30, 0x89, 0xd8, 0xe6, 0x80, 0xeb, 0xf5,
    ];

    fn next_out(vcpu: &mut Vcpu) -> u8 {
        match vcpu.run().expect("run") {
            VcpuExitKind::IoOut { port: 0x80, data } => data[0],
            other => panic!("unexpected exit {other:?}"),
        }
    }

    #[test]
    fn state_round_trips_into_a_fresh_vm_on_the_same_memory() {
        let memory = MemoryLayout::single(16 * 4096).create().expect("memory");
        memory
            .write_slice(&COUNTER_LOOP, GuestAddress(0x1000))
            .expect("code");
        let vm = Vm::with_memory(memory.clone()).expect("vm");
        let mut vcpu = vm.create_vcpu(0).expect("vcpu");
        vcpu.set_real_mode_entry(0x1000).expect("entry");
        // An MSR value the restore must carry (SYSENTER_CS is supported everywhere).
        let sysenter = kvm_msr_entry {
            index: 0x174,
            data: 0x1234,
            ..Default::default()
        };
        let msrs = Msrs::from_entries(&[sysenter]).expect("msrs");
        assert_eq!(vcpu.fd().set_msrs(&msrs).expect("set msr"), 1);
        for expected in 1..=5u8 {
            assert_eq!(next_out(&mut vcpu), expected);
        }
        let state = vcpu.save_state().expect("save");
        assert!(
            state
                .msrs
                .iter()
                .any(|m| m.index == 0x174 && m.data == 0x1234)
        );
        let json = serde_json::to_string(&state).expect("serialise");
        drop(vcpu);
        drop(vm);

        // A fresh VM on the same memory, restored from the serialised state, continues counting.
        let restored: VcpuState = serde_json::from_str(&json).expect("deserialise");
        let vm2 = Vm::with_memory(memory.clone()).expect("vm2");
        let mut vcpu2 = vm2.create_vcpu(0).expect("vcpu2");
        vcpu2.restore_state(&restored).expect("restore");
        assert_eq!(next_out(&mut vcpu2), 6);
        assert_eq!(next_out(&mut vcpu2), 7);
        assert_eq!(
            memory
                .read_obj::<u16>(GuestAddress(0x3000))
                .expect("counter"),
            7
        );
        let again = vcpu2.save_state().expect("save again");
        assert!(
            again
                .msrs
                .iter()
                .any(|m| m.index == 0x174 && m.data == 0x1234)
        );
        assert_eq!(again.regs.rbx, 7);
    }

    #[test]
    fn lapic_state_is_captured_with_an_in_kernel_irqchip() {
        let mut vm = Vm::new(&MemoryLayout::single(16 * 4096)).expect("vm");
        vm.create_irqchip().expect("irqchip");
        assert!(vm.state().irqchip);
        let vcpu = vm.create_vcpu(0).expect("vcpu");
        let state = vcpu.save_state().expect("save");
        assert!(state.lapic.is_some());
        // A VM without an irqchip refuses state that carries a LAPIC, and the other way round.
        let plain = Vm::new(&MemoryLayout::single(16 * 4096)).expect("vm");
        let mut other = plain.create_vcpu(0).expect("vcpu");
        assert!(matches!(
            other.restore_state(&state),
            Err(VcpuError::Mismatch(_))
        ));
        let mut fresh = vm.create_vcpu(1).expect("vcpu 1");
        fresh.restore_state(&state).expect("restore with LAPIC");
    }
}
