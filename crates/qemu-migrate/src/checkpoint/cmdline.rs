//! Putting overlays on a QEMU command line's disks: `-drive file=`,
//! `-hda`..`-hdd`, and `-blockdev` chains (key=value and JSON forms), the
//! rest left exactly as it was.
//!
//! Only the image the command line gives the disk's device is touched:
//! the images below it stay defined as they were, each node reading its
//! own file once. A `-drive` (whose lower images QEMU opens from each
//! image's header) is pointed at the new top image. A `-blockdev` node
//! keeps its name for the new top, which every user of the disk refers to
//! (as QEMU's snapshot put it under the same users), and is itself defined
//! read-only under a new name below it.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

/// Where a command line defines a disk's top image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Top {
    /// A `-blockdev` node, by its node name.
    Node(String),
    /// A `-drive` or `-hda`..`-hdd`, by the file it names (absolute).
    File(PathBuf),
}

/// Overlays to put on one disk: `overlays`, top first, each a qcow2 image
/// whose header names the next as its backing file, the last naming the
/// image at `top`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lift {
    /// The disk's top image as the command line defines it.
    pub top: Top,
    /// The new images above it, top first.
    pub overlays: Vec<PathBuf>,
}

/// The node names `args` define with `-blockdev`.
#[must_use]
pub fn blockdev_names(args: &[String]) -> Vec<String> {
    options(args, "blockdev")
        .filter_map(|(_, v)| Node::parse(v).get("node-name"))
        .collect()
}

/// The files `args` give a `-drive` (`file=`) or `-hda`..`-hdd`, absolute.
#[must_use]
pub fn drive_files(args: &[String], cwd: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 1 < args.len() {
        match args[i].trim_start_matches('-') {
            "drive" => {
                if let Some(f) = Keyval::parse(&args[i + 1]).get("file") {
                    out.push(absolute(cwd, &f));
                }
            }
            "hda" | "hdb" | "hdc" | "hdd" => out.push(absolute(cwd, &args[i + 1])),
            _ => {}
        }
        i += 1;
    }
    out
}

/// The files `args` give `-blockdev` nodes (`filename=`, or a format
/// node's inline `file.filename=`), absolute.
#[must_use]
pub fn blockdev_files(args: &[String], cwd: &Path) -> Vec<PathBuf> {
    options(args, "blockdev")
        .flat_map(|(_, v)| {
            let node = Node::parse(v);
            [node.get("filename"), node.get("file.filename")]
        })
        .flatten()
        .map(|f| absolute(cwd, &f))
        .collect()
}

/// The files `args`' `-blockdev` nodes open for writing: a format node's
/// (its inline `file`, or that of the `file` node it names) unless it is
/// read-only, and a protocol node's that no node reads through (a disk
/// given to its device as it is) unless read-only. Absolute, from `cwd`.
#[must_use]
pub fn writable_blockdev_files(args: &[String], cwd: &Path) -> Vec<PathBuf> {
    let nodes: Vec<Node> = options(args, "blockdev")
        .map(|(_, v)| Node::parse(v))
        .collect();
    let is_protocol = |n: &Node| {
        n.get("driver")
            .is_some_and(|d| qemu_monitor::is_protocol(&d))
    };
    let file_of = |name: &str| {
        nodes
            .iter()
            .find(|n| n.get("node-name").as_deref() == Some(name))
            .and_then(|n| n.get("filename"))
    };
    let referenced: Vec<String> = nodes.iter().filter_map(|n| n.get("file")).collect();
    let mut out = Vec::new();
    for n in &nodes {
        if n.flag("read-only") == Some(true) {
            continue;
        }
        let file = if is_protocol(n) {
            let name = n.get("node-name").unwrap_or_default();
            if referenced.contains(&name) {
                continue;
            }
            n.get("filename")
        } else {
            n.get("file.filename")
                .or_else(|| n.get("file").and_then(|f| file_of(&f)))
        };
        out.extend(file.map(|f| absolute(cwd, &f)));
    }
    out
}

/// Each `-OPTION VALUE` pair of `args` for one option name, with its index.
fn options<'a>(args: &'a [String], name: &'a str) -> impl Iterator<Item = (usize, &'a String)> {
    args.windows(2)
        .enumerate()
        .filter(move |(_, w)| w[0].trim_start_matches('-') == name)
        .map(|(i, w)| (i, &w[1]))
}

