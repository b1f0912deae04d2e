//! The test guest: a multiboot kernel booted like IncludeOS's chainloader
//! (`-kernel GUEST -append ARGS -initrd PAYLOAD`) that prints a banner once,
//! `tick N` ten times a second from the PIT, and sweeps RAM so that a wrong
//! restore shows. This crate builds it from `fixtures/guest` with binutils
//! and reads what it prints; `fixtures/guest/README.md` has the formats.
//!
//! ```no_run
//! let elf = test_guest::build(std::path::Path::new("target/guest"))?;
//! # Ok::<(), test_guest::BuildError>(())
//! ```

use std::fmt;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// Where the guest's sources are.
pub fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/guest")
}

/// A failed build: which tool, and what it said.
#[derive(Debug)]
pub struct BuildError(String);

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BuildError {}

/// Builds `out_dir/guest.elf` unless it is newer than its sources; returns its path.
pub fn build(out_dir: &Path) -> Result<PathBuf, BuildError> {
    let src = source_dir();
    let sources = [src.join("guest.S"), src.join("guest.ld")];
    let output = out_dir.join("guest.elf");
    if fresh(&output, &sources) {
        return Ok(output);
    }
    std::fs::create_dir_all(out_dir)
        .map_err(|e| BuildError(format!("{}: {e}", out_dir.display())))?;
    let object = out_dir.join("guest.o");
    // Linked under another name and renamed, so an interrupted build never
    // leaves a guest.elf that looks current.
    let partial = out_dir.join("guest.elf.partial");
    run(Command::new("as")
        .arg("--32")
        .arg("-o")
        .arg(&object)
        .arg(&sources[0]))?;
    run(Command::new("ld")
        .args([
            "-m",
            "elf_i386",
            "-nostdlib",
            "-static",
            "--build-id=none",
            "-T",
        ])
        .arg(&sources[1])
        .arg("-o")
        .arg(&partial)
        .arg(&object))?;
    std::fs::rename(&partial, &output)
        .map_err(|e| BuildError(format!("{}: {e}", output.display())))?;
    Ok(output)
}

fn fresh(output: &Path, sources: &[PathBuf]) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(out) = modified(output) else {
        return false;
    };
    sources
        .iter()
        .all(|s| modified(s).is_some_and(|t: SystemTime| t <= out))
}

