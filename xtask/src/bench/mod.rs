//! `cargo xtask bench`: the project's speed and delivery figures, each
//! measured beside its peers in the same run, printed as markdown tables
//! (and kept in target/bench/results.md for the README).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

mod checkpoint;
mod instant;
mod libvirt;
mod live;
mod monitor;
mod save;

use crate::qemu;
use crate::test::cargo;

pub struct Args {
    pub runs: usize,
    pub delivery_runs: usize,
    /// Guest RAM and how much of it the guest writes, for the save rows.
    pub ram_mib: u32,
    pub fill_mib: u32,
    /// Only the instant-restore rows.
    pub instant_only: bool,
    /// Only the instant restore by RAM shape.
    pub shapes_only: bool,
    /// Only the live migration rows.
    pub live_only: bool,
    /// Only the save rows.
    pub save_only: bool,
}

pub fn run(root: &Path, args: &Args) -> anyhow::Result<()> {
    cargo(
        root,
        &[
            "build",
            "--release",
            "-q",
            "-p",
            "monitor-send",
            "-p",
            "qemu-migrate-cli",
        ],
        &[],
    )?;
    let send = root.join("target/release/monitor-send");
    let migrate = root.join("target/release/qemu-migrate");
    let guest = test_guest::build(&root.join("target/guest"))?;
    let qemus = qemu::installed();
    if qemus.is_empty() {
        bail!(qemu::INSTALL_HINT);
    }
    let mut report = String::new();
    for q in qemus.iter().filter(|_| args.live_only) {
        let section = live::live_speed(q, &migrate, &guest, args)?;
        print!("{section}");
        report.push_str(&section);
    }
    for q in qemus.iter().filter(|_| args.save_only) {
        let section = save::save_speed(q, &send, &migrate, &guest, args)?;
        print!("{section}");
        report.push_str(&section);
    }
    let all = !args.instant_only && !args.shapes_only && !args.live_only && !args.save_only;
    for q in qemus.iter().filter(|_| args.shapes_only) {
        let section = instant::instant_shapes(q, &migrate, &guest)?;
        print!("{section}");
        report.push_str(&section);
    }
    for q in qemus
        .iter()
        .filter(|_| args.instant_only && !args.shapes_only)
    {
        let section = instant::instant_speed(q, &migrate, &guest)?;
        print!("{section}");
        report.push_str(&section);
        let section = instant::instant_shapes(q, &migrate, &guest)?;
        print!("{section}");
        report.push_str(&section);
    }
    for q in qemus.iter().filter(|_| all) {
        let section = monitor::monitor_round_trips(q, &send, args)?;
        print!("{section}");
        report.push_str(&section);
    }
    for q in qemus.iter().filter(|_| all) {
        let section = save::save_speed(q, &send, &migrate, &guest, args)?;
        print!("{section}");
        report.push_str(&section);
        let section = live::live_speed(q, &migrate, &guest, args)?;
        print!("{section}");
        report.push_str(&section);
        let section = instant::instant_speed(q, &migrate, &guest)?;
        print!("{section}");
        report.push_str(&section);
        let section = instant::instant_shapes(q, &migrate, &guest)?;
        print!("{section}");
        report.push_str(&section);
        let section = checkpoint::checkpoint_speed(q, &migrate, &guest, args)?;
        print!("{section}");
        report.push_str(&section);
    }
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("results.md"), &report)?;
    eprintln!("written to {}", out.join("results.md").display());
    Ok(())
}

pub(super) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(super) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Runs a command to its end; returns its time and peak resident memory (KiB).
pub(super) fn timed_child(cmd: &mut Command) -> anyhow::Result<(Duration, u64)> {
    let start = Instant::now();
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data, filled by wait4 for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // wait4 rather than Child::wait, for this child's own peak memory.
    // SAFETY: pid is our child, not yet waited for; status and usage are valid.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let took = start.elapsed();
    if rc != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        let mut err = String::new();
        if let Some(mut e) = child.stderr {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        bail!("{:?} failed: {}", cmd.get_program(), err.trim());
    }
    Ok((took, usage.ru_maxrss as u64))
}

/// Removes a save (its state file, manifest and instant images), unmeasured,
/// before a timed save of the same name: a save refuses to replace one
/// without --force, and replacing would add the removal to its time.
fn remove_save(state: &Path) {
    let images = (1..16).map(|n| format!(".ram.{n}"));
    for suffix in ["", ".manifest.json", ".ram"]
        .map(String::from)
        .into_iter()
        .chain(images)
    {
        let mut name = state.as_os_str().to_owned();
        name.push(suffix);
        let _ = std::fs::remove_file(name);
    }
}
