//! Driving a VM's migration through whichever monitor it offers: QMP where
//! there is one, else the human monitor (the user's recipe gives only that).

use std::os::fd::BorrowedFd;

use qemu_monitor::{HmpSession, Monitor, QemuVersion, QmpSession};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{Error, Result};

/// `query-migrate`'s status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    None,
    Setup,
    Active,
    Cancelling,
    Cancelled,
    Completed,
    Failed,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecoverSetup,
    PostcopyRecover,
    PreSwitchover,
    Device,
    WaitUnplug,
    Colo,
}

impl MigrationStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }

    fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(json!(s)).ok()
    }
}

/// What `query-migrate` (or `info migrate`) says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationInfo {
    pub status: MigrationStatus,
    pub transferred: u64,
    pub total: u64,
    pub remaining: u64,
    pub error: Option<String>,
    pub downtime_ms: Option<u64>,
    pub total_time_ms: Option<u64>,
}

/// The VM's run state, as `query-status` names it (`running`, `paused`,
/// `postmigrate`, `inmigrate`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunState(pub String);

impl RunState {
    pub fn is_running(&self) -> bool {
        self.0 == "running"
    }
}

/// A monitor session used to drive migration.
#[derive(Debug)]
pub enum Control {
    Qmp(QmpSession),
    Hmp(HmpSession),
}

impl Control {
    pub fn from_monitor(m: Monitor) -> Result<Control> {
        Ok(match m {
            Monitor::Qmp(mut s) => {
                s.negotiate()?;
                Control::Qmp(s)
            }
            Monitor::Hmp(s) => Control::Hmp(s),
        })
    }

    pub fn peer_pid(&self) -> Result<u32> {
        Ok(match self {
            Control::Qmp(s) => s.peer_pid()?,
            Control::Hmp(s) => s.peer_pid()?,
        })
    }

    pub fn version(&mut self) -> Result<QemuVersion> {
        match self {
            Control::Qmp(s) => Ok(s.version()),
            Control::Hmp(s) => {
                let banner = s.version().map(String::from);
                let text = match banner {
                    Some(v) => v,
                    None => s.command("info version")?,
                };
                text.parse().map_err(|e: String| Error::Protocol(e))
            }
        }
    }

    /// Runs an HMP command line on either monitor.
    pub fn hmp(&mut self, line: &str) -> Result<String> {
        Ok(match self {
            Control::Qmp(s) => s.hmp(line)?,
            Control::Hmp(s) => s.command(line)?,
        })
    }

    pub fn status(&mut self) -> Result<RunState> {
        match self {
            Control::Qmp(s) => {
                let r = s.execute("query-status", None)?;
                Ok(RunState(
                    r["status"].as_str().unwrap_or_default().to_string(),
                ))
            }
            Control::Hmp(s) => {
                // "VM status: running" / "VM status: paused (postmigrate)"
                let text = s.command("info status")?;
                let rest = text
                    .trim()
                    .strip_prefix("VM status: ")
                    .unwrap_or(text.trim());
                let state = match rest.split_once(" (") {
                    Some((_, reason)) => reason.trim_end_matches(')').to_string(),
                    None => rest.to_string(),
                };
                Ok(RunState(state))
            }
        }
    }

    pub fn stop(&mut self) -> Result<()> {
        match self {
            Control::Qmp(s) => s.execute("stop", None).map(drop)?,
            Control::Hmp(s) => s.command("stop").map(drop)?,
        }
        Ok(())
    }

    pub fn cont(&mut self) -> Result<()> {
        match self {
            Control::Qmp(s) => s.execute("cont", None).map(drop)?,
            Control::Hmp(s) => s.command("cont").map(drop)?,
        }
        Ok(())
    }

