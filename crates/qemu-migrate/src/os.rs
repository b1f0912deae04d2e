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

/// `FILE.partial`: the name older versions wrote an unfinished state file
/// under; a restore still recognises it.
#[must_use]
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Letters of the random part of a temporary name.
const TAG_LEN: usize = 10;
const TAG_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// An unpredictable tag for a temporary name, from the kernel's random source.
fn random_tag() -> String {
    let mut bytes = [0u8; TAG_LEN];
    // SAFETY: getrandom writes at most `len` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // No getrandom (kernels before 3.17): the clock and pid still make
        // the name hard to guess, and O_EXCL makes a guessed one harmless.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
            ^ u128::from(std::process::id()) << 64;
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (seed >> (i * 12)) as u8;
        }
    }
    bytes
        .iter()
        .map(|b| TAG_CHARS[*b as usize % TAG_CHARS.len()] as char)
        .collect()
}

/// Creates `path` for writing, readable and writable by this user only
/// (`0600` whatever the umask), never through a symlink and never over an
/// existing file (`O_EXCL|O_NOFOLLOW`).
///
/// # Errors
/// The operating system's error: `AlreadyExists` when anything is at `path`.
pub(crate) fn create_private(path: &Path) -> std::io::Result<File> {
    let file = File::options()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // The umask may have taken more away than 0600 does; say exactly 0600.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// [`create_private`], locked (`flock`) until the file is closed: a save's
/// unfinished files are locked while it lives, so that another save can
/// tell a dead one's leftovers (unlocked) from them.
pub(crate) fn create_locked(path: &Path) -> std::io::Result<File> {
    let file = create_private(path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(std::io::Error::other(e.to_string()))
        }
    }
}

/// The unfinished files of one save of `target`, beside it under a name
/// nobody can guess: `TARGET.TAG.partial` (the stream) and
/// `TARGET.TAG.manifest.partial`. The stream file is locked while the save
/// runs, so a later save can tell a dead save's leftovers from a live one.
#[derive(Debug)]
pub struct SaveFiles {
    /// The stream, until it is renamed to the target.
    pub state: PathBuf,
    /// The manifest, until it is renamed beside the target.
    pub manifest: PathBuf,
}

impl SaveFiles {
    /// Creates the stream's temporary file (`0600`, `O_EXCL|O_NOFOLLOW`),
    /// locked; the manifest's name is reserved beside it.
    ///
    /// # Errors
    /// [`Error::File`] when the directory cannot take the file.
    pub fn create(target: &Path) -> Result<(SaveFiles, File)> {
        let name = target.file_name().unwrap_or_default().to_os_string();
        loop {
            let tag = random_tag();
            let with = |suffix: &str| {
                let mut n = name.clone();
                n.push(format!(".{tag}.{suffix}"));
                target.with_file_name(n)
            };
            let files = SaveFiles {
                state: with("partial"),
                manifest: with("manifest.partial"),
            };
            match create_locked(&files.state) {
                Ok(file) => return Ok((files, file)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(Error::file(&files.state, "creating the state file")(e));
                }
            }
        }
    }

    /// Removes both files, where they still exist.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.state);
        let _ = std::fs::remove_file(&self.manifest);
    }
}

/// Whether `file_name` is an unfinished file of a save of `target_name`:
/// `TARGET.TAG.partial` (a stream) or `TARGET.TAG.manifest.partial`.
fn is_partial_of(file_name: &str, target_name: &str, manifests_too: bool) -> bool {
    let Some(rest) = file_name
        .strip_prefix(target_name)
        .and_then(|r| r.strip_prefix('.'))
    else {
        return false;
    };
    let tag = match rest.strip_suffix(".manifest.partial") {
        Some(tag) if manifests_too => tag,
        Some(_) => return false,
        None => match rest.strip_suffix(".partial") {
            Some(tag) => tag,
            None => return false,
        },
    };
    tag.len() == TAG_LEN && tag.bytes().all(|b| TAG_CHARS.contains(&b))
}

fn partials(target: &Path, manifests_too: bool) -> Vec<PathBuf> {
    let Some(name) = target.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|f| is_partial_of(f, name, manifests_too))
        })
        .map(|e| target.with_file_name(e.file_name()))
        .collect()
}

