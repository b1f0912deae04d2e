//! The file-system steps a save's commit is made of (write, fsync, rename,
//! unlink, directory sync), each through here so that each is a step a
//! fault can be injected at.
//!
//! Fault injection is for tests of the commit protocol: with
//! `QEMU_MIGRATE_FAULT=N:error` the Nth step of this process fails with
//! `EIO` instead of being done; with `QEMU_MIGRATE_FAULT=N:kill` the
//! process is killed (`SIGKILL`) just before it. Either way one line on
//! stderr names the step first, so a test walking N = 1, 2, … knows when it
//! has walked them all (no line). Unset, the steps cost one atomic add.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The variable that asks for a fault.
pub const FAULT_VAR: &str = "QEMU_MIGRATE_FAULT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Error,
    Kill,
}

fn planned() -> Option<(usize, Fault)> {
    static PLAN: OnceLock<Option<(usize, Fault)>> = OnceLock::new();
    *PLAN.get_or_init(|| {
        let v = std::env::var(FAULT_VAR).ok()?;
        let (n, how) = v.split_once(':')?;
        let how = match how {
            "error" => Fault::Error,
            "kill" => Fault::Kill,
            _ => return None,
        };
        Some((n.parse().ok()?, how))
    })
}

static STEPS: AtomicUsize = AtomicUsize::new(0);
static OFF: AtomicBool = AtomicBool::new(false);

/// No fault is injected in this process from now on: for the watchdog,
/// a fork whose steps would otherwise count from where its parent's were.
pub(crate) fn no_faults() {
    OFF.store(true, Ordering::SeqCst);
}

/// Counts one step (`what` of `path`) and injects the planned fault when
/// it is this one.
fn step(what: &str, path: &Path) -> std::io::Result<()> {
    let n = STEPS.fetch_add(1, Ordering::SeqCst) + 1;
    let Some((at, how)) = planned() else {
        return Ok(());
    };
    if OFF.load(Ordering::SeqCst) {
        return Ok(());
    }
    if n != at {
        return Ok(());
    }
    super::write_stderr(&format!(
        "qemu-migrate: fault injected at step {n}: {what} {}\n",
        path.display()
    ));
    match how {
        Fault::Error => Err(std::io::Error::from_raw_os_error(libc::EIO)),
        Fault::Kill => {
            // SAFETY: raising a signal at ourselves has no memory effects.
            unsafe { libc::raise(libc::SIGKILL) };
            unreachable!("SIGKILL cannot be caught")
        }
    }
}

/// Writes all of `bytes` to `file` (the file at `path`).
pub(crate) fn write_all(mut file: &File, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    step("write", path)?;
    file.write_all(bytes)
}

/// `fsync(2)` of `file` (the file at `path`).
pub(crate) fn fsync(file: &File, path: &Path) -> std::io::Result<()> {
    step("fsync", path)?;
    file.sync_all()
}

/// `rename(2)`, atomic: `to` is the old file or the new one at every instant.
pub(crate) fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    step("rename to", to)?;
    std::fs::rename(from, to)
}

/// `unlink(2)`; a file already gone is no error.
pub(crate) fn unlink(path: &Path) -> std::io::Result<()> {
    step("unlink", path)?;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes the entries of the directory holding `path` durable (after a
/// rename or unlink in it).
pub(crate) fn sync_dir_of(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    step("fsync of the directory of", path)?;
    File::open(dir)?.sync_all()
}
