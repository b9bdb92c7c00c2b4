//! Which mounted filesystems can be scanned, and where on which disk their blocks lie.
//!
//! A filesystem is eligible when it sits directly on a disk or on a partition of one, so that a
//! block's byte offset on the whole disk is the filesystem's offset plus the partition's start.
//! Device-mapper, md, network and in-memory block devices are skipped and counted, and so are
//! loop devices unless asked for: inside a guest a loop device's blocks live in some file, not at
//! those offsets of any disk the host knows. (On a machine that is not a ditto guest, such as a
//! test host, a loop device is the natural stand-in for a whole disk.)

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// What can go wrong while finding the disks.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// /proc/self/mountinfo could not be read.
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(String),
}

/// A whole disk that holds eligible filesystems.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// The virtio-blk serial when the device has one (the VMM sets it to the drive id), else
    /// the kernel's name for the disk.
    pub id: String,
    /// Major and minor number of the whole disk.
    pub dev: (u32, u32),
    /// The device node, `/dev/<name>`.
    pub path: PathBuf,
    /// Size of the whole disk in bytes.
    pub size_bytes: u64,
}

/// An eligible mounted filesystem.
#[derive(Clone, Debug)]
pub struct Mount {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Major and minor number of the block device it is on (a disk or a partition).
    pub dev: (u32, u32),
    /// Index of its disk in [`Layout::disks`].
    pub disk: usize,
    /// Byte offset of the block device on the whole disk (a partition's start; 0 for a disk).
    pub start_bytes: u64,
    /// Filesystem type, e.g. `ext4`.
    pub fs_type: String,
}

/// The disks and eligible filesystems of this machine.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    /// Disks that hold at least one eligible filesystem.
    pub disks: Vec<Disk>,
    /// Eligible filesystems, one per block device.
    pub mounts: Vec<Mount>,
    /// Mounted filesystems skipped, by reason.
    pub skipped: BTreeMap<String, u64>,
}

impl Layout {
    /// The eligible mount that holds `dev`, if any.
    pub fn mount_of(&self, dev: (u32, u32)) -> Option<&Mount> {
        self.mounts.iter().find(|m| m.dev == dev)
    }
}

/// Splits a Linux `dev_t` into major and minor numbers.
pub fn split_dev(dev: u64) -> (u32, u32) {
    (libc::major(dev), libc::minor(dev))
}

/// Reads /proc/self/mountinfo and /sys to find the eligible filesystems and their disks.
pub fn discover(include_loop: bool) -> Result<Layout, DiskError> {
    let infos = procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .map_err(|e| DiskError::MountInfo(e.to_string()))?;
    let mut layout = Layout::default();
    for info in infos {
        // dax, dax=always and dax=inode (which lets single files bypass the page cache) make the
        // whole mount ineligible; dax=never does not.
        let dax = info
            .super_options
            .iter()
            .chain(info.mount_options.iter())
            .any(|(key, value)| key == "dax" && value.as_deref() != Some("never"));
        let verdict = match parse_majmin(&info.majmin) {
            None | Some((0, _)) => Err(blockless_reason(&info.fs_type)),
            Some(_) if dax => Err("dax"),
            Some(dev) => classify(dev, include_loop).map(|block| (dev, block)),
        };
        let (dev, block) = match verdict {
            Ok(found) => found,
            Err(reason) => {
                *layout.skipped.entry(reason.to_owned()).or_default() += 1;
                continue;
            }
        };
        if layout.mount_of(dev).is_some() {
            *layout.skipped.entry("mounted again".into()).or_default() += 1;
            continue;
        }
        let disk = match layout.disks.iter().position(|d| d.dev == block.disk.dev) {
            Some(index) => index,
            None => {
                layout.disks.push(block.disk);
                layout.disks.len() - 1
            }
        };
        layout.mounts.push(Mount {
            mount_point: info.mount_point,
            dev,
            disk,
            start_bytes: block.start_bytes,
            fs_type: info.fs_type,
        });
    }
    Ok(layout)
}

/// Why a filesystem that is not on a block device is skipped, by its type.
fn blockless_reason(fs_type: &str) -> &'static str {
    let base = fs_type.split('.').next().unwrap_or(fs_type);
    match base {
        "nfs" | "nfs4" | "cifs" | "smb3" | "9p" | "virtiofs" | "ceph" | "glusterfs" | "fuse"
        | "sshfs" => "network or shared filesystem",
        "tmpfs" | "ramfs" | "devtmpfs" | "hugetlbfs" | "ramdisk" => "in-memory filesystem",
        _ => "not on a block device",
    }
}

