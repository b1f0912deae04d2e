//! Links the monitor-send binary statically (a static PIE) where the C
//! library's static archives are installed. Recipes start it thousands of
//! times, and a static binary skips the dynamic loader at every start: about
//! a tenth of a whole `info status` round trip (`cargo xtask bench`).
//! Elsewhere, or with MONITOR_SEND_DYNAMIC=1, it links as usual.
//!
//! rustc asks for the C library and the unwinder as shared libraries
//! (`-Bdynamic -lgcc_s ... -lc`) whatever the link mode, so each name it asks
//! for is given, in a directory searched before the system's, as a linker
//! script that names the static archive instead.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The libraries rustc links the standard library with on linux-gnu, and
/// the static archives that stand in for them.
const STAND_INS: &[(&str, &[&str])] = &[
    ("gcc_s", &["libgcc_eh.a", "libgcc.a"]),
    ("util", &["libutil.a"]),
    ("rt", &["librt.a"]),
    ("pthread", &["libpthread.a"]),
    ("m", &["libm.a"]),
    ("dl", &["libdl.a"]),
    ("c", &["libc.a", "libgcc.a", "libgcc_eh.a"]),
];

fn main() {
    println!("cargo:rerun-if-env-changed=MONITOR_SEND_DYNAMIC");
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    let host = std::env::var("HOST").unwrap_or_default();
    let crt_static = std::env::var("CARGO_CFG_TARGET_FEATURE")
        .unwrap_or_default()
        .split(',')
        .any(|f| f == "crt-static");
    if target != "x86_64-unknown-linux-gnu"
        || target != host
        || crt_static
        || std::env::var_os("MONITOR_SEND_DYNAMIC").is_some_and(|v| v != "0")
        || find("rcrt1.o").is_none()
    {
        return;
    }
    let dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("static-libs");
    std::fs::create_dir_all(&dir).expect("creating the stand-ins' directory");
    for (name, archives) in STAND_INS {
        let Some(paths) = archives.iter().map(|a| find(a)).collect::<Option<Vec<_>>>() else {
            return;
        };
        let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        let script = format!("GROUP({})\n", list.join(" "));
        std::fs::write(dir.join(format!("lib{name}.so")), script)
            .expect("writing a stand-in linker script");
    }
    println!("cargo:rustc-link-arg-bins=-static-pie");
    println!("cargo:rustc-link-arg-bins=-L{}", dir.display());
}

/// Where the C compiler finds a file of its libraries (it echoes a bare name when it does not).
fn find(name: &str) -> Option<PathBuf> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(cc)
        .arg(format!("-print-file-name={name}"))
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    (path.is_absolute() && Path::new(&path).exists()).then_some(path)
}
