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
/// disk image): a write lease is granted only when there is none. `Err` says why it
/// cannot be told: leases need the file's owner or `CAP_LEASE` (a VM's `disk.img` belongs
/// to the VM's user), and a filesystem may not support them.
pub fn open_elsewhere(f: &File) -> std::result::Result<bool, String> {
    // SAFETY: fcntl(F_SETLEASE) on a descriptor we own, with an integer argument.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) };
    if r == 0 {
        // SAFETY: as above; releases the lease just taken.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        return Ok(false);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EBUSY) => Ok(true),
        Some(libc::EACCES) | Some(libc::EPERM) => Err("a write lease needs the file's owner or CAP_LEASE, which this process lacks".into()),
        _ => Err(format!("the filesystem grants no write lease ({e})")),
    }
}

/// Refuses a regular file another process has open (a running VM's disk image), and one
/// for which that cannot be told (fails closed: writing under a running VM destroys it).
/// Called when a restore target is opened and again just before the first write (a
/// queued restore may start long after its request).
pub fn refuse_if_in_use(f: &File, label: &str, what: &str) -> Result<()> {
    match open_elsewhere(f) {
        Ok(false) => Ok(()),
        Ok(true) => Err(Error::precondition(format!("{what} {label} is in use: another process has it open (a running VM?); nothing was written"))),
        Err(why) => Err(Error::precondition(format!(
            "{what} {label}: cannot tell whether another process has it open ({why}); refusing to write into a file that may be a running VM's disk; nothing was written"
        ))),
    }
}

/// The processes that hold block device `f` open (other than this one): QEMU holds a raw
/// block PVC open read-write but not exclusively, so the kernel's `O_EXCL` does not see it.
/// Found by looking at every process's descriptors (`/proc/<pid>/fd`). `Err` says why that
/// look cannot be complete: outside the host's PID namespace other pods' processes are
/// invisible (the DaemonSet sets `hostPID`), and without `CAP_SYS_PTRACE` the descriptors of
/// processes with other credentials cannot be read.
pub fn block_holders(f: &File) -> std::result::Result<Vec<String>, String> {
    use std::os::unix::fs::MetadataExt;
    /// The inode number of the initial PID namespace (the kernel's `PROC_PID_INIT_INO`).
    const INIT_PID_NS: u64 = 0xEFFF_FFFC;
    let rdev = f.metadata().map_err(|e| format!("inspecting the device: {e}"))?.rdev();
    match std::fs::metadata("/proc/self/ns/pid") {
        Ok(m) if m.ino() == INIT_PID_NS => {}
        Ok(_) => return Err("this process is not in the host's PID namespace, so other pods' processes are not visible (run with hostPID)".into()),
        Err(e) => return Err(format!("cannot tell this process's PID namespace ({e})")),
    }
    let me = std::process::id();
    let mut holders = Vec::new();
    let mut unreadable = Vec::new();
    let procs = std::fs::read_dir("/proc").map_err(|e| format!("listing /proc: {e}"))?;
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let fds = match std::fs::read_dir(p.path().join("fd")) {
            Ok(d) => d,
            // Gone meanwhile, or a kernel thread.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(_) => {
                unreadable.push(pid);
                continue;
            }
        };
        for fd in fds.flatten() {
            // stat follows the descriptor's magic link to the open file itself.
            if let Ok(m) = std::fs::metadata(fd.path()) {
                if m.file_type().is_block_device() && m.rdev() == rdev {
                    let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                    holders.push(format!("pid {pid} ({})", comm.trim()));
                    break;
                }
            }
        }
    }
    if holders.is_empty() && !unreadable.is_empty() {
        return Err(format!(
            "the open files of {} process(es) (pid {}{}) cannot be read (CAP_SYS_PTRACE is needed)",
            unreadable.len(),
            unreadable[0],
            if unreadable.len() > 1 { ", …" } else { "" }
        ));
    }
    Ok(holders)
}

/// Refuses a block device another process holds open, exclusively or not, and one for which
/// that cannot be told (fails closed). Called when a restore target is opened and again just
/// before the first write.
pub fn refuse_if_held(f: &File, label: &str, what: &str) -> Result<()> {
    let mut found = block_holders(f);
    // udev probes a device for a moment after it changes: a holder must still be there
    // a second later to count.
    for _ in 0..2 {
        if !matches!(&found, Ok(h) if !h.is_empty()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        found = block_holders(f);
    }
    match found {
        Ok(h) if h.is_empty() => Ok(()),
        Ok(h) => Err(Error::precondition(format!(
            "{what} {label} is in use: held open by {} (a running VM?); nothing was written",
            h.join(", ")
        ))),
        Err(why) => Err(Error::precondition(format!(
            "{what} {label}: cannot tell whether another process holds it open ({why}); refusing to write onto a device that may be a running VM's disk; nothing was written"
        ))),
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
