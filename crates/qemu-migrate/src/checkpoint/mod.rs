//! Checkpoints that include the disks: `save --with-disks` freezes every
//! writable file-backed disk under a qcow2 overlay in the same pause as the
//! memory save, so the images below hold the disks exactly as the memory
//! state expects them; every restore then writes to a fresh overlay of its
//! own, and the checkpoint can be restored, or a running VM reverted to it,
//! any number of times.
//!
//! Every save records the VM's writable disks (path, format, size,
//! modification time, a sampled fingerprint) in the manifest; a restore
//! refuses, in words, images that changed since. Without `--with-disks`
//! this is what stops a second restore of the same state onto a disk the
//! first one wrote to.
//!
//! A disk is known by its chain as QEMU's block graph tells it: each image
//! with the node that reads it. Only the image the command line gives the
//! device (its `-blockdev` node, or the file of its `-drive` or `-hda`) is
//! ever given an overlay; the images below keep their own definitions, so
//! a restored QEMU opens each file once, as the saved one did.
//!
//! Where each part lives: [`record`] is what the manifest holds and the
//! check of it; [`freeze`] the save's side (find the disks and their
//! chains, create the overlays, switch to them); [`thaw`] the restore's
//! side (check, new overlays, the command line given them); [`revert`](mod@revert)
//! puts a running VM back to its checkpoint; [`cmdline`] puts overlays on
//! `-drive`, `-blockdev` and `-hda` options; [`overlay`] writes the overlay
//! files (empty qcow2 images).
//!
//! Disks that are not files (NBD, iSCSI, host devices) cannot be frozen: a
//! checkpoint of a VM with one is refused; a plain save leaves them out of
//! its record, unchecked. Read-only disks (CD-ROMs, firmware) are not
//! recorded. A disk on QEMU's temporary overlay (`snapshot=on`) is saved
//! only while the guest has written nothing to it: its writes go with QEMU.

pub mod cmdline;
pub mod freeze;
pub mod overlay;
pub mod record;
pub mod revert;
pub mod thaw;

pub use record::{Disk, DiskRecord, Image};
pub use revert::revert;
