//! One save, migration or restore of a VM at a time: locks in a private
//! directory of this user's, removed when let go.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One save or migration per VM at a time: an exclusive lock keyed by
/// QEMU's pid, in a directory only this user can write (never through a
/// symlink), removed when the lock is let go.
#[derive(Debug)]
pub struct VmLock {
    file: File,
    path: PathBuf,
}

impl VmLock {
    /// Takes the lock of the VM run by QEMU `pid`, or says who holds it.
    ///
    /// # Errors
    /// [`Error::Busy`] when another process holds it; [`Error::File`] when
    /// the lock directory is not private.
    pub fn take(pid: u32) -> Result<VmLock> {
        // A save or migration cleans up after dead runs as a restore does.
        super::sweep_run_dirs(&std::env::temp_dir());
        VmLock::take_in(&lock_dir()?, pid)
    }

    /// The lock of restoring the state file `statefile` (keyed by its
    /// device and inode): two restores of one save cannot both start it.
    ///
    /// # Errors
    /// [`Error::RestoreBusy`] when another restore holds it; as [`VmLock::take`].
    pub fn take_restore(statefile: &Path) -> Result<VmLock> {
        let meta = std::fs::metadata(statefile)
            .map_err(Error::file(statefile, "opening the state file"))?;
        let name = format!("restore-{}-{}.lock", meta.dev(), meta.ino());
        VmLock::take_file(&lock_dir()?.join(name)).map_err(|e| match e {
            Error::Busy { .. } => Error::RestoreBusy {
                path: statefile.to_path_buf(),
            },
            e => e,
        })
    }

    pub(super) fn take_in(dir: &Path, pid: u32) -> Result<VmLock> {
        VmLock::take_file(&dir.join(format!("vm-{pid}.lock"))).map_err(|e| match e {
            Error::Busy { .. } => Error::Busy {
                pid,
                migration: None,
            },
            e => e,
        })
    }

    fn take_file(path: &Path) -> Result<VmLock> {
        let path = path.to_path_buf();
        let pid = 0;
        loop {
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(Error::file(&path, "opening the VM's lock file"))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::Busy {
                        pid,
                        migration: None,
                    })
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(Error::file(&path, "locking the VM's lock file")(e))
                }
            }
            // The holder before us removes the file as it lets go: a lock on
            // a file no longer at the path guards nothing, so try again.
            let ours = file.metadata().map(|m| (m.dev(), m.ino())).ok();
            let at_path = std::fs::symlink_metadata(&path)
                .map(|m| (m.dev(), m.ino()))
                .ok();
            if ours.is_some() && ours == at_path {
                if let Some(dir) = path.parent() {
                    sweep(dir, &path);
                }
                return Ok(VmLock { file, path });
            }
        }
    }
}

/// The QEMU pids whose VM lock some process holds now, read from the
/// kernel's lock table (`/proc/locks`) without touching the locks.
pub fn held_vms() -> Vec<u32> {
    let Ok(dir) = lock_dir() else {
        return Vec::new();
    };
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    // `1: FLOCK  ADVISORY  WRITE 1234 00:2f:5678 0 EOF`: the device's
    // major and minor in hex, then the inode. An inode number alone also
    // names files of other file systems (another program's lock).
    let held: Vec<(u32, u32, u64)> = locks
        .lines()
        .filter(|l| l.contains("FLOCK"))
        .filter_map(|l| {
            let mut id = l.split_whitespace().nth(5)?.split(':');
            let major = u32::from_str_radix(id.next()?, 16).ok()?;
            let minor = u32::from_str_radix(id.next()?, 16).ok()?;
            Some((major, minor, id.next()?.parse().ok()?))
        })
        .collect();
    let id = |m: &std::fs::Metadata| (libc::major(m.dev()), libc::minor(m.dev()), m.ino());
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.metadata().is_ok_and(|m| held.contains(&id(&m))))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("vm-")?
                .strip_suffix(".lock")?
                .parse()
                .ok()
        })
        .collect()
}

/// Removes the lock files nobody holds: those of a process killed with
/// SIGKILL, which could not remove its own. Each is locked before it is
/// removed, so a holder keeps its file, and a taker that had opened one
/// finds it gone from the path and takes a new one (see `take_file`).
fn sweep(dir: &Path, ours: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_lock = path.extension().is_some_and(|e| e == "lock");
        if !is_lock || path == ours {
            continue;
        }
        let Ok(file) = File::options()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        else {
            continue;
        };
        if file.try_lock().is_ok() {
            let _ = std::fs::remove_file(&path);
            let _ = file.unlock();
        }
    }
}

impl Drop for VmLock {
    fn drop(&mut self) {
        // Removed while still locked, so nobody can lock the old file and
        // believe it guards the VM.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

/// `$XDG_RUNTIME_DIR/qemu-migrate`, else `$TMPDIR/qemu-migrate-UID`: made
/// `0700` if missing, and refused if it is a symlink, another user's, or
/// writable by others.
fn lock_dir() -> Result<PathBuf> {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("qemu-migrate"),
        _ => std::env::temp_dir().join(format!("qemu-migrate-{uid}")),
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::file(&dir, "creating the lock directory")(e)),
    }
    check_private_dir(&dir, uid)?;
    Ok(dir)
}

/// Refuses a directory that is a symlink, another user's, or writable by others.
pub(super) fn check_private_dir(dir: &Path, uid: u32) -> Result<()> {
    let meta =
        std::fs::symlink_metadata(dir).map_err(Error::file(dir, "checking the lock directory"))?;
    let private = meta.is_dir() && meta.uid() == uid && meta.permissions().mode() & 0o022 == 0;
    if !private {
        return Err(Error::file(dir, "checking the lock directory")(
            std::io::Error::other(
                "not a private directory of this user (a symlink, another user's, or writable by others)",
            ),
        ));
    }
    Ok(())
}
