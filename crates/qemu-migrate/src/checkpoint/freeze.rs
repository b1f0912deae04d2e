//! The save's side: find the VM's writable disks, and for a checkpoint
//! freeze them under overlays in the same pause as the memory save.

use std::path::{Path, PathBuf};
use std::process::Command;

use qemu_monitor::{BlockDevice, BlockGraph, DiskSnapshot, ImageInfo, SnapshotTarget};

use super::cmdline::{self, Lift, Top};
use super::overlay::{self, Made};
use super::record::{Disk, DiskRecord, Image};
use crate::error::{Error, Result};
use crate::vm::Vm;

/// A writable, file-backed disk as the monitor, the block graph and its
/// images tell it.
#[derive(Debug)]
struct Found {
    /// Its name: the command line's top node, else the drive id.
    name: String,
    /// Where a snapshot goes: the device's top node as QEMU has it now.
    target: SnapshotTarget,
    virtual_size: u64,
    /// Its images, top first.
    chain: Vec<Link>,
    /// How many images at the top of `chain` the command line does not
    /// define: overlays an earlier checkpoint put there.
    above: usize,
    /// Where the command line defines `chain[above]`; `None` when it does
    /// not define any image of this disk (a disk added at run time).
    top: Option<Top>,
    /// The overlay the VM goes on writing to, for a checkpoint of a VM that lives on.
    overlay: Option<PathBuf>,
    /// QEMU runs it on a temporary overlay of its own (`snapshot=on`),
    /// which `chain` leaves out: it is deleted when QEMU ends.
    temporary: bool,
    /// Its top image is an overlay the command line does not name, over
    /// images it does, and the block graph does not tell which node to
    /// put it on: a restore could not be pointed at it.
    unplaceable: bool,
}

