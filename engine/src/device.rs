//! Block devices and regular files (a KubeVirt `disk.img`) as the pipeline sees them:
//! their kind and size on an open descriptor, allocated ranges, zeroing and hole punching.

use crate::error::{Error, Result, ResultExt};
use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_write_ptr_bad!(blkzeroout_raw, nix::request_code_none!(0x12, 127), [u64; 2]);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    BlockDevice,
    File,
}

/// Size in bytes and kind of an open source or target.
pub fn inspect(label: &str, f: &File) -> Result<(Kind, u64)> {
    let meta = f.metadata().with_context(|| format!("inspecting {label}"))?;
    let ft = meta.file_type();
    if ft.is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
        unsafe { blkgetsize64(f.as_raw_fd(), &mut size) }.map_err(std::io::Error::from).with_context(|| format!("BLKGETSIZE64 on {label}"))?;
        Ok((Kind::BlockDevice, size))
    } else if ft.is_file() {
        Ok((Kind::File, meta.len()))
    } else {
        Err(Error::invalid(format!("{label} is neither a block device nor a regular file")))
    }
}

/// Whether another open file description of this regular file exists (a running VM's
/// disk image): a write lease is granted only when there is none. `None` when the
/// filesystem or the process's privileges do not allow leases.
pub fn open_elsewhere(f: &File) -> Option<bool> {
    // SAFETY: fcntl(F_SETLEASE) on a descriptor we own, with an integer argument.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) };
    if r == 0 {
        // SAFETY: as above; releases the lease just taken.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        return Some(false);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EBUSY) => Some(true),
        _ => None,
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
