//! Live migration rows: to a local QEMU, and over TCP to a receiver.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::bail;

use super::save::{filled_args, FilledVm};
use super::Args;
use crate::qemu::Qemu;

/// `qemu-migrate live --json --to DEST`; returns its result line.
fn run_live(
    migrate: &Path,
    monitor: &Path,
    to: &str,
    security: &[String],
) -> anyhow::Result<serde_json::Value> {
    let output = Command::new(migrate)
        .args(["live", "--json", "--to", to, "--monitor"])
        .arg(monitor)
        .args(security)
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
pub(super) fn live_speed(
    q: &Qemu,
    migrate: &Path,
    guest: &Path,
    args: &Args,
) -> anyhow::Result<String> {
    let mut out = format!(
        "\n### Live migration of a running {} MiB guest with {} MiB written (QEMU {})\n\n\
         | route | total | downtime | sent |\n|---|---|---|---|\n",
        args.ram_mib, args.fill_mib, q.version
    );
    let vm = FilledVm::start(q, guest, args.ram_mib, args.fill_mib)?;
    let result = run_live(migrate, &vm.hmp, "local", &[])?;
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

    // Over TCP on 127.0.0.1: in clear, and through QEMU's TLS with a key.
    let keys = tempfile::tempdir()?;
    let key = key_file(keys.path())?.display().to_string();
    for (route, security) in [
        (
            "TCP on 127.0.0.1 in clear, `receive` + `live --to tcp: --insecure`",
            vec!["--insecure".to_string()],
        ),
        (
            "TCP on 127.0.0.1 with TLS, `receive` + `live --to tcp: --tls-psk KEY`",
            vec!["--tls-psk".to_string(), key.clone()],
        ),
    ] {
        out.push_str(&tcp_row(q, migrate, guest, args, route, &security)?);
    }
    Ok(out)
}

/// A fresh pre-shared key file (hex, mode 600) in `dir`.
fn key_file(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    let path = dir.join("key.psk");
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?
        .write_all(format!("{hex}\n").as_bytes())?;
    Ok(path)
}

/// One TCP row: a receiver with the same options (its own sockets), secured as `security` says.
fn tcp_row(
    q: &Qemu,
    migrate: &Path,
    guest: &Path,
    args: &Args,
    route: &str,
    security: &[String],
) -> anyhow::Result<String> {
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
        .args(security)
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
    let result = run_live(migrate, &vm.hmp, &listen, security);
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
    Ok(format!(
        "| {route} | {:.2} s | {} ms | {:.0} MB |\n",
        result["seconds"].as_f64().unwrap_or(0.0),
        result["downtime_ms"],
        result["bytes"].as_f64().unwrap_or(0.0) / 1e6
    ))
}
