//! The processes this one starts (QEMU, the backends it needs) end with it
//! until they are handed over, whatever ends this one (`kill -9` included).
//!
//! One helper process, the keeper, is forked the first time something is
//! started and holds one end of a socket pair; this process holds the
//! other. Each child names itself to the keeper between fork and exec, so
//! there is no instant at which a child runs that the keeper does not know
//! of. This process tells the keeper when it hands a child over (it is to
//! outlive this process: a restored VM) or has ended it itself. When the
//! socket reaches its end, this process is gone: the keeper ends every
//! child still its own, says so on stderr, runs the command it was given
//! for that case if any (a revert brings its VM back), and exits.
//!
//! `PR_SET_PDEATHSIG` would do the first part in the kernel, but it cannot
//! be taken back once QEMU runs, and a restored VM must outlive the tool;
//! it also fires when the *thread* that forked the child ends.

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{Error, Result};

use super::process::wait_gone;
use super::watchdog::close_all_but;
use super::write_stderr;

/// A child names itself: 'A' and its pid (4 bytes, little-endian).
const ADOPT: u8 = b'A';
/// This process let a child go (handed over, or ended and about to be reaped).
const RELEASE: u8 = b'R';
/// The command to run if this process dies, NUL-separated; empty for none.
const ON_DEATH: u8 = b'D';

/// The keeper's pid and this process's end of the socket.
struct Keeper {
    pid: libc::pid_t,
    socket: OwnedFd,
}

static KEEPER: Mutex<Option<Keeper>> = Mutex::new(None);

/// Makes the child `cmd` starts end with this process until
/// [`release`]d: it names itself to the keeper before it execs.
///
/// # Errors
/// [`Error::Os`] when the keeper cannot be started.
pub(crate) fn end_with_us(cmd: &mut std::process::Command) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let fd = keeper_socket()?;
    // SAFETY: only getpid and send, both async-signal-safe, run between
    // fork and exec; the descriptor stays open in this process for good.
    unsafe {
        cmd.pre_exec(move || {
            // No allocation here: the error is the system's own.
            send_raw(fd, &message(ADOPT, libc::getpid() as u32))
        });
    }
    Ok(())
}

/// Lets child `pid` go: it is handed over (it outlives this process), or
/// this process ended it and has not reaped it yet. Call it before the
/// child is reaped, so that its pid cannot be another's by then.
pub(crate) fn release(pid: u32) {
    if let Some(k) = KEEPER.lock().expect("keeper lock").as_ref() {
        let _ = send_raw(k.socket.as_raw_fd(), &message(RELEASE, pid));
    }
}

/// Makes `pid`, a process this one started some other way, end with this
/// one until [`release`]d.
///
/// # Errors
/// [`Error::Os`] when the keeper cannot be started or told.
pub(crate) fn adopt(pid: u32) -> Result<()> {
    let fd = keeper_socket()?;
    send_raw(fd, &message(ADOPT, pid)).map_err(Error::os("telling the keeper process of a child"))
}

/// Sets (or with `None` clears) the command the keeper runs, in its own
/// place, once it has ended the children after this process died.
///
/// # Errors
/// [`Error::Os`] when the keeper cannot be started or told (a command of
/// more than 60 KiB included).
pub(crate) fn on_death_run(argv: Option<&[OsString]>) -> Result<()> {
    let fd = keeper_socket()?;
    let mut msg = vec![ON_DEATH];
    for a in argv.unwrap_or_default() {
        msg.extend_from_slice(a.as_bytes());
        msg.push(0);
    }
    if msg.len() > MAX_MESSAGE {
        return Err(Error::os("telling the keeper process what to run")(
            std::io::Error::other("the command is too long"),
        ));
    }
    send_raw(fd, &msg).map_err(Error::os("telling the keeper process what to run"))
}

const MAX_MESSAGE: usize = 60 << 10;

fn message(tag: u8, pid: u32) -> [u8; 5] {
    let p = pid.to_le_bytes();
    [tag, p[0], p[1], p[2], p[3]]
}

