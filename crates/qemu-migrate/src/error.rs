use std::io;
use std::path::PathBuf;

use qemu_monitor::{MigrationStatus, QemuVersion, RunState};

/// What went wrong in a save, restore or migration. Every variant says what
/// failed, on which file or socket, and what QEMU said where it said anything.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The monitor could not be reached, or failed mid-conversation.
    #[error(transparent)]
    Monitor(#[from] qemu_monitor::Error),
    /// A file of the save or of the VM could not be read or written.
    #[error("{}: {what}: {}", .path.display(), os_message(.source))]
    File {
        /// The file.
        path: PathBuf,
        /// What was being done with it.
        what: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// An operating-system resource that is no file (a pipe, a thread) failed.
    #[error("{what}: {}", os_message(.source))]
    Os {
        /// What was being done.
        what: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The VM's run state does not allow the operation.
    #[error("{}", not_migratable(*.pid, .state, .verb))]
    NotMigratable {
        /// QEMU's pid.
        pid: u32,
        /// The state it is in.
        state: RunState,
        /// What was asked: `save`, `migrate`.
        verb: &'static str,
    },
    /// Another save or migration holds this VM.
    #[error("{}", busy(*.pid, .migration))]
    Busy {
        /// QEMU's pid.
        pid: u32,
        /// QEMU's own migration in progress, or `None` when another
        /// qemu-migrate holds the VM's lock.
        migration: Option<MigrationStatus>,
    },
    /// QEMU itself will not migrate this VM now (`blocked-reasons`: a device
    /// without migration support such as vhost-user-fs, a 9p export in use).
    #[error(
        "QEMU will not {verb} this VM (pid {pid}) as it is, so nothing was changed and the guest \
         runs on:{}",
        .reasons.iter().map(|r| format!("\n  - {r}")).collect::<String>()
    )]
    Blocked {
        /// What was asked: `save`, `live migration`.
        verb: &'static str,
        /// QEMU's pid.
        pid: u32,
        /// QEMU's reasons, as it gives them.
        reasons: Vec<String>,
    },
    /// A TCP monitor answered, but its QEMU is not a process of this host
    /// (or one this user may see): a VM is saved on the host it runs on.
    #[error(
        "{addr}: the QEMU behind this TCP monitor is not a process this host shows; run \
         qemu-migrate on the VM's own host (as a user who can see its process)"
    )]
    NotLocal {
        /// The monitor's address.
        addr: String,
    },
    /// The VM's console is this terminal, which a second QEMU on the same host cannot take over.
    #[error(
        "the VM uses its terminal (-serial stdio, -nographic or a stdio monitor), which a second \
         QEMU on this host cannot take over; save and restore it instead, or give the serial \
         port a socket"
    )]
    UsesTerminal,
    /// Parts of the VM's command line, or processes it depends on, that a
    /// second QEMU cannot have as they are (see [`crate::replay`]).
    #[error("{}", not_replayable(.verb, .items))]
    NotReplayable {
        /// What was asked: `save --then quit`, `live migration`, `restore`.
        verb: &'static str,
        /// Each part, in words.
        items: Vec<String>,
    },
    /// The destination runs an older QEMU than the source.
    #[error(
        "the destination runs QEMU {destination}, older than the source's QEMU {source_version}; \
         QEMU loads only states from its own or older versions"
    )]
    OlderDestination {
        /// The destination's QEMU.
        destination: QemuVersion,
        /// The source's QEMU.
        source_version: QemuVersion,
    },
    /// The receiver runs another machine type than the source.
    #[error(
        "the receiver's QEMU runs machine type {destination}, this VM runs {source_machine}: \
         start the receiver with -M {source_machine} (or from the save's manifest)"
    )]
    DestinationMachine {
        /// The receiver's machine type.
        destination: String,
        /// The source's.
        source_machine: String,
    },
    /// A TCP address that is not `tcp:HOST:PORT`.
    #[error("{given:?}: expected {expected}")]
    BadAddress {
        /// What was given.
        given: String,
        /// The forms that are understood.
        expected: &'static str,
    },
    /// The receiving side of a migration could not be reached or is not one.
    #[error("{addr}: {detail}")]
    Receiver {
        /// Its address, `tcp:HOST:PORT`.
        addr: String,
        /// What went wrong.
        detail: String,
    },
    /// A TCP port could not be listened on.
    #[error("cannot listen on {addr}: {}", os_message(.source))]
    Listen {
        /// The address, `tcp:ADDR:PORT`.
        addr: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// QEMU reported the migration failed; the text says why and what became of the guest.
    #[error("the migration failed: {0}")]
    MigrationFailed(String),
    /// QEMU exited before the operation finished.
    #[error("QEMU exited {during}{}", qemu_said(.stderr))]
    QemuExited {
        /// When, in words (`during the save`).
        during: String,
        /// What QEMU printed on stderr.
        stderr: String,
    },
    /// The source QEMU died while its guest was being migrated: the guest
    /// went with it.
    #[error(
        "the source QEMU (pid {pid}) died {during} ({how}){}; its guest is gone with it",
        qemu_said(.stderr)
    )]
    SourceDied {
        /// Its pid.
        pid: u32,
        /// When, in words (`during the live migration`).
        during: String,
        /// How it ended, as far as can be known (`killed by signal 6 (SIGABRT)`).
        how: String,
        /// The last of what it printed on stderr, where that could be read.
        stderr: String,
    },
    /// The operation would hit a known QEMU bug that loses the guest; the text says which and what to do.
    #[error("{0}")]
    KnownQemuBug(String),
    /// The operation was cancelled (a signal, the caller's flag).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// An error, and what it left changed that its own words do not say.
    #[error("{source}; {note}")]
    Noted {
        /// What failed.
        source: Box<Error>,
        /// What stays changed.
        note: String,
    },
    /// A save that could not be put in place; the target is as it was.
    #[error("{source}; {}", crate::commit::kept_words(.target, *.had_save))]
    NotSaved {
        /// The state file the save was for.
        target: PathBuf,
        /// Whether an earlier save is there (and stays).
        had_save: bool,
        /// What failed.
        source: Box<Error>,
    },
    /// A state file or its manifest is incomplete, damaged or unreadable.
    #[error("{}: {reason}", .path.display())]
    BadStateFile {
        /// The state file or manifest.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The options or QEMU chosen cannot restore this state file.
    #[error("{} cannot be restored with these options:\n{}", .path.display(), bullet(.differences))]
    Mismatch {
        /// The state file.
        path: PathBuf,
        /// Each difference, in words.
        differences: Vec<String>,
    },
    /// Files the saved guest depends on (disks, boot files) changed since the save.
    #[error(
        "{} was saved from a VM whose files have changed since; its memory describes them as \
         they were, and resuming it over other disks corrupts them:\n{}\n(--force restores it \
         anyway; a state saved with `save --with-disks` can be restored again and again)",
        .path.display(), bullet(.changes)
    )]
    FilesChanged {
        /// The state file.
        path: PathBuf,
        /// Each change, in words.
        changes: Vec<String>,
    },
    /// A file or binary a restore would trust is not trustworthy.
    #[error("{}: {reason}", .path.display())]
    Untrusted {
        /// The file, binary or state file.
        path: PathBuf,
        /// Why it is not trusted.
        reason: String,
    },
    /// Another restore of the same state file is running.
    #[error("another qemu-migrate is restoring {} right now", .path.display())]
    RestoreBusy {
        /// The state file.
        path: PathBuf,
    },
    /// A socket or disk of the VM is still held by a running process: the
    /// saved VM itself, or another restore of it.
    #[error("{what} is still held by process {pid} ({name}){}", still_held(.leftover))]
    StillHeld {
        /// The socket or disk, in words.
        what: String,
        /// The process holding it.
        pid: u32,
        /// Its name.
        name: String,
        /// What it is when it is known to be left by a run that died (a
        /// QEMU waiting for a migration nobody feeds), and how to end it.
        leftover: Option<String>,
    },
    /// The target of a save exists and replacing it was not asked for.
    #[error(
        "{} exists{}; give --force to replace it",
        .path.display(),
        if *.is_save { " (an earlier save)" } else { " and is not a save of qemu-migrate" }
    )]
    Exists {
        /// The target.
        path: PathBuf,
        /// Whether it is a save (it has a manifest).
        is_save: bool,
    },
    /// The QEMU binary to run does not exist.
    #[error("{}", qemu_not_found(.binary, .from))]
    QemuNotFound {
        /// The binary, as named.
        binary: PathBuf,
        /// Who named it.
        from: QemuFrom,
    },
    /// QEMU could not be started.
    #[error("{}", launch_words(.binary, .source))]
    Launch {
        /// The QEMU binary.
        binary: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A disk that cannot be checkpointed, or an image that changed since the save.
    #[error("{0}")]
    Disk(String),
    /// A migration over TCP was asked for without saying how it is secured.
    #[error(
        "a migration over TCP needs a key or certificates: give --tls-psk FILE (a key both \
         hosts hold), --tls-x509 DIR (certificates as libvirt lays them out), or --insecure \
         (guest RAM then crosses the network in clear)"
    )]
    NoSecurity,
    /// A key file or certificate directory that cannot be used.
    #[error("{}: {reason}", .path.display())]
    BadCredentials {
        /// The key file or directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The other side of the confirm channel did not prove it holds the secret.
    #[error("{addr}: {detail}")]
    NotAuthenticated {
        /// Its address, `tcp:HOST:PORT`.
        addr: String,
        /// What it failed to prove.
        detail: String,
    },
}