/// The unfinished streams of saves of `target` beside it, whether their
/// save still runs or died (and the old `TARGET.partial`).
pub fn partials_of(target: &Path) -> Vec<PathBuf> {
    let mut found = partials(target, false);
    if partial_path(target).exists() {
        found.push(partial_path(target));
    }
    found
}

/// Removes what saves of `target` that died (killed, crashed machine) left
/// beside it: unfinished streams and manifests nobody holds the lock of.
/// Only this user's files; a save still running keeps its own, locked.
pub fn remove_stale_partials(target: &Path) {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    for partial in partials(target, true) {
        let Ok(file) = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&partial)
        else {
            continue;
        };
        let mine = file.metadata().is_ok_and(|m| m.is_file() && m.uid() == uid);
        if mine && file.try_lock().is_ok() {
            let _ = std::fs::remove_file(&partial);
        }
    }
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

    fn take_in(dir: &Path, pid: u32) -> Result<VmLock> {
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
    check_private_dir(&dir, uid)?;
    Ok(dir)
}

/// Refuses a directory that is a symlink, another user's, or writable by others.
fn check_private_dir(dir: &Path, uid: u32) -> Result<()> {
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

/// A process that outlives this one to put a VM back as it was if this
/// one dies (kill -9 included) in the middle of changing it. It is forked
/// before anything changes and holds one end of a pipe: this process tells
/// it how far it got (one byte per step), and says "done" when it has put
/// things back itself. If the pipe reaches its end without "done", this
/// process is gone, and the watchdog runs its task with the last step it
/// heard, then exits.
///
/// The task runs in a forked child of a process that may have threads: it
/// may use the allocator (glibc's is safe after fork) and sockets, but no
/// lock another thread could have held (stdout, the environment).
#[derive(Debug)]
pub struct Watchdog {
    pid: libc::pid_t,
    to_child: Option<File>,
}

/// The byte that tells the watchdog its parent put everything back itself.
const WATCHDOG_DONE: u8 = b'.';

impl Watchdog {
    /// Forks the watchdog; `task(last_step)` runs in it if this process
    /// dies without [`Watchdog::dismiss`]. It ignores SIGINT, SIGTERM and
    /// SIGHUP (a Ctrl-C is this process's to handle) and keeps only
    /// stdin, stdout and stderr of this process's descriptors, so that no
    /// lock, monitor connection or file of this process outlives it.
    ///
    /// # Errors
    /// [`Error::Os`] when the pipe or the fork fails.
    pub fn spawn(task: impl FnOnce(Option<u8>)) -> Result<Watchdog> {
        let (rx, tx) = std::io::pipe().map_err(Error::os("creating the watchdog's pipe"))?;
        // SAFETY: fork has no preconditions; the child only runs the code
        // below and exits without returning into the caller.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(Error::os("starting the watchdog process")(
                std::io::Error::last_os_error(),
            ));
        }
        if pid > 0 {
            drop(rx);
            return Ok(Watchdog {
                pid,
                to_child: Some(File::from(OwnedFd::from(tx))),
            });
        }
        // The child.
        drop(tx);
        let keep = rx.as_fd().as_raw_fd();
        // SAFETY: plain calls on this process's own signals and descriptors.
        unsafe {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
                libc::signal(sig, libc::SIG_IGN);
            }
        }
        close_all_but(keep);
        let mut rx = rx;
        let mut last = None;
        let mut byte = [0u8; 1];
        loop {
            match std::io::Read::read(&mut rx, &mut byte) {
                Ok(1) if byte[0] == WATCHDOG_DONE => {
                    // SAFETY: leaves the child without running the parent's destructors.
                    unsafe { libc::_exit(0) }
                }
                Ok(1) => last = Some(byte[0]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ => break,
            }
        }
        task(last);
        // SAFETY: as above.
        unsafe { libc::_exit(0) }
    }

    /// A watchdog that ends process `pid` (a QEMU this process started and
    /// has not handed over yet) and says `why` if this process dies first.
    ///
    /// # Errors
    /// As [`Watchdog::spawn`].
    pub fn ending(pid: u32, why: &'static str) -> Result<Watchdog> {
        Watchdog::spawn(move |_| {
            kill(pid);
            wait_gone(pid, Duration::from_secs(5));
            write_stderr(why);
        })
    }

    /// Tells the watchdog how far this process got.
    pub fn step(&mut self, step: u8) {
        debug_assert_ne!(step, WATCHDOG_DONE);
        if let Some(f) = self.to_child.as_mut() {
            let _ = std::io::Write::write_all(f, &[step]);
        }
    }

    /// Tells the watchdog all is well, and waits for it to exit.
    pub fn dismiss(mut self) {
        self.step_done();
    }

    fn step_done(&mut self) {
        if let Some(mut f) = self.to_child.take() {
            let _ = std::io::Write::write_all(&mut f, &[WATCHDOG_DONE]);
            drop(f);
            let mut status = 0;
            // SAFETY: waits for our own child, which exits on reading "done".
            unsafe { libc::waitpid(self.pid, &mut status, 0) };
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Dropped on a path that returned normally (an error included):
        // this process put things back itself.
        self.step_done();
    }
}

