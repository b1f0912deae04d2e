//! Helpers for the cross-crate tests: finding QEMU and starting it.
