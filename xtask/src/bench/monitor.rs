//! Monitor rows: one `info status` per process for each client, and how
//! many fire-and-forget `stop`s each delivers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use qemu_monitor::Options;
use testkit::{Serial, Vm};

use super::{ms, percentile, Args};
use crate::qemu::Qemu;

/// One way to send a command from the shell.
pub(super) struct Peer {
    pub(super) name: &'static str,
    pub(super) program: PathBuf,
    pub(super) args: Vec<String>,
}

pub(super) fn run_once(peer: &Peer, input: &[u8]) -> anyhow::Result<Duration> {
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

/// The median time of `info status` on one HMP connection held open.
fn open_connection_round_trip(hmp: &Path, runs: usize) -> anyhow::Result<Duration> {
    let mut session = qemu_monitor::connect_hmp(hmp, &Options::default())?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        session.command("info status")?;
        times.push(start.elapsed());
    }
    session.close()?;
    times.sort();
    Ok(percentile(&times, 0.5))
}

pub(super) fn monitor_round_trips(q: &Qemu, send: &Path, args: &Args) -> anyhow::Result<String> {
    let mut vm = Vm::try_start(
        q.binary.as_path(),
        &["-M", "none"],
        tempfile::tempdir()?,
        Serial::Null,
    )
    .map_err(anyhow::Error::msg)?;
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
            name: "`monitor-send - unix-connect:SOCK` (socat form)",
            program: send.to_path_buf(),
            args: vec!["-".into(), format!("unix-connect:{sock}")],
        },
        Peer {
            name: "`socat - unix-connect:SOCK`",
            program: "socat".into(),
            args: vec!["-".into(), format!("unix-connect:{sock}")],
        },
        Peer {
            name: "`true` (starting a minimal binary, dynamically linked as nc is)",
            program: "true".into(),
            args: vec![],
        },
    ];
    const NC: usize = 2;
    const TRUE: usize = 5;
    let input = |peer: &Peer| -> &'static [u8] {
        if peer.args.len() == 2 && peer.args[1] == "info status" {
            b""
        } else {
            b"info status\n"
        }
    };
    // One unmeasured run so every peer starts with a warm page cache; then
    // the peers in turn, run after run, so a drift of the machine's speed
    // weighs on all of them alike.
    for peer in &peers {
        run_once(peer, input(peer))?;
    }
    let mut times = vec![Vec::with_capacity(args.runs); peers.len()];
    for _ in 0..args.runs {
        for (peer, t) in peers.iter().zip(&mut times) {
            t.push(run_once(peer, input(peer))?);
        }
    }
    let medians: Vec<(Duration, Duration)> = times
        .iter_mut()
        .map(|t| {
            t.sort();
            (percentile(t, 0.5), percentile(t, 0.95))
        })
        .collect();
    let nc_median = medians[NC].0.as_secs_f64();
    for (peer, (median, p95)) in peers.iter().zip(&medians) {
        out.push_str(&format!(
            "| {} | {} | {} | {:.2}× |\n",
            peer.name,
            ms(*median),
            ms(*p95),
            median.as_secs_f64() / nc_median
        ));
    }
    // The floor: no client can do better than starting a process and
    // waiting for QEMU's own work, measured here on a connection held open.
    let qemu_work = open_connection_round_trip(&vm.hmp, args.runs)?;
    out.push_str(&format!(
        "| QEMU's round trip on an open connection | {} | | |\n\
         | floor for a dynamically linked client: `true` + that round trip | {} | | {:.2}× |\n",
        ms(qemu_work),
        ms(medians[TRUE].0 + qemu_work),
        (medians[TRUE].0 + qemu_work).as_secs_f64() / nc_median
    ));

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
            vm.qmp().execute("cont", None)?;
            run_once(peer, b"stop\n")?;
            // QEMU may still be reading what the client left behind: a
            // later HMP client would then run it. Ask over QMP, which is
            // answered only after the main loop has handled what was read.
            let status = vm.qmp().execute("query-status", None)?;
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
