//! A vCPU: its file descriptor and a run loop step that turns KVM exits into plain values the
//! VMM can act on without holding borrows of the vCPU's run structure.

use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
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
    /// The guest read `len` bytes from I/O port `port` (answering it is not wired yet: the
    /// guest sees zeros).
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
    /// The guest read `len` bytes from MMIO address `addr` (not wired yet: the guest sees zeros).
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

/// A vCPU of a [`super::vm::Vm`].
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
}

impl Vcpu {
    /// Creates vCPU `index` on `vm`.
    pub(crate) fn new(vm: &VmFd, index: u8) -> Result<Self, VcpuError> {
        let fd = kvm("KVM_CREATE_VCPU", vm.create_vcpu(u64::from(index)))?;
        Ok(Self { fd, index })
    }

    /// The vCPU's index (its APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The vCPU file descriptor.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Puts the vCPU in real mode with all segment bases 0 and `ip` as the entry point (for tiny
    /// test payloads; Linux boot sets up long mode instead).
    pub fn set_real_mode_entry(&mut self, ip: u16) -> Result<(), VcpuError> {
        let mut sregs = kvm("KVM_GET_SREGS", self.fd.get_sregs())?;
        let segments = [&mut sregs.cs, &mut sregs.ds, &mut sregs.es];
        for seg in segments
            .into_iter()
            .chain([&mut sregs.ss, &mut sregs.fs, &mut sregs.gs])
        {
            (seg.base, seg.selector) = (0, 0);
        }
        kvm("KVM_SET_SREGS", self.fd.set_sregs(&sregs))?;
        let mut regs = kvm("KVM_GET_REGS", self.fd.get_regs())?;
        regs.rip = u64::from(ip);
        regs.rflags = 0x2;
        kvm("KVM_SET_REGS", self.fd.set_regs(&regs))
    }

    /// Runs the vCPU until its next exit. An interrupted run (`EINTR`) is reported as
    /// [`VcpuExitKind::Interrupted`], not as an error.
    pub fn run(&mut self) -> Result<VcpuExitKind, VcpuError> {
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
            VcpuExit::Hlt => VcpuExitKind::Hlt,
            VcpuExit::IoOut(port, data) => VcpuExitKind::IoOut {
                port,
                data: data.to_vec(),
            },
            VcpuExit::IoIn(port, data) => VcpuExitKind::IoIn {
                port,
                len: data.len(),
            },
            VcpuExit::MmioWrite(addr, data) => VcpuExitKind::MmioWrite {
                addr,
                data: data.to_vec(),
            },
            VcpuExit::MmioRead(addr, data) => VcpuExitKind::MmioRead {
                addr,
                len: data.len(),
            },
            VcpuExit::Shutdown => VcpuExitKind::Shutdown,
            VcpuExit::Intr => VcpuExitKind::Interrupted,
            other => VcpuExitKind::Other(format!("{other:?}")),
        })
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
}
