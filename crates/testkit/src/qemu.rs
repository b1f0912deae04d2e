//! Finding the QEMUs to run against.

use std::path::{Path, PathBuf};
use std::process::Command;

use qemu_monitor::QemuVersion;

/// A QEMU binary that runs, and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qemu {
    pub binary: PathBuf,
    pub version: QemuVersion,
}

/// Where `.ci/install-deps` puts QEMU 10.0 beside the distribution's QEMU
/// (`QEMU10_PREFIX`, else `/opt/qemu10`).
pub fn qemu10_launcher() -> PathBuf {
    let prefix = std::env::var("QEMU10_PREFIX").unwrap_or_else(|_| "/opt/qemu10".into());
    Path::new(&prefix).join("bin/qemu-system-x86_64")
}

/// The version a QEMU binary reports, or `None` if it does not run.
pub fn probe(binary: &Path) -> Option<Qemu> {
    let out = Command::new(binary).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let version = qemu_migrate::vm::parse_version_banner(&String::from_utf8_lossy(&out.stdout))?;
    Some(Qemu {
        binary: binary.to_path_buf(),
        version,
    })
}

/// Every QEMU present: the one on PATH and the private QEMU 10.0, oldest first.
pub fn installed() -> Vec<Qemu> {
    let mut found: Vec<Qemu> = [PathBuf::from("qemu-system-x86_64"), qemu10_launcher()]
        .iter()
        .filter_map(|b| probe(b))
        .collect();
    found.sort_by_key(|q| q.version);
    found.dedup_by_key(|q| q.version);
    found
}

/// The QEMUs a test must pass on: `QEMU_BINARIES` (colon-separated paths;
/// `cargo xtask test` sets it to every QEMU installed), else
/// `qemu-system-x86_64` on PATH. One that does not run is a failure, not a
/// skip: these tests are about QEMU.
///
/// # Panics
/// When a named QEMU does not run.
pub fn from_env() -> Vec<Qemu> {
    let list: Vec<PathBuf> = match std::env::var("QEMU_BINARIES") {
        Ok(v) if !v.trim().is_empty() => v
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect(),
        _ => vec![PathBuf::from("qemu-system-x86_64")],
    };
    list.iter()
        .map(|q| {
            probe(q).unwrap_or_else(|| {
                panic!(
                    "QEMU {} does not run: install it (.ci/install-deps) or set QEMU_BINARIES",
                    q.display()
                )
            })
        })
        .collect()
}

/// Whether `tool` is on PATH.
pub fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}
