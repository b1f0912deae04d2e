//! The save's side: find the VM's writable disks, and for a checkpoint
//! freeze them under overlays in the same pause as the memory save.

use std::path::{Path, PathBuf};
use std::process::Command;

use qemu_monitor::{BlockDevice, DiskSnapshot, SnapshotTarget};

use super::cmdline::{self, Swap};
use super::overlay::{self, Made};
use super::record::{Disk, DiskRecord, Image};
use crate::error::{Error, Result};
use crate::vm::Vm;

/// A writable, file-backed disk as the monitor and its images tell it.
#[derive(Debug)]
struct Found {
    name: String,
    target: SnapshotTarget,
    virtual_size: u64,
    /// Absolute path and format, top first.
    chain: Vec<(PathBuf, String)>,
    /// The overlay the VM goes on writing to, for a checkpoint of a VM that lives on.
    overlay: Option<PathBuf>,
}

/// The disks of a VM being saved, from before the pause to the manifest.
#[derive(Debug)]
pub struct Freeze {
    frozen: bool,
    cwd: PathBuf,
    disks: Vec<Found>,
    made: Made,
    in_use: bool,
}

impl Freeze {
    /// Finds the VM's writable disks. For a checkpoint (`with_disks`) of a
    /// VM that lives on after the save (`lives_on`), creates the overlays
    /// it will write to, named `IMAGE.after-STATEFILE.N.qcow2` beside each
    /// disk's top image; nothing is switched yet.
    ///
    /// # Errors
    /// [`Error::Disk`] for a checkpoint of a VM with a disk that is not a
    /// file (NBD, iSCSI, a host device), before anything changed; errors of
    /// the monitor, and [`Error::File`] when an overlay cannot be written.
    pub fn prepare(
        vm: &mut Vm,
        statefile: &Path,
        with_disks: bool,
        lives_on: bool,
    ) -> Result<Freeze> {
        let cwd = std::fs::read_link(format!("/proc/{}/cwd", vm.pid()))
            .or_else(|_| std::env::current_dir())
            .unwrap_or_else(|_| PathBuf::from("/"));
        let devices = vm.monitor.block_devices()?;
        let qemu_img = overlay::qemu_img(vm.binary());
        let mut disks = Vec::new();
        let mut not_files = Vec::new();
        for d in devices.iter().filter(|d| !d.read_only) {
            match found(d, &cwd, &qemu_img) {
                Ok(Some(f)) => disks.push(f),
                Ok(None) => {}
                Err(why) => not_files.push(why),
            }
        }
        if with_disks && !not_files.is_empty() {
            return Err(Error::Disk(format!(
                "cannot checkpoint this VM's disks: {}. Only disks stored in files can be \
                 frozen under an overlay; detach the others, or save without --with-disks and \
                 keep those disks consistent yourself",
                not_files.join("; ")
            )));
        }
        let hmp = vm.monitor.protocol() == qemu_monitor::Protocol::Hmp;
        let nodes: Vec<&str> = disks
            .iter()
            .filter(|d| matches!(d.target, SnapshotTarget::Node(_)))
            .map(|d| d.name.as_str())
            .collect();
        if with_disks && hmp && !nodes.is_empty() {
            return Err(Error::Disk(format!(
                "cannot checkpoint through the human monitor: {} defined with -blockdev, which \
                 its snapshot_blkdev cannot reach; give the VM's QMP socket instead",
                nodes.join(", ")
            )));
        }
        let mut freeze = Freeze {
            frozen: with_disks,
            cwd,
            disks,
            made: Made::default(),
            in_use: false,
        };
        if with_disks && lives_on {
            let name = statefile.file_name().unwrap_or_default().to_string_lossy();
            for d in &mut freeze.disks {
                let (top, format) = &d.chain[0];
                let dir = top.parent().unwrap_or(Path::new("/"));
                let stem = format!(
                    "{}.after-{}",
                    top.file_name().unwrap_or_default().to_string_lossy(),
                    overlay::label(&name)
                );
                let path = overlay::reserve(dir, &stem)?;
                freeze.made.paths.push(path.clone());
                overlay::create(&path, top, format, d.virtual_size)?;
                d.overlay = Some(path);
            }
        }
        Ok(freeze)
    }

