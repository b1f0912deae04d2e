//! socat's terminal options on standard input (`raw`, `rawer`, `echo=0`,
//! `icanon=0`): set while a session runs, restored after.

use std::os::fd::RawFd;

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
    // SAFETY: fd is a terminal and t a valid termios.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
    Some(saved)
}

/// Puts the terminal back as it was.
pub fn restore(fd: RawFd, saved: Option<libc::termios>) {
    if let Some(t) = saved {
        // SAFETY: fd is a terminal and t the settings read from it.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
    }
}
