//! The VM's disks, in QEMU's words: what each block device has inserted
//! (`query-block`, `info block`), the block graph's nodes, each with the
//! file it reads (`query-named-block-nodes`, `info block -n`), and external
//! snapshots that put a new overlay on top of a disk while the guest is
//! paused (`blockdev-snapshot-sync` in one `transaction`, `snapshot_blkdev -n`).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::{Error, Monitor, Result};

/// One block device of the VM (a `-drive` or a `-blockdev` attached to a device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// The drive's id (`virtio0`, `ide0-hd0`, the `id=` of a `-drive`);
    /// empty for a disk defined with `-blockdev`.
    pub device: String,
    /// The node name of its top format node (`#block123` when QEMU chose it).
    pub node_name: Option<String>,
    /// Whether QEMU opened it read-only.
    pub read_only: bool,
    /// The image chain, top first; `None` for an empty drive (no medium).
    pub image: Option<ImageInfo>,
}

/// One image of a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The file name as QEMU holds it: a path (maybe relative to QEMU's
    /// working directory), a URL (`nbd://...`), or a `json:{...}` description.
    pub filename: String,
    /// The format driver: `raw`, `qcow2`, ...
    pub format: String,
    /// The size the guest sees, in bytes, where QEMU says it.
    pub virtual_size: Option<u64>,
    /// The image below it, if any.
    pub backing: Option<Box<ImageInfo>>,
}

impl ImageInfo {
    /// The path of the file this image is stored in, when QEMU's file name
    /// names a plain file: itself, or the `file.filename` of a `json:{...}`
    /// description. `None` for URLs and other protocols.
    #[must_use]
    pub fn path(&self) -> Option<PathBuf> {
        plain_path(&self.filename)
    }

    /// The chain from this image down, top first.
    #[must_use]
    pub fn chain(&self) -> Vec<&ImageInfo> {
        let mut out = vec![self];
        let mut at = self;
        while let Some(b) = &at.backing {
            out.push(b);
            at = b;
        }
        out
    }
}

/// One node of QEMU's block graph: a format node (`qcow2`, `raw`) or a
/// protocol node (`file`, `host_device`, `nbd`) under one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockNode {
    /// Its node name (`#block123` when QEMU chose it).
    pub node_name: String,
    /// Its driver: `qcow2`, `raw`, `file`, ...
    pub driver: String,
    /// QEMU's file name for it: a path, a URL, or a `json:{...}` description
    /// of the node and what is below it (a node given its backing node
    /// explicitly, as libvirt does).
    pub filename: String,
    /// Whether it is open read-only.
    pub read_only: bool,
    /// The file name of the node below it in its backing chain, as QEMU
    /// holds it (equal to that node's `filename`); `None` at a chain's end.
    pub backing: Option<String>,
}

impl BlockNode {
    /// The file this node itself reads: its own for a `file` node, its
    /// protocol child's for a format node. `None` for other protocols.
    #[must_use]
    pub fn path(&self) -> Option<PathBuf> {
        plain_path(&self.filename)
    }

    /// Whether it is a protocol node: one that reaches storage itself
    /// rather than interpreting a file below it.
    #[must_use]
    pub fn is_protocol(&self) -> bool {
        is_protocol(&self.driver)
    }
}

/// Whether `driver` is one of QEMU's protocol drivers: a node of it
/// reaches storage itself rather than interpreting a node below it.
#[must_use]
pub fn is_protocol(driver: &str) -> bool {
    PROTOCOLS.contains(&driver)
}

/// QEMU's protocol drivers (`block/*.c`, those with a `protocol_name`, and
/// the ones that open no file below them).
const PROTOCOLS: &[&str] = &[
    "file",
    "host_device",
    "host_cdrom",
    "nbd",
    "iscsi",
    "iser",
    "rbd",
    "gluster",
    "ssh",
    "http",
    "https",
    "ftp",
    "ftps",
    "nfs",
    "nvme",
    "null-co",
    "null-aio",
    "vvfat",
    "io_uring",
    "virtio-blk-vhost-user",
    "virtio-blk-vfio-pci",
    "virtio-blk-vhost-vdpa",
];

