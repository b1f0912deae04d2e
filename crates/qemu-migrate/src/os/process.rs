//! Other processes: who listens on a socket or holds a file, whose a
//! process is, waiting for one to be gone, reading its command line.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

use super::poll_ms;

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

/// Whether `pid` has begun to exit: its main thread is a zombie, while
/// other threads may still be releasing its memory and files.
pub(crate) fn is_exiting(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

/// The parent of process `pid` (the 4th field of `/proc/PID/stat`).
pub(crate) fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
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

/// Makes `cmd`'s child have each descriptor of `fds` open at the number
/// given beside it (above its standard streams), as a launcher passes
/// descriptors to QEMU. The numbers should be high enough not to be any of
/// this process's own, which the child has too until it execs.
pub(crate) fn pass_fds(cmd: &mut std::process::Command, fds: Vec<(OwnedFd, i32)>) {
    use std::os::unix::process::CommandExt;
    if fds.is_empty() {
        return;
    }
    let pairs: Vec<(i32, i32)> = fds.iter().map(|(f, n)| (f.as_raw_fd(), *n)).collect();
    // SAFETY: only dup2 and fcntl, both async-signal-safe, run between fork
    // and exec; `fds` lives in the closure, so the descriptors stay open
    // until the child has its copies.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &fds;
            for &(from, to) in &pairs {
                if from == to {
                    // dup2 onto itself would leave close-on-exec set.
                    if libc::fcntl(to, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// What a process writes to its standard error from now on, when that is a
/// regular file (a QEMU started with `2>log`): the file, opened through
/// `/proc/PID/fd/2`, and where it ended when opened. A pipe or a terminal
/// cannot be read by anyone else, so there is no tap for those.
#[derive(Debug)]
pub(crate) struct StderrTap {
    file: File,
    from: u64,
}

impl StderrTap {
    /// The tap on `pid`'s stderr, if it is a regular file this process may read.
    pub(crate) fn of(pid: u32) -> Option<StderrTap> {
        let path = format!("/proc/{pid}/fd/2");
        let meta = std::fs::metadata(&path).ok()?;
        if !meta.is_file() {
            return None;
        }
        let file = File::open(&path).ok()?;
        Some(StderrTap {
            file,
            from: meta.len(),
        })
    }

    /// What was written since the tap was made (its last 16 KiB at most).
    pub(crate) fn written(&self) -> String {
        use std::os::unix::fs::FileExt;
        let end = self.file.metadata().map_or(self.from, |m| m.len());
        let start = self.from.max(end.saturating_sub(16 << 10));
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
        let n = self.file.read_at(&mut buf, start).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

/// How a process that ended is said to have ended, from a wait status.
pub(crate) fn status_words(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => {
            let core = if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            };
            format!("killed by {}{core}", signal_name(sig))
        }
        _ => status.to_string(),
    }
}

fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGABRT => "SIGABRT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGPIPE => "SIGPIPE",
        _ => return format!("signal {sig}"),
    };
    format!("signal {sig} ({name})")
}

/// How `pid`, which is not our child, ended: readable only while it is a
/// zombie its parent has not reaped yet (`exit_code`, the 52nd field of
/// `/proc/PID/stat`, a wait status).
pub(crate) fn zombie_status(pid: u32) -> Option<String> {
    use std::os::unix::process::ExitStatusExt;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (the state).
    if fields.first() != Some(&"Z") {
        return None;
    }
    let raw: i32 = fields.get(52 - 3)?.parse().ok()?;
    Some(status_words(std::process::ExitStatus::from_raw(raw)))
}
