//! A tiny real-mode guest for checking KVM itself: hand-assembled code that writes one byte into
//! each of a chosen set of pages and halts, in a VM whose only memory slot has dirty logging on.
//!
//! It needs nothing but `/dev/kvm`, so it runs against the development machine's KVM (which
//! cannot boot Linux) as well as inside the KVM test box.

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// Pages of guest memory: 64 KiB, all reachable from real mode with DS = 0.
pub const GUEST_PAGES: u64 = 16;
/// Offset inside each target page that the payload writes.
const WRITE_OFFSET: u64 = 0x10;
/// The byte the payload writes.
pub const MARKER: u8 = 0x5a;

/// What can go wrong while running the payload.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The operation that failed.
        op: &'static str,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The guest stopped for something other than `hlt`.
    #[error("guest exited with {0} instead of halting")]
    UnexpectedExit(String),
    /// A page outside the guest or outside real-mode reach was asked for.
    #[error("page {0} is not writable by the payload (pages 0..{GUEST_PAGES}, not the code page)")]
    BadPage(u64),
}

fn kvm<T>(op: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, PayloadError> {
    r.map_err(|source| PayloadError::Kvm { op, source })
}

/// A one-vCPU real-mode VM with dirty logging on its single memory slot.
pub struct TinyVm {
    // Field order matters: the vCPU and VM file descriptors close before the memory unmaps.
    vcpu: VcpuFd,
    vm: VmFd,
    memory: GuestMemoryMmap,
}

impl TinyVm {
    /// Creates the VM on `/dev/kvm` with [`GUEST_PAGES`] pages of zeroed memory at address 0.
    pub fn new() -> Result<Self, PayloadError> {
        let kvm_fd = kvm("open /dev/kvm", Kvm::new())?;
        let vm = kvm("KVM_CREATE_VM", kvm_fd.create_vm())?;
        let size = (GUEST_PAGES * PAGE_SIZE) as usize;
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])
            .map_err(|e| PayloadError::Memory(e.to_string()))?;
        let host = memory
            .get_host_address(GuestAddress(0))
            .map_err(|e| PayloadError::Memory(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: size as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live mapping of `size` bytes owned by `memory`, which
        // this struct keeps alive for at least as long as the VM file descriptor.
        kvm("KVM_SET_USER_MEMORY_REGION", unsafe {
            vm.set_user_memory_region(region)
        })?;
        let vcpu = kvm("KVM_CREATE_VCPU", vm.create_vcpu(0))?;
        let mut sregs = kvm("KVM_GET_SREGS", vcpu.get_sregs())?;
        for seg in [
            &mut sregs.cs,
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.ss,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            seg.base = 0;
            seg.selector = 0;
        }
        kvm("KVM_SET_SREGS", vcpu.set_sregs(&sregs))?;
        Ok(Self { vcpu, vm, memory })
    }

    /// Places code at page `code_page` that writes [`MARKER`] into each page of `pages`, runs it
    /// until it halts, and returns the sorted page numbers KVM_GET_DIRTY_LOG reports (which also
    /// clears the log).
    pub fn write_pages(&mut self, code_page: u64, pages: &[u64]) -> Result<Vec<u64>, PayloadError> {
        if code_page >= GUEST_PAGES {
            return Err(PayloadError::BadPage(code_page));
        }
        let mut code = vec![0xb0, MARKER]; // mov al, MARKER
        for &page in pages {
            if page >= GUEST_PAGES || page == code_page {
                return Err(PayloadError::BadPage(page));
            }
            let addr = (page * PAGE_SIZE + WRITE_OFFSET) as u16;
            code.push(0xa2); // mov [moffs16], al
            code.extend_from_slice(&addr.to_le_bytes());
        }
        code.push(0xf4); // hlt
        let entry = code_page * PAGE_SIZE;
        self.memory
            .write_slice(&code, GuestAddress(entry))
            .map_err(|e| PayloadError::Memory(e.to_string()))?;

        let mut regs = kvm("KVM_GET_REGS", self.vcpu.get_regs())?;
        regs.rip = entry;
        regs.rflags = 0x2;
        kvm("KVM_SET_REGS", self.vcpu.set_regs(&regs))?;
        match kvm("KVM_RUN", self.vcpu.run())? {
            VcpuExit::Hlt => {}
            other => return Err(PayloadError::UnexpectedExit(format!("{other:?}"))),
        }
        self.dirty_pages()
    }

    /// Fetches and clears KVM's dirty log of the slot, as sorted page numbers.
    pub fn dirty_pages(&self) -> Result<Vec<u64>, PayloadError> {
        let bitmap = kvm(
            "KVM_GET_DIRTY_LOG",
            self.vm.get_dirty_log(0, (GUEST_PAGES * PAGE_SIZE) as usize),
        )?;
        let mut pages = Vec::new();
        for (word_index, word) in bitmap.iter().enumerate() {
            for bit in 0..64 {
                if word & (1 << bit) != 0 {
                    pages.push(word_index as u64 * 64 + bit);
                }
            }
        }
        Ok(pages)
    }

    /// The byte the payload writes in `page`, as the host sees it now.
    pub fn marker_in(&self, page: u64) -> Result<u8, PayloadError> {
        self.memory
            .read_obj(GuestAddress(page * PAGE_SIZE + WRITE_OFFSET))
            .map_err(|e| PayloadError::Memory(e.to_string()))
    }
}
