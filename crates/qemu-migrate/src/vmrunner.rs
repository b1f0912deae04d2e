//! IncludeOS's `vm.json`, read as its test runner (vmrunner) reads it, into
//! the QEMU options vmrunner would start: a 64-bit service booted through
//! the chainloader as `-kernel CHAINLOADER -append ARGS -initrd "IMAGE ARGS"`,
//! a 32-bit one directly as `-kernel IMAGE -append ARGS`; `modules` as more
//! multiboot modules (`-initrd "path args,..."`), `drives`, `net`, `mem`,
//! `cpu`, `smp`, `bios` and `vga`. Relative paths are taken from the
//! `vm.json`'s own directory. vmrunner's `-nographic` becomes
//! `-serial stdio -display none`: the same console without the muxed monitor.
//!
//! ```
//! let vm: qemu_migrate::vmrunner::VmJson =
//!     serde_json::from_str(r#"{"image": "service", "mem": 128}"#).unwrap();
//! assert_eq!(vm.mem, Some(128));
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A `vm.json` (vmrunner's `vm.schema.json`; unknown keys are ignored).
#[derive(Debug, Clone, Default, Deserialize)]
#[non_exhaustive]
pub struct VmJson {
    /// What it is.
    #[serde(default)]
    pub description: Option<String>,
    /// The service image (an ELF).
    #[serde(default)]
    pub image: Option<String>,
    /// More multiboot modules.
    #[serde(default)]
    pub modules: Vec<Module>,
    /// Disks.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// Network devices.
    #[serde(default)]
    pub net: Vec<Net>,
    /// RAM in MiB.
    #[serde(default)]
    pub mem: Option<u64>,
    /// The virtual CPU.
    #[serde(default)]
    pub cpu: Option<Cpu>,
    /// Number of CPUs.
    #[serde(default)]
    pub smp: Option<u32>,
    /// A BIOS image.
    #[serde(default)]
    pub bios: Option<String>,
    /// A VGA card; none means `-nographic`.
    #[serde(default)]
    pub vga: Option<String>,
}

/// A multiboot module.
#[derive(Debug, Clone, Deserialize)]
#[non_exhaustive]
pub struct Module {
    /// Its file.
    pub path: String,
    /// Its command line.
    #[serde(default)]
    pub args: Option<String>,
}

/// A disk.
#[derive(Debug, Clone, Deserialize)]
#[non_exhaustive]
pub struct Drive {
    /// Its file.
    pub file: String,
    /// `ide` or `virtio`.
    #[serde(rename = "type", default = "virtio")]
    pub kind: String,
    /// `raw`, `qcow2`, `vdi`.
    #[serde(default = "raw")]
    pub format: String,
    /// `disk`.
    #[serde(default = "disk")]
    pub media: String,
}

fn virtio() -> String {
    "virtio".into()
}
fn raw() -> String {
    "raw".into()
}
fn disk() -> String {
    "disk".into()
}

/// A network device.
#[derive(Debug, Clone, Deserialize)]
#[non_exhaustive]
pub struct Net {
    /// The guest's device: `virtio`, `vmxnet3`, `e1000`, ...
    pub device: String,
    /// `tap` (vmrunner's default) or `user`.
    #[serde(default = "tap")]
    pub backend: String,
    /// A MAC address.
    #[serde(default)]
    pub mac: Option<String>,
    /// A host bridge.
    #[serde(default)]
    pub bridge: Option<String>,
}

fn tap() -> String {
    "tap".into()
}

/// A CPU model and features.
#[derive(Debug, Clone, Deserialize)]
#[non_exhaustive]
pub struct Cpu {
    /// `qemu64`, `host`, ...
    pub model: String,
    /// Features to add: `xsave`, `avx`, `aes`.
    #[serde(default)]
    pub features: Vec<String>,
}

/// What went wrong reading a `vm.json`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmJsonError {
    /// It could not be read or parsed.
    #[error("{}: {detail}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A 64-bit image without a chainloader to boot it.
    #[error(
        "{}: a 64-bit image is booted through IncludeOS's chainloader: give --chainloader FILE \
         (or set INCLUDEOS_PREFIX)",
        .image.display()
    )]
    NoChainloader {
        /// The image.
        image: PathBuf,
    },
}

