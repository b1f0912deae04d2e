//! Builds the test guest from `fixtures/guest`: a multiboot kernel that QEMU boots
//! with `-kernel`, assembled by GNU `as` and linked by GNU `ld` (binutils).
//!
//! What the guest prints and what it does to RAM is described in
//! `fixtures/guest/README.md`.

use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{bail, Context};

const SOURCE: &str = "guest.S";
const LINKER_SCRIPT: &str = "guest.ld";
const OUTPUT: &str = "guest.elf";

/// Builds the guest kernel into `out_dir` and returns its path.
///
/// Does nothing but return the path when `out_dir/guest.elf` is newer than every
/// source file.
pub fn build(out_dir: &Path) -> anyhow::Result<PathBuf> {
    let src_dir = crate::project_root().join("fixtures/guest");
    let source = src_dir.join(SOURCE);
    let script = src_dir.join(LINKER_SCRIPT);
    let output = out_dir.join(OUTPUT);

    if is_up_to_date(&output, &[&source, &script])? {
        return Ok(output);
    }
    fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;

    let object = out_dir.join("guest.o");
    // Linked under a temporary name and renamed, so an interrupted build never leaves
    // a half-written guest.elf that the freshness check would then take as current.
    let partial = out_dir.join("guest.elf.partial");
    run(Command::new("as")
        .arg("--32")
        .arg("-o")
        .arg(&object)
        .arg(&source))?;
    run(Command::new("ld")
        .args(["-m", "elf_i386", "-nostdlib", "-static", "--build-id=none"])
        .arg("-T")
        .arg(&script)
        .arg("-o")
        .arg(&partial)
        .arg(&object))?;
    fs::rename(&partial, &output).with_context(|| {
        format!(
            "cannot rename {} to {}",
            partial.display(),
            output.display()
        )
    })?;
    Ok(output)
}

fn is_up_to_date(output: &Path, sources: &[&Path]) -> anyhow::Result<bool> {
    let built = match fs::metadata(output).and_then(|m| m.modified()) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("cannot stat {}", output.display())),
    };
    for source in sources {
        if modified(source)? >= built {
            return Ok(false);
        }
    }
    Ok(true)
}

fn modified(path: &Path) -> anyhow::Result<SystemTime> {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .with_context(|| format!("cannot read guest source {}", path.display()))
}

/// Runs a binutils tool, naming it in every error.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => bail!(
            "`{tool}` not found: building the test guest needs GNU binutils \
             (`as` and `ld` with i386 support, e.g. the Debian/Ubuntu package `binutils`)"
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot run `{tool}`")),
    };
    if !out.status.success() {
        let args: Vec<_> = cmd.get_args().map(OsStr::to_string_lossy).collect();
        bail!(
            "`{tool} {}` failed ({}):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_multiboot_elf32_kernel_once() {
        let dir = std::env::temp_dir().join(format!("xtask-guest-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);

        let path = build(&dir).expect("guest builds");
        let image = fs::read(&path).unwrap();
        assert_eq!(&image[..4], b"\x7fELF");
        assert_eq!(
            image[4], 1,
            "ELFCLASS32: QEMU's multiboot loader rejects 64-bit images"
        );
        assert_eq!(u16::from_le_bytes([image[18], image[19]]), 3, "EM_386");
        // The loader searches the first 8 KiB, on 4-byte boundaries.
        let magic = 0x1BAD_B002_u32.to_le_bytes();
        assert!(
            image[..image.len().min(8192)]
                .chunks_exact(4)
                .any(|w| w == magic),
            "multiboot header in the first 8 KiB"
        );

        let built = fs::metadata(&path).unwrap().modified().unwrap();
        assert_eq!(build(&dir).unwrap(), path);
        assert_eq!(
            fs::metadata(&path).unwrap().modified().unwrap(),
            built,
            "an up-to-date guest is not rebuilt"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
