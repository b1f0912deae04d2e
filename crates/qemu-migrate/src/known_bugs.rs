//! QEMU bugs this crate steers around, each with where it was seen.
//!
//! **QEMU 9.0 and later under TCG abort** a migration of a running guest
//! whose RAM is several blocks (NUMA nodes, DIMMs): syncing the dirty bitmap
//! resets the TLBs for a block's range given from the block's start instead
//! of its RAM address, and once that range runs past the first block,
//! `tlb_reset_dirty_range_all` (system/physmem.c) fails its assertion that a
//! range stays within one block, and QEMU aborts with the guest. Reproduced
//! with 10.0.2 (an 8 MiB node 0 and a 24 MiB node 1: the source aborts in
//! the first pass of `live` and of `save --live`), not with 7.2. A paused
//! guest dirties nothing, so nothing is reset and nothing aborts: `live`
//! pauses such a guest for its migration and resumes it on the destination,
//! `save --live` saves it paused, and both say why.

use qemu_monitor::QemuVersion;

use crate::error::Result;
use crate::vm::Vm;

/// The first QEMU whose TCG dirty-bitmap sync aborts with several RAM
/// blocks; no fixed version is known.
const DIRTY_SYNC_ABORT: QemuVersion = QemuVersion {
    major: 9,
    minor: 0,
    micro: 0,
};

/// Why migrating `vm` while its guest runs would abort its QEMU, in words;
/// `None` when it would not (see the module docs).
///
/// # Errors
/// When the monitor fails.
pub(crate) fn dirty_sync_abort(vm: &mut Vm) -> Result<Option<String>> {
    let version = vm.version();
    if version < DIRTY_SYNC_ABORT || vm.monitor.kvm_enabled()? {
        return Ok(None);
    }
    let blocks = vm.monitor.ram_blocks()?;
    let guest = crate::instant::shape::guest_blocks(vm.args(), &blocks);
    if guest.len() < 2 {
        return Ok(None);
    }
    Ok(Some(format!(
        "QEMU {version} under TCG aborts the migration of a running guest whose RAM is several \
         blocks ({}) as it syncs the dirty bitmap (tlb_reset_dirty_range_all), losing the guest",
        guest.join(", ")
    )))
}
