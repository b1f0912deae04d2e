//! `cargo xtask build-guest`: the test guest, built by the `test-guest` crate
//! (the tests build it the same way).

use std::path::{Path, PathBuf};

pub fn build(out_dir: &Path) -> anyhow::Result<PathBuf> {
    Ok(test_guest::build(out_dir)?)
}
