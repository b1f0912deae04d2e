//! A QEMU process started by a test, the e2e job or a benchmark: killed
//! when its handle goes, its stderr kept in a file, its serial console
//! (stdout) read line by line when asked.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use test_guest::Lines;

/// Where a started QEMU's stdout goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serial {
    /// Nowhere.
    Null,
    /// Read line by line (a guest with `-serial stdio`).
    Lines,
}

/// A started QEMU, killed when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
    stderr_log: PathBuf,
    serial: Option<Lines>,
}

impl Process {
    /// Starts `binary args...` with stdin closed, stderr into `stderr_log`,
    /// and stdout as `serial` says (copied into `serial_log` when given).
    ///
    /// # Errors
    /// When the log cannot be created or QEMU cannot be started, in words.
    pub fn start<S: AsRef<OsStr>>(
        binary: &Path,
        args: &[S],
        stderr_log: &Path,
        serial: Serial,
        serial_log: Option<&Path>,
    ) -> Result<Process, String> {
        let stderr =
            File::create(stderr_log).map_err(|e| format!("{}: {e}", stderr_log.display()))?;
        let stdout = match serial {
            Serial::Null => Stdio::null(),
            Serial::Lines => Stdio::piped(),
        };
        let mut child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let serial = child.stdout.take().map(|out| {
            let log = serial_log.and_then(|p| File::create(p).ok());
            Lines::collect_to(out, log)
        });
        Ok(Process {
            child,
            stderr_log: stderr_log.to_path_buf(),
            serial,
        })
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The serial console's lines, when it was asked for.
    ///
    /// # Panics
    /// When the process was started with [`Serial::Null`].
    pub fn serial(&self) -> &Lines {
        self.serial
            .as_ref()
            .expect("this QEMU was started without its serial console")
    }

    /// Everything QEMU printed on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// QEMU's own words on stderr, without blank lines and module noise, on one line.
    pub fn said(&self) -> String {
        qemu_migrate::qemu_stderr_lines(&self.stderr()).join(" / ")
    }

    /// Waits for QEMU to exit by itself.
    ///
    /// # Errors
    /// When waiting fails.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait()
    }

    /// Whether QEMU has exited, without waiting.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits, up to `timeout`, for process `pid` (a child or not) to be gone
/// with all its threads, and so to have closed its sockets and files; says
/// whether it is. A zombie main thread is not enough: the other threads of
/// a QEMU may still be letting go of its RAM, its sockets still open.
pub fn wait_gone(pid: u32, timeout: std::time::Duration) -> bool {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(fd) = libc::c_int::try_from(raw) else {
        return true;
    };
    if fd < 0 {
        return true; // ESRCH: already gone (kernels without pidfd are not supported here).
    }
    // SAFETY: the descriptor was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call; it becomes
    // readable when the process has exited.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}
