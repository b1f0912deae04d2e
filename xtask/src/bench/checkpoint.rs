//! Checkpoint rows: `save --with-disks` beside the memory-only save of the
//! same VM, and a restore from the checkpoint (a fresh overlay each time)
//! beside a plain restore. The target: each costs no more than its
//! memory-only peer plus 50 ms, whatever the disk's size (overlays are O(1)).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use super::save::FilledVm;
use super::{timed_child, Args};
use crate::qemu::Qemu;

/// Alternated runs of each row; the median is shown.
const RUNS: usize = 5;
/// The disk the checkpoint freezes: sparse, so its size costs nothing to make.
const DISK_GIB: u64 = 4;

pub(super) fn checkpoint_speed(
    q: &Qemu,
    migrate: &Path,
    guest: &Path,
    args: &Args,
) -> anyhow::Result<String> {
    let work = tempfile::tempdir()?;
    let dir = work.path();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)?.set_len(DISK_GIB << 30)?;
    let drive = [
        "-drive".to_string(),
        format!("file={},format=raw,if=virtio", disk.display()),
    ];
    let vm = FilledVm::start_with(q, guest, args.ram_mib, args.fill_mib, &drive)?;
    let save = |name: &str, with_disks: bool, then: &str| -> anyhow::Result<Duration> {
        super::remove_save(&dir.join(name));
        let mut cmd = Command::new(migrate);
        cmd.args(["save", "--quiet", "--no-sync", "--then", then]);
        if with_disks {
            cmd.arg("--with-disks");
        }
        Ok(timed_child(cmd.arg("--monitor").arg(&vm.hmp).arg(dir.join(name)))?.0)
    };

    // Once unmeasured each, so both start from the same warm caches.
    save("state", false, "resume")?;
    save("ckpt-warm", true, "resume")?;
    std::fs::remove_file(dir.join("ckpt-warm"))?;
    // Alternated, each first in turn; a checkpoint's state file goes once
    // measured (its images stay: the VM's overlays read from them), so the
    // page cache holds the same for both.
    let (mut plain, mut frozen) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let name = format!("ckpt{run}");
        if run % 2 == 0 {
            plain.push(save("state", false, "resume")?);
            frozen.push(save(&name, true, "resume")?);
        } else {
            frozen.push(save(&name, true, "resume")?);
            plain.push(save("state", false, "resume")?);
        }
        if run + 1 < RUNS {
            std::fs::remove_file(dir.join(&name))?;
        }
    }
    // The last checkpoint, and a plain save that ends the source (its disks free).
    let ckpt = dir.join(format!("ckpt{}", RUNS - 1));
    save("state", false, "quit")?;

    let runs = dir.join("runs");
    std::fs::create_dir(&runs)?;
    let restore = |state: &Path, into: bool| -> anyhow::Result<Duration> {
        let pidfile = dir.join("restored.pid");
        let mut cmd = Command::new(migrate);
        cmd.args(["restore", "--quiet", "--daemonize", "--pidfile"])
            .arg(&pidfile);
        if into {
            cmd.arg("--into").arg(&runs);
        }
        let (took, _) = timed_child(cmd.arg(state))?;
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .context("the restore's pidfile")?
            .trim()
            .parse()?;
        end(pid)?;
        Ok(took)
    };
    restore(&dir.join("state"), false)?;
    restore(&ckpt, true)?;
    let (mut restored, mut thawed) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        if run % 2 == 0 {
            restored.push(restore(&dir.join("state"), false)?);
            thawed.push(restore(&ckpt, true)?);
        } else {
            thawed.push(restore(&ckpt, true)?);
            restored.push(restore(&dir.join("state"), false)?);
        }
    }
    drop(vm);

    let rows = [
        (
            "`qemu-migrate save --no-sync` (memory only)",
            median(&mut plain),
            None,
        ),
        (
            "`qemu-migrate checkpoint --no-sync` (memory + disk overlay, same pause)",
            median(&mut frozen),
            Some(median(&mut plain)),
        ),
        (
            "`qemu-migrate restore --daemonize`",
            median(&mut restored),
            None,
        ),
        (
            "`qemu-migrate restore --daemonize` of the checkpoint (a fresh overlay)",
            median(&mut thawed),
            Some(median(&mut restored)),
        ),
    ];
    let mut out = format!(
        "\n### Checkpoint with disks: a {} MiB guest with {} MiB written and a {DISK_GIB} GiB raw \
         disk (QEMU {}, median of {RUNS})\n\n| operation | time | vs its memory-only peer |\n\
         |---|---|---|\n",
        args.ram_mib, args.fill_mib, q.version
    );
    for (name, took, peer) in rows {
        let delta = peer.map_or(String::new(), |p| {
            format!("{:+.0} ms", (took.as_secs_f64() - p.as_secs_f64()) * 1000.0)
        });
        out.push_str(&format!(
            "| {name} | {:.2} s | {delta} |\n",
            took.as_secs_f64()
        ));
    }
    Ok(out)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Ends a restored QEMU (no child of ours: the restore detached it) and
/// waits, bounded, until it is gone, so the next one can take its sockets and disks.
fn end(pid: i32) -> anyhow::Result<()> {
    // SAFETY: a signal to the QEMU the restore started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    if !testkit::wait_gone(pid as u32, Duration::from_secs(30)) {
        anyhow::bail!("QEMU pid {pid} did not end within 30 s of SIGTERM");
    }
    Ok(())
}
