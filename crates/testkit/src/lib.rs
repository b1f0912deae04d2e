//! What the project's cross-crate tests, `cargo xtask e2e` and `cargo
//! xtask bench` share, so that each exists once: which QEMUs there are
//! ([`qemu`]), a QEMU process that is killed when its handle goes and whose
//! stderr is kept ([`Process`]), a QEMU with an HMP and a QMP socket of its
//! own ([`Vm`]), and the test guest's serial lines ([`Lines`], [`tick`]).
//! What the product itself needs (typed monitor commands, waiting for a
//! migration, QEMU's stderr without noise) comes from the product's crates.

mod process;
pub mod qemu;
mod vm;

pub use process::{wait_gone, Process, Serial};
pub use test_guest::{tick, Lines};
pub use vm::Vm;
