//! Restore to a running guest: the stream loaded (`save`, `restore`) beside
//! the RAM image mapped (`save --instant`, `restore`), at 1, 4 and 8 GiB,
//! with the memory the restored QEMU holds a second later, and N clones of
//! one instant save running side by side; and the instant restore of the
//! same 1 GiB guest in the RAM shapes libvirt and NUMA give it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::save::FilledVm;
use super::timed_child;
use crate::qemu::Qemu;

/// Guest sizes and how much each writes: 60 % of RAM, as the 1 GiB rows
/// elsewhere, but no more than the 32-bit test guest reaches below 3 GiB.
const SIZES: [(u32, u32); 3] = [(1024, 600), (4096, 2400), (8192, 2800)];
/// Clones of the 1 GiB guest.
const CLONES: usize = 8;
/// Alternated runs of each restore; the median is shown.
const RUNS: usize = 3;

/// Resident memory of a process (KiB): proportional share (`Pss`, which sums
/// to the memory really used when pages are shared) and private anonymous.
fn memory(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Pss:"), field("Anonymous:"))
}

/// Ends a QEMU the restore left running and waits until it is gone.
fn end(pid: u32) {
    // SAFETY: a signal to a QEMU this bench started through qemu-migrate.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    testkit::wait_gone(pid, Duration::from_secs(30));
}

