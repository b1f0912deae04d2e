//! The restore's side: the recorded images checked, and for a checkpoint a
//! fresh overlay on each frozen disk's top image, given to the node or
//! drive that defines it.

use std::path::{Path, PathBuf};

use super::cmdline::{self, Lift, Top};
use super::overlay::{self, Made};
use super::record::DiskRecord;
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
    /// The overlays made for this restore alone.
    #[must_use]
    pub fn overlays(&self) -> &[PathBuf] {
        &self.made.paths
    }

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
/// [`Error::Disk`] when an image changed since the save, or the options do
/// not define a frozen disk's top image (see [`tops`]), before any overlay
/// is made; [`Error::File`] when an overlay cannot be written.
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
    let tops = tops(record, statefile, args)?;
    let name = statefile.file_name().unwrap_or_default().to_string_lossy();
    let mut made = Made::default();
    let mut lifts = Vec::new();
    for (d, top) in record.disks.iter().zip(tops) {
        let frozen = &d.images[0];
        let stem = format!("{}.{}", overlay::label(&name), overlay::label(&d.name));
        let path = overlay::reserve(&dir, &stem)?;
        let path = std::path::absolute(&path).unwrap_or(path);
        made.paths.push(path.clone());
        overlay::create(&path, &frozen.path, &frozen.format, d.virtual_size)?;
        lifts.push(Lift {
            top,
            overlays: vec![path],
        });
    }
    let (args, found) = cmdline::lift_disks(args, &record.cwd, &lifts);
    // `tops` found each one; never start on a frozen image all the same.
    if found.contains(&false) {
        return Err(Error::Disk(format!(
            "{}: the options could not be given every disk's overlay",
            statefile.display()
        )));
    }
    Ok(Thawed { args, made })
}

/// Where `args` define each frozen disk's top image, the one its fresh
/// overlay goes on: its `-blockdev` node, else the `-drive` or `-hda`
/// naming the file.
///
/// # Errors
/// [`Error::Disk`] naming each disk `args` do not define, before anything
/// is made or stopped.
pub fn tops(record: &DiskRecord, statefile: &Path, args: &[String]) -> Result<Vec<Top>> {
    let names = cmdline::blockdev_names(args);
    let mut tops = Vec::new();
    let mut missing = Vec::new();
    for d in &record.disks {
        let node = d
            .node
            .clone()
            .or_else(|| names.contains(&d.name).then(|| d.name.clone()));
        let top = match node {
            Some(n) => Top::Node(n),
            None => Top::File(d.images[0].path.clone()),
        };
        if !cmdline::defines(args, &record.cwd, &top) {
            missing.push(format!("{} ({})", d.name, d.images[0].path.display()));
        }
        tops.push(top);
    }
    if !missing.is_empty() {
        return Err(Error::Disk(format!(
            "{}: these options do not define the top image of the checkpoint's disk {}: it \
             cannot be given its overlay (a -blockdev node of that name, or a -drive file= or \
             -hda naming the frozen image, is expected)",
            statefile.display(),
            missing.join(", ")
        )));
    }
    Ok(tops)
}

#[cfg(test)]
mod tests {
    use super::super::record::{Disk, Image};
    use super::*;

    fn record(name: &str, node: Option<&str>) -> DiskRecord {
        DiskRecord {
            frozen: true,
            cwd: PathBuf::from("/d"),
            disks: vec![Disk {
                name: name.into(),
                node: node.map(String::from),
                virtual_size: 1 << 20,
                images: vec![Image {
                    path: PathBuf::from("/d/top.qcow2"),
                    node: node.map(String::from),
                    format: "qcow2".into(),
                    size: 0,
                    mtime_ns: 0,
                    fingerprint: String::new(),
                }],
                source_overlay: None,
            }],
        }
    }

    fn v(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn a_disk_is_found_by_its_node_else_by_its_file() {
        let blockdev = v("-blockdev driver=file,node-name=s,filename=/d/top.qcow2 -blockdev driver=qcow2,node-name=t,file=s");
        let state = Path::new("/s/ck");
        assert_eq!(
            tops(&record("t", Some("t")), state, &blockdev).unwrap(),
            [Top::Node("t".into())]
        );
        // A manifest from before nodes were recorded: the disk's name is its node's.
        assert_eq!(
            tops(&record("t", None), state, &blockdev).unwrap(),
            [Top::Node("t".into())]
        );
        let drive = v("-drive file=top.qcow2,if=virtio");
        assert_eq!(
            tops(&record("virtio0", None), state, &drive).unwrap(),
            [Top::File(PathBuf::from("/d/top.qcow2"))]
        );
        let err = tops(&record("t", Some("t")), state, &drive).unwrap_err();
        assert!(
            err.to_string()
                .contains("do not define the top image of the checkpoint's disk t (/d/top.qcow2)"),
            "{err}"
        );
    }
}
