//! Finding the QEMUs to run against, and installing them where asked.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Where `.ci/install-deps` puts QEMU 10.0 beside the distribution's QEMU.
pub fn qemu10_launcher() -> PathBuf {
    let prefix = std::env::var("QEMU10_PREFIX").unwrap_or_else(|_| "/opt/qemu10".into());
    Path::new(&prefix).join("bin/qemu-system-x86_64")
}

#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: PathBuf,
    pub version: String,
}

/// The version a QEMU binary reports, or None if it does not run.
pub fn probe(binary: &Path) -> Option<Qemu> {
    let out = Command::new(binary).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().nth(3)?.to_string();
    Some(Qemu {
        binary: binary.to_path_buf(),
        version,
    })
}

/// Every QEMU present: the one on PATH and the private QEMU 10.0.
pub fn installed() -> Vec<Qemu> {
    [PathBuf::from("qemu-system-x86_64"), qemu10_launcher()]
        .iter()
        .filter_map(|b| probe(b))
        .collect()
}

/// Runs `.ci/install-deps` unless every QEMU and peer tool is already there.
pub fn install_deps(root: &Path) -> anyhow::Result<()> {
    let have_all = probe(Path::new("qemu-system-x86_64")).is_some()
        && probe(&qemu10_launcher()).is_some()
        && which("socat")
        && which("nc");
    if have_all {
        return Ok(());
    }
    if !which("apt-get") {
        bail!(
            "QEMU, socat or nc is missing and this is not a Debian machine: install \
             qemu-system-x86, socat and netcat-openbsd by hand"
        );
    }
    let script = root.join(".ci/install-deps");
    eprintln!(
        "installing QEMU 7.2, QEMU 10.0, socat and nc ({})",
        script.display()
    );
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    Ok(())
}

/// What to tell a user who has no QEMU.
pub const INSTALL_HINT: &str = "QEMU is not installed: run `sudo .ci/install-deps` \
    (or `apt-get install qemu-system-x86`), or pass --install-deps";

pub fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}