/// `qemu-migrate restore --daemonize STATE [extra]`: its time and QEMU's pid.
fn restore(
    migrate: &Path,
    state: &Path,
    extra: &[&str],
    tag: usize,
) -> anyhow::Result<(Duration, u32)> {
    let pidfile = state.with_file_name(format!("restored-{tag}.pid"));
    let (took, _) = timed_child(
        Command::new(migrate)
            .args(["restore", "--quiet", "--daemonize", "--pidfile"])
            .arg(&pidfile)
            .args(extra)
            .arg(state),
    )?;
    let pid = std::fs::read_to_string(&pidfile)?
        .trim()
        .parse()
        .context("the restore's pidfile")?;
    Ok((took, pid))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub(super) fn instant_speed(q: &Qemu, migrate: &Path, guest: &Path) -> anyhow::Result<String> {
    let mut out = format!(
        "\n### Restore to a running guest: stream loaded vs RAM image mapped (QEMU {})\n\n\
         | guest | save | save `--instant` | restore (stream) | restore (`--instant`) | \
         faster | memory 1 s after: stream | `--instant` |\n\
         |---|---|---|---|---|---|---|---|\n",
        q.version
    );
    let mut clones = String::new();
    let mut measured = Vec::new();
    for (ram, fill) in SIZES {
        let available = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemAvailable:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .unwrap_or(0);
        // The source, a restored copy, and both files in the page cache.
        if available < (u64::from(fill) * 3 + 1024) * 1024 {
            out.push_str(&format!(
                "| {ram} MiB, {fill} MiB written | not measured: {} MiB of memory available |\n",
                available / 1024
            ));
            continue;
        }
        let vm = FilledVm::start(q, guest, ram, fill)?;
        let work = tempfile::tempdir()?;
        let plain = work.path().join("plain");
        let instant = work.path().join("instant");
        let save = |state: &Path, extra: &[&str], then: &str| {
            super::remove_save(state);
            // The last save's dirty pages written out first: otherwise the
            // kernel throttles whichever save comes second while it writes
            // them back.
            // SAFETY: sync takes no arguments and cannot fail.
            unsafe { libc::sync() };
            timed_child(
                Command::new(migrate)
                    .args(["save", "--quiet", "--no-sync", "--then", then, "--monitor"])
                    .arg(&vm.hmp)
                    .args(extra)
                    .arg(state),
            )
            .map(|(t, _)| t)
        };
        // Alternated (at 1 GiB, where it is cheap), the last one ending the source.
        let saves = if ram <= 1024 { RUNS } else { 1 };
        let (mut s_plain, mut s_instant) = (Vec::new(), Vec::new());
        for run in 0..saves {
            s_plain.push(save(&plain, &[], "resume")?);
            let then = if run + 1 == saves { "quit" } else { "resume" };
            s_instant.push(save(&instant, &["--instant"], then)?);
        }
        let (save_plain, save_instant) = (median(s_plain), median(s_instant));
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(work.path().join("instant.manifest.json"))?)?;
        if manifest["instant"].is_null() {
            bail!("the instant save fell back to a plain stream");
        }
        // Alternated, so both see the same machine.
        let (mut t_plain, mut t_instant) = (Vec::new(), Vec::new());
        let (mut m_plain, mut m_instant) = ((0, 0), (0, 0));
        for run in 0..RUNS {
            for (state, times, mem) in [
                (&plain, &mut t_plain, &mut m_plain),
                (&instant, &mut t_instant, &mut m_instant),
            ] {
                let (took, pid) = restore(migrate, state, &[], 0)?;
                times.push(took);
                if run == 0 {
                    // What the guest has pulled in after running a second.
                    std::thread::sleep(Duration::from_secs(1));
                    *mem = memory(pid);
                }
                end(pid);
            }
        }
        let (tp, ti) = (median(t_plain), median(t_instant));
        measured.push((ram, fill, tp, ti));
        let mib = |kib: u64| kib as f64 / 1024.0;
        out.push_str(&format!(
            "| {ram} MiB, {fill} MiB written | {:.2} s | {:.2} s | {:.2} s | {:.3} s | {:.1}× | \
             {:.0} MiB | {:.0} MiB ({:.0} MiB private) |\n",
            save_plain.as_secs_f64(),
            save_instant.as_secs_f64(),
            tp.as_secs_f64(),
            ti.as_secs_f64(),
            tp.as_secs_f64() / ti.as_secs_f64(),
            mib(m_plain.0),
            mib(m_instant.0),
            mib(m_instant.1),
        ));

        if ram == 1024 {
            // N VMs from the one instant save, side by side: the first, then
            // its clones all at once.
            let start = Instant::now();
            let (first, first_pid) = restore(migrate, &instant, &[], 0)?;
            let mut pids = vec![first_pid];
            let mut each = vec![first];
            let clones_done: Vec<anyhow::Result<(Duration, u32)>> = std::thread::scope(|s| {
                let handles: Vec<_> = (1..CLONES)
                    .map(|i| {
                        let instant = &instant;
                        s.spawn(move || restore(migrate, instant, &["--clone"], i))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a clone's thread"))
                    .collect()
            });
            let all = start.elapsed();
            let mut failed = None;
            for c in clones_done {
                match c {
                    Ok((took, pid)) => {
                        each.push(took);
                        pids.push(pid);
                    }
                    Err(e) => failed = Some(e),
                }
            }
            if let Some(e) = failed {
                for p in pids {
                    end(p);
                }
                return Err(e.context("a clone"));
            }
            std::thread::sleep(Duration::from_secs(1));
            let pss: u64 = pids.iter().map(|&p| memory(p).0).sum();
            let anon: u64 = pids.iter().map(|&p| memory(p).1).sum();
            clones = format!(
                "\n#### {CLONES} VMs from one instant save of the {ram} MiB guest, the clones \
                 started together (QEMU {})\n\n\
                 | all running | each restore (median) | their memory 1 s later (sum of Pss) | \
                 of it private |\n|---|---|---|---|\n\
                 | {:.2} s | {:.3} s | {:.0} MiB | {:.0} MiB |\n",
                q.version,
                all.as_secs_f64(),
                median(each).as_secs_f64(),
                mib(pss),
                mib(anon)
            );
            for p in pids {
                end(p);
            }
        }
        drop(vm);
    }
    out.push_str(&clones);
    out.push_str(&virsh_rows(q, guest, &measured));
    Ok(out)
}

/// The 1 GiB guest's RAM in three shapes: `-m` only (one `pc.ram`; on pc
/// and on q35, to tell the machine's cost from the backend's), as libvirt
/// starts a q35 guest (a `memory-backend-ram` named `pc.ram`, in JSON), and
/// two NUMA nodes with a backend each (two images).
fn shapes() -> [(&'static str, Vec<String>); 4] {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    [
        ("`-m 1024` (pc)", Vec::new()),
        ("`-m 1024` (q35)", v(&["-machine", "q35"])),
        (
            "libvirt-shaped (q35, `memory-backend-ram`)",
            v(&[
                "-machine",
                "q35",
                "-object",
                r#"{"qom-type":"memory-backend-ram","id":"pc.ram","size":1073741824,"x-use-canonical-path-for-ramblock-id":false}"#,
                "-machine",
                "memory-backend=pc.ram",
            ]),
        ),
        (
            "2 NUMA nodes (pc, `-smp 2`)",
            v(&[
                "-smp",
                "2",
                "-object",
                "memory-backend-ram,id=m0,size=512M",
                "-object",
                "memory-backend-ram,id=m1,size=512M",
                "-numa",
                "node,memdev=m0",
                "-numa",
                "node,memdev=m1",
            ]),
        ),
    ]
}

pub(super) fn instant_shapes(q: &Qemu, migrate: &Path, guest: &Path) -> anyhow::Result<String> {
    let (ram, fill) = SIZES[0];
    let mut out = format!(
        "\n#### Save and restore of the {ram} MiB guest ({fill} MiB written) by the shape of its \
         RAM (QEMU {}, restores median of {RUNS})\n\n\
         | RAM | images | save | restore (stream) | save `--instant` | restore (`--instant`) |\n\
         |---|---|---|---|---|---|\n",
        q.version
    );
    for (name, extra) in shapes() {
        let vm = FilledVm::start_with(q, guest, ram, fill, &extra)?;
        let work = tempfile::tempdir()?;
        let state = work.path().join("instant");
        let plain = work.path().join("plain");
        super::remove_save(&state);
        super::remove_save(&plain);
        // SAFETY: sync takes no arguments and cannot fail.
        unsafe { libc::sync() };
        let (saved_plain, _) = timed_child(
            Command::new(migrate)
                .args(["save", "--quiet", "--no-sync", "--then", "resume"])
                .arg("--monitor")
                .arg(&vm.hmp)
                .arg(&plain),
        )?;
        // SAFETY: as above.
        unsafe { libc::sync() };
        let (saved, _) = timed_child(
            Command::new(migrate)
                .args([
                    "save",
                    "--quiet",
                    "--no-sync",
                    "--instant",
                    "--then",
                    "quit",
                ])
                .arg("--monitor")
                .arg(&vm.hmp)
                .arg(&state),
        )?;
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(work.path().join("instant.manifest.json"))?)?;
        let images = match &manifest["instant"] {
            serde_json::Value::Null => {
                bail!("{name}: the instant save fell back to a plain stream")
            }
            l => l["images"].as_array().map_or(1, Vec::len),
        };
        // Alternated, so both see the same machine.
        let (mut times, mut streamed) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let (took, pid) = restore(migrate, &plain, &[], 0)?;
            streamed.push(took);
            end(pid);
            let (took, pid) = restore(migrate, &state, &[], 0)?;
            times.push(took);
            end(pid);
        }
        out.push_str(&format!(
            "| {name} | {images} | {:.2} s | {:.2} s | {:.2} s | {:.3} s |\n",
            saved_plain.as_secs_f64(),
            median(streamed).as_secs_f64(),
            saved.as_secs_f64(),
            median(times).as_secs_f64()
        ));
        drop(vm);
    }
    Ok(out)
}

