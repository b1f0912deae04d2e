//! The words QEMU uses for a VM's state and its migration's, as its QAPI
//! schema names them (`qapi/run-state.json` `RunState`,
//! `qapi/migration.json` `MigrationStatus` and `MigrationInfo`), read from
//! QMP's replies or parsed once from the human monitor's text.

use serde::{Deserialize, Serialize};

/// The VM's run state (QAPI `RunState`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum RunState {
    /// Stopped by a debugger (gdbstub).
    Debug,
    /// Waiting for or loading an incoming migration.
    Inmigrate,
    /// Stopped by an internal error; QEMU cannot go on.
    InternalError,
    /// Stopped on a disk I/O error (`werror=stop`).
    IoError,
    /// Paused by `stop`.
    Paused,
    /// Paused after its state was migrated or saved.
    Postmigrate,
    /// Started with `-S`, not yet run.
    Prelaunch,
    /// Paused for the last step of an outgoing migration.
    FinishMigrate,
    /// Loading a snapshot (`loadvm`).
    RestoreVm,
    /// The guest's CPUs run.
    Running,
    /// Saving a snapshot (`savevm`).
    SaveVm,
    /// The guest shut down (with `-no-shutdown`).
    Shutdown,
    /// The guest is suspended (ACPI S3).
    Suspended,
    /// Stopped by a watchdog device's action.
    Watchdog,
    /// The guest panicked (pvpanic).
    GuestPanicked,
    /// Running as a COLO secondary.
    Colo,
    /// A state this crate does not know yet, by QEMU's name for it.
    #[serde(untagged)]
    Other(String),
}

impl RunState {
    /// Whether the guest's CPUs run.
    #[must_use]
    pub fn is_running(&self) -> bool {
        *self == RunState::Running
    }

    /// QEMU's name for the state (`running`, `paused`, `postmigrate`, ...).
    #[must_use]
    pub fn name(&self) -> String {
        match self {
            RunState::Other(s) => s.clone(),
            known => serde_json::to_value(known)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
        }
    }

    /// Parses QEMU's name for a state; unknown names are kept as [`RunState::Other`].
    #[must_use]
    pub fn from_name(name: &str) -> RunState {
        serde_json::from_value(serde_json::Value::String(name.to_string()))
            .unwrap_or_else(|_| RunState::Other(name.to_string()))
    }

    /// HMP's `info status`: `VM status: running`, `VM status: paused`,
    /// `VM status: paused (postmigrate)`. The word in parentheses is the run
    /// state whenever it is not plain `paused` (hmp_info_status in monitor/hmp-cmds.c).
    ///
    /// ```
    /// use qemu_monitor::RunState;
    ///
    /// let state = RunState::from_info_status("VM status: paused (postmigrate)");
    /// assert_eq!(state, Some(RunState::Postmigrate));
    /// assert!(!RunState::Postmigrate.is_running());
    /// ```
    #[must_use]
    pub fn from_info_status(text: &str) -> Option<RunState> {
        let rest = text.trim().strip_prefix("VM status: ")?;
        if rest.starts_with("running") {
            return Some(RunState::Running);
        }
        Some(match rest.split_once(" (") {
            Some((_, reason)) => RunState::from_name(reason.trim_end_matches(')')),
            None => RunState::from_name(rest.trim()),
        })
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// A migration's status (QAPI `MigrationStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum MigrationStatus {
    /// No migration yet.
    None,
    /// Setting up.
    Setup,
    /// Sending RAM.
    Active,
    /// Being cancelled.
    Cancelling,
    /// Cancelled.
    Cancelled,
    /// Done: the destination has the whole state.
    Completed,
    /// Failed; `error-desc` says why.
    Failed,
    /// In postcopy: the destination runs and pulls pages.
    PostcopyActive,
    /// Postcopy interrupted, waiting for recovery.
    PostcopyPaused,
    /// Postcopy recovery being set up.
    PostcopyRecoverSetup,
    /// Postcopy recovering.
    PostcopyRecover,
    /// Paused before the switchover (`pause-before-switchover`).
    PreSwitchover,
    /// Sending device state.
    Device,
    /// Waiting for devices to be unplugged (failover).
    WaitUnplug,
    /// In COLO mode.
    Colo,
}

impl MigrationStatus {
    /// Completed, failed or cancelled: nothing more will happen.
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }

    /// Parses QEMU's name for a status (`completed`, `postcopy-active`, ...).
    #[must_use]
    pub fn from_name(name: &str) -> Option<MigrationStatus> {
        serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
    }
}

/// What `query-migrate` (or HMP's `info migrate`) says of the current or last migration.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationInfo {
    /// Where the migration is.
    pub status: MigrationStatus,
    /// RAM bytes sent (or received) so far.
    pub transferred: u64,
    /// The guest's RAM in bytes, as the migration counts it.
    pub total: u64,
    /// RAM bytes still to send.
    pub remaining: u64,
    /// QEMU's reason, for a failed migration.
    pub error: Option<String>,
    /// How long the guest was paused for the final copy (completed only).
    pub downtime_ms: Option<u64>,
    /// How long it took (or has taken so far).
    pub total_time_ms: Option<u64>,
}