/// Closes every descriptor above stderr but `keep`: `close_range` (Linux
/// 5.9), else each one `/proc/self/fd` lists.
fn close_all_but(keep: libc::c_int) {
    let ranges = [(3, keep - 1), (keep + 1, libc::c_int::MAX)];
    // SAFETY: close_range only closes this process's descriptors in the range.
    let ok = ranges.iter().all(|&(lo, hi)| {
        lo > hi || unsafe { libc::syscall(libc::SYS_close_range, lo as u32, hi as u32, 0) } == 0
    });
    if ok {
        return;
    }
    let open: Vec<libc::c_int> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2 && fd != keep)
        .collect();
    for fd in open {
        // SAFETY: closes a descriptor of this process; one that was the
        // directory listing's own is already closed and fails harmlessly.
        unsafe { libc::close(fd) };
    }
}

/// The process listening on the unix socket at `path`, if one does: a
/// connection is made and let go at once (`SO_PEERCRED` names the
/// listener). `None` when nothing listens (no file, or a stale one).
pub fn socket_listener(path: &Path) -> Option<u32> {
    let stream = std::os::unix::net::UnixStream::connect(path).ok()?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

/// The processes that have the file at `path` open (any descriptor of
/// theirs on the same inode), as far as `/proc` lets this user see.
pub fn file_holders(path: &Path) -> Vec<u32> {
    let Ok(target) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let holds = std::fs::read_dir(entry.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| {
                std::fs::metadata(fd.path())
                    .is_ok_and(|m| m.dev() == target.dev() && m.ino() == target.ino())
            });
        if holds {
            out.push(pid);
        }
    }
    out
}

/// A process's name (`/proc/PID/comm`), for messages.
pub fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Ends process `pid` at once (SIGKILL): a QEMU this crate started.
pub(crate) fn kill(pid: u32) {
    // SAFETY: kill only sends a signal.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

/// Writes `text` to stderr with one system call and no lock (safe in a
/// forked child, where another thread may have held std's stderr lock).
pub(crate) fn write_stderr(text: &str) {
    // SAFETY: writes from a buffer we own, of its length.
    unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
}

/// This process's real user id.
pub(crate) fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// The user a process runs as (the owner of `/proc/PID`: its effective uid).
pub(crate) fn process_uid(pid: u32) -> Option<u32> {
    std::fs::metadata(format!("/proc/{pid}"))
        .ok()
        .map(|m| m.uid())
}

/// `name (uid N)` from `/etc/passwd`, or `uid N`.
pub(crate) fn user_name(uid: u32) -> String {
    let name = std::fs::read_to_string("/etc/passwd").ok().and_then(|t| {
        t.lines().find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            (f.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_string())
        })
    });
    match name {
        Some(n) => format!("{n} (uid {uid})"),
        None => format!("uid {uid}"),
    }
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

#[cfg(test)]
mod tests {
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
        assert!(!Path::new("/nonexistent-target").exists());
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
