//! Pointing a QEMU command line's disks at other images: `-drive file=`,
//! `-blockdev` (key=value and JSON forms) and `-hda`..`-hdd`, the rest
//! left exactly as it was.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// One disk to point elsewhere: whichever of `from` (absolute paths, any
/// image of its chain) the command line names becomes `to`, a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swap {
    /// The paths the command line may name the disk by.
    pub from: Vec<PathBuf>,
    /// The image it is to use now.
    pub to: PathBuf,
}

/// `args` with each swap applied; the second value lists, for each swap,
/// whether the command line named its disk at all.
#[must_use]
pub fn point_disks(args: &[String], cwd: &Path, swaps: &[Swap]) -> (Vec<String>, Vec<bool>) {
    let mut out = args.to_vec();
    let mut found = vec![false; swaps.len()];
    let matches = |value: &str| -> Option<usize> {
        let p = absolute(cwd, value);
        swaps.iter().position(|s| s.from.contains(&p))
    };
    // Protocol nodes named by -blockdev whose format node is to become qcow2.
    let mut protocol_nodes: Vec<String> = Vec::new();
    let mut i = 0;
    while i + 1 < out.len() {
        let option = out[i].trim_start_matches('-');
        match option {
            "drive" => {
                let mut kv = Keyval::parse(&out[i + 1]);
                if let Some(s) = kv.get("file").and_then(|v| matches(&v)) {
                    kv.set("file", &swaps[s].to.display().to_string());
                    kv.set("format", "qcow2");
                    out[i + 1] = kv.render();
                    found[s] = true;
                }
            }
            "hda" | "hdb" | "hdc" | "hdd" => {
                if let Some(s) = matches(&out[i + 1]) {
                    let index = usize::from(option.as_bytes()[2] - b'a');
                    out[i] = "-drive".into();
                    out[i + 1] = format!(
                        "file={},format=qcow2,index={index},media=disk",
                        escape(&swaps[s].to.display().to_string())
                    );
                    found[s] = true;
                }
            }
            "blockdev" => {
                let mut node = Node::parse(&out[i + 1]);
                let keys: Vec<String> = node
                    .keys()
                    .into_iter()
                    .filter(|k| k == "filename" || k.ends_with(".filename"))
                    .collect();
                for key in keys {
                    let Some(s) = node.get(&key).and_then(|v| matches(&v)) else {
                        continue;
                    };
                    node.set(&key, &swaps[s].to.display().to_string());
                    found[s] = true;
                    let prefix = &key[..key.len() - "filename".len()];
                    match prefix.strip_suffix("file.") {
                        // The format node holds its protocol inline.
                        Some(format_prefix) => to_qcow2(&mut node, format_prefix),
                        None if prefix.is_empty() => {
                            if let Some(name) = node.get("node-name") {
                                protocol_nodes.push(name);
                            }
                        }
                        None => {}
                    }
                }
                out[i + 1] = node.render();
            }
            _ => {}
        }
        i += 1;
    }
    if !protocol_nodes.is_empty() {
        let mut i = 0;
        while i + 1 < out.len() {
            if out[i].trim_start_matches('-') == "blockdev" {
                let mut node = Node::parse(&out[i + 1]);
                let refs: Vec<String> = node
                    .keys()
                    .into_iter()
                    .filter(|k| k == "file" || k.ends_with(".file"))
                    .filter(|k| node.get(k).is_some_and(|v| protocol_nodes.contains(&v)))
                    .collect();
                for key in &refs {
                    to_qcow2(&mut node, &key[..key.len() - "file".len()]);
                }
                if !refs.is_empty() {
                    out[i + 1] = node.render();
                }
            }
            i += 1;
        }
    }
    (out, found)
}

/// The format node at `prefix` reads a qcow2 overlay now, whose own header
/// names its backing image.
fn to_qcow2(node: &mut Node, prefix: &str) {
    node.set(&format!("{prefix}driver"), "qcow2");
    node.remove(&format!("{prefix}backing"));
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

    fn remove(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
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

    fn keys(&self) -> Vec<String> {
        match self {
            Node::Keyval(kv) => kv.0.iter().map(|(k, _)| k.clone()).collect(),
            Node::Json(m) => {
                let mut out = Vec::new();
                json_keys(m, "", &mut out);
                out
            }
        }
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

    fn remove(&mut self, key: &str) {
        match self {
            Node::Keyval(kv) => kv.remove(key),
            Node::Json(m) => {
                if let Some((parent, last)) = json_parent_mut(m, key) {
                    parent.remove(last);
                }
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

fn json_keys(m: &Map<String, Value>, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in m {
        let key = format!("{prefix}{k}");
        if let Value::Object(inner) = v {
            json_keys(inner, &format!("{key}."), out);
        } else {
            out.push(key);
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

    fn swap(from: &str, to: &str) -> Swap {
        Swap {
            from: vec![PathBuf::from(from)],
            to: PathBuf::from(to),
        }
    }

    #[test]
    fn drive_and_hda_point_at_the_overlay() {
        let args = v("-m 64 -drive file=disk.img,format=raw,if=virtio -hdb /d/b,x.img -kernel k");
        let (out, found) = point_disks(
            &args,
            Path::new("/d"),
            &[
                swap("/d/disk.img", "/o/1.qcow2"),
                swap("/d/b,x.img", "/o/2.qcow2"),
            ],
        );
        assert_eq!(
            out,
            v("-m 64 -drive file=/o/1.qcow2,format=qcow2,if=virtio -drive file=/o/2.qcow2,format=qcow2,index=1,media=disk -kernel k")
        );
        assert_eq!(found, [true, true]);
    }

    #[test]
    fn blockdev_protocol_and_format_nodes_follow() {
        let args = v("-blockdev driver=file,node-name=f0,filename=/d/disk.img -blockdev driver=raw,node-name=d0,file=f0 -device virtio-blk,drive=d0 -blockdev {\"driver\":\"qcow2\",\"node-name\":\"d1\",\"backing\":null,\"file\":{\"driver\":\"file\",\"filename\":\"/d/q.qcow2\"}}");
        let (out, found) = point_disks(
            &args,
            Path::new("/"),
            &[
                swap("/d/disk.img", "/o/1.qcow2"),
                swap("/d/q.qcow2", "/o/2.qcow2"),
            ],
        );
        assert_eq!(found, [true, true]);
        assert_eq!(out[1], "driver=file,node-name=f0,filename=/o/1.qcow2");
        assert_eq!(out[3], "driver=qcow2,node-name=d0,file=f0");
        let json: Value = serde_json::from_str(&out[7]).unwrap();
        assert_eq!(json["driver"], "qcow2");
        assert_eq!(json["file"]["filename"], "/o/2.qcow2");
        assert!(json.get("backing").is_none());
    }

    #[test]
    fn other_disks_stay_and_unknown_ones_are_reported() {
        let args = v("-drive file=/d/other.img,format=raw");
        let (out, found) = point_disks(&args, Path::new("/"), &[swap("/d/disk.img", "/o/1")]);
        assert_eq!(out, args);
        assert_eq!(found, [false]);
    }
}