    /// Switches every disk to its overlay, with the guest paused: from now
    /// on the images below are read-only to QEMU and hold the disks as they
    /// are at this instant.
    ///
    /// # Errors
    /// QEMU's refusal. On QMP no disk switched; on the human monitor those
    /// before the refused one did, and keep their overlay.
    pub fn freeze(&mut self, vm: &mut Vm) -> Result<()> {
        let snapshots: Vec<DiskSnapshot> = self
            .disks
            .iter()
            .filter_map(|d| {
                d.overlay.as_ref().map(|o| DiskSnapshot {
                    target: d.target.clone(),
                    overlay: o.clone(),
                })
            })
            .collect();
        if snapshots.is_empty() {
            return Ok(());
        }
        match vm.monitor.snapshot_disks(&snapshots) {
            Ok(()) => {
                self.in_use = true;
                Ok(())
            }
            Err(e) => {
                // Keep whatever QEMU now writes to.
                let active: Vec<PathBuf> = vm
                    .monitor
                    .block_devices()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|d| d.image.as_ref()?.path())
                    .map(|p| cmdline::absolute(&self.cwd, &p.display().to_string()))
                    .collect();
                self.made.paths.retain(|p| !active.contains(p));
                Err(e.into())
            }
        }
    }

    /// The command line as the VM now runs: a disk whose top image is an
    /// overlay its options do not name (a checkpoint taken earlier) is
    /// pointed at that overlay, so a restore never writes to a frozen image.
    #[must_use]
    pub fn current_args(&self, args: &[String]) -> Vec<String> {
        let swaps: Vec<Swap> = self
            .disks
            .iter()
            .filter(|d| d.chain.len() > 1 && d.chain[0].1 == "qcow2")
            .map(|d| Swap {
                from: d.chain[1..].iter().map(|(p, _)| p.clone()).collect(),
                to: d.chain[0].0.clone(),
            })
            .collect();
        cmdline::point_disks(args, &self.cwd, &swaps).0
    }

    /// What the manifest records, read once QEMU has written its last byte
    /// to the images (after the snapshot, or once the migration completed
    /// and QEMU let go of its disks); `None` for a VM without file disks.
    ///
    /// # Errors
    /// [`Error::File`] when an image cannot be read.
    pub fn record(&self) -> Result<Option<DiskRecord>> {
        if self.disks.is_empty() {
            return Ok(None);
        }
        let mut disks = Vec::new();
        for d in &self.disks {
            let images = d
                .chain
                .iter()
                .map(|(p, f)| Image::read(p, f))
                .collect::<Result<Vec<_>>>()?;
            disks.push(Disk {
                name: d.name.clone(),
                virtual_size: d.virtual_size,
                images,
                source_overlay: d.overlay.clone(),
            });
        }
        Ok(Some(DiskRecord {
            frozen: self.frozen,
            cwd: self.cwd.clone(),
            disks,
        }))
    }

    /// Lets the overlays this save made stay (once QEMU writes to them).
    pub fn keep_overlays(&mut self) {
        if self.in_use {
            let _ = std::mem::take(&mut self.made).keep();
        }
    }
}

/// A writable disk with a medium: `Ok(None)` for an empty drive, `Err`
/// saying why a disk is not a plain file.
fn found(
    d: &BlockDevice,
    cwd: &Path,
    qemu_img: &Path,
) -> std::result::Result<Option<Found>, String> {
    let Some(image) = &d.image else {
        return Ok(None);
    };
    let name = if d.device.is_empty() {
        d.node_name.clone().unwrap_or_default()
    } else {
        d.device.clone()
    };
    let not_file = |what: &str| format!("{name} is {what}");
    let mut chain = Vec::new();
    // The human monitor tells neither sizes nor backing formats: then the images are asked.
    let ask_images =
        image.virtual_size.is_none() || image.chain().iter().any(|i| i.format.is_empty());
    for i in image.chain() {
        let Some(p) = i.path() else {
            return Err(not_file(&format!("not a file ({})", i.filename)));
        };
        let p = cmdline::absolute(cwd, &p.display().to_string());
        if !std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
            return Err(not_file(&format!("not a regular file ({})", p.display())));
        }
        chain.push((p, i.format.clone()));
    }
    let mut virtual_size = image.virtual_size;
    if ask_images {
        let (c, size) = qemu_img_chain(qemu_img, &chain[0].0).map_err(|e| not_file(&e))?;
        chain = c;
        virtual_size = Some(size);
    }
    let target = if d.device.is_empty() {
        SnapshotTarget::Node(name.clone())
    } else {
        SnapshotTarget::Device(name.clone())
    };
    Ok(Some(Found {
        name,
        target,
        virtual_size: virtual_size.unwrap_or(0),
        chain,
        overlay: None,
    }))
}

/// `qemu-img info --backing-chain` of an image QEMU holds open (`-U`).
fn qemu_img_chain(
    qemu_img: &Path,
    top: &Path,
) -> std::result::Result<(Vec<(PathBuf, String)>, u64), String> {
    let out = Command::new(qemu_img)
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(top)
        .output()
        .map_err(|e| format!("unreadable: running {}: {e}", qemu_img.display()))?;
    if !out.status.success() {
        return Err(format!(
            "unreadable: qemu-img said: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("unreadable: qemu-img's answer: {e}"))?;
    let list = v.as_array().cloned().unwrap_or_default();
    let size = list
        .first()
        .and_then(|i| i["virtual-size"].as_u64())
        .ok_or("unreadable: qemu-img gave no size")?;
    let parent = top.parent().unwrap_or(Path::new("/"));
    let chain = list
        .iter()
        .map(|i| {
            let f = i["filename"].as_str().unwrap_or_default();
            (
                cmdline::absolute(parent, f),
                i["format"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    Ok((chain, size))
}
