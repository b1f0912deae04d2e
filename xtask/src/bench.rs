//! `cargo xtask bench`: the project's speed and delivery figures, each
//! measured beside its peers in the same run, printed as markdown tables
//! (and kept in target/bench/results.md for the README).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use qemu_migrate::{MigrationStatus, Monitor, UNCAPPED};
use qemu_monitor::{Options, QmpSession};

use crate::qemu::{self, Qemu};
use crate::test::cargo;

mod instant;
mod libvirt;

pub struct Args {
    pub runs: usize,
    pub delivery_runs: usize,
    /// Guest RAM and how much of it the guest writes, for the save rows.
    pub ram_mib: u32,
    pub fill_mib: u32,
    /// Only the instant-restore rows.
    pub instant_only: bool,
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
    for q in qemus.iter().filter(|_| args.instant_only) {
        let section = instant::instant_speed(q, &migrate, &guest)?;
        print!("{section}");
        report.push_str(&section);
    }
    for q in qemus.iter().filter(|_| !args.instant_only) {
        let section = monitor_round_trips(q, &send, args)?;
        print!("{section}");
        report.push_str(&section);
    }
    for q in qemus.iter().filter(|_| !args.instant_only) {
        let section = save_speed(q, &send, &migrate, &guest, args)?;
        print!("{section}");
        report.push_str(&section);
        let section = live_speed(q, &migrate, &guest, args)?;
        print!("{section}");
        report.push_str(&section);
        let section = instant::instant_speed(q, &migrate, &guest)?;
        print!("{section}");
        report.push_str(&section);
    }
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("results.md"), &report)?;
    eprintln!("written to {}", out.join("results.md").display());
    Ok(())
}

/// A monitor-only QEMU with an HMP socket for the tools and a QMP socket to
/// check what really happened.
struct MonitorVm {
    child: Child,
    _dir: tempfile::TempDir,
    hmp: PathBuf,
    qmp: QmpSession,
}

impl MonitorVm {
    fn start(q: &Qemu) -> anyhow::Result<MonitorVm> {
        let dir = tempfile::tempdir()?;
        let hmp = dir.path().join("hmp.sock");
        let qmp = dir.path().join("qmp.sock");
        let child = Command::new(&q.binary)
            .args(["-M", "none", "-display", "none", "-monitor"])
            .arg(format!("unix:{},server,nowait", hmp.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server,nowait", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", q.binary.display()))?;
        let qmp = qemu_monitor::connect_qmp(
            qmp,
            &Options {
                timeout: Duration::from_secs(10),
                wait_socket: Some(Duration::from_secs(10)),
            },
        )?;
        Ok(MonitorVm {
            child,
            _dir: dir,
            hmp,
            qmp,
        })
    }
}

impl Drop for MonitorVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One way to send a command from the shell.
struct Peer {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
}

