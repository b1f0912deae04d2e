use std::io;
use std::path::PathBuf;

/// What went wrong in a save, restore or migration. Every variant says what
/// failed, on which file or socket, and what QEMU said where it said anything.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Monitor(#[from] qemu_monitor::Error),
    /// The monitor answered something this crate cannot read.
    #[error("unexpected monitor output: {0}")]
    Protocol(String),
    #[error("{}: {what}: {}", .path.display(), os_message(.source))]
    File {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The VM is not in a state this operation can start from.
    #[error("{0}")]
    NotReady(String),
    /// Another save or migration holds this VM.
    #[error("{0}")]
    Busy(String),
    /// QEMU reported the migration failed.
    #[error("the migration failed: {0}")]
    MigrationFailed(String),
    /// QEMU exited before the operation finished.
    #[error("QEMU exited {during}{}", qemu_said(.stderr))]
    QemuExited { during: String, stderr: String },
    #[error("cancelled: {0}")]
    Interrupted(String),
    /// A state file or its manifest is incomplete, damaged or unreadable.
    #[error("{}: {reason}", .path.display())]
    BadStateFile { path: PathBuf, reason: String },
    /// The options or QEMU chosen cannot restore this state file.
    #[error("{} cannot be restored with these options:\n{}", .path.display(), bullet(.differences))]
    Mismatch {
        path: PathBuf,
        differences: Vec<String>,
    },
    #[error("starting {}: {}", .binary.display(), os_message(.source))]
    Launch {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn os_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn qemu_said(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("failed to open module") && !l.trim().is_empty())
        .collect();
    if lines.is_empty() {
        String::new()
    } else {
        format!("; QEMU said: {}", lines.join(" / "))
    }
}

fn bullet(items: &[String]) -> String {
    items
        .iter()
        .map(|d| format!("  - {d}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Error {
    pub(crate) fn file(
        path: impl Into<PathBuf>,
        what: &'static str,
    ) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::File { path, what, source }
    }

    /// The CLI's exit status for this error (documented in `--help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::BadStateFile { .. } | Error::Mismatch { .. } => 2,
            Error::NotReady(_) | Error::Busy(_) => 2,
            Error::MigrationFailed(_) | Error::File { .. } => 3,
            Error::QemuExited { .. } => 3,
            Error::Interrupted(_) => 4,
            Error::Monitor(e) if e.kind() == qemu_monitor::ErrorKind::Unreachable => 1,
            Error::Monitor(_) | Error::Protocol(_) | Error::Launch { .. } => 1,
        }
    }
}