fn parse_majmin(s: &str) -> Option<(u32, u32)> {
    let (major, minor) = s.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// A block device resolved to its whole disk.
struct Block {
    disk: Disk,
    start_bytes: u64,
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The sysfs folder of the whole disk that holds `dev` and the byte offset of `dev` on it (a
/// partition's start; 0 when `dev` is a whole disk), or why that is unknown.
fn whole_disk_dir(dev: (u32, u32)) -> Result<(PathBuf, u64), &'static str> {
    let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", dev.0, dev.1));
    let real = fs::canonicalize(&sys).map_err(|_| "block device unknown to sysfs")?;
    if !sys.join("partition").exists() {
        return Ok((real, 0));
    }
    let start: u64 = read_trimmed(&sys.join("start"))
        .and_then(|s| s.parse().ok())
        .ok_or("partition without a start")?;
    let parent = real.parent().ok_or("partition without a disk")?.to_owned();
    let start_bytes = start
        .checked_mul(512)
        .ok_or("partition start out of range")?;
    Ok((parent, start_bytes))
}

fn dir_dev(dir: &Path) -> Option<(u32, u32)> {
    read_trimmed(&dir.join("dev"))
        .as_deref()
        .and_then(parse_majmin)
}

/// The whole disk (its major and minor number) that holds block device `dev`, and the byte
/// offset of `dev` on it: `(dev, 0)` for a whole disk, the disk and the partition's start for
/// a partition (from /sys/dev/block). `None` when sysfs does not know `dev`.
pub fn whole_disk(dev: (u32, u32)) -> Option<((u32, u32), u64)> {
    let (dir, start_bytes) = whole_disk_dir(dev).ok()?;
    Some((dir_dev(&dir)?, start_bytes))
}

/// Resolves `dev` through /sys/dev/block to a whole disk, or says why it is not eligible.
fn classify(dev: (u32, u32), include_loop: bool) -> Result<Block, &'static str> {
    let (disk_dir, start_bytes) = whole_disk_dir(dev)?;
    let name = disk_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("unnamed disk")?
        .to_owned();
    let kind = |prefix: &[&str]| prefix.iter().any(|p| name.starts_with(p));
    if kind(&["dm-"]) {
        return Err("device-mapper");
    }
    if kind(&["md"]) {
        return Err("md raid");
    }
    if kind(&["loop"]) && !include_loop {
        return Err("loop device");
    }
    if kind(&["ram", "zram", "pmem", "brd"]) {
        return Err("in-memory block device");
    }
    if kind(&["nbd", "rbd", "drbd"]) {
        return Err("network block device");
    }
    let disk_dev = dir_dev(&disk_dir).ok_or("disk without a device number")?;
    let sectors: u64 = read_trimmed(&disk_dir.join("size"))
        .and_then(|s| s.parse().ok())
        .ok_or("disk without a size")?;
    let id = read_trimmed(&disk_dir.join("serial")).unwrap_or_else(|| name.clone());
    Ok(Block {
        disk: Disk {
            id,
            dev: disk_dev,
            path: PathBuf::from("/dev").join(&name),
            size_bytes: sectors.saturating_mul(512),
        },
        start_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majmin_parses_and_rejects_garbage() {
        assert_eq!(parse_majmin("259:3"), Some((259, 3)));
        assert_eq!(parse_majmin("0:52"), Some((0, 52)));
        assert_eq!(parse_majmin("259"), None);
        assert_eq!(parse_majmin("a:b"), None);
    }

    #[test]
    fn blockless_filesystems_are_skipped_by_kind() {
        assert_eq!(blockless_reason("nfs4"), "network or shared filesystem");
        assert_eq!(
            blockless_reason("fuse.sshfs"),
            "network or shared filesystem"
        );
        assert_eq!(blockless_reason("virtiofs"), "network or shared filesystem");
        assert_eq!(blockless_reason("tmpfs"), "in-memory filesystem");
        assert_eq!(blockless_reason("proc"), "not on a block device");
    }

    #[test]
    fn in_memory_filesystems_are_never_eligible() {
        let layout = discover(true).unwrap();
        for mount in &layout.mounts {
            assert_ne!(mount.dev.0, 0, "{mount:?}");
            assert_ne!(mount.fs_type, "tmpfs", "{mount:?}");
            assert_ne!(mount.fs_type, "proc", "{mount:?}");
        }
        assert!(
            layout
                .skipped
                .get("not on a block device")
                .copied()
                .unwrap_or(0)
                > 0
        );
    }
}