fn run(cmd: &mut Command) -> Result<(), BuildError> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|e| {
        if e.kind() == ErrorKind::NotFound {
            BuildError(format!(
                "`{tool}` is not installed: the test guest is built with binutils (apt-get install binutils)"
            ))
        } else {
            BuildError(format!("running {tool}: {e}"))
        }
    })?;
    if !out.status.success() {
        return Err(BuildError(format!(
            "{tool} failed building the test guest: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The banner the guest prints once at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Banner {
    pub cmdline: String,
    pub module_size: u64,
    pub module_sum: u32,
    pub mem_kib: u64,
    /// The RAM region the guest sweeps: `[start, end)` guest-physical.
    pub sweep: Option<(u64, u64)>,
}

impl Banner {
    pub fn parse(line: &str) -> Option<Banner> {
        static RE: OnceLock<regex::Regex> = OnceLock::new();
        let re = RE.get_or_init(|| {
            regex::Regex::new(
                r#"^BOOT qemu-migrate test guest cmdline="(.*)" module_size=(\d+) module_sum=([0-9a-f]{8}) mem_kib=(\d+)"#,
            )
            .expect("valid regex")
        });
        let c = re.captures(line)?;
        Some(Banner {
            cmdline: c[1].to_string(),
            module_size: c[2].parse().ok()?,
            module_sum: u32::from_str_radix(&c[3], 16).ok()?,
            mem_kib: c[4].parse().ok()?,
            sweep: line.split_whitespace().find_map(|w| {
                let (a, b) = w.strip_prefix("sweep=")?.split_once('-')?;
                let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
                Some((hex(a)?, hex(b)?))
            }),
        })
    }
}

/// Adler-32 as zlib computes it: the guest's `module_sum` of its payload.
pub fn adler32(bytes: &[u8]) -> u32 {
    const MOD: u32 = 65521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 bytes is the most that can be summed before b could overflow.
    for chunk in bytes.chunks(5552) {
        for &byte in chunk {
            a += u32::from(byte);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

/// The number of a `tick N` line.
pub fn tick(line: &str) -> Option<u64> {
    line.trim_end().strip_prefix("tick ")?.parse().ok()
}

/// Whether a line is the guest's own report of inconsistent RAM.
pub fn is_ram_mismatch(line: &str) -> bool {
    line.starts_with("RAM MISMATCH")
}

/// Lines a process prints (a guest's serial console on QEMU's stdout),
/// collected by a thread with the time each arrived, copied to a log if
/// asked, and waited for with deadlines.
#[derive(Debug, Clone, Default)]
pub struct Lines(Arc<(Mutex<Collected>, Condvar)>);

#[derive(Debug, Default)]
struct Collected {
    lines: Vec<(Instant, String)>,
    ended: bool,
}

impl Lines {
    /// Starts collecting `reader`'s lines.
    pub fn collect(reader: impl Read + Send + 'static) -> Lines {
        Lines::collect_to(reader, None)
    }

    /// Starts collecting `reader`'s lines, appending each to `log` as well.
    pub fn collect_to(reader: impl Read + Send + 'static, mut log: Option<std::fs::File>) -> Lines {
        let lines = Lines::default();
        let inner = lines.clone();
        std::thread::spawn(move || {
            let (state, cv) = &*inner.0;
            // Lines end in \n; a migration can cut one, so bytes are taken as they come.
            for line in BufReader::new(reader).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                if let Some(f) = log.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                state
                    .lock()
                    .expect("lines lock")
                    .lines
                    .push((Instant::now(), line));
                cv.notify_all();
            }
            state.lock().expect("lines lock").ended = true;
            cv.notify_all();
        });
        lines
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.timed().into_iter().map(|(_, l)| l).collect()
    }

    /// The lines with the time each arrived.
    pub fn timed(&self) -> Vec<(Instant, String)> {
        self.0 .0.lock().expect("lines lock").lines.clone()
    }

    /// Waits for a line (from index `from` on) that `pred` accepts and
    /// returns its index; panics naming `what` at the deadline or when the
    /// output ends without one. For tests.
    pub fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> usize {
        self.try_wait_for(from, timeout, pred)
            .unwrap_or_else(|got| panic!("no {what} within {timeout:?}; got: {got:?}"))
    }

    /// Like [`Lines::wait_for`], returning the lines seen instead of panicking.
    pub fn try_wait_for(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<usize, Vec<String>> {
        let deadline = Instant::now() + timeout;
        let (state, cv) = &*self.0;
        let mut guard = state.lock().expect("lines lock");
        loop {
            if let Some(i) = guard.lines.iter().skip(from).position(|(_, l)| pred(l)) {
                return Ok(from + i);
            }
            let now = Instant::now();
            if guard.ended || now >= deadline {
                return Err(guard.lines.iter().map(|(_, l)| l.clone()).collect());
            }
            guard = cv
                .wait_timeout(guard, deadline - now)
                .expect("lines lock")
                .0;
        }
    }
}

/// The guest's page size for the sweep.
pub const PAGE: usize = 4096;

/// Checks a dump of the sweep region (from `pmemsave` after `stop`): the
/// first byte of every page holds the same value, except that a sweep
/// interrupted part-way leaves a prefix one step ahead. Anything else means
/// the RAM is not what the guest wrote.
pub fn check_sweep(dump: &[u8]) -> Result<(), String> {
    let firsts: Vec<u8> = dump.chunks(PAGE).map(|p| p[0]).collect();
    let Some(&head) = firsts.first() else {
        return Err("the dump is empty".into());
    };
    let step = firsts
        .iter()
        .position(|&b| b != head)
        .unwrap_or(firsts.len());
    let behind = head.wrapping_sub(1);
    match firsts[step..].iter().position(|&b| b != behind) {
        None => Ok(()),
        Some(i) => Err(format!(
            "page {} of the sweep holds {:#04x}; pages before it hold {head:#04x}{}",
            step + i,
            firsts[step + i],
            if step < firsts.len() {
                format!(" then {behind:#04x}")
            } else {
                String::new()
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(values: &[u8]) -> Vec<u8> {
        values
            .iter()
            .flat_map(|&v| {
                let mut page = vec![0u8; PAGE];
                page[0] = v;
                page
            })
            .collect()
    }

    #[test]
    fn sweep_invariant() {
        assert!(check_sweep(&dump(&[5, 5, 5, 5])).is_ok());
        assert!(check_sweep(&dump(&[6, 6, 5, 5])).is_ok());
        assert!(check_sweep(&dump(&[0, 0, 255, 255])).is_ok());
        assert!(check_sweep(&dump(&[6, 5, 6, 5])).is_err());
        assert!(check_sweep(&dump(&[6, 6, 9, 6])).is_err());
        assert!(check_sweep(&dump(&[6, 4])).is_err());
    }

    #[test]
    fn builds_a_multiboot_elf32_kernel_once() {
        let dir = tempfile_dir();
        let path = build(&dir).expect("guest builds");
        let image = std::fs::read(&path).unwrap();
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
        let built = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert_eq!(build(&dir).unwrap(), path);
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            built,
            "an up-to-date guest is not rebuilt"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("test-guest-build-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn reads_the_banner() {
        let b = Banner::parse("BOOT qemu-migrate test guest cmdline=\"-initrd hello.bin\" module_size=6 module_sum=084b021f mem_kib=31616 modules=1 sweep=0x00400000-0x01c00000 fill_mib=0").unwrap();
        assert_eq!(b.cmdline, "-initrd hello.bin");
        assert_eq!(b.module_size, 6);
        assert_eq!(b.sweep, Some((0x400000, 0x1c00000)));
        assert_eq!(tick("tick 12"), Some(12));
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
        assert_eq!(adler32(b""), 1);
    }
}
