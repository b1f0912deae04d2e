//! `cargo xtask fuzz`: the stream reader's fuzz target for a bounded time,
//! its corpus seeded from the real streams under fixtures/streams.

use std::io::Read;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

/// The longest input the target is given: the fixtures' interesting parts
/// (header, RAM setup, device sections) fit well within it.
const MAX_LEN: usize = 400_000;

pub fn run(root: &Path, seconds: u64) -> anyhow::Result<()> {
    let fuzz_dir = root.join("crates/qemu-stream/fuzz");
    let corpus = fuzz_dir.join("corpus/inspect");
    std::fs::create_dir_all(&corpus)?;
    for entry in std::fs::read_dir(root.join("fixtures/streams"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "gz") {
            let mut bytes = Vec::new();
            flate2::read::GzDecoder::new(std::fs::File::open(&path)?)
                .take(MAX_LEN as u64)
                .read_to_end(&mut bytes)
                .with_context(|| format!("reading {}", path.display()))?;
            let name = path.file_stem().unwrap_or_default();
            std::fs::write(corpus.join(name), bytes)?;
        }
    }
    if !installed("cargo-fuzz") {
        eprintln!("installing cargo-fuzz");
        let status = Command::new("cargo")
            .args(["install", "--locked", "cargo-fuzz"])
            .status()?;
        if !status.success() {
            bail!("cargo install cargo-fuzz failed ({status})");
        }
    }
    // cargo-fuzz passes sanitizer flags only a nightly compiler takes;
    // RUSTC_BOOTSTRAP lets the stable one accept them.
    let status = Command::new("cargo")
        .current_dir(&fuzz_dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", "run", "inspect", "corpus/inspect", "--"])
        .arg(format!("-max_len={MAX_LEN}"))
        .arg(format!("-max_total_time={seconds}"))
        .status()
        .context("running cargo fuzz")?;
    if !status.success() {
        bail!(
            "the fuzz target found a crash ({status}); the input is under {}",
            fuzz_dir.join("artifacts/inspect").display()
        );
    }
    println!("fuzzed the stream reader for {seconds} s: no crash");
    Ok(())
}

fn installed(tool: &str) -> bool {
    Command::new("cargo")
        .args([tool.trim_start_matches("cargo-"), "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}