fn run_once(peer: &Peer, input: &[u8]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut child = Command::new(&peer.program)
        .args(&peer.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", peer.name))?;
    // A client that quits before reading its input (nc -w 0 can) breaks
    // the pipe: that is the lost command the delivery table counts.
    match child.stdin.take().expect("piped").write_all(input) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    let out = child.wait_with_output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!("{} exited with {}", peer.name, out.status);
    }
    Ok(took)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn monitor_round_trips(q: &Qemu, send: &Path, args: &Args) -> anyhow::Result<String> {
    let mut vm = MonitorVm::start(q)?;
    let sock = vm.hmp.display().to_string();
    let mut out = format!(
        "\n### Monitor round trip: one `info status` per process (QEMU {}, {} runs)\n\n\
         | client | median | p95 | vs `nc -N -U` |\n|---|---|---|---|\n",
        q.version, args.runs
    );
    let peers = [
        Peer {
            name: "`monitor-send SOCK 'info status'`",
            program: send.to_path_buf(),
            args: vec![sock.clone(), "info status".into()],
        },
        Peer {
            name: "`monitor-send -NU SOCK` (nc form)",
            program: send.to_path_buf(),
            args: vec!["-NU".into(), sock.clone()],
        },
        Peer {
            name: "`nc -N -U SOCK`",
            program: "nc".into(),
            args: vec!["-N".into(), "-U".into(), sock.clone()],
        },
        Peer {
            name: "`socat - unix-connect:SOCK`",
            program: "socat".into(),
            args: vec!["-".into(), format!("unix-connect:{sock}")],
        },
    ];
    let mut medians = Vec::new();
    for peer in &peers {
        let input: &[u8] = if peer.args.len() == 2 && peer.args[1] == "info status" {
            b""
        } else {
            b"info status\n"
        };
        // One unmeasured run so every peer starts with a warm page cache.
        run_once(peer, input)?;
        let mut times = Vec::with_capacity(args.runs);
        for _ in 0..args.runs {
            times.push(run_once(peer, input)?);
        }
        times.sort();
        medians.push((percentile(&times, 0.5), percentile(&times, 0.95)));
    }
    let nc_median = medians[2].0.as_secs_f64();
    for (peer, (median, p95)) in peers.iter().zip(&medians) {
        out.push_str(&format!(
            "| {} | {} | {} | {:.2}× |\n",
            peer.name,
            ms(*median),
            ms(*p95),
            median.as_secs_f64() / nc_median
        ));
    }

    out.push_str(&format!(
        "\n### Delivery: `echo stop | CLIENT`, checked over QMP (QEMU {}, {} runs each)\n\n\
         | client | stops executed |\n|---|---|\n",
        q.version, args.delivery_runs
    ));
    let fire_and_forget = [
        Peer {
            name: "`nc -w 0 -U SOCK` (the seed's recipe)",
            program: "nc".into(),
            args: vec!["-w".into(), "0".into(), "-U".into(), sock.clone()],
        },
        Peer {
            name: "`socat -u - unix-connect:SOCK` (the seed's recipe)",
            program: "socat".into(),
            args: vec!["-u".into(), "-".into(), format!("unix-connect:{sock}")],
        },
        Peer {
            name: "`monitor-send -w 0 -U SOCK`",
            program: send.to_path_buf(),
            args: vec!["-w".into(), "0".into(), "-U".into(), sock.clone()],
        },
        Peer {
            name: "`monitor-send -u - unix-connect:SOCK`",
            program: send.to_path_buf(),
            args: vec!["-u".into(), "-".into(), format!("unix-connect:{sock}")],
        },
    ];
    for peer in &fire_and_forget {
        let mut executed = 0;
        for _ in 0..args.delivery_runs {
            vm.qmp.execute("cont", None)?;
            run_once(peer, b"stop\n")?;
            // QEMU may still be reading what the client left behind: a
            // later HMP client would then run it. Ask over QMP, which is
            // answered only after the main loop has handled what was read.
            let status = vm.qmp.execute("query-status", None)?;
            if status["status"] == "paused" {
                executed += 1;
            }
        }
        out.push_str(&format!(
            "| {} | {executed}/{} |\n",
            peer.name, args.delivery_runs
        ));
    }
    Ok(out)
}

/// A test guest with most of its RAM written, and the bench's own QMP socket.
struct FilledVm {
    child: Child,
    _dir: tempfile::TempDir,
    hmp: PathBuf,
    /// The bench's own QMP session, through the library the CLIs use.
    control: Monitor,
    _serial: test_guest::Lines,
}

/// The options of the filled guest, its sockets in `dir`.
fn filled_args(dir: &Path, guest: &Path, ram_mib: u32, fill_mib: u32) -> Vec<String> {
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
    fn start(q: &Qemu, guest: &Path, ram_mib: u32, fill_mib: u32) -> anyhow::Result<FilledVm> {
        let dir = tempfile::tempdir()?;
        let hmp = dir.path().join("hmp.sock");
        let qmp = dir.path().join("qmp.sock");
        let serial = dir.path().join("serial.sock");
        let child = Command::new(&q.binary)
            .args(filled_args(dir.path(), guest, ram_mib, fill_mib))
            .arg("-S")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", q.binary.display()))?;
        let mut qmp = qemu_monitor::connect_qmp(
            qmp,
            &Options {
                timeout: Duration::from_secs(120),
                wait_socket: Some(Duration::from_secs(10)),
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
            child,
            _dir: dir,
            hmp,
            control,
            _serial: serial,
        })
    }

    /// Waits for the migration to end; returns QEMU's status.
    fn wait_migration(&mut self) -> anyhow::Result<MigrationStatus> {
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        let info = self.control.wait_migration(deadline, |_| {})?;
        Ok(info.status)
    }
}

impl Drop for FilledVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to its end; returns its time and peak resident memory (KiB).
fn timed_child(cmd: &mut Command) -> anyhow::Result<(Duration, u64)> {
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

fn save_speed(
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
    let has_file = q
        .version
        .parse::<qemu_monitor::QemuVersion>()
        .is_ok_and(|v| (v.major, v.minor) >= (8, 2));
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

/// `qemu-migrate live --json --to DEST`; returns its result line.
fn run_live(migrate: &Path, monitor: &Path, to: &str) -> anyhow::Result<serde_json::Value> {
    let output = Command::new(migrate)
        .args(["live", "--json", "--to", to, "--monitor"])
        .arg(monitor)
        .stderr(Stdio::piped())
        .output()?;
    if !output.status.success() {
        bail!(
            "qemu-migrate live --to {to}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("migrated").is_some())
        .ok_or_else(|| anyhow::anyhow!("qemu-migrate live printed no result"))
}

/// Live migration of a running guest to a new QEMU on this host.
fn live_speed(q: &Qemu, migrate: &Path, guest: &Path, args: &Args) -> anyhow::Result<String> {
    let mut out = format!(
        "\n### Live migration of a running {} MiB guest with {} MiB written (QEMU {})\n\n\
         | route | total | downtime | sent |\n|---|---|---|---|\n",
        args.ram_mib, args.fill_mib, q.version
    );
    let vm = FilledVm::start(q, guest, args.ram_mib, args.fill_mib)?;
    let result = run_live(migrate, &vm.hmp, "local")?;
    if let Some(pid) = result["pid"].as_i64() {
        // SAFETY: a signal to the destination QEMU the migration started.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    out.push_str(&format!(
        "| local (unix socket), `qemu-migrate live --to local` | {:.2} s | {} ms | {:.0} MB |\n",
        result["seconds"].as_f64().unwrap_or(0.0),
        result["downtime_ms"],
        result["bytes"].as_f64().unwrap_or(0.0) / 1e6
    ));
    drop(vm);

    // Over TCP on 127.0.0.1: a receiver with the same options (its own sockets).
    let vm = FilledVm::start(q, guest, args.ram_mib, args.fill_mib)?;
    let dest_dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("tcp:127.0.0.1:{port}");
    let mut receiver = Command::new(migrate)
        .args([
            "receive",
            "--json",
            "--daemonize",
            "--listen",
            &listen,
            "--qemu",
        ])
        .arg(&q.binary)
        .arg("--")
        .args(filled_args(
            dest_dir.path(),
            guest,
            args.ram_mib,
            args.fill_mib,
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let said = test_guest::Lines::collect(receiver.stdout.take().expect("piped"));
    said.try_wait_for(0, Duration::from_secs(60), |l| l.contains("\"listening\""))
        .map_err(|got| anyhow::anyhow!("the receiver did not listen: {got:?}"))?;
    let result = run_live(migrate, &vm.hmp, &listen);
    let received = receiver.wait_with_output()?;
    let result = result?;
    let dest_pid = said
        .snapshot()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("received").and(v["pid"].as_i64()));
    let Some(pid) = dest_pid else {
        bail!(
            "the receiver reported nothing: {}",
            String::from_utf8_lossy(&received.stderr).trim()
        );
    };
    // SAFETY: a signal to the destination QEMU the receiver started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    out.push_str(&format!(
        "| TCP on 127.0.0.1, `qemu-migrate receive` + `live --to tcp:` | {:.2} s | {} ms | {:.0} MB |\n",
        result["seconds"].as_f64().unwrap_or(0.0),
        result["downtime_ms"],
        result["bytes"].as_f64().unwrap_or(0.0) / 1e6
    ));
    Ok(out)
}
