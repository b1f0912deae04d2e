//! Everything this crate asks of the operating system beyond plain files,
//! in one place to audit: the pipe QEMU streams through, the per-VM lock,
//! durable renames, writeback hints, waiting for a process to be gone, and
//! reading another process's command line. The `unsafe` blocks of the crate
//! are all here, each for a call std does not offer.

use std::fs::File;
use std::io::{PipeReader, PipeWriter};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};

mod background;
pub mod durable;
mod fds;
mod files;
pub(crate) mod keeper;
mod lock;
mod process;
mod relay;
mod rundir;
mod verity;
mod watchdog;

pub(crate) use background::*;
pub use fds::*;
pub use files::*;
pub use lock::*;
pub use process::*;
pub use relay::*;
pub use rundir::*;
pub(crate) use verity::*;
pub use watchdog::*;

/// The pipe's buffer: large, so QEMU and the copying thread rarely wait on each other.
pub(crate) const PIPE_BUFFER: usize = 1 << 20;

/// A timeout as `poll(2)` takes it: milliseconds, saturated.
fn poll_ms(timeout: Duration) -> libc::c_int {
    libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX)
}

/// A pipe with a large buffer (close-on-exec, as std makes it).
pub(crate) fn pipe() -> Result<(PipeReader, PipeWriter)> {
    let (r, w) = std::io::pipe().map_err(Error::os("creating a pipe"))?;
    // SAFETY: fcntl on a descriptor we own; failure only leaves the default size.
    unsafe {
        libc::fcntl(
            w.as_fd().as_raw_fd(),
            libc::F_SETPIPE_SZ,
            libc::c_int::try_from(PIPE_BUFFER).unwrap_or(libc::c_int::MAX),
        );
    }
    Ok((r, w))
}

/// Why this process cannot create files in directory `dir` (a read-only
/// file system, no permission), where it cannot.
pub(crate) fn not_writable_dir(dir: &Path) -> Option<std::io::Error> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: access reads the NUL-terminated path, which lives across the call.
    let r = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) };
    (r != 0).then(std::io::Error::last_os_error)
}

/// Asks the kernel to start writing `len` bytes at `offset` to disk now, so
/// a later fsync has less to wait for.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: an advisory call on an open descriptor; failure only means the
    // final fsync does all the work, as it would without this.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            libc::off64_t::try_from(offset).unwrap_or(libc::off64_t::MAX),
            libc::off64_t::try_from(len).unwrap_or(libc::off64_t::MAX),
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::lock::check_private_dir;
    use super::*;

    fn uid() -> u32 {
        // SAFETY: getuid cannot fail.
        unsafe { libc::getuid() }
    }

    #[test]
    fn a_vm_lock_is_exclusive_and_removed_when_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = VmLock::take_in(dir.path(), 7).unwrap();
        let path = dir.path().join("vm-7.lock");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(
            VmLock::take_in(dir.path(), 7),
            Err(Error::Busy {
                pid: 7,
                migration: None
            })
        ));
        // Another VM's lock is another lock.
        drop(VmLock::take_in(dir.path(), 8).unwrap());
        drop(first);
        assert!(!path.exists(), "removed when let go");
        drop(VmLock::take_in(dir.path(), 7).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_lock_left_by_a_killed_process_is_removed_and_a_held_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        // A process killed with SIGKILL leaves its file, unlocked.
        let stale = dir.path().join("vm-41.lock");
        std::fs::write(&stale, b"").unwrap();
        let held = VmLock::take_in(dir.path(), 42).unwrap();
        assert!(!stale.exists(), "the dead process's lock file is swept");
        let other = VmLock::take_in(dir.path(), 43).unwrap();
        assert!(dir.path().join("vm-42.lock").exists(), "a held lock stays");
        assert!(matches!(
            VmLock::take_in(dir.path(), 42),
            Err(Error::Busy { pid: 42, .. })
        ));
        drop((held, other));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_symlink_planted_at_a_lock_path_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("vm-9.lock")).unwrap();
        let err = VmLock::take_in(dir.path(), 9).unwrap_err();
        assert!(matches!(err, Error::File { .. }), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn a_lock_directory_that_is_not_private_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(check_private_dir(&shared, uid()).is_err());
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(check_private_dir(&shared, uid()).is_ok());
        assert!(
            check_private_dir(&shared, uid() + 1).is_err(),
            "another user's"
        );
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&shared, &link).unwrap();
        assert!(check_private_dir(&link, uid()).is_err());
    }

    #[test]
    fn private_files_are_0600_and_never_replace_or_follow() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0) };
        let made = create_private(&dir.path().join("a"));
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        made.unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join("a"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let err = create_private(&dir.path().join("a")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        std::os::unix::fs::symlink("/nonexistent-target", dir.path().join("b")).unwrap();
        assert!(create_private(&dir.path().join("b")).is_err());
        assert!(!std::path::Path::new("/nonexistent-target").exists());
    }

    #[test]
    fn only_a_dead_saves_files_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("state");
        let (live, _file) = SaveFiles::create(&target).unwrap();
        let dead = dir.path().join("state.abcdefghij.partial");
        let dead_manifest = dir.path().join("state.abcdefghij.manifest.partial");
        let other = dir.path().join("state.x.abcdefghij.partial");
        for p in [&dead, &dead_manifest, &other] {
            std::fs::write(p, b"").unwrap();
        }
        assert_eq!(partials_of(&target).len(), 2);
        remove_stale_partials(&target);
        assert!(live.state.exists(), "a running save keeps its file");
        assert!(!dead.exists() && !dead_manifest.exists());
        assert!(other.exists(), "another target's file");
    }
}
