//! Loading the committed real-QEMU fixtures.

#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/streams")
}

/// The decompressed bytes of `fixtures/streams/NAME.bin.gz`.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(format!("{name}.bin.gz"));
    let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .expect("fixture decompresses");
    out
}

pub const ALL: [&str; 7] = [
    "pc-7.2-exec",
    "q35-7.2-rng-exec",
    "pc-10.0-exec",
    "pc-10.0-file",
    "q35-10.0-rng-file",
    "pc-10.0-mapped-ram",
    "microvm-7.2-exec",
];
