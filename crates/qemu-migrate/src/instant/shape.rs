//! Where a VM's guest RAM comes from, read from its options: which RAM
//! blocks an instant save moves into images, and how a restore maps each
//! image back under the same block name.
//!
//! A VM started with `-m` only has one block, `pc.ram`, which QEMU makes
//! from a default backend; a restore gives it a file backend of that id
//! instead. Every other block a save moves comes from a user's backend
//! (`-object memory-backend-ram|memfd|file`) that `-machine memory-backend=`,
//! a `-numa node,memdev=` or a `-device pc-dimm,memdev=` uses; a restore
//! rewrites that very object into a `memory-backend-file` of the image.
//!
//! The block's name in the stream is the backend's id, or its canonical
//! path `/objects/ID` when `x-use-canonical-path-for-ramblock-id` is on
//! (`host_memory_backend_get_name`, backends/hostmem.c). The property is off
//! by default, but machine types up to 3.1 turn it on for file and memfd
//! backends (`hw_compat_3_1`, hw/core/machine.c), so the save asks QEMU
//! which name a block has (`info ramblock`) instead of working it out, and
//! the restore sets the property explicitly to give the same name again.

use std::path::Path;

use serde_json::{Map, Value};

/// Backend options a rewritten backend keeps: they mean the same for a
/// private mapping of the image. Everything else is dropped: the kind's own
/// options (`mem-path`, `share`, `hugetlb`, `seal`, `align`, `offset`,
/// `pmem`, `discard-data`), and `prealloc` (with its threads and context),
/// which on a private mapping would read the whole image and copy every
/// page up front: exactly the load an instant restore exists to avoid.
/// `policy` and `host-nodes` still place the pages the guest writes (its
/// private copies); `merge`, `dump` and `reserve` are about the mapping.
const KEPT: &[&str] = &["size", "policy", "host-nodes", "merge", "dump", "reserve"];

/// The property that decides a backend's block name.
const CANONICAL: &str = "x-use-canonical-path-for-ramblock-id";

/// A memory backend object of the VM's options.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Backend {
    /// Index of the `-object` option's value in the options.
    pub at: usize,
    /// `memory-backend-ram`, `-memfd`, `-file`, …
    pub kind: String,
    /// Its id.
    pub id: String,
    props: Props,
}

#[derive(Debug, Clone, PartialEq)]
enum Props {
    /// `memory-backend-ram,id=m0,size=1G`: every `key=value` after the
    /// type, in order (a bare `key` is `key=on`).
    Dotted(Vec<(String, String)>),
    /// `{"qom-type":"memory-backend-ram","id":"m0","size":1073741824}`, as
    /// libvirt writes it.
    Json(Map<String, Value>),
}

fn is_on(v: &str) -> bool {
    matches!(v, "on" | "yes" | "true" | "y")
}

/// QEMU's option syntax: `,` separates, `,,` is a comma in a value.
fn split_opts(s: &str) -> Vec<String> {
    crate::argv::option_parts(s, crate::argv::Commas::Undoubled)
}

fn escape(v: &str) -> String {
    v.replace(',', ",,")
}

