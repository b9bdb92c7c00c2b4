//! Loading a Linux guest into memory: the bzImage (linux-loader), the initrd below the limit
//! the kernel announces, the command line and the boot parameters ("zero page") with the e820
//! map and the RSDP address. Every size and address is checked against guest RAM first, so a
//! kernel or initrd that does not fit is a clear error before the guest starts.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{KernelLoader, bzimage::BzImage};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

use super::layout::{
    CMDLINE_MAX, CMDLINE_START, E820Kind, KERNEL_START, Layout, MmioSlot, RSDP_START,
    ZERO_PAGE_START,
};
use crate::kvm::memory::GuestMemory;

/// Boot protocol magic values.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDR_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader type.
const LOADER_TYPE_OTHER: u8 = 0xff;
/// e820 type codes.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Offset of the 64-bit entry point from the start of the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;
/// Alignment of the initrd.
const PAGE: u64 = 4096;

/// Why a guest cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file cannot be opened or read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The kernel is not a loadable bzImage or does not fit in guest memory.
    #[error("{path} is not a bzImage this VM can load: {source}")]
    Kernel {
        /// The kernel file.
        path: PathBuf,
        /// What linux-loader said.
        source: linux_loader::loader::Error,
    },
    /// The kernel does not support the 64-bit boot protocol this VMM uses.
    #[error(
        "{path}: boot protocol {version:#x} is older than 2.12 (64-bit entry, initrd above 4 GiB)"
    )]
    Protocol {
        /// The kernel file.
        path: PathBuf,
        /// The boot protocol version in its header.
        version: u16,
    },
    /// The initrd does not fit in guest memory below the kernel's limit.
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest memory between the kernel and {limit:#x}"
    )]
    InitrdTooLarge {
        /// The initrd file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Highest address the initrd may end at.
        limit: u64,
    },
    /// The command line is too long or malformed.
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// Writing the boot parameters failed.
    #[error("cannot write the boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
    /// Guest memory could not be written.
    #[error("cannot write the {what} into guest memory")]
    Memory {
        /// What was written.
        what: &'static str,
    },
}

/// A loaded kernel: where to enter it and its setup header.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// The 64-bit entry point (`startup_64`).
    pub entry: GuestAddress,
    /// End of the loaded image.
    pub end: u64,
    /// The kernel's setup header, updated with where it was loaded.
    pub header: setup_header,
}

/// A loaded initrd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedInitrd {
    /// Where it starts.
    pub addr: u64,
    /// Its size in bytes.
    pub size: u64,
}

fn open(path: &Path) -> Result<File, LoadError> {
    File::open(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Loads the bzImage at `path` at [`KERNEL_START`].
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, LoadError> {
    let mut file = open(path)?;
    let loaded = BzImage::load(mem, None, &mut file, Some(GuestAddress(KERNEL_START))).map_err(
        |source| LoadError::Kernel {
            path: path.to_owned(),
            source,
        },
    )?;
    let header = loaded.setup_header.ok_or_else(|| LoadError::Kernel {
        path: path.to_owned(),
        source: linux_loader::loader::Error::InvalidKernelStartAddress,
    })?;
    if header.version < 0x020c {
        return Err(LoadError::Protocol {
            path: path.to_owned(),
            version: header.version,
        });
    }
    Ok(LoadedKernel {
        entry: GuestAddress(loaded.kernel_load.0 + STARTUP_64_OFFSET),
        end: loaded.kernel_end,
        header,
    })
}

/// Loads the initrd at `path` as high as allowed: below the kernel's `initrd_addr_max`, below
/// the end of low RAM, page aligned, and above the kernel image.
pub fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<LoadedInitrd, LoadError> {
    let mut file = open(path)?;
    let size = file
        .metadata()
        .map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?
        .len();
    // The first region holds low RAM; the initrd must stay below 4 GiB for the 32-bit fields.
    let low_end = mem.iter().next().map_or(0, |r| r.start_addr().0 + r.len());
    let limit = low_end.min(u64::from(kernel.header.initrd_addr_max) + 1);
    let too_large = || LoadError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE - 1);
    // Leave room for the kernel to decompress itself in place.
    let kernel_reach =
        KERNEL_START + u64::from(kernel.header.init_size).max(kernel.end - KERNEL_START);
    if addr < kernel_reach {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|_| LoadError::Memory { what: "initrd" })?;
    Ok(LoadedInitrd { addr, size })
}

/// Builds the kernel command line: `base`, then `virtio_mmio.device=` entries for `slots` when
/// `describe_on_cmdline` (for kernels built with that option; ACPI describes them anyway).
pub fn command_line(
    base: &str,
    slots: &[MmioSlot],
    describe_on_cmdline: bool,
) -> Result<Cmdline, LoadError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX as usize).map_err(LoadError::Cmdline)?;
    if !base.trim().is_empty() {
        cmdline
            .insert_str(base.trim())
            .map_err(LoadError::Cmdline)?;
    }
    if describe_on_cmdline {
        for slot in slots {
            cmdline
                .add_virtio_mmio_device(slot.len, GuestAddress(slot.base), slot.irq, None)
                .map_err(LoadError::Cmdline)?;
        }
    }
    Ok(cmdline)
}

