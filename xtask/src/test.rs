//! `cargo xtask test`: the project's whole test run, as CI runs it.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

use crate::qemu;

pub fn run(root: &Path, install_deps: bool) -> anyhow::Result<()> {
    if install_deps {
        qemu::install_deps(root)?;
    }
    let qemus = qemu::installed();
    if qemus.is_empty() {
        bail!(qemu::INSTALL_HINT);
    }
    let list: Vec<String> = qemus
        .iter()
        .map(|q| q.binary.display().to_string())
        .collect();
    for q in &qemus {
        eprintln!(
            "testing against QEMU {} ({})",
            q.version,
            q.binary.display()
        );
    }
    cargo(root, &["fmt", "--all", "--check"], &[])?;
    cargo(
        root,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    // The tests run the binaries as a user does; cargo builds another
    // package's binaries for its own tests only.
    cargo(root, &["build", "--workspace", "--bins"], &[])?;
    // The round-trip tests boot the Linux guest too.
    let linux = crate::linux_guest::prepare(&root.join("target/linux-guest"))?;
    cargo(
        root,
        &["test", "--workspace"],
        &[
            ("QEMU_BINARIES", list.join(":")),
            ("LINUX_GUEST_KERNEL", linux.kernel.display().to_string()),
            ("LINUX_GUEST_INITRD", linux.initrd.display().to_string()),
            ("LINUX_GUEST_APPEND", linux.append),
        ],
    )
}

pub fn cargo(root: &Path, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