impl Backend {
    /// The backend an `-object` value defines, if it is a memory backend.
    fn parse(at: usize, value: &str) -> Option<Backend> {
        if value.trim_start().starts_with('{') {
            let Ok(Value::Object(map)) = serde_json::from_str::<Value>(value) else {
                return None;
            };
            let kind = map.get("qom-type")?.as_str()?.to_string();
            let id = map.get("id")?.as_str()?.to_string();
            return kind.starts_with("memory-backend").then_some(Backend {
                at,
                kind,
                id,
                props: Props::Json(map),
            });
        }
        let mut parts = split_opts(value).into_iter();
        let first = parts.next()?;
        let mut kind = (!first.contains('=')).then_some(first.clone());
        let mut id = None;
        let mut props = Vec::new();
        let rest = if kind.is_some() { None } else { Some(first) };
        for p in rest.into_iter().chain(parts) {
            let (k, v) = match p.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (p.clone(), "on".to_string()),
            };
            match k.as_str() {
                "qom-type" => kind = Some(v),
                "id" => id = Some(v),
                _ => props.push((k, v)),
            }
        }
        let kind = kind?;
        kind.starts_with("memory-backend").then_some(Backend {
            at,
            kind,
            id: id?,
            props: Props::Dotted(props),
        })
    }

    /// A property as text (`None` when not given).
    pub fn get(&self, key: &str) -> Option<String> {
        match &self.props {
            Props::Dotted(p) => p
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone()),
            Props::Json(m) => m.get(key).map(|v| match v {
                Value::String(s) => s.clone(),
                Value::Bool(true) => "on".to_string(),
                Value::Bool(false) => "off".to_string(),
                other => other.to_string(),
            }),
        }
    }

    fn flag(&self, key: &str) -> Option<bool> {
        self.get(key).map(|v| is_on(&v))
    }

    /// Whether its memory is shared with other processes: `share=on`, the
    /// default of a memfd backend.
    fn shared(&self) -> bool {
        self.flag("share")
            .unwrap_or(self.kind == "memory-backend-memfd")
    }

    /// The two names QEMU may give this backend's block.
    pub fn block_names(&self) -> [String; 2] {
        [self.id.clone(), format!("/objects/{}", self.id)]
    }

    /// Why this backend's RAM cannot be an image, in words; `None` when it can.
    pub fn unsuitable(&self) -> Option<String> {
        let id = &self.id;
        match self.kind.as_str() {
            "memory-backend-ram" => {}
            "memory-backend-memfd" => {
                if self.flag("hugetlb") == Some(true) {
                    return Some(format!(
                        "memory backend {id} is on hugepages (hugetlb=on), which a RAM image \
                         of ordinary pages cannot stand in for"
                    ));
                }
            }
            "memory-backend-file" => {
                if self.flag("share") == Some(true) {
                    return Some(format!(
                        "memory backend {id} maps its file shared (share=on): that file already \
                         is the guest's RAM, which the VM and whoever else maps it keep writing, \
                         and a restore from an image would cut the VM off from it"
                    ));
                }
                if let Some(path) = self.get("mem-path") {
                    if crate::os::is_hugetlbfs(Path::new(&path)) {
                        return Some(format!(
                            "memory backend {id} is on hugepages ({path} is hugetlbfs), which a \
                             RAM image of ordinary pages cannot stand in for"
                        ));
                    }
                }
                if self.flag("readonly") == Some(true) || self.flag("rom") == Some(true) {
                    return Some(format!("memory backend {id} is read-only guest memory"));
                }
            }
            other => {
                return Some(format!(
                    "memory backend {id} is a {other}, which the instant layout does not map"
                ))
            }
        }
        None
    }

    /// This backend as a private, copy-on-write mapping of `image`, whose
    /// block is named `block` as the saved one was; `read_only` opens the
    /// image read-only (QEMU 8.2+: `readonly=on,rom=off`), so that nothing
    /// QEMU does can write to it.
    pub fn as_image(&self, image: &Path, block: &str, read_only: bool) -> String {
        let canonical = block.starts_with("/objects/");
        let mem_path = image.display().to_string();
        match &self.props {
            Props::Dotted(props) => {
                let mut out = format!(
                    "memory-backend-file,id={},mem-path={},share=off,{CANONICAL}={}",
                    escape(&self.id),
                    escape(&mem_path),
                    if canonical { "on" } else { "off" }
                );
                if read_only {
                    out.push_str(",readonly=on,rom=off");
                }
                for (k, v) in props.iter().filter(|(k, _)| KEPT.contains(&k.as_str())) {
                    out.push_str(&format!(",{k}={}", escape(v)));
                }
                out
            }
            Props::Json(map) => {
                let mut out = Map::new();
                out.insert("qom-type".into(), "memory-backend-file".into());
                out.insert("id".into(), self.id.clone().into());
                out.insert("mem-path".into(), mem_path.into());
                out.insert("share".into(), false.into());
                out.insert(CANONICAL.into(), canonical.into());
                if read_only {
                    out.insert("readonly".into(), true.into());
                    out.insert("rom".into(), "off".into());
                }
                for (k, v) in map.iter().filter(|(k, _)| KEPT.contains(&k.as_str())) {
                    out.insert(k.clone(), v.clone());
                }
                Value::Object(out).to_string()
            }
        }
    }

    /// Whether this is a backend a restore made of an image (`mem-path`
    /// given, `share=off`, the block name property set explicitly).
    pub fn image_path(&self) -> Option<String> {
        (self.kind == "memory-backend-file"
            && self.flag("share") == Some(false)
            && self.get(CANONICAL).is_some())
        .then(|| self.get("mem-path"))
        .flatten()
    }
}

