//! Everything this crate asks of the operating system beyond plain files,
//! in one place to audit: the pipe QEMU streams through, the per-VM lock,
//! durable renames, writeback hints, waiting for a process to be gone, and
//! reading another process's command line. The `unsafe` blocks of the crate
//! are all here, each for a call std does not offer.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{PipeReader, PipeWriter};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

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

/// `FILE.partial`: where a state file is written until it is complete.
#[must_use]
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Makes a rename durable: the directory entry itself is synced.
pub(crate) fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
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
        let dir = lock_dir()?;
        let path = dir.join(format!("vm-{pid}.lock"));
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
                return Ok(VmLock { file, path });
            }
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
    let meta = std::fs::symlink_metadata(&dir)
        .map_err(Error::file(&dir, "checking the lock directory"))?;
    let private = meta.is_dir() && meta.uid() == uid && meta.permissions().mode() & 0o022 == 0;
    if !private {
        return Err(Error::file(&dir, "checking the lock directory")(
            std::io::Error::other(
                "not a private directory of this user (a symlink, another user's, or writable by others)",
            ),
        ));
    }
    Ok(dir)
}

/// Waits (bounded) for a process that was told to quit to be gone.
pub(crate) fn wait_gone(pid: u32, timeout: Duration) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if let Ok(fd) = libc::c_int::try_from(raw) {
        if fd < 0 {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
                return; // ESRCH: already gone.
            }
            return wait_gone_by_proc(pid, timeout);
        }
        // SAFETY: the descriptor was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call; it becomes
        // readable when the process has exited.
        unsafe { libc::poll(&mut p, 1, poll_ms(timeout)) };
    }
}

/// Kernels before 5.3 have no pidfd: watch /proc instead.
fn wait_gone_by_proc(pid: libc::pid_t, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let stat = PathBuf::from(format!("/proc/{pid}/stat"));
    while Instant::now() < deadline {
        let gone = std::fs::read_to_string(&stat)
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if gone {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Whether `fd` (a listening socket) has a connection waiting, within `timeout`.
pub(crate) fn readable(fd: &impl AsRawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, poll_ms(timeout)) > 0 }
}

/// A process's binary, its arguments (without argv[0]) and its `QEMU_*` environment.
pub(crate) struct ProcessInfo {
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// Reads what `/proc/PID` says of a process.
pub(crate) fn process_info(pid: u32) -> Result<ProcessInfo> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let cmdline = std::fs::read(proc.join("cmdline")).map_err(Error::file(
        proc.join("cmdline"),
        "reading the QEMU command line",
    ))?;
    let mut args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.last().is_some_and(String::is_empty) {
        args.pop();
    }
    if args.is_empty() {
        return Err(Error::file(
            proc.join("cmdline"),
            "reading the QEMU command line",
        )(std::io::Error::other(
            "the process has no command line",
        )));
    }
    let argv0 = args.remove(0);
    let binary = std::fs::read_link(proc.join("exe")).unwrap_or_else(|_| PathBuf::from(argv0));
    let env = std::fs::read(proc.join("environ"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter_map(|kv| {
                    let kv = String::from_utf8_lossy(kv);
                    let (k, v) = kv.split_once('=')?;
                    k.starts_with("QEMU_")
                        .then(|| (k.to_string(), v.to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(ProcessInfo { binary, args, env })
}
