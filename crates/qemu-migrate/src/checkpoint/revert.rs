//! Reverting a running VM to its checkpoint: the checkpoint checked first,
//! then the VM stopped and ended, and a new QEMU with the same options
//! started on fresh overlays and loaded from the checkpoint. The overlay
//! the VM wrote to since the checkpoint is deleted once the new one runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::cmdline;
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
/// [`Error::Disk`] for a state file that is no checkpoint, or whose frozen
/// images changed, before the VM is touched; the restore's errors after
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
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", vm.pid()))
        .unwrap_or_else(|_| PathBuf::from("/"));

    // The VM's own overlays on the frozen images: what it wrote since the checkpoint.
    let frozen_tops: Vec<PathBuf> = record
        .disks
        .iter()
        .map(|d| d.images[0].path.clone())
        .collect();
    let discard: Vec<PathBuf> = vm
        .monitor
        .block_devices()?
        .iter()
        .filter_map(|d| {
            let top = d.image.as_ref()?;
            let below = top.backing.as_ref()?;
            let abs = |p: PathBuf| cmdline::absolute(&cwd, &p.display().to_string());
            let (top_path, below_path) = (abs(top.path()?), abs(below.path()?));
            (top.format == "qcow2" && frozen_tops.contains(&below_path)).then_some(top_path)
        })
        .collect();

    vm.monitor.stop()?;
    let pid = vm.pid();
    vm.monitor.quit()?;
    crate::os::wait_gone(pid, QUIT_TIMEOUT);
    drop(vm);

    let mut options = options.clone();
    if options.into.is_none() {
        options.into = discard
            .first()
            .and_then(|p| p.parent())
            .map(Path::to_path_buf);
    }
    let restored = restore::restore_checked(checked, started, &options, progress)?;
    for p in &discard {
        if !restored.overlays.contains(p) {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(restored)
}