    /// Resumes a guest whose migration just completed. QEMU reports
    /// completion a moment before the source leaves `finish-migrate`, and
    /// refuses `cont` until then; no event marks that moment, so the state
    /// is asked again, briefly, until it has.
    pub fn cont_after_migration(&mut self) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.status()?.0 == "finish-migrate" && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        self.cont()
    }

    /// Ends QEMU. It answers by closing the monitor, which is success here.
    pub fn quit(&mut self) -> Result<()> {
        match self {
            Control::Qmp(s) => match s.execute("quit", None) {
                Ok(_) | Err(qemu_monitor::Error::Closed { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            },
            Control::Hmp(s) => s.command("quit").map(drop).map_err(Into::into),
        }
    }

    /// The migration bandwidth cap in bytes per second.
    pub fn max_bandwidth(&mut self) -> Result<u64> {
        match self {
            Control::Qmp(s) => {
                let r = s.execute("query-migrate-parameters", None)?;
                Ok(r["max-bandwidth"].as_u64().unwrap_or(0))
            }
            Control::Hmp(s) => {
                let text = s.command("info migrate_parameters")?;
                field(&text, "max-bandwidth")
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
                    .ok_or_else(|| {
                        Error::Protocol("no max-bandwidth in info migrate_parameters".into())
                    })
            }
        }
    }

    pub fn set_max_bandwidth(&mut self, bytes_per_second: u64) -> Result<()> {
        self.set_parameter("max-bandwidth", bytes_per_second)
    }

    /// Sets a numeric migration parameter (`max-bandwidth`, `downtime-limit`, ...).
    pub fn set_parameter(&mut self, name: &str, value: u64) -> Result<()> {
        match self {
            Control::Qmp(s) => s
                .execute("migrate-set-parameters", Some(json!({ name: value })))
                .map(drop)?,
            Control::Hmp(s) => {
                // HMP reads a bare size as MiB; a `B` suffix makes it bytes.
                let unit = if SIZE_PARAMETERS.contains(&name) {
                    "B"
                } else {
                    ""
                };
                s.command(&format!("migrate_set_parameter {name} {value}{unit}"))
                    .map(drop)?
            }
        }
        Ok(())
    }

    pub fn set_capability(&mut self, name: &str, on: bool) -> Result<()> {
        match self {
            Control::Qmp(s) => s
                .execute(
                    "migrate-set-capabilities",
                    Some(json!({"capabilities": [{"capability": name, "state": on}]})),
                )
                .map(drop)?,
            Control::Hmp(s) => s
                .command(&format!(
                    "migrate_set_capability {name} {}",
                    if on { "on" } else { "off" }
                ))
                .map(drop)?,
        }
        Ok(())
    }

    /// Hands QEMU a file descriptor under `name`, for a `fd:NAME` URI.
    pub fn getfd(&mut self, name: &str, fd: BorrowedFd) -> Result<()> {
        match self {
            Control::Qmp(s) => s
                .execute_with_fd("getfd", Some(json!({ "fdname": name })), fd)
                .map(drop)?,
            Control::Hmp(s) => s.command_with_fd(&format!("getfd {name}"), fd).map(drop)?,
        }
        Ok(())
    }

    /// Starts an outgoing migration; returns at once.
    pub fn migrate(&mut self, uri: &str) -> Result<()> {
        match self {
            Control::Qmp(s) => s
                .execute("migrate", Some(json!({ "uri": uri })))
                .map(drop)?,
            Control::Hmp(s) => s
                .command(&format!("migrate -d {}", hmp_quote(uri)))
                .map(drop)?,
        }
        Ok(())
    }

    /// Starts listening for an incoming migration (QEMU started with `-incoming defer`).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<()> {
        match self {
            Control::Qmp(s) => s
                .execute("migrate-incoming", Some(json!({ "uri": uri })))
                .map(drop)?,
            Control::Hmp(s) => s
                .command(&format!("migrate_incoming {}", hmp_quote(uri)))
                .map(drop)?,
        }
        Ok(())
    }

    pub fn migrate_cancel(&mut self) -> Result<()> {
        match self {
            Control::Qmp(s) => s.execute("migrate_cancel", None).map(drop)?,
            Control::Hmp(s) => s.command("migrate_cancel").map(drop)?,
        }
        Ok(())
    }

    pub fn query_migrate(&mut self) -> Result<MigrationInfo> {
        match self {
            Control::Qmp(s) => {
                let r = s.execute("query-migrate", None)?;
                let status = r["status"]
                    .as_str()
                    .and_then(MigrationStatus::parse)
                    .unwrap_or(MigrationStatus::None);
                let ram = &r["ram"];
                Ok(MigrationInfo {
                    status,
                    transferred: ram["transferred"].as_u64().unwrap_or(0),
                    total: ram["total"].as_u64().unwrap_or(0),
                    remaining: ram["remaining"].as_u64().unwrap_or(0),
                    error: r["error-desc"].as_str().map(String::from),
                    downtime_ms: r["downtime"].as_u64(),
                    total_time_ms: r["total-time"].as_u64(),
                })
            }
            Control::Hmp(s) => {
                let text = s.command("info migrate")?;
                Ok(parse_info_migrate(&text))
            }
        }
    }

    /// The guest's base RAM in bytes.
    pub fn ram_size(&mut self) -> Result<u64> {
        match self {
            Control::Qmp(s) => {
                let r = s.execute("query-memory-size-summary", None)?;
                Ok(r["base-memory"].as_u64().unwrap_or(0))
            }
            Control::Hmp(s) => {
                let text = s.command("info memory_size_summary")?;
                field(&text, "base memory")
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| {
                        Error::Protocol("no base memory in info memory_size_summary".into())
                    })
            }
        }
    }

    /// Waits for a QMP event (QMP only), up to `timeout`.
    pub fn next_event(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<Option<qemu_monitor::Event>> {
        match self {
            Control::Qmp(s) => match s.next_event(timeout) {
                Ok(e) => Ok(Some(e)),
                Err(qemu_monitor::Error::Timeout { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            },
            Control::Hmp(_) => Ok(None),
        }
    }

    pub fn close(self) -> Result<()> {
        match self {
            Control::Qmp(s) => s.close().map(drop)?,
            Control::Hmp(s) => s.close().map(drop)?,
        }
        Ok(())
    }
}

/// Migration parameters that HMP parses as sizes.
const SIZE_PARAMETERS: &[&str] = &[
    "max-bandwidth",
    "max-postcopy-bandwidth",
    "xbzrle-cache-size",
];

/// HMP parses its arguments with quotes: a URI with spaces needs them.
fn hmp_quote(s: &str) -> String {
    if s.contains([' ', '"', '\\']) {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s.to_string()
    }
}

/// The value of `name: value` in HMP's key/value listings.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then_some(v.trim())
    })
}

