//! The restore's side: the recorded images checked, and for a checkpoint a
//! fresh overlay on each frozen image with the command line pointed at it.

use std::path::{Path, PathBuf};

use super::cmdline::{self, Swap};
use super::overlay::{self, Made};
use crate::error::{Error, Result};
use crate::manifest::Manifest;

/// The command line to start QEMU with, and the overlays made for it
/// (removed when dropped, unless the restore succeeded and kept them).
#[derive(Debug)]
pub struct Thawed {
    /// QEMU's options, the disks pointed at the new overlays.
    pub args: Vec<String>,
    made: Made,
}

impl Thawed {
    /// The overlays, kept: the restored VM writes to them.
    #[must_use]
    pub fn keep(self) -> Vec<PathBuf> {
        self.made.keep()
    }
}

/// Checks the images the state was saved with and, for a checkpoint, makes
/// a fresh overlay for each disk in `into` (default: beside the state
/// file), named `STATEFILE.DISK.N.qcow2`.
///
/// # Errors
/// [`Error::Disk`] when an image changed since the save, or the options name
/// none of a frozen disk's images; [`Error::File`] when an overlay cannot be written.
pub fn thaw(
    manifest: Option<&Manifest>,
    statefile: &Path,
    args: &[String],
    into: Option<&Path>,
) -> Result<Thawed> {
    let unchanged = || Thawed {
        args: args.to_vec(),
        made: Made::default(),
    };
    let Some(record) = manifest.and_then(|m| m.checkpoint.as_ref()) else {
        return Ok(unchanged());
    };
    record.verify(statefile)?;
    if !record.frozen {
        return Ok(unchanged());
    }
    let dir = match into {
        Some(d) => d.to_path_buf(),
        None => statefile
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf(),
    };
    let name = statefile.file_name().unwrap_or_default().to_string_lossy();
    let mut made = Made::default();
    let mut swaps = Vec::new();
    for d in &record.disks {
        let top = &d.images[0];
        let stem = format!("{}.{}", overlay::label(&name), overlay::label(&d.name));
        let path = overlay::reserve(&dir, &stem)?;
        let path = std::path::absolute(&path).unwrap_or(path);
        made.paths.push(path.clone());
        overlay::create(&path, &top.path, &top.format, d.virtual_size)?;
        swaps.push(Swap {
            from: d.images.iter().map(|i| i.path.clone()).collect(),
            to: path,
        });
    }
    let (args, found) = cmdline::point_disks(args, &record.cwd, &swaps);
    let missing: Vec<String> = record
        .disks
        .iter()
        .zip(found)
        .filter(|(_, f)| !f)
        .map(|(d, _)| format!("{} ({})", d.name, d.images[0].path.display()))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Disk(format!(
            "{}: these options name none of the images of the checkpoint's disk {}: it \
             cannot be given its overlay (a -drive file=, -blockdev filename= or -hda naming \
             the frozen image is expected)",
            statefile.display(),
            missing.join(", ")
        )));
    }
    Ok(Thawed { args, made })
}