/// Every node of the VM's block graph.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockGraph {
    /// The nodes, in QEMU's order.
    pub nodes: Vec<BlockNode>,
}

impl BlockGraph {
    /// The node named `name`.
    #[must_use]
    pub fn node(&self, name: &str) -> Option<&BlockNode> {
        self.nodes.iter().find(|n| n.node_name == name)
    }

    /// The node below `node` in its backing chain: the format (or filter)
    /// node whose file name is the one `node` names as its backing. Its
    /// protocol node has the same file name when that is a plain path, and
    /// is never the one meant.
    #[must_use]
    pub fn backing_of(&self, node: &BlockNode) -> Option<&BlockNode> {
        let name = node.backing.as_deref()?;
        self.nodes
            .iter()
            .find(|n| n.filename == name && !n.is_protocol() && n.node_name != node.node_name)
    }

    /// The backing chain from `root` down, top first: `root` itself, then
    /// each node below. Empty when there is no such node.
    #[must_use]
    pub fn chain(&self, root: &str) -> Vec<&BlockNode> {
        let mut out: Vec<&BlockNode> = Vec::new();
        let mut at = self.node(root);
        while let Some(n) = at {
            if out.iter().any(|o| o.node_name == n.node_name) {
                break; // never loop, whatever QEMU says
            }
            out.push(n);
            at = self.backing_of(n);
        }
        out
    }
}

/// What was written through one block device since QEMU started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskWrites {
    /// The drive's id; empty for a `-blockdev` disk.
    pub device: String,
    /// Its top node's name, where QEMU says it.
    pub node_name: Option<String>,
    /// Bytes the guest's device wrote.
    pub bytes: u64,
    /// The end of the furthest write through its top node, from the
    /// device or anything else (`qemu-io`, a block job); `None` where the
    /// monitor does not tell (the human monitor).
    pub highest_offset: Option<u64>,
}

impl DiskWrites {
    /// Whether anything was written at all.
    #[must_use]
    pub fn any(&self) -> bool {
        self.bytes > 0 || self.highest_offset.is_some_and(|o| o > 0)
    }
}

/// Which node a snapshot goes on top of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotTarget {
    /// A drive by its id (`-drive`).
    Device(String),
    /// A node by its name (`-blockdev`).
    Node(String),
}

/// An external snapshot to take: `overlay`, an existing qcow2 image whose
/// backing file is the disk's current top image, becomes the disk's top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSnapshot {
    /// The disk.
    pub target: SnapshotTarget,
    /// The overlay, created beforehand (mode `existing`).
    pub overlay: PathBuf,
}

impl Monitor {
    /// The VM's block devices (`query-block`, or `info block` parsed on the
    /// human monitor, which tells one backing level and no sizes).
    ///
    /// # Errors
    /// When the monitor fails or answers something unreadable.
    pub fn block_devices(&mut self) -> Result<Vec<BlockDevice>> {
        match self {
            Monitor::Qmp(s) => {
                s.negotiate()?;
                let r = s.execute("query-block", None)?;
                Ok(r.as_array()
                    .map(|a| a.iter().map(from_query_block).collect())
                    .unwrap_or_default())
            }
            Monitor::Hmp(s) => Ok(parse_info_block(&s.command("info block")?)),
        }
    }

    /// The VM's block graph: every node with the file it reads
    /// (`query-named-block-nodes`, flat where QEMU has it; on the human
    /// monitor `info block -n`, which prints the same fields).
    ///
    /// # Errors
    /// When the monitor fails or answers something unreadable.
    pub fn block_graph(&mut self) -> Result<BlockGraph> {
        let nodes = match self {
            Monitor::Qmp(s) => {
                s.negotiate()?;
                // `flat` (QEMU 5.0) leaves out each node's backing images:
                // without it the answer grows with the square of a chain.
                let r = match s.execute("query-named-block-nodes", Some(json!({"flat": true}))) {
                    Err(Error::Command { message, .. }) if message.contains("flat") => {
                        s.execute("query-named-block-nodes", None)?
                    }
                    r => r?,
                };
                r.as_array()
                    .map(|a| a.iter().map(node_from_qmp).collect())
                    .unwrap_or_default()
            }
            Monitor::Hmp(s) => parse_info_block(&s.command("info block -n")?)
                .into_iter()
                .filter_map(|d| {
                    let image = d.image?;
                    Some(BlockNode {
                        node_name: d.node_name?,
                        driver: image.format,
                        filename: image.filename,
                        read_only: d.read_only,
                        backing: image.backing.map(|b| b.filename),
                    })
                })
                .collect(),
        };
        Ok(BlockGraph { nodes })
    }