/// What kind of failure an [`Error`] is, for callers that map failures to
/// exit statuses or decide whether to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The monitor, QEMU or the other side could not be reached or started,
    /// or an argument was malformed: nothing changed.
    Unreachable,
    /// Refused before anything changed: a damaged file, mismatched options,
    /// a VM in the wrong state or busy.
    Refused,
    /// The migration failed or QEMU exited; nothing half-written is left.
    Failed,
    /// Cancelled on request; the guest is as it was.
    Cancelled,
}

impl Error {
    /// What kind of failure this is.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Noted { source, .. } => source.kind(),
            Error::BadStateFile { .. }
            | Error::Mismatch { .. }
            | Error::NotMigratable { .. }
            | Error::Busy { .. }
            | Error::UsesTerminal
            | Error::Blocked { .. }
            | Error::NotReplayable { .. }
            | Error::Exists { .. }
            | Error::FilesChanged { .. }
            | Error::Untrusted { .. }
            | Error::RestoreBusy { .. }
            | Error::StillHeld { .. }
            | Error::OlderDestination { .. }
            | Error::DestinationMachine { .. }
            | Error::KnownQemuBug(_)
            | Error::NotAuthenticated { .. }
            | Error::Disk(_) => ErrorKind::Refused,
            Error::MigrationFailed(_)
            | Error::File { .. }
            | Error::NotSaved { .. }
            | Error::Os { .. }
            | Error::QemuExited { .. }
            | Error::SourceDied { .. } => ErrorKind::Failed,
            Error::Cancelled(_) => ErrorKind::Cancelled,
            Error::Monitor(_)
            | Error::Launch { .. }
            | Error::QemuNotFound { .. }
            | Error::BadAddress { .. }
            | Error::NotLocal { .. }
            | Error::Receiver { .. }
            | Error::NoSecurity
            | Error::BadCredentials { .. }
            | Error::Listen { .. } => ErrorKind::Unreachable,
        }
    }

    pub(crate) fn file(
        path: impl Into<PathBuf>,
        what: &'static str,
    ) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::File { path, what, source }
    }

    pub(crate) fn os(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Os { what, source }
    }
}

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn os_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// QEMU's stderr without blank lines and the noise of modules it could not
/// load (a distribution's optional display modules), which says nothing about the VM.
#[must_use]
pub fn qemu_stderr_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| !l.contains("failed to open module") && !l.trim().is_empty())
        .collect()
}

