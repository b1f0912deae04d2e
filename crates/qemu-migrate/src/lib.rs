//! Save, restore and live-migrate a QEMU VM with the exact same options.
//!
//! A VM started by hand with `-monitor unix:...` is attached to by its
//! monitor socket; its command line is read from the process on the other
//! end, so a restore needs no option repeated. A save pauses the guest, lifts
//! QEMU's bandwidth cap, streams through a pipe into a private (`0600`)
//! temporary file with an unpredictable name beside the target, and syncs
//! and renames it only when QEMU says the migration completed; a manifest
//! beside it records the options, QEMU version, sizes and a checksum. An
//! existing save is replaced only when asked, and crash-safely. The stream stays QEMU's own format: `-incoming "exec: cat FILE"`
//! still restores it by hand.
//!
//! Where each concern lives: [`vm`] attaches to or launches a QEMU (the
//! monitor's typed commands come from `qemu_monitor::Monitor`); [`save`],
//! [`restore`] and [`live`] are the three operations; [`machine`] pins the
//! saved machine type for a newer QEMU; [`preflight`] asks a
//! QEMU whether given options can restore a state; [`manifest`] is the file
//! beside the state; [`roundtrip`] is the check that a VM survives a save and
//! restore, reading IncludeOS's `vm.json` with [`vmrunner`]; [`argv`] reads
//! QEMU command lines; [`os`] is every call to the operating system beyond
//! plain files. The `qemu-migrate` command
//! line is a separate package over this library.
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

#![warn(missing_docs)]

pub mod argv;
pub mod checkpoint;
mod commit;
mod error;
pub mod guard;
pub mod instant;
mod known_bugs;
pub mod live;
pub mod machine;
pub mod manifest;
pub mod os;
pub mod preflight;
pub mod progress;
pub mod replay;
pub mod restore;
pub mod roundtrip;
pub mod save;
mod snapshot;
pub mod trust;
pub mod vm;
pub mod vmrunner;

pub use error::{qemu_stderr_lines, Error, ErrorKind, QemuFrom, Result};
pub use manifest::Manifest;
pub use qemu_monitor::{MigrationInfo, MigrationStatus, Monitor, RunState};
pub use vm::Vm;

/// A bandwidth cap no disk or pipe reaches: QEMU's own default is 128 MiB/s,
/// and a paused guest is saved, and a live migration sent, uncapped.
pub const UNCAPPED: u64 = 1 << 40;