/// libvirt's `virsh save` and `virsh restore` of the same guests, beside
/// the restores measured above (libvirt runs the system's QEMU only).
fn virsh_rows(q: &Qemu, guest: &Path, ours: &[(u32, u32, Duration, Duration)]) -> String {
    let mut out = format!(
        "\n#### libvirt's `virsh save` / `virsh restore` of the same guests (QEMU {})\n\n\
         | guest | `virsh save` | `virsh restore` | `qemu-migrate restore` (stream) | \
         `qemu-migrate restore` (`--instant`) | `--instant` vs `virsh restore` |\n\
         |---|---|---|---|---|---|\n",
        q.version
    );
    // libvirt runs the QEMU on PATH, not the private QEMU 10.0.
    if q.binary != Path::new("qemu-system-x86_64")
        && q.binary != Path::new("/usr/bin/qemu-system-x86_64")
    {
        return String::new();
    }
    if let Err(e) = super::libvirt::set_up() {
        out.push_str(&format!("| not measured: {e} | | | | | |\n"));
        return out;
    }
    for &(ram, fill, tp, ti) in ours {
        let row = || -> anyhow::Result<(Duration, Duration)> {
            let runs = if ram <= 1024 { RUNS } else { 1 };
            let (mut saves, mut restores) = (Vec::new(), Vec::new());
            let dom = super::libvirt::Domain::start(guest, ram, fill)?;
            for _ in 0..runs {
                let (s, r, _) = dom.save_restore()?;
                saves.push(s);
                restores.push(r);
            }
            Ok((median(saves), median(restores)))
        };
        match row() {
            Ok((s, r)) => out.push_str(&format!(
                "| {ram} MiB, {fill} MiB written | {:.2} s | {:.2} s | {:.2} s | {:.3} s | {:.1}× faster |\n",
                s.as_secs_f64(),
                r.as_secs_f64(),
                tp.as_secs_f64(),
                ti.as_secs_f64(),
                r.as_secs_f64() / ti.as_secs_f64()
            )),
            Err(e) => out.push_str(&format!("| {ram} MiB | not measured: {e} | | | | |\n")),
        }
    }
    out
}