fn qemu_said(stderr: &str) -> String {
    let lines = qemu_stderr_lines(stderr);
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

fn not_migratable(pid: u32, state: &RunState, verb: &str) -> String {
    if *state == RunState::Postmigrate {
        format!(
            "the VM (QEMU pid {pid}) is paused after a previous migration (postmigrate): its \
             state was already saved or moved; `cont` it first to {verb} it again, and only if \
             no other copy of it runs"
        )
    } else {
        format!(
            "the VM (QEMU pid {pid}) cannot be {verb}d in its state {:?}",
            state.name()
        )
    }
}

fn busy(pid: u32, migration: &Option<MigrationStatus>) -> String {
    match migration {
        Some(status) => {
            format!("a migration of this VM (QEMU pid {pid}) is already running ({status:?})")
        }
        None => {
            format!("another qemu-migrate is already saving or migrating this VM (QEMU pid {pid})")
        }
    }
}

/// Who named a QEMU binary, for [`Error::QemuNotFound`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QemuFrom {
    /// The manifest at this path: the QEMU that ran the saved VM.
    Manifest(PathBuf),
    /// `--qemu`.
    Given,
    /// Nobody: the default name, looked up on `PATH`.
    Default,
}

fn qemu_not_found(binary: &std::path::Path, from: &QemuFrom) -> String {
    let b = binary.display();
    let bare = binary.components().count() == 1;
    let looked = if bare {
        format!(
            " on PATH ({})",
            std::env::var("PATH").unwrap_or_else(|_| "not set".into())
        )
    } else {
        String::new()
    };
    match from {
        QemuFrom::Manifest(m) => format!(
            "the QEMU binary {b} is not there{looked}: it ran the saved VM, and the manifest {} \
             names it. Install it again, or give --qemu PATH to use another QEMU (a newer one is \
             given the saved machine type)",
            m.display()
        ),
        QemuFrom::Given => format!(
            "the QEMU binary {b} given with --qemu is not there{looked}: give the path of an \
             installed QEMU, e.g. --qemu /usr/bin/qemu-system-x86_64"
        ),
        QemuFrom::Default => format!(
            "the QEMU binary {b} (the default, as no manifest or --qemu names one) is not there\
             {looked}: install QEMU (Debian: apt-get install qemu-system-x86), or give --qemu PATH"
        ),
    }
}

fn launch_words(binary: &std::path::Path, source: &io::Error) -> String {
    if source.kind() == io::ErrorKind::NotFound {
        return format!(
            "starting {}: there is no such QEMU binary{}; give the path of an installed one",
            binary.display(),
            if binary.components().count() == 1 {
                " on PATH"
            } else {
                ""
            }
        );
    }
    format!("starting {}: {}", binary.display(), os_message(source))
}

fn still_held(leftover: &Option<String>) -> String {
    match leftover {
        Some(words) => format!(": {words}"),
        None => ": the saved VM, or another restore of it, still runs; end it first (`quit` on \
                 its monitor), since two QEMUs of one VM take each other's sockets and disks"
            .to_string(),
    }
}

fn not_replayable(verb: &str, items: &[String]) -> String {
    let mut out = format!(
        "refusing the {verb}: a new QEMU could not start this VM as it runs now, so nothing was changed"
    );
    for item in items {
        out.push_str("\n  - ");
        out.push_str(item);
    }
    out
}