/// `args` with each lift applied; the second value lists, for each lift,
/// whether the command line defines its top (a lift whose top it does not
/// define changes nothing).
#[must_use]
pub fn lift_disks(args: &[String], cwd: &Path, lifts: &[Lift]) -> (Vec<String>, Vec<bool>) {
    let mut out = args.to_vec();
    let mut found = vec![false; lifts.len()];
    for (k, lift) in lifts.iter().enumerate() {
        let Some(top) = lift.overlays.first() else {
            found[k] = defines(&out, cwd, &lift.top);
            continue;
        };
        let top = top.display().to_string();
        match &lift.top {
            Top::File(path) => {
                let mut i = 0;
                while i + 1 < out.len() && !found[k] {
                    let option = out[i].trim_start_matches('-').to_string();
                    match option.as_str() {
                        "drive" => {
                            let mut kv = Keyval::parse(&out[i + 1]);
                            if drive_names(&kv, cwd, path) {
                                kv.set("file", &top);
                                let key = if kv.get("driver").is_some() {
                                    "driver"
                                } else {
                                    "format"
                                };
                                kv.set(key, "qcow2");
                                out[i + 1] = kv.render();
                                found[k] = true;
                            }
                        }
                        "hda" | "hdb" | "hdc" | "hdd" if absolute(cwd, &out[i + 1]) == *path => {
                            let index = usize::from(option.as_bytes()[2] - b'a');
                            out[i] = "-drive".into();
                            out[i + 1] = format!(
                                "file={},format=qcow2,index={index},media=disk",
                                escape(&top)
                            );
                            found[k] = true;
                        }
                        _ => {}
                    }
                    i += 1;
                }
            }
            Top::Node(name) => {
                let at = options(&out, "blockdev")
                    .find(|(_, v)| Node::parse(v).get("node-name").as_deref() == Some(name))
                    .map(|(i, _)| i);
                if let Some(i) = at {
                    let below = format!(
                        "under-{}",
                        &qemu_monitor::overlay_node_name(&lift.overlays[lift.overlays.len() - 1])
                            ["overlay-".len()..]
                    );
                    let mut node = Node::parse(&out[i + 1]);
                    node.set("node-name", &below);
                    node.set_flag("read-only", true);
                    out[i + 1] = node.render();
                    // Bottom first: a node's backing must be defined before it.
                    let mut backing = below;
                    let mut added = Vec::new();
                    for (j, overlay) in lift.overlays.iter().enumerate().rev() {
                        let node_name = if j == 0 {
                            name.clone()
                        } else {
                            qemu_monitor::overlay_node_name(overlay)
                        };
                        added.push("-blockdev".to_string());
                        added.push(
                            json!({
                                "driver": "qcow2",
                                "node-name": node_name,
                                "file": {"driver": "file", "filename": overlay.display().to_string()},
                                "backing": backing,
                            })
                            .to_string(),
                        );
                        backing = node_name;
                    }
                    out.splice(i + 2..i + 2, added);
                    found[k] = true;
                }
            }
        }
    }
    (out, found)
}

/// Whether `args` define `top`.
#[must_use]
pub fn defines(args: &[String], cwd: &Path, top: &Top) -> bool {
    match top {
        Top::Node(name) => blockdev_names(args).contains(name),
        Top::File(path) => {
            options(args, "drive").any(|(_, v)| drive_names(&Keyval::parse(v), cwd, path))
                || ["hda", "hdb", "hdc", "hdd"]
                    .iter()
                    .any(|o| options(args, o).any(|(_, v)| absolute(cwd, v) == *path))
        }
    }
}

/// Whether QEMU runs the disk whose image is `path` on a temporary overlay
/// of its own: its `-drive` says `snapshot=on`, or the VM has `-snapshot`.
#[must_use]
pub fn on_temporary_overlay(args: &[String], cwd: &Path, path: &Path) -> bool {
    let on = |v: &str| matches!(v, "on" | "yes" | "true" | "y");
    args.iter().any(|a| a == "-snapshot" || a == "--snapshot")
        || drive_options(args, cwd, path)
            .is_some_and(|kv| kv.get("snapshot").is_some_and(|v| on(&v)))
}

/// The options of the `-drive` whose file is `path`.
fn drive_options(args: &[String], cwd: &Path, path: &Path) -> Option<Keyval> {
    options(args, "drive")
        .map(|(_, v)| Keyval::parse(v))
        .find(|kv| kv.get("file").is_some_and(|f| absolute(cwd, &f) == path))
}

