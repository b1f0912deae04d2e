//! Reverting a running VM to its checkpoint: the checkpoint checked first,
//! then the VM stopped and ended, and a new QEMU with the same options
//! started on fresh overlays and loaded from the checkpoint. The overlay
//! the VM wrote to since the checkpoint is deleted once the new one runs,
//! when the checkpoint made it (its save's or a restore's); any other file
//! is left alone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{cmdline, overlay};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::restore::{self, RestoreOptions, Restored};
use crate::vm::Vm;

/// How long the old QEMU may take to be gone after `quit`.
const QUIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Puts `vm` back to the checkpoint `statefile` (a `save --with-disks`):
/// nothing is touched unless the checkpoint and its frozen images are
/// intact. The new QEMU takes over the VM's monitor sockets; its pid differs.
/// Its overlays go into `options.into`, else where the discarded ones were.
///
/// # Errors
/// [`Error::Disk`] for a state file that is no checkpoint, whose frozen
/// images changed, or a VM that does not run on them, before the VM is touched; the restore's errors after
/// (the old VM is gone then, and its overlays are left in place).
pub fn revert(
    mut vm: Vm,
    statefile: &Path,
    options: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<Restored> {
    let started = Instant::now();
    let checked = restore::check(statefile)?;
    let record = checked
        .manifest
        .as_ref()
        .and_then(|m| m.checkpoint.as_ref())
        .filter(|r| r.frozen)
        .ok_or_else(|| {
            Error::Disk(format!(
                "{}: not a checkpoint (saved without --with-disks): reverting needs disks frozen \
                 at the save",
                statefile.display()
            ))
        })?;
    record.verify(statefile)?;
    if record.disks.is_empty() {
        return Err(Error::Disk(format!(
            "{}: this checkpoint froze no disk (its VM had none written to a file), so nothing \
             tells its VM from another at that socket; the VM was left as it is. End it and \
             `qemu-migrate restore {}` puts it back",
            statefile.display(),
            statefile.display()
        )));
    }
    // The new QEMU's options must give each frozen disk its overlay: known
    // now, while the VM still runs.
    let args = options
        .args
        .as_ref()
        .or(checked.manifest.as_ref().map(|m| &m.args))
        .cloned()
        .unwrap_or_default();
    super::thaw::tops(record, statefile, &args)?;
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", vm.pid()))
        .unwrap_or_else(|_| PathBuf::from("/"));

    // The VM's own overlays on the frozen images, what it wrote since the
    // checkpoint: those this checkpoint made (its save's, its restores'), no other file.
    let frozen_tops: Vec<PathBuf> = record
        .disks
        .iter()
        .map(|d| d.images[0].path.clone())
        .collect();
    let restore_made = format!(
        "{}.",
        overlay::label(&statefile.file_name().unwrap_or_default().to_string_lossy())
    );
    let ours = |p: &Path| {
        record
            .disks
            .iter()
            .any(|d| d.source_overlay.as_deref() == Some(p))
            || p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&restore_made) && n.ends_with(".qcow2"))
    };
    let devices = vm.monitor.block_devices()?;
    // Only the checkpoint's own VM is put back: one whose disks sit on its
    // frozen images. Any other VM at that socket would be ended for nothing.
    let abs = |p: PathBuf| cmdline::absolute(&cwd, &p.display().to_string());
    let in_use: Vec<PathBuf> = devices
        .iter()
        .filter_map(|d| d.image.as_ref())
        .flat_map(|i| i.chain().into_iter().filter_map(|i| i.path()).map(abs))
        .collect();
    let foreign: Vec<String> = frozen_tops
        .iter()
        .filter(|t| !in_use.contains(t))
        .map(|t| t.display().to_string())
        .collect();
    if !foreign.is_empty() {
        return Err(Error::Disk(format!(
            "the VM at {} (QEMU pid {}) does not run on the checkpoint's disk images ({}): it is \
             not this checkpoint's VM, and was left as it is; `qemu-migrate restore {}` starts \
             one",
            vm.monitor.addr(),
            vm.pid(),
            foreign.join(", "),
            statefile.display()
        )));
    }
    let discard: Vec<PathBuf> = devices
        .iter()
        .filter_map(|d| {
            let top = d.image.as_ref()?;
            let below = top.backing.as_ref()?;
            let (top_path, below_path) = (abs(top.path()?), abs(below.path()?));
            (top.format == "qcow2" && frozen_tops.contains(&below_path) && ours(&top_path))
                .then_some(top_path)
        })
        .collect();

    let mut options = options.clone();
    if options.into.is_none() {
        options.into = discard
            .first()
            .and_then(|p| p.parent())
            .map(Path::to_path_buf);
    }
    // From here until the new VM runs, a death of this process leaves no
    // VM: the old one is ended with it, and the checkpoint restored anew.
    let revival = match &options.revive {
        Some(r) => Some(Revival::arm(
            vm.pid(),
            &(r.0)(statefile, options.into.as_deref()),
        )?),
        None => None,
    };
    vm.monitor.stop()?;
    vm.quit_and_wait(QUIT_TIMEOUT)?;
    drop(vm);

    let restored = restore::restore_checked(checked, started, &options, progress);
    drop(revival);
    let restored = restored?;
    for p in &discard {
        if !restored.overlays.contains(p) {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(restored)
}

/// The old VM and the command that restores the checkpoint, left with the
/// keeper (see `os::keeper`) while a revert ends one VM and starts another;
/// taken back when the revert returns, whatever it returns.
struct Revival {
    old: u32,
}

impl Revival {
    fn arm(old: u32, command: &[std::ffi::OsString]) -> Result<Revival> {
        crate::os::keeper::adopt(old)?;
        if let Err(e) = crate::os::keeper::on_death_run(Some(command)) {
            crate::os::keeper::release(old);
            return Err(e);
        }
        Ok(Revival { old })
    }
}

impl Drop for Revival {
    fn drop(&mut self) {
        let _ = crate::os::keeper::on_death_run(None);
        crate::os::keeper::release(self.old);
    }
}
