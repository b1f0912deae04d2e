//! A process of its own for work that outlives the call that starts it: the
//! check of a restored VM's RAM images, which goes on after `restore
//! --daemonize` has returned.

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::error::{Error, Result};

use super::watchdog::close_all_but;

/// Runs `task` in a process of its own (forked twice, so that it is
/// nobody's zombie and outlives this one), at the lowest CPU and I/O
/// priority, holding none of this process's descriptors but stderr and
/// `socket`, which it gets as its own (stdin and stdout are `/dev/null`). It ignores SIGINT and
/// SIGHUP (the terminal's, meant for the VM), not SIGTERM.
///
/// The task runs in a forked child of a process that may have threads: it
/// may use the allocator and sockets, but no lock another thread could
/// have held (stdout, stderr through std: use [`super::write_stderr`]).
///
/// # Errors
/// [`Error::Os`] when the fork fails.
pub(crate) fn spawn_background(socket: RawFd, task: impl FnOnce(UnixStream)) -> Result<()> {
    // SAFETY: fork has no preconditions; the child only runs the code
    // below and exits without returning into the caller.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::os("starting the RAM image check")(
            std::io::Error::last_os_error(),
        ));
    }
    if pid > 0 {
        let mut status = 0;
        // SAFETY: waits for our own child, which exits as soon as it has forked.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Ok(());
    }
    // The child: fork again and leave, so the grandchild is reparented.
    // SAFETY: as above; the child exits at once either way.
    if unsafe { libc::fork() } != 0 {
        // SAFETY: leaves without running the parent's destructors.
        unsafe { libc::_exit(0) }
    }
    // SAFETY: plain calls on this process's own signals.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    close_all_but(socket);
    // Its words go to stderr (the terminal of a restore in the foreground);
    // stdin and stdout, which a caller may be reading to their end, are let go.
    // SAFETY: open and dup2 on this process's own descriptors; the path is
    // a NUL-terminated literal.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            if null > 2 {
                libc::close(null);
            }
        }
    }
    super::lower_priority();
    // SAFETY: `socket` is a descriptor this process inherited and, with
    // every other closed, the only owner of.
    let stream = unsafe { UnixStream::from_raw_fd(socket) };
    task(stream);
    // SAFETY: leaves without running the parent's destructors.
    unsafe { libc::_exit(0) }
}

/// Whether process `pid` still exists (a zombie counts as gone).
pub(crate) fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}