    /// What was written to each block device since QEMU started
    /// (`query-blockstats`, `info blockstats`).
    ///
    /// # Errors
    /// When the monitor fails or answers something unreadable.
    pub fn disk_writes(&mut self) -> Result<Vec<DiskWrites>> {
        match self {
            Monitor::Qmp(s) => {
                s.negotiate()?;
                let r = s.execute("query-blockstats", None)?;
                Ok(r.as_array()
                    .map(|a| {
                        a.iter()
                            .map(|v| DiskWrites {
                                device: v["device"].as_str().unwrap_or_default().to_string(),
                                node_name: v["node-name"].as_str().map(String::from),
                                bytes: v["stats"]["wr_bytes"].as_u64().unwrap_or(0),
                                highest_offset: v["stats"]["wr_highest_offset"].as_u64(),
                            })
                            .collect()
                    })
                    .unwrap_or_default())
            }
            Monitor::Hmp(s) => Ok(parse_info_blockstats(&s.command("info blockstats")?)),
        }
    }

    /// Takes the external snapshots while the guest is paused: on QMP all
    /// in one `transaction` (all or none); on the human monitor one
    /// `snapshot_blkdev -n` after the other, which knows drives by id only.
    ///
    /// # Errors
    /// QEMU's refusal, naming the disk; on the human monitor the disks
    /// before the one refused keep their new overlay.
    pub fn snapshot_disks(&mut self, snapshots: &[DiskSnapshot]) -> Result<()> {
        if snapshots.is_empty() {
            return Ok(());
        }
        match self {
            Monitor::Qmp(s) => {
                s.negotiate()?;
                let actions: Vec<Value> = snapshots
                    .iter()
                    .map(|d| {
                        let mut data = json!({
                            "snapshot-file": d.overlay.display().to_string(),
                            "format": "qcow2",
                            "mode": "existing",
                        });
                        match &d.target {
                            SnapshotTarget::Device(name) => data["device"] = json!(name),
                            SnapshotTarget::Node(name) => {
                                data["node-name"] = json!(name);
                                // QEMU wants the new node named when the old one was named.
                                data["snapshot-node-name"] = json!(overlay_node_name(&d.overlay));
                            }
                        }
                        json!({"type": "blockdev-snapshot-sync", "data": data})
                    })
                    .collect();
                s.execute("transaction", Some(json!({ "actions": actions })))
                    .map(drop)
            }
            Monitor::Hmp(s) => {
                for d in snapshots {
                    let SnapshotTarget::Device(name) = &d.target else {
                        return Err(Error::Command {
                            addr: s.addr().clone(),
                            command: "snapshot_blkdev".into(),
                            class: None,
                            message: "the human monitor's snapshot_blkdev knows drives by id \
                                      only, and this disk is a -blockdev node; use the VM's \
                                      QMP socket"
                                .into(),
                        });
                    };
                    s.command(&format!(
                        "snapshot_blkdev -n {name} {} qcow2",
                        d.overlay.display()
                    ))?;
                }
                Ok(())
            }
        }
    }
}

/// A node name for an overlay, unique as its path is: a letter, then hex
/// (QEMU allows letters, digits, `-`, `_`, `.`, 31 characters at most).
#[must_use]
pub fn overlay_node_name(overlay: &Path) -> String {
    // FNV-1a: stable, and enough to keep two overlays apart.
    let hash = overlay
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("overlay-{hash:016x}")
}

fn from_query_block(v: &Value) -> BlockDevice {
    let inserted = &v["inserted"];
    BlockDevice {
        device: v["device"].as_str().unwrap_or_default().to_string(),
        node_name: inserted["node-name"].as_str().map(String::from),
        read_only: inserted["ro"].as_bool().unwrap_or(false),
        image: inserted.get("image").map(image_from_qmp),
    }
}