/// Writes the command line and the boot parameters (e820 map from `layout`, initrd, RSDP).
pub fn write_boot_params(
    mem: &GuestMemory,
    layout: &Layout,
    kernel: &LoadedKernel,
    initrd: Option<LoadedInitrd>,
    cmdline: &Cmdline,
) -> Result<(), LoadError> {
    let cstring = cmdline.as_cstring().map_err(LoadError::Cmdline)?;
    let bytes = cstring.as_bytes_with_nul();
    mem.write_slice(bytes, GuestAddress(CMDLINE_START))
        .map_err(|_| LoadError::Memory {
            what: "command line",
        })?;

    let mut params = boot_params {
        hdr: kernel.header,
        acpi_rsdp_addr: RSDP_START,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_OTHER;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = bytes.len() as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    if layout.e820.len() > params.e820_table.len() {
        return Err(LoadError::Memory { what: "e820 map" });
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&layout.e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: match entry.kind {
                E820Kind::Ram => E820_RAM,
                E820Kind::Reserved => E820_RESERVED,
            },
        };
    }
    params.e820_entries = layout.e820.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(LoadError::BootParams)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::boot::layout::Layout;

    /// A minimal file with a bzImage setup header: enough for the loader's checks.
    fn fake_bzimage(version: u16) -> tempfile::NamedTempFile {
        let mut image = vec![0u8; 5 * 512 + 4096];
        image[0x1f1] = 4; // setup_sects
        image[0x202..0x206].copy_from_slice(&HDR_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        image[0x211] = 1; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&(KERNEL_START as u32).to_le_bytes());
        image[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
        image[0x260..0x264].copy_from_slice(&0x10_0000u32.to_le_bytes()); // init_size
        let mut f = tempfile::NamedTempFile::new().expect("tmp");
        f.write_all(&image).expect("write");
        f
    }

    fn memory(mib: u64) -> (Layout, GuestMemory) {
        let layout = Layout::plan(mib, 2).expect("layout");
        let mem = layout.memory.create().expect("memory");
        (layout, mem)
    }

    #[test]
    fn kernel_initrd_cmdline_and_boot_params_land_where_the_kernel_looks() {
        let (layout, mem) = memory(64);
        let kernel_file = fake_bzimage(0x020f);
        let kernel = load_kernel(&mem, kernel_file.path()).expect("kernel");
        assert_eq!(kernel.entry, GuestAddress(KERNEL_START + 0x200));
        let mut initrd_file = tempfile::NamedTempFile::new().expect("tmp");
        initrd_file.write_all(&[0x5a; 10_000]).expect("write");
        let initrd = load_initrd(&mem, initrd_file.path(), &kernel).expect("initrd");
        assert_eq!(initrd.addr % PAGE, 0);
        assert!(initrd.addr + initrd.size <= 64 << 20);
        let mut first = [0u8; 1];
        mem.read_slice(&mut first, GuestAddress(initrd.addr))
            .expect("read");
        assert_eq!(first[0], 0x5a);

        let cmdline = command_line("console=ttyS0", &layout.devices, true).expect("cmdline");
        write_boot_params(&mem, &layout, &kernel, Some(initrd), &cmdline).expect("params");
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).expect("params");
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.ramdisk_image }, initrd.addr as u32);
        assert_eq!({ hdr.ramdisk_size }, 10_000);
        assert_eq!({ params.acpi_rsdp_addr }, RSDP_START);
        assert_eq!(params.e820_entries as usize, layout.e820.len());
        let mut line = vec![0u8; { hdr.cmdline_size } as usize];
        mem.read_slice(&mut line, GuestAddress(CMDLINE_START))
            .expect("cmdline");
        let line = String::from_utf8(line).expect("utf8");
        assert!(
            line.starts_with("console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 "),
            "{line}"
        );
        assert!(line.ends_with('\0'));
    }

    #[test]
    fn bad_kernels_and_initrds_are_refused() {
        let (_, mem) = memory(64);
        let mut not_a_kernel = tempfile::NamedTempFile::new().expect("tmp");
        not_a_kernel.write_all(&[0u8; 8192]).expect("write");
        assert!(matches!(
            load_kernel(&mem, not_a_kernel.path()),
            Err(LoadError::Kernel { .. })
        ));
        assert!(matches!(
            load_kernel(&mem, Path::new("/nonexistent/vmlinuz")),
            Err(LoadError::Read { .. })
        ));
        assert!(matches!(
            load_kernel(&mem, fake_bzimage(0x0206).path()),
            Err(LoadError::Protocol { .. })
        ));
        let kernel = load_kernel(&mem, fake_bzimage(0x020f).path()).expect("kernel");
        let huge = tempfile::NamedTempFile::new().expect("tmp");
        huge.as_file().set_len(63 << 20).expect("truncate");
        assert!(matches!(
            load_initrd(&mem, huge.path(), &kernel),
            Err(LoadError::InitrdTooLarge { .. })
        ));
    }
}