fn kbytes(text: &str, name: &str) -> u64 {
    field(text, name)
        .and_then(|v| v.strip_suffix(" kbytes"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(0, |k| k * 1024)
}

fn millis(text: &str, name: &str) -> Option<u64> {
    field(text, name)?.strip_suffix(" ms")?.trim().parse().ok()
}

/// `info migrate`: "Migration status: failed (error text)", "transferred ram: 517 kbytes", ...
fn parse_info_migrate(text: &str) -> MigrationInfo {
    let status_line = field(text, "Migration status").unwrap_or("none");
    let (status, error) = match status_line.split_once(" (") {
        Some((s, e)) => (s, Some(e.trim_end_matches(')').to_string())),
        None => (status_line, None),
    };
    MigrationInfo {
        status: MigrationStatus::parse(status.trim()).unwrap_or(MigrationStatus::None),
        transferred: kbytes(text, "transferred ram"),
        total: kbytes(text, "total ram"),
        remaining: kbytes(text, "remaining ram"),
        error,
        downtime_ms: millis(text, "downtime"),
        total_time_ms: millis(text, "total time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_info_migrate() {
        let text = "globals:\nstore-global-state: on\nMigration status: completed\ntotal time: 14 ms\n\
                    downtime: 2 ms\ntransferred ram: 517 kbytes\nremaining ram: 0 kbytes\ntotal ram: 33288 kbytes\n";
        let info = parse_info_migrate(text);
        assert_eq!(info.status, MigrationStatus::Completed);
        assert_eq!(info.transferred, 517 * 1024);
        assert_eq!(info.total, 33288 * 1024);
        assert_eq!(info.downtime_ms, Some(2));
        let failed = parse_info_migrate(
            "Migration status: failed (Unable to write to command: Broken pipe)\n",
        );
        assert_eq!(failed.status, MigrationStatus::Failed);
        assert_eq!(
            failed.error.as_deref(),
            Some("Unable to write to command: Broken pipe")
        );
        assert_eq!(
            parse_info_migrate("globals:\n").status,
            MigrationStatus::None
        );
    }

    #[test]
    fn quotes_uris_for_hmp() {
        assert_eq!(hmp_quote("fd:save"), "fd:save");
        assert_eq!(hmp_quote("exec:cat > f"), "\"exec:cat > f\"");
    }
}
