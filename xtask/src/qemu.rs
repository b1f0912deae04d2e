//! Finding the QEMUs to run against, and installing them where asked.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

pub use testkit::qemu::{installed, probe, qemu10_launcher, which, Qemu};

/// UEFI firmware's code, from Debian's `ovmf` (the disk tests' pflash drives).
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

/// Runs `.ci/install-deps` unless every QEMU and peer tool is already there.
pub fn install_deps(root: &Path) -> anyhow::Result<()> {
    let have_all = probe(Path::new("qemu-system-x86_64")).is_some()
        && probe(&qemu10_launcher()).is_some()
        && [
            "socat",
            "nc",
            "qemu-img",
            "strace",
            "setpriv",
            "mkfs.ext4",
            "debugfs",
            "swtpm",
        ]
        .iter()
        .all(|t| which(t))
        && Path::new(OVMF_CODE).is_file();
    if have_all {
        return Ok(());
    }
    if !which("apt-get") {
        bail!(
            "QEMU or a tool the tests use is missing and this is not a Debian machine: install \
             qemu-system-x86, qemu-utils, socat, netcat-openbsd, strace, util-linux, e2fsprogs, \
             ovmf and swtpm by hand"
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
