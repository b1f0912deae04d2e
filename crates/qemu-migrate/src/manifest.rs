//! The manifest written beside a state file: everything needed to restore
//! it without the user repeating an option, and to tell it is complete.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The manifest format this version writes and reads.
pub const FORMAT: &str = "qemu-migrate/1";

/// What a save records beside its state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The QEMU binary that ran the VM.
    pub qemu: PathBuf,
    /// Its version, `7.2.22`.
    pub qemu_version: String,
    /// The command line as it ran (without argv[0]).
    pub args: Vec<String>,
    /// The part of it that identifies the VM: monitors, -incoming,
    /// -daemonize and -pidfile left out.
    pub vm_options: Vec<String>,
    /// `QEMU_*` environment the binary needs (module and firmware paths).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The machine type the stream names, e.g. `pc-i440fx-7.2`.
    pub machine: Option<String>,
    /// The guest's base RAM.
    pub ram_bytes: u64,
    /// The state file's size.
    pub stream_bytes: u64,
    /// CRC-32 (IEEE) of the stream, 8 hex digits.
    pub crc32: String,
    /// Whether the guest ran when the save began (a restore resumes it then).
    pub guest_was_running: bool,
    /// Seconds since the Unix epoch.
    pub saved_at: u64,
    /// How QEMU sent the stream (`fd`).
    pub transport: String,
    /// The VM's disk images at the save; frozen for a checkpoint (`save --with-disks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<crate::checkpoint::DiskRecord>,
}

/// Where the manifest of `statefile` lives.
#[must_use]
pub fn path_for(statefile: &Path) -> PathBuf {
    let mut name = statefile.file_name().unwrap_or_default().to_os_string();
    name.push(".manifest.json");
    statefile.with_file_name(name)
}

impl Manifest {
    /// The manifest beside `statefile`; `None` when it has none.
    ///
    /// # Errors
    /// [`Error::BadStateFile`] for a damaged or unknown manifest.
    pub fn load(statefile: &Path) -> Result<Option<Manifest>> {
        let path = path_for(statefile);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::file(&path, "reading the manifest")(e)),
        };
        let m: Manifest = serde_json::from_str(&text).map_err(|e| Error::BadStateFile {
            path: path.clone(),
            reason: format!("the manifest is damaged: {e}"),
        })?;
        if m.format != FORMAT {
            return Err(Error::BadStateFile {
                path,
                reason: format!("unknown manifest format {:?} (expected {FORMAT})", m.format),
            });
        }
        Ok(Some(m))
    }

    /// Writes the manifest atomically: a temporary file, renamed; synced
    /// first when `sync` (an fsync here can cost as much as the state file's).
    ///
    /// # Errors
    /// [`Error::File`] when it cannot be written.
    pub fn store(&self, statefile: &Path, sync: bool) -> Result<()> {
        let path = path_for(statefile);
        let tmp = path.with_extension("json.partial");
        let text = serde_json::to_string_pretty(self).expect("a manifest always serialises");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.write_all(b"\n")?;
            if sync {
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::file(&path, "writing the manifest")(e)
        })
    }
}