fn node_from_qmp(v: &Value) -> BlockNode {
    BlockNode {
        node_name: v["node-name"].as_str().unwrap_or_default().to_string(),
        driver: v["drv"].as_str().unwrap_or_default().to_string(),
        filename: v["file"].as_str().unwrap_or_default().to_string(),
        read_only: v["ro"].as_bool().unwrap_or(false),
        backing: v["backing_file"].as_str().map(String::from),
    }
}

fn image_from_qmp(v: &Value) -> ImageInfo {
    ImageInfo {
        filename: v["filename"].as_str().unwrap_or_default().to_string(),
        format: v["format"].as_str().unwrap_or_default().to_string(),
        virtual_size: v["virtual-size"].as_u64(),
        backing: v.get("backing-image").map(|b| Box::new(image_from_qmp(b))),
    }
}

/// A file name that names a plain file: a path, or the innermost
/// `filename` of a `json:{...}` description whose protocol is `file`.
fn plain_path(filename: &str) -> Option<PathBuf> {
    if let Some(text) = filename.strip_prefix("json:") {
        let v: Value = serde_json::from_str(text).ok()?;
        return json_file(&v);
    }
    // `nbd://`, `iscsi://`, `nbd+unix:///`, `gluster://`, `ssh://`...
    if filename.contains("://") || filename.is_empty() {
        return None;
    }
    let path = filename.strip_prefix("file:").unwrap_or(filename);
    Some(Path::new(path).to_path_buf())
}

fn json_file(v: &Value) -> Option<PathBuf> {
    match v.get("file") {
        Some(Value::Object(_)) => json_file(&v["file"]),
        Some(Value::String(s)) if v.get("driver").is_none() => plain_path(s),
        _ => match v["driver"].as_str() {
            Some("file") => v["filename"].as_str().map(PathBuf::from),
            _ => None,
        },
    }
}

/// `info blockstats`: `NAME: rd_bytes=N wr_bytes=N ...`, one line per
/// device, the name empty for a `-blockdev` disk.
fn parse_info_blockstats(text: &str) -> Vec<DiskWrites> {
    text.lines()
        .filter_map(|line| {
            let (name, fields) = line.split_once(':')?;
            let bytes = fields
                .split_whitespace()
                .find_map(|f| f.strip_prefix("wr_bytes="))?
                .parse()
                .ok()?;
            Some(DiskWrites {
                device: name.trim().to_string(),
                node_name: None,
                bytes,
                highest_offset: None,
            })
        })
        .collect()
}

