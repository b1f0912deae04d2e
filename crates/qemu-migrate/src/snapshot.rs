//! `qemu-migrate snapshot` (`save --snapshot`): a point-in-time save of a
//! running VM. QEMU's background snapshot (6.0 and later) saves the device
//! state in a pause of its own of a few milliseconds, write-protects guest
//! RAM with userfaultfd, resumes the guest, and writes every page as it was
//! at that instant (a page the guest is about to change is written first).
//! The guest runs throughout, and the state is the instant the snapshot
//! began, unlike `save --live`, a precopy whose state is whenever it
//! converged. A checkpoint (`--with-disks`) freezes the disks in a pause of
//! ours just before, so disks and memory are of one instant.
//!
//! Where it cannot run (an older QEMU, a kernel without userfaultfd
//! write-protection, RAM it cannot track, a capability it does not go
//! with), the save is made with the guest paused, and the report says why.

use qemu_monitor::QemuVersion;

use crate::error::Result;
use crate::vm::Vm;

/// QEMU's capability.
pub(crate) const CAPABILITY: &str = "background-snapshot";

/// The first QEMU with a background snapshot.
const FIRST: QemuVersion = QemuVersion {
    major: 6,
    minor: 0,
    micro: 0,
};

/// Turns QEMU's background snapshot on for the next migration, or says,
/// in QEMU's words where it has them, why it cannot.
///
/// # Errors
/// The monitor's failures.
pub(crate) fn enable(vm: &mut Vm) -> Result<std::result::Result<(), String>> {
    if vm.version() < FIRST {
        return Ok(Err(format!(
            "QEMU {} has no background snapshot (6.0 and later have)",
            vm.version()
        )));
    }
    if vm.monitor.capability(CAPABILITY)?.is_none() {
        return Ok(Err(format!("this QEMU has no {CAPABILITY} capability")));
    }
    if let Err(e) = vm.monitor.set_capability(CAPABILITY, true) {
        return Ok(Err(format!("QEMU refused a background snapshot: {e}")));
    }
    // The human monitor prints a refusal rather than failing the command.
    if vm.monitor.capability(CAPABILITY)? != Some(true) {
        return Ok(Err(
            "QEMU refused a background snapshot (the kernel may lack userfaultfd \
             write-protection, or another migration capability is on that it does not go with)"
                .into(),
        ));
    }
    Ok(Ok(()))
}

/// Turns it off again: later migrations of the VM are QEMU's ordinary ones.
pub(crate) fn disable(vm: &mut Vm) {
    let _ = vm.monitor.set_capability(CAPABILITY, false);
}

/// Whether a failed migration failed because QEMU could not track this
/// VM's RAM (which only shows once it starts): then a paused save serves.
pub(crate) fn refused_at_start(why: &str) -> bool {
    let why = why.to_ascii_lowercase();
    why.contains("background") || why.contains("write-track") || why.contains("userfault")
}