/// Every memory backend object in `args`.
pub(crate) fn backends(args: &[String]) -> Vec<Backend> {
    args.windows(2)
        .enumerate()
        .filter(|(_, w)| w[0] == "-object" || w[0] == "--object")
        .filter_map(|(i, w)| Backend::parse(i + 1, &w[1]))
        .collect()
}

/// What a save moves: a RAM block, and the backend it comes from
/// (`None`: the machine's own `pc.ram` of a `-m` VM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub block: String,
    pub backend: Option<String>,
}

/// The blocks of guest RAM among `blocks` (QEMU's names) of a VM run with
/// `args`: the machine's `pc.ram` and those of its memory backends.
pub(crate) fn guest_blocks<'b>(args: &[String], blocks: &'b [(String, u64)]) -> Vec<&'b str> {
    let backends = backends(args);
    blocks
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|name| {
            super::MACHINE_BLOCKS.contains(name)
                || backends
                    .iter()
                    .any(|b| b.block_names().iter().any(|n| n == name))
        })
        .collect()
}

/// The blocks of a VM run with `args`, whose RAM blocks QEMU names `blocks`,
/// that a save moves into images; or why its RAM cannot be laid out so.
pub(crate) fn targets(args: &[String], blocks: &[(String, u64)]) -> Result<Vec<Target>, String> {
    let backends = backends(args);
    let mut out = Vec::new();
    for (name, _) in blocks {
        if let Some(b) = backends.iter().find(|b| b.block_names().contains(name)) {
            if let Some(why) = b.unsuitable() {
                return Err(why);
            }
            out.push(Target {
                block: name.clone(),
                backend: Some(b.id.clone()),
            });
        } else if super::MACHINE_BLOCKS.contains(&name.as_str()) {
            out.push(Target {
                block: name.clone(),
                backend: None,
            });
        }
    }
    // vhost-user backends map guest RAM from the descriptors QEMU passes
    // them, which a private mapping of an image cannot serve.
    let vhost_user = args.iter().find(|a| a.contains("vhost-user"));
    let shared = out
        .iter()
        .filter_map(|t| t.backend.as_ref())
        .find(|id| backends.iter().any(|b| &b.id == *id && b.shared()));
    if let (Some(arg), Some(id)) = (vhost_user, shared) {
        return Err(format!(
            "the VM shares memory backend {id} with a vhost-user backend ({arg}), which maps \
             guest RAM itself; a private mapping of an image cannot be shared"
        ));
    }
    if out.is_empty() {
        return Err(format!(
            "the VM has no RAM block named {} nor one from a memory backend (only x86 pc, q35 \
             and microvm machines are laid out this way)",
            super::MACHINE_BLOCKS.join(" or ")
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn reads_backends_in_both_syntaxes() {
        let args = v(
            r#"-m 1G -object memory-backend-ram,id=pc.ram,size=1073741824,x-use-canonical-path-for-ramblock-id=off -object {"qom-type":"memory-backend-memfd","id":"m1","size":536870912,"share":true} -object secret,id=s,data=x -object qom-type=memory-backend-file,id=f,mem-path=/a,,b,size=64M"#,
        );
        let b = backends(&args);
        assert_eq!(b.len(), 3);
        assert_eq!(
            (b[0].at, b[0].kind.as_str(), b[0].id.as_str()),
            (3, "memory-backend-ram", "pc.ram")
        );
        assert_eq!(b[0].get(CANONICAL).as_deref(), Some("off"));
        assert_eq!(
            (b[1].kind.as_str(), b[1].id.as_str()),
            ("memory-backend-memfd", "m1")
        );
        assert_eq!(b[1].get("share").as_deref(), Some("on"));
        assert_eq!(b[2].get("mem-path").as_deref(), Some("/a,b"));
    }

    #[test]
    fn a_rewritten_backend_keeps_its_id_size_name_and_placement() {
        let args = v("-object memory-backend-memfd,id=m0,size=1G,policy=bind,host-nodes=0,prealloc=on,hugetlb=off,seal=on");
        let b = &backends(&args)[0];
        assert_eq!(
            b.as_image(Path::new("/s/st,x.ram.1"), "m0", false),
            "memory-backend-file,id=m0,mem-path=/s/st,,x.ram.1,share=off,\
             x-use-canonical-path-for-ramblock-id=off,size=1G,policy=bind,host-nodes=0"
        );
        assert_eq!(
            b.as_image(Path::new("/s/st.ram"), "/objects/m0", true),
            "memory-backend-file,id=m0,mem-path=/s/st.ram,share=off,\
             x-use-canonical-path-for-ramblock-id=on,readonly=on,rom=off,size=1G,policy=bind,\
             host-nodes=0"
        );
        let json = v(
            r#"-object {"qom-type":"memory-backend-ram","id":"pc.ram","size":1073741824,"host-nodes":[0,1],"policy":"bind","prealloc":true}"#,
        );
        let j: Value =
            serde_json::from_str(&backends(&json)[0].as_image(Path::new("/i"), "pc.ram", false))
                .unwrap();
        assert_eq!(
            j,
            serde_json::json!({"qom-type": "memory-backend-file", "id": "pc.ram", "mem-path": "/i",
                "share": false, CANONICAL: false, "size": 1073741824u64, "host-nodes": [0, 1],
                "policy": "bind"})
        );
        // What a restore wrote is recognised as such.
        let again = vec![
            "-object".to_string(),
            b.as_image(Path::new("/s/st.ram"), "m0", true),
        ];
        assert_eq!(
            backends(&again)[0].image_path().as_deref(),
            Some("/s/st.ram")
        );
        assert_eq!(b.image_path(), None);
    }

    #[test]
    fn the_blocks_moved_are_pc_ram_and_those_of_suitable_backends() {
        let blocks = |names: &[&str]| -> Vec<(String, u64)> {
            names.iter().map(|n| (n.to_string(), 1 << 20)).collect()
        };
        let t = targets(&v("-m 64"), &blocks(&["pc.ram", "pc.bios"])).unwrap();
        assert_eq!(
            t,
            vec![Target {
                block: "pc.ram".into(),
                backend: None
            }]
        );
        let numa = v("-object memory-backend-ram,id=m0,size=32M -object memory-backend-memfd,id=m1,size=32M,x-use-canonical-path-for-ramblock-id=on -numa node,memdev=m0 -numa node,memdev=m1");
        let t = targets(&numa, &blocks(&["m0", "/objects/m1", "pc.bios"])).unwrap();
        assert_eq!(
            t,
            vec![
                Target {
                    block: "m0".into(),
                    backend: Some("m0".into())
                },
                Target {
                    block: "/objects/m1".into(),
                    backend: Some("m1".into())
                }
            ]
        );
        let dimm = v("-m 64,slots=2,maxmem=256M -object memory-backend-ram,id=d0,size=64M -device pc-dimm,memdev=d0");
        let t = targets(&dimm, &blocks(&["d0", "pc.ram"])).unwrap();
        assert_eq!(t.len(), 2);
        let shared = v("-object memory-backend-file,id=f,size=64M,mem-path=/x,share=on -machine memory-backend=f");
        assert!(targets(&shared, &blocks(&["f"]))
            .unwrap_err()
            .contains("share=on"));
        let huge =
            v("-object memory-backend-memfd,id=h,size=64M,hugetlb=on -machine memory-backend=h");
        assert!(targets(&huge, &blocks(&["h"]))
            .unwrap_err()
            .contains("hugepages"));
        // microvm's -m RAM is its own block, moved as pc.ram is.
        assert_eq!(
            targets(&v("-M microvm"), &blocks(&["microvm.ram"])).unwrap(),
            [Target {
                block: "microvm.ram".into(),
                backend: None
            }]
        );
        assert!(targets(&v("-M virt"), &blocks(&["mach-virt.ram"])).is_err());
        let virtiofs = v("-object memory-backend-memfd,id=mem,size=64M -machine memory-backend=mem -chardev socket,id=fs,path=/f -device vhost-user-fs-pci,chardev=fs,tag=t");
        assert!(targets(&virtiofs, &blocks(&["mem"]))
            .unwrap_err()
            .contains("vhost-user"));
        let private = v("-object memory-backend-memfd,id=mem,size=64M,share=off -machine memory-backend=mem -device vhost-user-fs-pci,chardev=fs");
        assert!(targets(&private, &blocks(&["mem"])).is_ok());
    }
}