/// `info block`: one paragraph per device,
/// `NAME (#blockN): FILE (FORMAT[, read-only])` then indented details,
/// of which `Backing file:     FILE (chain depth: N)` names the image below.
fn parse_info_block(text: &str) -> Vec<BlockDevice> {
    let mut out: Vec<BlockDevice> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(' ') {
            let Some((head, rest)) = line.split_once(": ") else {
                continue;
            };
            let (name, node) = match head.split_once(" (") {
                Some((n, node)) => (n, Some(node.trim_end_matches(')').to_string())),
                None => (head, None),
            };
            let (device, node_name) = match node {
                Some(node) => (name.to_string(), Some(node)),
                // No `(#blockN)`: the name is a -blockdev node's.
                None => (String::new(), Some(name.to_string())),
            };
            let rest = rest.trim();
            let (image, read_only) = if rest.starts_with('[') {
                (None, false)
            } else {
                match rest.rsplit_once(" (") {
                    Some((file, fmt)) => {
                        let fmt = fmt.trim_end_matches(')');
                        let mut parts = fmt.split(", ");
                        let format = parts.next().unwrap_or_default().to_string();
                        let read_only = parts.any(|p| p == "read-only");
                        (
                            Some(ImageInfo {
                                filename: file.to_string(),
                                format,
                                virtual_size: None,
                                backing: None,
                            }),
                            read_only,
                        )
                    }
                    None => (None, false),
                }
            };
            out.push(BlockDevice {
                device,
                node_name,
                read_only,
                image,
            });
        } else if let Some(rest) = line.trim().strip_prefix("Backing file:") {
            let file = rest
                .trim()
                .rsplit_once(" (chain depth")
                .map_or(rest.trim(), |(f, _)| f);
            if let Some(image) = out.last_mut().and_then(|d| d.image.as_mut()) {
                image.backing = Some(Box::new(ImageInfo {
                    filename: file.to_string(),
                    // HMP does not say; the caller asks the image itself.
                    format: String::new(),
                    virtual_size: None,
                    backing: None,
                }));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_info_block_as_qemu_prints_it() {
        let text = "virtio0 (#block541): json:{\"backing\": {\"driver\": \"raw\", \"file\": {\"driver\": \"file\", \"filename\": \"d.img\"}}, \"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"/tmp/ck/o1.qcow2\"}} (qcow2)\n    Attached to:      /machine/peripheral-anon/device[1]/virtio-backend\n    Cache mode:       writeback\n    Backing file:     d.img (chain depth: 1)\n\nro1 (#block338): d.img (raw, read-only)\n    Removable device: not locked, tray closed\n\nd1: q.qcow2 (qcow2)\n    Attached to:      /machine/peripheral-anon/device[0]/virtio-backend\n\nide1-cd0: [not inserted]\n    Removable device: not locked, tray closed\n";
        let d = parse_info_block(text);
        assert_eq!(d.len(), 4);
        assert_eq!(d[0].device, "virtio0");
        let top = d[0].image.as_ref().unwrap();
        assert_eq!(top.path(), Some(PathBuf::from("/tmp/ck/o1.qcow2")));
        assert_eq!(top.format, "qcow2");
        assert_eq!(top.backing.as_ref().unwrap().filename, "d.img");
        assert!(d[1].read_only);
        assert_eq!(
            (d[2].device.as_str(), d[2].node_name.as_deref()),
            ("", Some("d1"))
        );
        assert!(d[3].image.is_none());
    }

    #[test]
    fn reads_info_block_with_spaces_read_only_media_and_empty_drives() {
        let text = "virtio0 (#block143): /tmp/d 1.qcow2 (qcow2)\n    Attached to:      /machine/peripheral-anon/device[0]/virtio-backend\n    Cache mode:       writeback\n\nide1-cd0 (#block412): /tmp/cd.iso (raw, read-only)\nfloppy0: [not inserted]\n    Removable device: not locked, tray closed\n";
        let devs = parse_info_block(text);
        let with_image: Vec<_> = devs.iter().filter(|d| d.image.is_some()).collect();
        assert_eq!(with_image.len(), 2, "{devs:?}");
        let image = |d: &BlockDevice| d.image.clone().expect("an image");
        assert_eq!(with_image[0].device, "virtio0");
        assert_eq!(
            image(with_image[0]).path(),
            Some(PathBuf::from("/tmp/d 1.qcow2"))
        );
        assert_eq!(image(with_image[0]).format, "qcow2");
        assert!(!with_image[0].read_only);
        assert_eq!(image(with_image[1]).filename, "/tmp/cd.iso");
        assert!(with_image[1].read_only);
    }

    /// libvirt's chain base <- mid <- top, each a `file` node under a
    /// `qcow2` node, as QEMU 7.2 answers `query-named-block-nodes` (flat).
    fn libvirt_chain() -> BlockGraph {
        let mid_json = r#"json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "/d/base.qcow2"}}, "driver": "qcow2", "file": {"driver": "file", "filename": "/d/mid.qcow2"}}"#;
        let top_json = format!(
            r#"json:{{"backing": {}, "driver": "qcow2", "file": {{"driver": "file", "filename": "/d/top.qcow2"}}}}"#,
            &mid_json["json:".len()..]
        );
        let reply = json!([
            {"node-name": "libvirt-1-format", "drv": "qcow2", "ro": false, "file": top_json, "backing_file": mid_json},
            {"node-name": "libvirt-1-storage", "drv": "file", "ro": false, "file": "/d/top.qcow2"},
            {"node-name": "libvirt-2-format", "drv": "qcow2", "ro": true, "file": mid_json, "backing_file": "/d/base.qcow2"},
            {"node-name": "libvirt-2-storage", "drv": "file", "ro": false, "file": "/d/mid.qcow2"},
            {"node-name": "libvirt-3-storage", "drv": "file", "ro": false, "file": "/d/base.qcow2"},
            {"node-name": "libvirt-3-format", "drv": "qcow2", "ro": true, "file": "/d/base.qcow2"},
        ]);
        BlockGraph {
            nodes: reply
                .as_array()
                .unwrap()
                .iter()
                .map(node_from_qmp)
                .collect(),
        }
    }

    #[test]
    fn each_node_of_a_chain_reads_its_own_file() {
        let g = libvirt_chain();
        let files: Vec<(&str, PathBuf)> = g
            .nodes
            .iter()
            .map(|n| (n.node_name.as_str(), n.path().unwrap()))
            .collect();
        for (name, file) in files {
            let image = if name.starts_with("libvirt-1") {
                "top"
            } else if name.starts_with("libvirt-2") {
                "mid"
            } else {
                "base"
            };
            assert_eq!(file, PathBuf::from(format!("/d/{image}.qcow2")), "{name}");
        }
    }

    #[test]
    fn a_chain_is_walked_by_backing_never_to_a_protocol_node() {
        let g = libvirt_chain();
        let names: Vec<&str> = g
            .chain("libvirt-1-format")
            .iter()
            .map(|n| n.node_name.as_str())
            .collect();
        assert_eq!(
            names,
            ["libvirt-1-format", "libvirt-2-format", "libvirt-3-format"]
        );
        assert_eq!(g.chain("libvirt-2-storage").len(), 1);
        assert!(g.chain("nothing").is_empty());
    }

    #[test]
    fn the_human_monitor_lists_the_same_nodes() {
        let text = "top-fmt: json:{\"backing\": {\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"/d/base.qcow2\"}}, \"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"/d/top.qcow2\"}} (qcow2)\r\n    Cache mode:       writeback\r\n    Backing file:     /d/base.qcow2 (chain depth: 1)\r\n\r\ntop-file: /d/top.qcow2 (file)\r\n    Cache mode:       writeback\r\n\r\nbase-fmt: /d/base.qcow2 (qcow2, read-only)\r\n\r\nbase-file: /d/base.qcow2 (file)\r\n";
        let nodes: Vec<BlockNode> = parse_info_block(text)
            .into_iter()
            .map(|d| {
                let image = d.image.unwrap();
                BlockNode {
                    node_name: d.node_name.unwrap(),
                    driver: image.format,
                    filename: image.filename,
                    read_only: d.read_only,
                    backing: image.backing.map(|b| b.filename),
                }
            })
            .collect();
        let g = BlockGraph { nodes };
        let chain: Vec<(&str, PathBuf)> = g
            .chain("top-fmt")
            .iter()
            .map(|n| (n.node_name.as_str(), n.path().unwrap()))
            .collect();
        assert_eq!(
            chain,
            [
                ("top-fmt", PathBuf::from("/d/top.qcow2")),
                ("base-fmt", PathBuf::from("/d/base.qcow2"))
            ]
        );
        assert!(g.node("base-fmt").unwrap().read_only);
    }

    #[test]
    fn reads_info_blockstats() {
        let text = "virtio0: rd_bytes=512 wr_bytes=4096 rd_operations=1 wr_operations=1 flush_operations=0\r\n: rd_bytes=0 wr_bytes=0 rd_operations=0\r\n";
        let w = parse_info_blockstats(text);
        assert_eq!(w.len(), 2);
        assert_eq!(
            (w[0].device.as_str(), w[0].bytes, w[0].any()),
            ("virtio0", 4096, true)
        );
        assert!(!w[1].any());
    }

    #[test]
    fn only_plain_files_have_a_path() {
        assert_eq!(plain_path("disk.img"), Some(PathBuf::from("disk.img")));
        assert_eq!(plain_path("nbd://localhost:10809/x"), None);
        assert_eq!(
            plain_path("json:{\"driver\": \"nbd\", \"server\": {}}"),
            None
        );
        assert_eq!(
            plain_path("json:{\"driver\": \"raw\", \"file\": {\"driver\": \"host_device\", \"filename\": \"/dev/sdb\"}}"),
            None
        );
    }
}
