//! Save rows: the seed's recipe, `qemu-migrate save`, QEMU writing a file
//! by hand, the restore, and the page-cache and disk bounds; reading the
//! state file back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use qemu_migrate::{MigrationStatus, Monitor, UNCAPPED};
use qemu_monitor::Options;
use testkit::{Process, Serial};

use super::monitor::{run_once, Peer};
use super::{timed_child, Args};
use crate::qemu::Qemu;

/// A test guest with most of its RAM written, and the bench's own QMP socket.
pub(super) struct FilledVm {
    _process: Process,
    _dir: tempfile::TempDir,
    pub(super) hmp: PathBuf,
    /// The bench's own QMP session, through the library the CLIs use.
    control: Monitor,
    serial: test_guest::Lines,
}

/// The options of the filled guest, its sockets in `dir`.
pub(super) fn filled_args(dir: &Path, guest: &Path, ram_mib: u32, fill_mib: u32) -> Vec<String> {
    let mut a: Vec<String> = [
        "-accel",
        "tcg",
        "-m",
        &ram_mib.to_string(),
        "-nodefaults",
        "-display",
        "none",
    ]
    .map(String::from)
    .to_vec();
    let sock = |name: &str| dir.join(name).display().to_string();
    a.extend([
        "-chardev".into(),
        format!(
            "socket,id=ser0,path={},server=on,wait=off",
            sock("serial.sock")
        ),
        "-serial".into(),
        "chardev:ser0".into(),
        "-kernel".into(),
        guest.display().to_string(),
        "-append".into(),
        format!("fill={fill_mib}"),
        "-monitor".into(),
        format!("unix:{},server,nowait", sock("hmp.sock")),
        "-qmp".into(),
        format!("unix:{},server,nowait", sock("qmp.sock")),
    ]);
    a
}

impl FilledVm {
    /// Starts the guest paused, connects to its serial socket, lets it run
    /// and waits for its first tick: the fill is done by then.
    pub(super) fn start(
        q: &Qemu,
        guest: &Path,
        ram_mib: u32,
        fill_mib: u32,
    ) -> anyhow::Result<FilledVm> {
        FilledVm::start_with(q, guest, ram_mib, fill_mib, &[])
    }

    /// [`FilledVm::start`] with more QEMU options (a disk).
    pub(super) fn start_with(
        q: &Qemu,
        guest: &Path,
        ram_mib: u32,
        fill_mib: u32,
        extra: &[String],
    ) -> anyhow::Result<FilledVm> {
        let dir = tempfile::tempdir()?;
        let hmp = dir.path().join("hmp.sock");
        let qmp = dir.path().join("qmp.sock");
        let serial = dir.path().join("serial.sock");
        let mut args = filled_args(dir.path(), guest, ram_mib, fill_mib);
        args.extend_from_slice(extra);
        args.push("-S".into());
        let process = Process::start(
            &q.binary,
            &args,
            &dir.path().join("qemu.stderr"),
            Serial::Null,
            None,
        )
        .map_err(anyhow::Error::msg)?;
        let mut qmp = qemu_monitor::connect_qmp(
            qmp,
            &Options {
                timeout: Duration::from_secs(120),
                wait_socket: Some(Duration::from_secs(10)),
                mux_escape: false,
            },
        )?;
        // QMP answers after every chardev exists, so the serial socket is there.
        let serial = test_guest::Lines::collect(
            std::os::unix::net::UnixStream::connect(&serial)
                .with_context(|| format!("connecting to {}", serial.display()))?,
        );
        qmp.execute("cont", None)?;
        serial
            .try_wait_for(0, Duration::from_secs(120), |l| {
                test_guest::tick(l) == Some(1)
            })
            .map_err(|got| anyhow::anyhow!("the guest did not finish its fill: {got:?}"))?;
        let mut control = Monitor::Qmp(qmp);
        control.set_capability("events", true)?;
        Ok(FilledVm {
            _process: process,
            _dir: dir,
            hmp,
            control,
            serial,
        })
    }

    /// Waits for the migration to end; returns QEMU's status.
    fn wait_migration(&mut self) -> anyhow::Result<MigrationStatus> {
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        let info = self.control.wait_migration(deadline, |_| {})?;
        Ok(info.status)
    }
}