impl VmJson {
    /// Reads `path`.
    ///
    /// # Errors
    /// [`VmJsonError::Parse`] when it cannot be read or is not a `vm.json`.
    pub fn load(path: &Path) -> Result<VmJson, VmJsonError> {
        let parse = |detail: String| VmJsonError::Parse {
            path: path.to_path_buf(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| parse(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| parse(e.to_string()))
    }

    /// The QEMU options vmrunner would give this VM, with `args` as the
    /// service's command line and files relative to `base`. The
    /// chainloader is used for a 64-bit image, or for any image when given.
    ///
    /// # Errors
    /// [`VmJsonError::Parse`] without an image; [`VmJsonError::NoChainloader`].
    pub fn qemu_args(
        &self,
        base: &Path,
        args: &str,
        chainloader: Option<&Path>,
    ) -> Result<Vec<String>, VmJsonError> {
        let file = |p: &str| base.join(p).display().to_string();
        let Some(image) = &self.image else {
            return Err(VmJsonError::Parse {
                path: base.join("vm.json"),
                detail: "no \"image\" to boot".into(),
            });
        };
        let image_path = base.join(image);
        let mut modules: Vec<String> = Vec::new();
        let mut out: Vec<String> = Vec::new();
        let chainloader = match chainloader {
            Some(c) => Some(c.to_path_buf()),
            None if is_elf64(&image_path) => Some(
                std::env::var_os("INCLUDEOS_PREFIX")
                    .map(|p| Path::new(&p).join("includeos/chainloader"))
                    .filter(|c| c.exists())
                    .ok_or_else(|| VmJsonError::NoChainloader {
                        image: image_path.clone(),
                    })?,
            ),
            None => None,
        };
        match chainloader {
            Some(c) => {
                out.extend([
                    "-kernel".into(),
                    c.display().to_string(),
                    "-append".into(),
                    args.to_string(),
                ]);
                modules.push(join_args(&file(image), args));
            }
            None => out.extend([
                "-kernel".into(),
                file(image),
                "-append".into(),
                args.to_string(),
            ]),
        }
        for m in &self.modules {
            modules.push(join_args(&file(&m.path), m.args.as_deref().unwrap_or("")));
        }
        if !modules.is_empty() {
            out.extend(["-initrd".into(), modules.join(",")]);
        }
        if let Some(b) = &self.bios {
            out.extend(["-bios".into(), file(b)]);
        }
        if let Some(n) = self.smp {
            out.extend(["-smp".into(), n.to_string()]);
        }
        if let Some(cpu) = &self.cpu {
            let mut s = cpu.model.clone();
            for f in &cpu.features {
                s.push_str(",+");
                s.push_str(f);
            }
            out.extend(["-cpu".into(), s]);
        }
        for d in &self.drives {
            out.extend([
                "-drive".into(),
                format!(
                    "file={},format={},if={},media={}",
                    file(&d.file),
                    d.format,
                    d.kind,
                    d.media
                ),
            ]);
        }
        for (i, n) in self.net.iter().enumerate() {
            let device = match n.device.as_str() {
                "virtio" => "virtio-net",
                "vmxnet" | "vmxnet3" => "vmxnet3",
                other => other,
            };
            let id = format!("net{i}");
            let mut dev = format!("{device},netdev={id}");
            if let Some(mac) = &n.mac {
                dev.push_str(&format!(",mac={mac}"));
            }
            let netdev = match (&n.bridge, n.backend.as_str()) {
                (Some(br), _) => format!("bridge,id={id},br={br}"),
                (None, "tap") => format!("tap,id={id},script=no,downscript=no"),
                (None, backend) => format!("{backend},id={id}"),
            };
            out.extend(["-device".into(), dev, "-netdev".into(), netdev]);
        }
        if let Some(mem) = self.mem {
            out.extend(["-m".into(), mem.to_string()]);
        }
        match &self.vga {
            Some(v) => out.extend(["-vga".into(), v.clone(), "-serial".into(), "stdio".into()]),
            None => out.extend([
                "-serial".into(),
                "stdio".into(),
                "-display".into(),
                "none".into(),
            ]),
        }
        Ok(out)
    }
}

fn join_args(path: &str, args: &str) -> String {
    if args.is_empty() {
        path.to_string()
    } else {
        format!("{path} {args}")
    }
}

/// Whether `path` is a 64-bit ELF (`\x7fELF`, class 2).
fn is_elf64(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 5];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head[..4] == b"\x7fELF"
        && head[4] == 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_through_the_chainloader_with_modules_drives_and_net() {
        let vm: VmJson = serde_json::from_str(
            r#"{"image": "svc.elf", "mem": 64, "smp": 2,
                "cpu": {"model": "qemu64", "features": ["xsave", "avx"]},
                "modules": [{"path": "mod.bin", "args": "x=1"}],
                "drives": [{"file": "d.img", "type": "virtio", "format": "raw", "media": "disk"}],
                "net": [{"device": "virtio", "backend": "user"}]}"#,
        )
        .unwrap();
        let args = vm
            .qemu_args(Path::new("/s"), "hello", Some(Path::new("/c/chainloader")))
            .unwrap();
        assert_eq!(
            args.join(" "),
            "-kernel /c/chainloader -append hello -initrd /s/svc.elf hello,/s/mod.bin x=1 \
             -smp 2 -cpu qemu64,+xsave,+avx -drive file=/s/d.img,format=raw,if=virtio,media=disk \
             -device virtio-net,netdev=net0 -netdev user,id=net0 -m 64 -serial stdio -display none"
        );
    }

    #[test]
    fn a_32_bit_image_boots_directly() {
        let vm: VmJson = serde_json::from_str(r#"{"image": "k.elf"}"#).unwrap();
        let args = vm.qemu_args(Path::new("/s"), "", None).unwrap();
        assert_eq!(
            args.join(" "),
            "-kernel /s/k.elf -append  -serial stdio -display none"
        );
    }
}