/// One message on the keeper's socket (`SOCK_SEQPACKET`: sent whole, never
/// mixed with another's); a keeper gone is an error, not a SIGPIPE.
fn send_raw(fd: RawFd, msg: &[u8]) -> std::io::Result<()> {
    loop {
        // SAFETY: sends from a buffer we own, of its length.
        let n = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The keeper's socket, the keeper forked first if it is not running.
fn keeper_socket() -> Result<RawFd> {
    let mut keeper = KEEPER.lock().expect("keeper lock");
    if let Some(k) = keeper.as_ref() {
        let mut status = 0;
        // SAFETY: asks, without waiting, whether our own child has exited.
        if unsafe { libc::waitpid(k.pid, &mut status, libc::WNOHANG) } == 0 {
            return Ok(k.socket.as_raw_fd());
        }
    }
    let k = fork_keeper()?;
    let fd = k.socket.as_raw_fd();
    // A dead keeper's socket stays open: a child being spawned right now
    // may still name itself on that number, which must not become another file.
    if let Some(old) = keeper.replace(k) {
        std::mem::forget(old.socket);
    }
    Ok(fd)
}

fn fork_keeper() -> Result<Keeper> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array given.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(Error::os("creating the keeper process's socket")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: getpid cannot fail.
    let parent = unsafe { libc::getpid() };
    // SAFETY: fork has no preconditions; the child runs only `keep` and exits
    // without returning into the caller.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::os("starting the keeper process")(
            std::io::Error::last_os_error(),
        ));
    }
    if pid > 0 {
        drop(theirs);
        return Ok(Keeper { pid, socket: ours });
    }
    drop(ours);
    keep(theirs, parent)
}

/// The keeper itself: it listens until this process's end of the socket
/// closes, then ends what is still adopted, and runs the command it was given.
fn keep(socket: OwnedFd, parent: libc::pid_t) -> ! {
    // SAFETY: plain calls on this process's own signals, name and descriptors.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_IGN);
        }
        libc::prctl(libc::PR_SET_NAME, c"qemu-mig-keeper".as_ptr());
    }
    close_all_but(socket.as_raw_fd());
    let mut adopted: Vec<(u32, Option<OwnedFd>)> = Vec::new();
    let mut on_death: Vec<CString> = Vec::new();
    let mut buf = vec![0u8; MAX_MESSAGE + 16];
    loop {
        // SAFETY: receives into a buffer we own, of its length.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        let Ok(n) = usize::try_from(n) else { break };
        if n == 0 {
            break;
        }
        let msg = &buf[..n];
        let pid = || {
            msg.get(1..5)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_le_bytes)
        };
        match msg[0] {
            ADOPT => {
                // Held from now on, so the pid cannot name another process
                // by the time it is ended; one already gone is not kept.
                match pid().map(|p| (p, pidfd(p))) {
                    Some((pid, Ok(fd))) => adopted.push((pid, Some(fd))),
                    Some((pid, Err(e))) if e.raw_os_error() != Some(libc::ESRCH) => {
                        adopted.push((pid, None));
                    }
                    _ => {}
                }
            }
            RELEASE => {
                if let Some(pid) = pid() {
                    adopted.retain(|(p, _)| *p != pid);
                }
            }
            ON_DEATH => {
                on_death = msg[1..]
                    .split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .filter_map(|a| CString::new(a).ok())
                    .collect();
            }
            _ => {}
        }
    }
    let mut ended = Vec::new();
    for (pid, fd) in &adopted {
        let name = super::process::process_name(*pid);
        let sent = match fd {
            // SAFETY: signals the process the descriptor refers to.
            Some(fd) => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                ) == 0
            },
            // SAFETY: kill only sends a signal.
            None => unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) == 0 },
        };
        if sent {
            wait_gone(*pid, Duration::from_secs(5));
            ended.push(format!("{name} (pid {pid})"));
        }
    }
    if !ended.is_empty() {
        write_stderr(&format!(
            "qemu-migrate: process {parent} died before it handed over what it had started; \
             ended {}\n",
            ended.join(", ")
        ));
    }
    if let Some(program) = on_death.first() {
        let shown: Vec<String> = on_death
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        write_stderr(&format!(
            "qemu-migrate: the process (pid {parent}) died midway; putting things right: {}\n",
            shown.join(" ")
        ));
        let mut argv: Vec<*const libc::c_char> = on_death.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        // SAFETY: argv is a NULL-terminated array of C strings that live
        // until the call, which returns only on failure.
        unsafe { libc::execvp(program.as_ptr(), argv.as_ptr()) };
        write_stderr(&format!(
            "qemu-migrate: running {} failed: {}\n",
            program.to_string_lossy(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: leaves the keeper without running the parent's destructors.
    unsafe { libc::_exit(0) }
}

/// A descriptor that names process `pid` for good (Linux 5.3): `ESRCH`
/// when it is gone, `ENOSYS` on an older kernel.
fn pidfd(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    match libc::c_int::try_from(raw) {
        // SAFETY: the descriptor was just opened and is owned by nobody else.
        Ok(fd) if fd >= 0 => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        _ => Err(std::io::Error::last_os_error()),
    }
}