/// Writes `bytes` to a file as fast as the page cache takes it, optionally synced.
fn write_bound(path: &Path, bytes: u64, sync: bool) -> anyhow::Result<Duration> {
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut f = std::fs::File::create(path)?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    if sync {
        f.sync_all()?;
    }
    let took = start.elapsed();
    drop(f);
    std::fs::remove_file(path)?;
    Ok(took)
}

pub(super) fn save_speed(
    q: &Qemu,
    send: &Path,
    migrate: &Path,
    guest: &Path,
    args: &Args,
) -> anyhow::Result<String> {
    let mut vm = FilledVm::start(q, guest, args.ram_mib, args.fill_mib)?;
    let work = tempfile::tempdir()?;
    let dir = work.path().to_path_buf();
    let state = dir.join("state");
    let mut rows: Vec<(String, Duration, String)> = Vec::new();

    // The seed's recipe: a running guest, QEMU's defaults.
    let start = Instant::now();
    let peer = Peer {
        name: "recipe",
        program: send.to_path_buf(),
        args: vec![
            "-w".into(),
            "0".into(),
            "-U".into(),
            vm.hmp.display().to_string(),
        ],
    };
    run_once(
        &peer,
        format!("migrate \"exec:cat > {}\"\n", state.display()).as_bytes(),
    )?;
    let status = vm.wait_migration()?;
    let recipe = start.elapsed();
    if status != MigrationStatus::Completed {
        bail!("the recipe's migration ended {status:?}");
    }
    let stream_bytes = std::fs::metadata(&state)
        .with_context(|| format!("the recipe's state file {}", state.display()))?
        .len();
    let reading = inspect_speed(migrate, &state, stream_bytes)?;
    std::fs::remove_file(&state).with_context(|| format!("removing {}", state.display()))?;
    vm.control.cont_after_migration()?;
    rows.push((
        "the seed's recipe: `migrate \"exec:cat > F\"`, running guest, defaults".into(),
        recipe,
        String::new(),
    ));

    let mut peak = 0;
    for (name, extra) in [
        ("`qemu-migrate save --no-sync`", &["--no-sync"][..]),
        ("`qemu-migrate save` (fsync)", &[][..]),
    ] {
        let (took, rss) = timed_child(
            Command::new(migrate)
                .args(["save", "--quiet", "--then", "resume", "--monitor"])
                .arg(&vm.hmp)
                .arg(&state)
                .args(extra),
        )?;
        peak = peak.max(rss);
        let _ = std::fs::remove_file(&state);
        let _ = std::fs::remove_file(dir.join("state.manifest.json"));
        rows.push((
            name.into(),
            took,
            format!("peak RSS {:.1} MiB", rss as f64 / 1024.0),
        ));
    }
    // The snapshot: the guest runs while RAM is written; its pause is
    // QEMU's downtime, its pace the guest's ticks (10 a second) meanwhile.
    {
        let ticks = |vm: &FilledVm| {
            vm.serial
                .snapshot()
                .iter()
                .filter(|l| test_guest::tick(l).is_some())
                .count()
        };
        let before = ticks(&vm);
        let start = Instant::now();
        let out = Command::new(migrate)
            .args(["--json", "snapshot", "--monitor"])
            .arg(&vm.hmp)
            .arg(&state)
            .output()?;
        let took = start.elapsed();
        if !out.status.success() {
            bail!("snapshot: {}", String::from_utf8_lossy(&out.stderr));
        }
        let during = ticks(&vm) - before;
        let said: serde_json::Value = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .find(|v: &serde_json::Value| v.get("saved").is_some())
            .unwrap_or_default();
        let _ = std::fs::remove_file(&state);
        let _ = std::fs::remove_file(dir.join("state.manifest.json"));
        rows.push((
            "`qemu-migrate snapshot` (fsync; the guest runs throughout)".into(),
            took,
            format!(
                "paused {} ms; the guest ticked at {:.0} % of its pace meanwhile{}",
                said["downtime_ms"]
                    .as_u64()
                    .map_or("?".into(), |d| d.to_string()),
                100.0 * during as f64 / (took.as_secs_f64() * 10.0),
                said["manifest"]["format"]
                    .as_str()
                    .filter(|_| said["fallback"].is_string())
                    .map_or(String::new(), |_| " (fell back to a paused save)".into())
            ),
        ));
    }
    let has_file = (q.version.major, q.version.minor) >= (8, 2);
    if has_file {
        // QEMU writing the file itself, by hand: paused, uncapped, `file:`.
        let start = Instant::now();
        vm.control.stop()?;
        vm.control
            .set_migration_parameter("max-bandwidth", UNCAPPED)?;
        vm.control.migrate(&format!("file:{}", state.display()))?;
        let status = vm.wait_migration()?;
        let took = start.elapsed();
        if status != MigrationStatus::Completed {
            bail!("the file: migration ended {status:?}");
        }
        let _ = std::fs::remove_file(&state);
        vm.control.cont_after_migration()?;
        rows.push((
            "by hand: `stop`, cap lifted, `migrate file:F` (no fsync)".into(),
            took,
            String::new(),
        ));
    }
    // Restore of the synced save, to a running guest (it binds the source's
    // socket paths, so it comes last).
    timed_child(
        Command::new(migrate)
            .args(["save", "--quiet", "--then", "quit", "--monitor"])
            .arg(&vm.hmp)
            .arg(&state),
    )?;
    let pidfile = dir.join("restored.pid");
    let (restore, _) = timed_child(
        Command::new(migrate)
            .args(["restore", "--quiet", "--daemonize", "--pidfile"])
            .arg(&pidfile)
            .arg(&state),
    )?;
    if let Some(pid) = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    {
        // SAFETY: a signal to the QEMU the restore started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let _ = std::fs::remove_file(&state);
    rows.push((
        "`qemu-migrate restore --daemonize` (checksum, load, guest running)".into(),
        restore,
        String::new(),
    ));
    drop(vm);

    let cache = write_bound(&dir.join("bound"), stream_bytes, false)?;
    rows.push((
        "writing the same bytes to the page cache".into(),
        cache,
        String::new(),
    ));
    let synced = write_bound(&dir.join("bound"), stream_bytes, true)?;
    rows.push((
        "the same with fsync (`dd conv=fsync`)".into(),
        synced,
        String::new(),
    ));

    let mut out = format!(
        "\n### Saving a {} MiB guest with {} MiB written (QEMU {}, {:.0} MB stream)\n\n\
         | method | time | MB/s | vs the recipe | |\n|---|---|---|---|---|\n",
        args.ram_mib,
        args.fill_mib,
        q.version,
        stream_bytes as f64 / 1e6
    );
    for (name, took, note) in &rows {
        out.push_str(&format!(
            "| {name} | {:.2} s | {:.0} | {:.1}× faster | {note} |\n",
            took.as_secs_f64(),
            stream_bytes as f64 / 1e6 / took.as_secs_f64(),
            recipe.as_secs_f64() / took.as_secs_f64()
        ));
    }
    let _ = peak;
    out.push_str(&reading);
    Ok(out)
}

/// Reading the recipe's state file back: `qemu-migrate inspect` beside
/// QEMU's own analyze-migration.py when a copy is named by
/// `ANALYZE_MIGRATION_PY` (the project does not ship it).
fn inspect_speed(migrate: &Path, state: &Path, bytes: u64) -> anyhow::Result<String> {
    // Once unmeasured, so the file is in the page cache for every reader.
    timed_child(Command::new(migrate).args(["inspect"]).arg(state))?;
    let mut out = format!(
        "\n#### Reading that {:.0} MB state file from the page cache\n\n\
         | reader | time | GB/s | peak RSS |\n|---|---|---|---|\n",
        bytes as f64 / 1e6
    );
    let mut row = |name: &str, cmd: &mut Command| -> anyhow::Result<()> {
        let (took, rss) = timed_child(cmd)?;
        out.push_str(&format!(
            "| {name} | {:.3} s | {:.2} | {:.1} MiB |\n",
            took.as_secs_f64(),
            bytes as f64 / 1e9 / took.as_secs_f64(),
            rss as f64 / 1024.0
        ));
        Ok(())
    };
    row(
        "`qemu-migrate inspect`",
        Command::new(migrate).arg("inspect").arg(state),
    )?;
    if let Some(script) = std::env::var_os("ANALYZE_MIGRATION_PY") {
        row(
            "QEMU's `analyze-migration.py -f`",
            Command::new("python3").arg(script).arg("-f").arg(state),
        )?;
    }
    Ok(out)
}
