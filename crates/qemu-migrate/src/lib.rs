//! Save, restore and live-migrate a QEMU VM with the exact same options.
//!
//! A VM started by hand with `-monitor unix:...` is attached to by its
//! monitor socket; its command line is read from the process on the other
//! end, so a restore needs no option repeated. A save pauses the guest, lifts
//! QEMU's bandwidth cap, streams through a pipe into `FILE.partial`, and
//! syncs and renames it only when QEMU says the migration completed; a
//! manifest beside it records the options, QEMU version, sizes and a
//! checksum. The stream stays QEMU's own format: `-incoming "exec: cat FILE"`
//! still restores it by hand.
//!
//! ```no_run
//! use std::time::Duration;
//! use qemu_migrate::{progress::Quiet, save, restore, Vm};
//!
//! let mut vm = Vm::attach("/tmp/qemu-sock", Duration::from_secs(30))?;
//! save::save(&mut vm, "/tmp/statefile".as_ref(), &save::SaveOptions::default(), &Quiet)?;
//! let restored = restore::restore("/tmp/statefile".as_ref(), &restore::RestoreOptions::default(), &Quiet)?;
//! # Ok::<(), qemu_migrate::Error>(())
//! ```

pub mod argv;
pub mod control;
mod error;
pub mod live;
pub mod manifest;
pub mod preflight;
pub mod progress;
pub mod restore;
pub mod save;
pub mod vm;

pub use control::{Control, MigrationInfo, MigrationStatus, RunState};
pub use error::{Error, Result};
pub use manifest::Manifest;
pub use vm::Vm;
