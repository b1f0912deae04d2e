//! fs-verity (Linux 5.4+, `linux/fsverity.h`): a file sealed read-only for
//! good, whose every page the kernel checks against a Merkle tree as it is
//! read, and whose digest (the tree's root, with its parameters) is asked of
//! the kernel in O(1). ext4 with the `verity` feature, btrfs, f2fs and XFS
//! on recent kernels have it; a kernel without `CONFIG_FS_VERITY`, or any
//! other file system, answers `EOPNOTSUPP` or `ENOTTY`. libc has no wrappers:
//! the ioctls and their structs are spelled out here.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `FS_VERITY_HASH_ALG_SHA256`.
const HASH_SHA256: u32 = 1;
/// The Merkle tree's block size: 4 KiB, which every kernel with fs-verity
/// accepts on 4 KiB pages.
const BLOCK_SIZE: u32 = 4096;
/// The size of a SHA-256 digest.
const SHA256_BYTES: usize = 32;

/// `struct fsverity_enable_arg`.
#[repr(C)]
struct EnableArg {
    version: u32,
    hash_algorithm: u32,
    block_size: u32,
    salt_size: u32,
    salt_ptr: u64,
    sig_size: u32,
    reserved1: u32,
    sig_ptr: u64,
    reserved2: [u64; 11],
}

/// `struct fsverity_digest` with room for a SHA-256 digest after it.
#[repr(C)]
struct Digest {
    digest_algorithm: u16,
    digest_size: u16,
    digest: [u8; SHA256_BYTES],
}

/// `_IOW('f', 133, struct fsverity_enable_arg)`.
const FS_IOC_ENABLE_VERITY: libc::c_ulong = 0x4080_6685;
/// `_IOWR('f', 134, struct fsverity_digest)` (the struct's fixed part: 4 bytes).
const FS_IOC_MEASURE_VERITY: libc::c_ulong = 0xc004_6686;

const _: () = assert!(std::mem::size_of::<EnableArg>() == 128);

/// Whether `e` says the file system (or the kernel) has no fs-verity.
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL)
    )
}

/// Seals `file` with fs-verity (SHA-256, 4 KiB blocks, no salt): from now
/// on it cannot be opened for writing, and the kernel checks each page read
/// from it. `file` must be open read-only, and no descriptor may have it
/// open for writing (`ETXTBSY`). Reads the whole file once to build the tree.
///
/// # Errors
/// The kernel's: [`is_unsupported`] tells a file system without fs-verity.
pub(crate) fn enable_verity(file: &File) -> io::Result<()> {
    let arg = EnableArg {
        version: 1,
        hash_algorithm: HASH_SHA256,
        block_size: BLOCK_SIZE,
        salt_size: 0,
        salt_ptr: 0,
        sig_size: 0,
        reserved1: 0,
        sig_ptr: 0,
        reserved2: [0; 11],
    };
    loop {
        // SAFETY: the ioctl reads the struct we own, of the size its number
        // encodes, during the call; salt and signature are absent (null, 0).
        let r = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_ENABLE_VERITY, &arg) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The fs-verity digest of `file` as `sha256:HEX` (the form `fsverity
/// measure` prints); `None` when the file is not sealed (`ENODATA`) or the
/// file system has no fs-verity.
///
/// # Errors
/// Any other error of the kernel's.
pub(crate) fn measure_verity(file: &File) -> io::Result<Option<String>> {
    let mut d = Digest {
        digest_algorithm: 0,
        digest_size: SHA256_BYTES as u16,
        digest: [0; SHA256_BYTES],
    };
    // SAFETY: the kernel writes at most `digest_size` bytes after the
    // struct's 4-byte head, all inside the struct we own and lend it.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_MEASURE_VERITY, &mut d) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            _ if is_unsupported(&e) => Ok(None),
            _ => Err(e),
        };
    }
    if u32::from(d.digest_algorithm) != HASH_SHA256 || usize::from(d.digest_size) != SHA256_BYTES {
        return Err(io::Error::other(format!(
            "an fs-verity digest of algorithm {} and {} bytes, not SHA-256",
            d.digest_algorithm, d.digest_size
        )));
    }
    let hex: String = d.digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(Some(format!("sha256:{hex}")))
}

/// Seals the finished file `writable` (see [`enable_verity`]): opens it
/// again read-only, lets the writable descriptor go (its lock passes to
/// the new one), and seals it. Returns the read-only file, and its digest;
/// `None` where the file system has no fs-verity.
///
/// # Errors
/// When the kernel refuses to seal the file on a file system that has
/// fs-verity.
pub(crate) fn seal(writable: File) -> io::Result<(File, Option<String>)> {
    let fd = writable.as_raw_fd();
    let Ok(read_only) = File::open(format!("/proc/self/fd/{fd}")) else {
        // No /proc to open it again by: left unsealed, as on a file
        // system without fs-verity (the chunk checksums still cover it).
        return Ok((writable, None));
    };
    drop(writable);
    // The save's lock on its unfinished file, now on this descriptor: a
    // sweep of dead saves' leftovers must still see it as live.
    let _ = read_only.try_lock();
    match enable_verity(&read_only) {
        Ok(()) => {}
        Err(e) if is_unsupported(&e) => return Ok((read_only, None)),
        Err(e) => return Err(e),
    }
    let digest = measure_verity(&read_only)?;
    Ok((read_only, digest))
}

/// Lowers this process's CPU and I/O priority as far as it goes (nice 19,
/// the idle I/O class): for work that must yield to the VM it checks.
pub(crate) fn lower_priority() {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    // SAFETY: both calls change only this process's own scheduling; a
    // failure leaves it at the priority it had.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_system_without_fs_verity_measures_as_unsealed() {
        // tmpfs (and the kernels without CONFIG_FS_VERITY) have none: the
        // answer is "not sealed", not an error.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let f = File::open(&path).unwrap();
        assert_eq!(measure_verity(&f).unwrap(), None);
        match enable_verity(&f) {
            Ok(()) => {
                // A file system that has it: now sealed, and measured.
                let d = measure_verity(&f).unwrap().unwrap();
                assert!(d.starts_with("sha256:") && d.len() == 7 + 64, "{d}");
                assert!(File::options().write(true).open(&path).is_err());
            }
            Err(e) => assert!(is_unsupported(&e), "{e}"),
        }
    }
}
