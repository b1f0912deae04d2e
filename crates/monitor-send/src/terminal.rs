//! socat's terminal options on standard input (`raw`, `rawer`, `echo=0`,
//! `icanon=0`): set while a session runs, restored after.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicPtr, Ordering};

/// The settings to put back if a signal ends the process (Ctrl-C where the
/// modes keep signals on, as `echo=0,icanon=0` does), as socat does.
static SAVED: AtomicPtr<libc::termios> = AtomicPtr::new(std::ptr::null_mut());
/// The signals that end a session with the terminal's modes restored.
const ENDING_SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

extern "C" fn restore_and_die(sig: libc::c_int) {
    let saved = SAVED.load(Ordering::SeqCst);
    // SAFETY: tcsetattr, signal and raise are async-signal-safe; `saved`
    // points at settings leaked for the life of the process.
    unsafe {
        if !saved.is_null() {
            libc::tcsetattr(0, libc::TCSANOW, saved);
        }
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// The terminal modes a socat address asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TerminalOptions {
    /// `raw`: as `stty raw` (echo as it was).
    pub raw: bool,
    /// `rawer`: raw and no echo.
    pub rawer: bool,
    pub echo: Option<bool>,
    pub icanon: Option<bool>,
}

impl TerminalOptions {
    /// Whether keystrokes should go to QEMU as they are typed, its own line
    /// editor doing the editing and echo.
    pub fn wants_raw(&self) -> bool {
        self.raw || self.rawer || self.echo == Some(false) || self.icanon == Some(false)
    }
}

/// Applies the options to the terminal `fd`; returns the settings to restore.
pub fn apply(fd: RawFd, opts: &TerminalOptions) -> Option<libc::termios> {
    // SAFETY: termios is plain data, filled in by tcgetattr before use.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a terminal (checked by the caller) and saved is valid for writes.
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return None;
    }
    let mut t = saved;
    if opts.raw || opts.rawer {
        // SAFETY: t is a valid termios.
        unsafe { libc::cfmakeraw(&mut t) };
        if opts.raw && !opts.rawer {
            t.c_lflag |= saved.c_lflag & libc::ECHO;
        }
    }
    match opts.echo {
        Some(true) => t.c_lflag |= libc::ECHO,
        Some(false) => t.c_lflag &= !libc::ECHO,
        None => {}
    }
    match opts.icanon {
        Some(true) => t.c_lflag |= libc::ICANON,
        Some(false) => {
            t.c_lflag &= !libc::ICANON;
            t.c_cc[libc::VMIN] = 1;
            t.c_cc[libc::VTIME] = 0;
        }
        None => {}
    }
    SAVED.store(Box::into_raw(Box::new(saved)), Ordering::SeqCst);
    for sig in ENDING_SIGNALS {
        // SAFETY: the handler only calls async-signal-safe functions.
        unsafe {
            libc::signal(
                sig,
                restore_and_die as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
    // SAFETY: fd is a terminal and t a valid termios.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
    Some(saved)
}

/// Puts the terminal back as it was.
pub fn restore(fd: RawFd, saved: Option<libc::termios>) {
    if let Some(t) = saved {
        // SAFETY: fd is a terminal and t the settings read from it.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
        for sig in ENDING_SIGNALS {
            // SAFETY: back to the default disposition.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
}
