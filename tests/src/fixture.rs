//! Test disks whose every page says what it is: page `p` of file `f` starts with a header naming
//! `(f, p)` followed by bytes derived from both, so a block read back from a disk at an offset
//! some report claims can be checked against the one page it must be.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

/// Size of a page.
pub const PAGE: usize = 4096;
const MAGIC: &[u8; 8] = b"DITTOPG\0";

/// What can go wrong while making a fixture.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// File I/O failed.
    #[error("fixture I/O: {0}")]
    Io(#[from] std::io::Error),
    /// mkfs.ext4 failed.
    #[error("mkfs.ext4 failed: {0}")]
    Mkfs(String),
}

/// The content of page `page` of file `file`.
pub fn page_content(file: u32, page: u32) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(PAGE);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&file.to_le_bytes());
    bytes.extend_from_slice(&page.to_le_bytes());
    let mut state = (u64::from(file) << 32 | u64::from(page)) ^ 0x9e37_79b9_7f4a_7c15;
    while bytes.len() < PAGE {
        // xorshift64: cheap, deterministic, never all-zero.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(PAGE);
    bytes
}

/// Which `(file, page)` a block claims to be, if it has a header at all.
pub fn page_identity(block: &[u8]) -> Option<(u32, u32)> {
    if block.len() < 16 || &block[..8] != MAGIC {
        return None;
    }
    let file = u32::from_le_bytes(block[8..12].try_into().ok()?);
    let page = u32::from_le_bytes(block[12..16].try_into().ok()?);
    Some((file, page))
}

/// A file of the fixture: `full_pages` whole pages and `tail` bytes of one more page.
#[derive(Clone, Copy, Debug)]
pub struct FixtureFile {
    /// Whole pages.
    pub full_pages: u32,
    /// Bytes of a last, partial page (0 for none).
    pub tail: usize,
}

/// Writes `files` as `file-<index>` into `dir`.
pub fn write_files(dir: &Path, files: &[FixtureFile]) -> Result<(), FixtureError> {
    for (index, spec) in files.iter().enumerate() {
        let index = index as u32;
        let mut out = fs::File::create(dir.join(format!("file-{index}")))?;
        for page in 0..spec.full_pages {
            out.write_all(&page_content(index, page))?;
        }
        if spec.tail > 0 {
            out.write_all(&page_content(index, spec.full_pages)[..spec.tail])?;
        }
    }
    Ok(())
}

/// Makes `image`, a disk of `size_mib` MiB with an MBR partition table whose one partition
/// starts at 1 MiB and holds an ext4 filesystem with `files`.
pub fn partitioned_ext4(
    image: &Path,
    size_mib: u64,
    files: &[FixtureFile],
) -> Result<(), FixtureError> {
    const START: u64 = 1 << 20;
    let staging = image.with_extension("files");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    write_files(&staging, files)?;
    fs::File::create(image)?.set_len(size_mib << 20)?;
    let fs_kib = ((size_mib << 20) - START) >> 10;
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-E"])
        .arg(format!("offset={START}"))
        .arg("-d")
        .arg(&staging)
        .arg(image)
        .arg(format!("{fs_kib}k"))
        .output()?;
    fs::remove_dir_all(&staging)?;
    if !out.status.success() {
        return Err(FixtureError::Mkfs(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    // The MBR: one Linux partition from sector START/512 to the end of the disk.
    let mut mbr = [0u8; 512];
    let entry = &mut mbr[446..462];
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&((START / 512) as u32).to_le_bytes());
    entry[12..16].copy_from_slice(&((fs_kib * 2) as u32).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let mut disk = fs::OpenOptions::new().write(true).open(image)?;
    disk.seek(SeekFrom::Start(0))?;
    disk.write_all(&mbr)?;
    disk.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_name_themselves_and_differ() {
        let a = page_content(3, 7);
        assert_eq!(a.len(), PAGE);
        assert_eq!(page_identity(&a), Some((3, 7)));
        assert_ne!(a, page_content(3, 8));
        assert_ne!(a, page_content(4, 7));
        assert_eq!(page_identity(&[0u8; PAGE]), None);
    }
}