impl MigrationInfo {
    /// A migration that has not started (`query-migrate` returns `{}`).
    #[must_use]
    pub fn none() -> MigrationInfo {
        MigrationInfo {
            status: MigrationStatus::None,
            transferred: 0,
            total: 0,
            remaining: 0,
            error: None,
            downtime_ms: None,
            total_time_ms: None,
        }
    }

    /// From QMP's `query-migrate` reply.
    pub fn from_qmp(r: &serde_json::Value) -> MigrationInfo {
        let ram = &r["ram"];
        MigrationInfo {
            status: r["status"]
                .as_str()
                .and_then(MigrationStatus::from_name)
                .unwrap_or(MigrationStatus::None),
            transferred: ram["transferred"].as_u64().unwrap_or(0),
            total: ram["total"].as_u64().unwrap_or(0),
            remaining: ram["remaining"].as_u64().unwrap_or(0),
            error: r["error-desc"].as_str().map(String::from),
            downtime_ms: r["downtime"].as_u64(),
            total_time_ms: r["total-time"].as_u64(),
        }
    }

    /// From HMP's `info migrate`: `Migration status: failed (error text)`,
    /// `transferred ram: 517 kbytes`, `total time: 14 ms`, ...
    #[must_use]
    pub fn from_info_migrate(text: &str) -> MigrationInfo {
        let status_line = field(text, "Migration status").unwrap_or("none");
        let (status, error) = match status_line.split_once(" (") {
            Some((s, e)) => (s, Some(e.trim_end_matches(')').to_string())),
            None => (status_line, None),
        };
        MigrationInfo {
            status: MigrationStatus::from_name(status.trim()).unwrap_or(MigrationStatus::None),
            transferred: kbytes(text, "transferred ram"),
            total: kbytes(text, "total ram"),
            remaining: kbytes(text, "remaining ram"),
            error,
            downtime_ms: millis(text, "downtime"),
            total_time_ms: millis(text, "total time"),
        }
    }
}

/// The value of `name: value` in HMP's key/value listings.
pub(crate) fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_info_status() {
        assert_eq!(
            RunState::from_info_status("VM status: running\r\n"),
            Some(RunState::Running)
        );
        assert_eq!(
            RunState::from_info_status("VM status: running (single step mode)"),
            Some(RunState::Running)
        );
        assert_eq!(
            RunState::from_info_status("VM status: paused"),
            Some(RunState::Paused)
        );
        assert_eq!(
            RunState::from_info_status("VM status: paused (postmigrate)"),
            Some(RunState::Postmigrate)
        );
        assert_eq!(
            RunState::from_info_status("VM status: paused (finish-migrate)"),
            Some(RunState::FinishMigrate)
        );
        assert_eq!(
            RunState::from_info_status("VM status: paused (something-new)"),
            Some(RunState::Other("something-new".into()))
        );
        assert_eq!(RunState::from_info_status("garbage"), None);
        assert_eq!(RunState::InternalError.name(), "internal-error");
        assert_eq!(RunState::from_name("inmigrate"), RunState::Inmigrate);
    }

    #[test]
    fn reads_info_migrate() {
        let text = "globals:\nstore-global-state: on\nMigration status: completed\ntotal time: 14 ms\n\
                    downtime: 2 ms\ntransferred ram: 517 kbytes\nremaining ram: 0 kbytes\ntotal ram: 33288 kbytes\n";
        let info = MigrationInfo::from_info_migrate(text);
        assert_eq!(info.status, MigrationStatus::Completed);
        assert_eq!(info.transferred, 517 * 1024);
        assert_eq!(info.total, 33288 * 1024);
        assert_eq!(info.downtime_ms, Some(2));
        let failed = MigrationInfo::from_info_migrate(
            "Migration status: failed (Unable to write to command: Broken pipe)\n",
        );
        assert_eq!(failed.status, MigrationStatus::Failed);
        assert_eq!(
            failed.error.as_deref(),
            Some("Unable to write to command: Broken pipe")
        );
        assert_eq!(
            MigrationInfo::from_info_migrate("globals:\n").status,
            MigrationStatus::None
        );
    }

    #[test]
    fn reads_query_migrate() {
        let r =
            serde_json::json!({"status": "postcopy-active", "ram": {"transferred": 5, "total": 9}});
        let info = MigrationInfo::from_qmp(&r);
        assert_eq!(info.status, MigrationStatus::PostcopyActive);
        assert!(!info.status.is_final());
        assert_eq!((info.transferred, info.total), (5, 9));
        assert_eq!(
            MigrationInfo::from_qmp(&serde_json::json!({})),
            MigrationInfo::none()
        );
    }
}
