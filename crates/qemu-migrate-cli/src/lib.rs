//! What the `qemu-migrate` command shares beyond its binary: the man-page
//! renderer, which `cargo xtask dist` uses for monitor-send's page too.

pub mod man;