/// Whether this `-drive` gives `path` as its top image, with nothing said
/// of what is below it (`backing.*` options would then describe the
/// overlay's backing, not the image's).
fn drive_names(kv: &Keyval, cwd: &Path, path: &Path) -> bool {
    kv.get("file").is_some_and(|f| absolute(cwd, &f) == path)
        && !kv
            .0
            .iter()
            .any(|(k, _)| k == "backing" || k.starts_with("backing."))
}

/// `value` as an absolute path, relative ones taken from `cwd`.
#[must_use]
pub fn absolute(cwd: &Path, value: &str) -> PathBuf {
    let p = Path::new(value);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        cwd.join(p)
    };
    normalize(&joined)
}

/// `a/./b/../c` → `a/c`, without touching the file system.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// QEMU's `key=value,key=value` with `,,` for a comma in a value.
#[derive(Debug, Clone)]
struct Keyval(Vec<(String, Option<String>)>);

impl Keyval {
    fn parse(s: &str) -> Keyval {
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        let mut push = |cur: &mut String| {
            let item = std::mem::take(cur);
            match item.split_once('=') {
                Some((k, v)) => items.push((k.to_string(), Some(v.to_string()))),
                None => items.push((item, None)),
            }
        };
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    push(&mut cur);
                }
            } else {
                cur.push(c);
            }
        }
        push(&mut cur);
        Keyval(items)
    }

    fn get(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.clone())
    }

    fn set(&mut self, key: &str, value: &str) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(item) => item.1 = Some(value.to_string()),
            None => self.0.push((key.to_string(), Some(value.to_string()))),
        }
        // A later repetition would win over the one just set.
        let mut seen = false;
        self.0.retain(|(k, _)| {
            let keep = k != key || !seen;
            seen |= k == key;
            keep
        });
    }

    fn render(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={}", escape(v)),
                None => k.clone(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn escape(v: &str) -> String {
    v.replace(',', ",,")
}

/// A `-blockdev` value in either of QEMU's forms, addressed by dotted keys.
#[derive(Debug, Clone)]
enum Node {
    Keyval(Keyval),
    Json(Map<String, Value>),
}

impl Node {
    fn parse(s: &str) -> Node {
        if s.trim_start().starts_with('{') {
            if let Ok(Value::Object(m)) = serde_json::from_str(s) {
                return Node::Json(m);
            }
        }
        Node::Keyval(Keyval::parse(s))
    }

    fn get(&self, key: &str) -> Option<String> {
        match self {
            Node::Keyval(kv) => kv.get(key),
            Node::Json(m) => {
                let (parent, last) = json_parent(m, key)?;
                parent.get(last)?.as_str().map(String::from)
            }
        }
    }

    fn set(&mut self, key: &str, value: &str) {
        match self {
            Node::Keyval(kv) => kv.set(key, value),
            Node::Json(m) => {
                if let Some((parent, last)) = json_parent_mut(m, key) {
                    parent.insert(last.to_string(), Value::String(value.to_string()));
                }
            }
        }
    }

    /// A boolean option, in either form (`on`, `true`, `yes`, JSON `true`).
    fn flag(&self, key: &str) -> Option<bool> {
        let word = match self {
            Node::Keyval(kv) => kv.get(key)?,
            Node::Json(m) => {
                let (parent, last) = json_parent(m, key)?;
                match parent.get(last)? {
                    Value::Bool(b) => return Some(*b),
                    Value::String(s) => s.clone(),
                    _ => return None,
                }
            }
        };
        match word.as_str() {
            "on" | "true" | "yes" | "y" => Some(true),
            "off" | "false" | "no" | "n" => Some(false),
            _ => None,
        }
    }

    /// Sets a boolean option: `on`/`off` in key=value form, `true`/`false` in JSON.
    fn set_flag(&mut self, key: &str, value: bool) {
        match self {
            Node::Keyval(kv) => kv.set(key, if value { "on" } else { "off" }),
            Node::Json(m) => {
                m.insert(key.to_string(), Value::Bool(value));
            }
        }
    }

    fn render(&self) -> String {
        match self {
            Node::Keyval(kv) => kv.render(),
            Node::Json(m) => Value::Object(m.clone()).to_string(),
        }
    }
}

fn json_parent<'a, 'k>(
    m: &'a Map<String, Value>,
    key: &'k str,
) -> Option<(&'a Map<String, Value>, &'k str)> {
    let mut at = m;
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop()?;
    for p in parts {
        at = at.get(p)?.as_object()?;
    }
    Some((at, last))
}

fn json_parent_mut<'a, 'k>(
    m: &'a mut Map<String, Value>,
    key: &'k str,
) -> Option<(&'a mut Map<String, Value>, &'k str)> {
    let mut at = m;
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop()?;
    for p in parts {
        at = at.get_mut(p)?.as_object_mut()?;
    }
    Some((at, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    fn file(top: &str, overlays: &[&str]) -> Lift {
        Lift {
            top: Top::File(PathBuf::from(top)),
            overlays: overlays.iter().map(PathBuf::from).collect(),
        }
    }

    /// libvirt's way: base <- mid <- top, each a `file` node under a `qcow2` node.
    fn libvirt_chain() -> Vec<String> {
        let mut args = Vec::new();
        for (n, image, backing) in [
            (3, "base", "null".to_string()),
            (2, "mid", "\"libvirt-3-format\"".to_string()),
            (1, "top", "\"libvirt-2-format\"".to_string()),
        ] {
            args.push("-blockdev".to_string());
            args.push(format!(
                r#"{{"driver":"file","filename":"/d/{image}.qcow2","node-name":"libvirt-{n}-storage","auto-read-only":true,"discard":"unmap"}}"#
            ));
            args.push("-blockdev".to_string());
            args.push(format!(
                r#"{{"node-name":"libvirt-{n}-format","read-only":{},"driver":"qcow2","file":"libvirt-{n}-storage","backing":{backing}}}"#,
                n != 1
            ));
        }
        args.extend(v(
            "-device virtio-blk-pci,drive=libvirt-1-format,id=virtio-disk0",
        ));
        args
    }

    #[test]
    fn drive_and_hda_point_at_the_overlay() {
        let args = v("-m 64 -drive file=disk.img,format=raw,if=virtio -hdb /d/b,x.img -kernel k");
        let (out, found) = lift_disks(
            &args,
            Path::new("/d"),
            &[
                file("/d/disk.img", &["/o/1.qcow2"]),
                file("/d/b,x.img", &["/o/2.qcow2"]),
            ],
        );
        assert_eq!(
            out,
            v("-m 64 -drive file=/o/1.qcow2,format=qcow2,if=virtio -drive file=/o/2.qcow2,format=qcow2,index=1,media=disk -kernel k")
        );
        assert_eq!(found, [true, true]);
    }

    #[test]
    fn a_drive_given_its_driver_keeps_that_key_and_one_saying_what_is_below_is_not_touched() {
        let args = v("-drive driver=raw,file=/d/a.img,if=none,id=d0 -drive file=/d/b.qcow2,backing.file.filename=/d/c.img");
        let (out, found) = lift_disks(
            &args,
            Path::new("/"),
            &[
                file("/d/a.img", &["/o/1.qcow2"]),
                file("/d/b.qcow2", &["/o/2.qcow2"]),
            ],
        );
        assert_eq!(out[1], "driver=qcow2,file=/o/1.qcow2,if=none,id=d0");
        assert_eq!(out[3], args[3]);
        assert_eq!(found, [true, false]);
        assert!(!defines(
            &args,
            Path::new("/"),
            &Top::File(PathBuf::from("/d/b.qcow2"))
        ));
    }

    #[test]
    fn only_the_top_of_a_blockdev_chain_is_lifted_every_node_keeping_its_own_file() {
        let args = libvirt_chain();
        let lift = Lift {
            top: Top::Node("libvirt-1-format".into()),
            overlays: vec![PathBuf::from("/o/new.qcow2"), PathBuf::from("/o/old.qcow2")],
        };
        let (out, found) = lift_disks(&args, Path::new("/"), &[lift]);
        assert_eq!(found, [true]);
        // Nothing before the top's format node changed, nor the device.
        assert_eq!(out[..10], args[..10]);
        assert_eq!(out.last(), args.last());
        let nodes: Vec<Value> = out
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).unwrap())
            .collect();
        assert_eq!(nodes.len(), 8);
        // Each file once, under its own node.
        let files: Vec<&str> = nodes
            .iter()
            .filter_map(|n| n["filename"].as_str().or(n["file"]["filename"].as_str()))
            .collect();
        assert_eq!(
            files,
            [
                "/d/base.qcow2",
                "/d/mid.qcow2",
                "/d/top.qcow2",
                "/o/old.qcow2",
                "/o/new.qcow2"
            ]
        );
        // The old top, read-only under a new name, below the overlays; the
        // device's node name now the newest overlay's.
        let under = nodes[5]["node-name"].as_str().unwrap();
        assert!(under.starts_with("under-") && under.len() <= 31, "{under}");
        assert_eq!(nodes[5]["read-only"], true);
        assert_eq!(nodes[5]["backing"], "libvirt-2-format");
        assert_eq!(nodes[5]["file"], "libvirt-1-storage");
        assert_eq!(nodes[6]["backing"], under);
        assert_eq!(nodes[7]["node-name"], "libvirt-1-format");
        assert_eq!(nodes[7]["backing"], nodes[6]["node-name"]);
        assert_eq!(nodes[7]["driver"], "qcow2");
    }

    #[test]
    fn a_key_value_blockdev_is_lifted_too() {
        let args = v("-blockdev driver=file,node-name=f0,filename=/d/disk.img -blockdev driver=raw,node-name=d0,file=f0 -device virtio-blk,drive=d0");
        let lift = Lift {
            top: Top::Node("d0".into()),
            overlays: vec![PathBuf::from("/o/1.qcow2")],
        };
        let (out, found) = lift_disks(&args, Path::new("/"), &[lift]);
        assert_eq!(found, [true]);
        assert_eq!(out[1], args[1]);
        assert!(
            out[3].starts_with("driver=raw,node-name=under-")
                && out[3].ends_with(",file=f0,read-only=on"),
            "{}",
            out[3]
        );
        let top: Value = serde_json::from_str(&out[5]).unwrap();
        assert_eq!(top["node-name"], "d0");
        assert_eq!(top["file"]["filename"], "/o/1.qcow2");
        assert_eq!(out[6..], args[4..]);
    }

    #[test]
    fn nothing_to_put_on_a_disk_changes_nothing() {
        let args = libvirt_chain();
        let lifts = [
            Lift {
                top: Top::Node("libvirt-1-format".into()),
                overlays: vec![],
            },
            Lift {
                top: Top::Node("libvirt-9-format".into()),
                overlays: vec![],
            },
        ];
        let (out, found) = lift_disks(&args, Path::new("/"), &lifts);
        assert_eq!(out, args);
        assert_eq!(found, [true, false]);
    }

    #[test]
    fn other_disks_stay_and_unknown_ones_are_reported() {
        let args = v("-drive file=/d/other.img,format=raw");
        let (out, found) = lift_disks(&args, Path::new("/"), &[file("/d/disk.img", &["/o/1"])]);
        assert_eq!(out, args);
        assert_eq!(found, [false]);
    }

    #[test]
    fn a_drive_with_snapshot_on_runs_on_a_temporary_overlay() {
        let cwd = Path::new("/d");
        let args = v("-drive file=a.img,snapshot=on -drive file=b.img");
        assert!(on_temporary_overlay(&args, cwd, Path::new("/d/a.img")));
        assert!(!on_temporary_overlay(&args, cwd, Path::new("/d/b.img")));
        let all = v("-snapshot -hda /d/b.img");
        assert!(on_temporary_overlay(&all, cwd, Path::new("/d/b.img")));
    }

    #[test]
    fn blockdev_files_written_are_those_of_writable_format_nodes_and_bare_file_nodes() {
        let mut args = libvirt_chain();
        args.extend(v("-blockdev driver=file,node-name=raw0,filename=raw.img -blockdev driver=qcow2,node-name=q,read-only=on,file.driver=file,file.filename=/d/ro.qcow2 -blockdev driver=qcow2,node-name=w,file.driver=file,file.filename=/d/w.qcow2"));
        assert_eq!(
            writable_blockdev_files(&args, Path::new("/w")),
            ["/d/top.qcow2", "/w/raw.img", "/d/w.qcow2"].map(PathBuf::from)
        );
    }

    #[test]
    fn names_and_files_the_command_line_defines() {
        let mut args = libvirt_chain();
        args.extend(v("-drive file=rel.img,if=virtio -hda /d/h.img"));
        assert_eq!(
            blockdev_names(&args)
                .iter()
                .filter(|n| n.ends_with("format"))
                .count(),
            3
        );
        assert_eq!(
            drive_files(&args, Path::new("/w")),
            [PathBuf::from("/w/rel.img"), PathBuf::from("/d/h.img")]
        );
        let inline = v("-blockdev driver=qcow2,node-name=q,file.driver=file,file.filename=q.qcow2");
        assert_eq!(
            blockdev_files(&[args, inline].concat(), Path::new("/w")),
            [
                "/d/base.qcow2",
                "/d/mid.qcow2",
                "/d/top.qcow2",
                "/w/q.qcow2"
            ]
            .map(PathBuf::from)
        );
    }
}
