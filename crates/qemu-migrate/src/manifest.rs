//! The manifest written beside a state file: everything needed to restore
//! it without the user repeating an option, and to tell it is complete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::os::durable;

/// The manifest format this version writes and reads.
pub const FORMAT: &str = "qemu-migrate/1";
/// The format of an instant save's manifest: a reader that knows only
/// [`FORMAT`] must refuse it rather than restore the stream without its RAM.
pub const FORMAT_INSTANT: &str = "qemu-migrate/1+instant";

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
    /// SHA-256 of the QEMU binary `qemu` names, as the saved VM ran it: for
    /// a VM attached to, read through `/proc/PID/exe` at the save (so a
    /// binary deleted and replaced since it started is told apart); for one
    /// this tool started, of the file it was started as. 64 hex digits. A restore runs `qemu` only
    /// while its content is still this, unless given `--qemu`. Manifests
    /// of older versions have none (see [`crate::trust::recorded_qemu`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_sha256: Option<String>,
    /// The user the saved QEMU ran as: root restores another user's VM
    /// only when told to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_uid: Option<u32>,
    /// The disk images the VM had open for writing and its boot files, as
    /// they were when it was saved: a restore refuses them changed.
    #[serde(default)]
    pub files: Vec<crate::guard::GuardedFile>,
    /// The manifest of the save this one replaced, while the replacement is
    /// being committed: the new manifest is put in place first, and the
    /// state file beside it may still be the previous save's for a moment.
    /// A restore that finds the previous save's stream restores it with
    /// this (see [`crate::save`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Box<Manifest>>,
    /// Written while the save is being committed (see [`crate::commit`]):
    /// the files this manifest describes may not all be in place yet, and
    /// until they are, the target is the previous save (or none).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub committing: bool,
    /// For an instant save: where guest RAM is ([`crate::instant`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instant: Option<crate::instant::Layout>,
    /// The VM's disk images at the save; frozen for a checkpoint (`save --with-disks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<crate::checkpoint::DiskRecord>,
    /// Arguments a new QEMU cannot have as they are (a descriptor with no
    /// name): a restore refuses until `--replace` supplies them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreplayable: Vec<crate::replay::Unreplayable>,
    /// Processes the VM depends on (vhost-user backends, TPM emulators),
    /// started again by a restore when nothing listens on their socket.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<crate::replay::Backend>,
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
        if m.format != FORMAT && !(m.format == FORMAT_INSTANT && m.instant.is_some()) {
            return Err(Error::BadStateFile {
                path,
                reason: format!("unknown manifest format {:?} (expected {FORMAT})", m.format),
            });
        }
        Ok(Some(m))
    }

    /// Writes the manifest to `tmp`, a new private file (`0600`, never
    /// through a symlink), synced when `sync`; the caller renames it into
    /// place, and keeps the returned file (which holds its lock) open until then.
    ///
    /// # Errors
    /// [`Error::File`] when it cannot be written.
    pub fn write_new(&self, tmp: &Path, sync: bool) -> Result<std::fs::File> {
        let text = serde_json::to_string_pretty(self).expect("a manifest always serialises");
        let write = || -> std::io::Result<std::fs::File> {
            let f = crate::os::create_locked(tmp)?;
            durable::write_all(&f, tmp, format!("{text}\n").as_bytes())?;
            if sync {
                durable::fsync(&f, tmp)?;
            }
            Ok(f)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(tmp);
            Error::file(tmp, "writing the manifest")(e)
        })
    }

    /// The manifest for display: inline secrets in the command line
    /// (`-object secret,data=…`, `password=…`) replaced by `***`.
    pub fn redacted(&self) -> Manifest {
        let mut m = self.clone();
        m.args = m.args.iter().map(|a| crate::argv::redact(a)).collect();
        m.vm_options = m
            .vm_options
            .iter()
            .map(|a| crate::argv::redact(a))
            .collect();
        for u in &mut m.unreplayable {
            u.arg = crate::argv::redact(&u.arg);
        }
        for b in &mut m.backends {
            b.argv = b.argv.iter().map(|a| crate::argv::redact(a)).collect();
        }
        m.previous = m.previous.map(|p| Box::new(p.redacted()));
        m
    }

    /// The same save without RAM images: what is left to keep of a save
    /// that never was.
    #[must_use]
    pub fn without_images(&self) -> Manifest {
        let mut m = self.clone();
        m.instant = None;
        m
    }

    /// Whether a stream of `bytes` with CRC-32 `crc` is the one this
    /// manifest describes.
    pub fn describes(&self, bytes: u64, crc: u32) -> bool {
        self.stream_bytes == bytes && self.crc32 == format!("{crc:08x}")
    }
}
