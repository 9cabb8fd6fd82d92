//! Sources and targets: block devices and regular files (a KubeVirt `disk.img`).

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_write_ptr_bad!(blkzeroout_raw, nix::request_code_none!(0x12, 127), [u64; 2]);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    BlockDevice,
    File,
}

/// Size in bytes and kind of an open source or target.
pub fn inspect(path: &Path, f: &File) -> Result<(Kind, u64)> {
    let meta = f.metadata().with_context(|| format!("inspecting {}", path.display()))?;
    let ft = meta.file_type();
    if ft.is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
        unsafe { blkgetsize64(f.as_raw_fd(), &mut size) }.with_context(|| format!("BLKGETSIZE64 on {}", path.display()))?;
        Ok((Kind::BlockDevice, size))
    } else if ft.is_file() {
        Ok((Kind::File, meta.len()))
    } else {
        bail!("{} is neither a block device nor a regular file", path.display())
    }
}

/// Zeroes `len` bytes at `offset` of a block device (BLKZEROOUT: the device may unmap).
pub fn zero_out_device(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKZEROOUT reads a [u64; 2] through the pointer, which is valid.
    unsafe { blkzeroout_raw(f.as_raw_fd(), &range) }.map(|_| ()).map_err(std::io::Error::from)
}

/// Deallocates `len` bytes at `offset` of a regular file; they read back as zeros.
pub fn punch_hole(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    fallocate(f, FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE, offset as i64, len as i64).map_err(std::io::Error::from)
}

/// Allocated ranges of a regular file from SEEK_DATA/SEEK_HOLE, or `None` when the
/// filesystem does not tell.
pub fn allocated_ranges(f: &File, size: u64) -> Option<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        let data = match lseek(f, pos, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(_) => return None,
        };
        let hole = match lseek(f, data, Whence::SeekHole) {
            Ok(h) => h,
            Err(_) => return None,
        };
        if hole <= data {
            return None;
        }
        out.push((data as u64, (hole as u64).min(size)));
        pos = hole;
    }
    Some(out)
}