/// One image of a disk's chain.
#[derive(Debug, Clone)]
struct Link {
    /// Absolute path.
    path: PathBuf,
    format: String,
    /// QEMU's node name for it, where the block graph tells it.
    node: Option<String>,
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
        // Node names tell a -blockdev chain's images apart; a QEMU whose
        // human monitor has no `info block -n` still has its -drive disks
        // known by file.
        let graph = match vm.monitor.block_graph() {
            Ok(g) => g,
            Err(_) if vm.monitor.protocol() == qemu_monitor::Protocol::Hmp => BlockGraph::default(),
            Err(e) => return Err(e.into()),
        };
        let qemu_img = overlay::qemu_img(vm.binary());
        let mut disks = Vec::new();
        let mut not_files = Vec::new();
        for d in devices.iter().filter(|d| !d.read_only) {
            match found(d, &graph, &cwd, &qemu_img, vm.args()) {
                Ok(Some(f)) => disks.push(f),
                Ok(None) => {}
                Err(why) => not_files.push(why),
            }
        }
        refuse_written_temporaries(vm, &disks)?;
        let unplaceable: Vec<String> = disks
            .iter()
            .filter(|d| d.unplaceable)
            .map(|d| format!("{} ({})", d.name, d.chain[0].path.display()))
            .collect();
        if !unplaceable.is_empty() {
            return Err(Error::Disk(format!(
                "cannot save this VM: {} runs on an overlay its -blockdev options do not name, and \
                 this monitor does not say which of their nodes it sits on (`info block -n`), so a \
                 restore could not be given it; save through the VM's QMP socket",
                unplaceable.join(", ")
            )));
        }
        // What a temporary overlay holds goes with QEMU; a restore gets a
        // fresh one over the same image, which QEMU never writes to.
        disks.retain(|d| !d.temporary);
        if with_disks && !not_files.is_empty() {
            return Err(Error::Disk(format!(
                "cannot checkpoint this VM's disks: {}. Only disks stored in files can be \
                 frozen under an overlay; detach the others, or save without --with-disks and \
                 keep those disks consistent yourself",
                not_files.join("; ")
            )));
        }
        let undefined: Vec<&str> = disks
            .iter()
            .filter(|d| d.top.is_none())
            .map(|d| d.name.as_str())
            .collect();
        if with_disks && !undefined.is_empty() {
            return Err(Error::Disk(format!(
                "cannot checkpoint this VM's disks: the VM's command line defines none of the \
                 images of {} as a -drive, -hda or a -blockdev node the monitor names (added \
                 while it ran?), so a restore could not give it its overlay; detach it, or save \
                 without --with-disks",
                undefined.join(", ")
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
                let Link {
                    path: top, format, ..
                } = &d.chain[0];
                let dir = top.parent().unwrap_or(Path::new("/"));
                // Named after the image the command line defines, never
                // after an overlay: the name stays as long at every checkpoint.
                let defined = &d.chain[d.above.min(d.chain.len() - 1)].path;
                let stem = format!(
                    "{}.after-{}",
                    overlay::base_name(defined),
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

    /// The command line as the VM ran before this save: a disk with
    /// overlays its options do not define (checkpoints taken earlier) gets
    /// them put on the image they do define, so a restore never writes to a
    /// frozen image. Every other option stays as it was.
    #[must_use]
    pub fn current_args(&self, args: &[String]) -> Vec<String> {
        let lifts: Vec<Lift> = self
            .disks
            .iter()
            .filter(|d| d.above > 0)
            .filter_map(|d| {
                Some(Lift {
                    top: d.top.clone()?,
                    overlays: d.chain[..d.above].iter().map(|l| l.path.clone()).collect(),
                })
            })
            .collect();
        cmdline::lift_disks(args, &self.cwd, &lifts).0
    }

    /// What the manifest records, read once QEMU has written its last byte
    /// to the images (after the snapshot, or once the migration completed
    /// and QEMU let go of its disks); `None` for a plain save of a VM
    /// without file disks.
    ///
    /// # Errors
    /// [`Error::File`] when an image cannot be read.
    pub fn record(&self) -> Result<Option<DiskRecord>> {
        // A checkpoint says so even with no disk to freeze.
        if self.disks.is_empty() && !self.frozen {
            return Ok(None);
        }
        let mut disks = Vec::new();
        for d in &self.disks {
            let images = d
                .chain
                .iter()
                .map(|l| {
                    let mut image = Image::read(&l.path, &l.format)?;
                    image.node = l.node.clone().filter(|n| !n.starts_with('#'));
                    Ok(image)
                })
                .collect::<Result<Vec<_>>>()?;
            disks.push(Disk {
                name: d.name.clone(),
                node: match &d.top {
                    Some(Top::Node(n)) => Some(n.clone()),
                    _ => None,
                },
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

    /// What a failure after [`Freeze::freeze`] leaves changed, in words:
    /// the VM writes to the new overlays from then on. `None` when no disk
    /// was switched.
    #[must_use]
    pub fn left_on_overlays(&self) -> Option<String> {
        if !self.in_use {
            return None;
        }
        let overlays: Vec<String> = self
            .disks
            .iter()
            .filter_map(|d| d.overlay.as_ref())
            .map(|o| o.display().to_string())
            .collect();
        Some(format!(
            "the VM's disks stay switched to the new overlays {}, over images frozen as they were \
             at the failed checkpoint; that is safe (the guest sees no change), and the next \
             checkpoint freezes them in turn",
            overlays.join(", ")
        ))
    }

    /// Lets the overlays this save made stay (once QEMU writes to them).
    pub fn keep_overlays(&mut self) {
        if self.in_use {
            let _ = std::mem::take(&mut self.made).keep();
        }
    }
}

/// A writable disk with a medium: `Ok(None)` for an empty drive, `Err`
/// saying why a disk is not a plain file. Its images come from
/// `query-block` (or `qemu-img` where the human monitor tells too little);
/// the block graph names the node of each, walking down from the device's
/// top node, and so tells which one the command line `args` define.
fn found(
    d: &BlockDevice,
    graph: &BlockGraph,
    cwd: &Path,
    qemu_img: &Path,
    args: &[String],
) -> std::result::Result<Option<Found>, String> {
    let Some(image) = &d.image else {
        return Ok(None);
    };
    let device_name = if d.device.is_empty() {
        d.node_name.clone().unwrap_or_default()
    } else {
        d.device.clone()
    };
    let not_file = |what: &str| format!("{device_name} is {what}");
    let mut chain = Vec::new();
    // The human monitor tells neither sizes nor backing formats: then the images are asked.
    let ask_images =
        image.virtual_size.is_none() || image.chain().iter().any(|i| i.format.is_empty());
    let images = image.chain();
    let absolute = |i: &ImageInfo| {
        i.path()
            .map(|p| cmdline::absolute(cwd, &p.display().to_string()))
    };
    // `snapshot=on`: QEMU's temporary overlay (unlinked as soon as it is
    // open, in /var/tmp or $TMPDIR) over the image the drive names.
    let temporary = images.len() > 1
        && absolute(images[0]).is_some_and(|p| !cmdline::drive_files(args, cwd).contains(&p))
        && absolute(images[1]).is_some_and(|p| cmdline::on_temporary_overlay(args, cwd, &p));
    for i in images.iter().skip(usize::from(temporary)) {
        let Some(p) = i.path() else {
            return Err(not_file(&format!("not a file ({})", i.filename)));
        };
        let p = cmdline::absolute(cwd, &p.display().to_string());
        if !std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
            return Err(not_file(&format!("not a regular file ({})", p.display())));
        }
        chain.push(Link {
            path: p,
            format: i.format.clone(),
            node: None,
        });
    }
    let mut virtual_size = image.virtual_size;
    if ask_images && !temporary {
        let (c, size) = qemu_img_chain(qemu_img, &chain[0].path).map_err(|e| not_file(&e))?;
        chain = c
            .into_iter()
            .map(|(path, format)| Link {
                path,
                format,
                node: None,
            })
            .collect();
        virtual_size = Some(size);
    }
    if let Some(root) = d.node_name.as_ref().filter(|_| !temporary) {
        // Each image's node, as long as the graph's chain and the images agree.
        for (link, node) in chain.iter_mut().zip(graph.chain(root)) {
            let path = node
                .path()
                .map(|p| cmdline::absolute(cwd, &p.display().to_string()));
            if path.as_ref() != Some(&link.path) {
                break;
            }
            link.node = Some(node.node_name.clone());
        }
    }
    let names = cmdline::blockdev_names(args);
    let defined = chain.iter().enumerate().find_map(|(i, l)| {
        if let Some(n) = l.node.as_ref().filter(|n| names.contains(n)) {
            return Some((i, Top::Node(n.clone())));
        }
        let file = Top::File(l.path.clone());
        cmdline::defines(args, cwd, &file).then_some((i, file))
    });
    let (above, top) = match defined {
        Some((i, top)) => (i, Some(top)),
        None => (0, None),
    };
    let named = cmdline::blockdev_files(args, cwd);
    let unplaceable = top.is_none()
        && !named.contains(&chain[0].path)
        && chain[1..].iter().any(|l| named.contains(&l.path));
    let target = if d.device.is_empty() {
        SnapshotTarget::Node(device_name.clone())
    } else {
        SnapshotTarget::Device(device_name.clone())
    };
    let name = match &top {
        Some(Top::Node(n)) => n.clone(),
        _ => device_name,
    };
    Ok(Some(Found {
        name,
        target,
        virtual_size: virtual_size.unwrap_or(0),
        chain,
        above,
        top,
        overlay: None,
        temporary,
        unplaceable,
    }))
}

/// Refuses, before anything changes, to save a VM whose disk runs on a
/// temporary overlay (`snapshot=on`) the guest has written to: those
/// writes go with QEMU, and a restore would give the guest its disk as it
/// was at boot, under what it remembers writing.
fn refuse_written_temporaries(vm: &mut Vm, disks: &[Found]) -> Result<()> {
    let temporary: Vec<&Found> = disks.iter().filter(|d| d.temporary).collect();
    if temporary.is_empty() {
        return Ok(());
    }
    let writes = vm.monitor.disk_writes()?;
    let written: Vec<String> = temporary
        .iter()
        .filter(|d| {
            let SnapshotTarget::Device(name) = &d.target else {
                return false;
            };
            writes.iter().any(|w| w.device == *name && w.any())
        })
        .map(|d| format!("{} ({})", d.name, d.chain[0].path.display()))
        .collect();
    if written.is_empty() {
        return Ok(());
    }
    Err(Error::Disk(format!(
        "cannot save this VM: the guest wrote to {} since QEMU started, which runs with \
         snapshot=on: those writes are only in QEMU's temporary overlay, deleted when QEMU ends, \
         and a restore would give the guest its disk as it was at boot. Keep them in the image \
         first (`commit DRIVE` on the human monitor), or start the VM without snapshot=on",
        written.join(", ")
    )))
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

#[cfg(test)]
mod tests {
    use qemu_monitor::BlockNode;

    use super::*;

    fn image(dir: &Path, names: &[&str]) -> Option<ImageInfo> {
        let (first, rest) = names.split_first()?;
        Some(ImageInfo {
            filename: dir.join(first).display().to_string(),
            format: "qcow2".into(),
            virtual_size: Some(16 << 20),
            backing: image(dir, rest).map(Box::new),
        })
    }

    /// A format node over a file, as QEMU lists a -blockdev chain's nodes
    /// (the protocol nodes left out: the walk never takes them).
    fn node(dir: &Path, name: &str, file: &str, backing: Option<&str>) -> BlockNode {
        BlockNode {
            node_name: name.into(),
            driver: "qcow2".into(),
            filename: dir.join(file).display().to_string(),
            read_only: false,
            backing: backing.map(|b| dir.join(b).display().to_string()),
        }
    }

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn an_earlier_overlay_above_a_blockdev_chain_is_put_on_the_node_the_device_names() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["after.qcow2", "top.qcow2", "base.qcow2"] {
            std::fs::write(d.join(f), b"").unwrap();
        }
        let device = BlockDevice {
            device: String::new(),
            node_name: Some("overlay-1".into()),
            read_only: false,
            image: image(d, &["after.qcow2", "top.qcow2", "base.qcow2"]),
        };
        let graph = BlockGraph {
            nodes: vec![
                node(d, "overlay-1", "after.qcow2", Some("top.qcow2")),
                node(d, "top-fmt", "top.qcow2", Some("base.qcow2")),
                node(d, "base-fmt", "base.qcow2", None),
            ],
        };
        let top = format!(
            "driver=file,node-name=top-file,filename={}",
            d.join("top.qcow2").display()
        );
        let base = format!(
            "driver=file,node-name=base-file,filename={}",
            d.join("base.qcow2").display()
        );
        let args = strings(&[
            "-blockdev",
            &base,
            "-blockdev",
            "driver=qcow2,node-name=base-fmt,file=base-file,read-only=on",
            "-blockdev",
            &top,
            "-blockdev",
            "driver=qcow2,node-name=top-fmt,file=top-file,backing=base-fmt",
            "-device",
            "virtio-blk-pci,drive=top-fmt",
        ]);
        let f = found(&device, &graph, d, Path::new("qemu-img"), &args)
            .unwrap()
            .unwrap();
        assert_eq!(f.name, "top-fmt");
        assert_eq!(f.target, SnapshotTarget::Node("overlay-1".into()));
        assert_eq!(
            (f.above, f.top.clone()),
            (1, Some(Top::Node("top-fmt".into())))
        );
        let nodes: Vec<Option<&str>> = f.chain.iter().map(|l| l.node.as_deref()).collect();
        assert_eq!(
            nodes,
            [Some("overlay-1"), Some("top-fmt"), Some("base-fmt")]
        );
        assert!(!f.temporary && !f.unplaceable);

        // Without the graph (a human monitor that cannot list nodes), the
        // overlay cannot be placed: the save says so instead of guessing.
        let f = found(
            &device,
            &BlockGraph::default(),
            d,
            Path::new("qemu-img"),
            &args,
        )
        .unwrap()
        .unwrap();
        assert!(f.top.is_none() && f.unplaceable);
    }

    #[test]
    fn a_drive_on_snapshot_on_is_its_own_image_under_a_temporary_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("disk.qcow2"), b"").unwrap();
        let device = BlockDevice {
            device: "virtio0".into(),
            node_name: Some("#block1".into()),
            read_only: false,
            image: image(d, &["vl.ABC", "disk.qcow2"]),
        };
        let args = strings(&["-drive", "file=disk.qcow2,if=virtio,snapshot=on"]);
        let f = found(
            &device,
            &BlockGraph::default(),
            d,
            Path::new("qemu-img"),
            &args,
        )
        .unwrap()
        .unwrap();
        assert!(f.temporary);
        assert_eq!(f.chain.len(), 1);
        assert_eq!(f.chain[0].path, d.join("disk.qcow2"));
        assert_eq!(f.top, Some(Top::File(d.join("disk.qcow2"))));
    }
}
