//! A process that puts the VM back if this one dies (`kill -9` included).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use crate::error::{Error, Result};

use super::process::{kill, wait_gone};
use super::write_stderr;

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
        super::durable::no_faults();
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
pub(super) fn close_all_but(keep: libc::c_int) {
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
