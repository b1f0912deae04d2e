//! The guest's first serial port, written by every QEMU of the check to one
//! file (`append=on`, so a destination carries on where the source stopped),
//! and read back line by line as it grows.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::argv;

/// The chardev id the check gives the guest's serial port.
const CHARDEV_ID: &str = "roundtrip-serial";
/// How often a file that has not grown is looked at again while waiting.
const FOLLOW: Duration = Duration::from_millis(5);

/// Why the options' serial port cannot be read.
#[derive(Debug)]
pub struct NotStdio(pub String);

/// `args` with the first serial port written to `log` instead of stdio:
/// `-serial stdio`, `-serial mon:stdio` and `-nographic` are replaced, and a
/// VM with no `-serial` at all gets one. A serial port already going
/// elsewhere is refused: the check would not see the guest.
pub fn to_file(args: &[String], log: &Path) -> Result<Vec<String>, NotStdio> {
    let mut out = Vec::with_capacity(args.len() + 4);
    let mut replaced = false;
    let mut i = 0;
    let chardev = format!("file,id={CHARDEV_ID},path={},append=on", log.display());
    while i < args.len() {
        let a = args[i].trim_start_matches('-');
        match (a, args.get(i + 1).map(String::as_str)) {
            ("serial", Some(v)) if !replaced => {
                if !matches!(v, "stdio" | "mon:stdio") {
                    return Err(NotStdio(format!(
                        "the guest's first serial port goes to {v:?}; the check reads it from \
                         -serial stdio (it writes it to a file of its own)"
                    )));
                }
                out.extend([
                    "-chardev".into(),
                    chardev.clone(),
                    "-serial".into(),
                    format!("chardev:{CHARDEV_ID}"),
                ]);
                replaced = true;
                i += 2;
            }
            ("nographic", _) => {
                out.extend(["-display".into(), "none".into()]);
                i += 1;
            }
            _ => {
                out.push(args[i].clone());
                i += 1;
            }
        }
    }
    if !replaced {
        out.extend([
            "-chardev".into(),
            chardev,
            "-serial".into(),
            format!("chardev:{CHARDEV_ID}"),
        ]);
    }
    if argv::last_value(&out, "-display").is_none() {
        out.extend(["-display".into(), "none".into()]);
    }
    Ok(out)
}

/// A serial log read as it grows.
#[derive(Debug)]
pub struct Follow {
    path: PathBuf,
    file: Option<File>,
    partial: Vec<u8>,
    lines: Vec<(Instant, String)>,
}

impl Follow {
    /// Follows `path`, which need not exist yet.
    pub fn new(path: &Path) -> Follow {
        Follow {
            path: path.to_path_buf(),
            file: None,
            partial: Vec::new(),
            lines: Vec::new(),
        }
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every complete line so far, with the time it was read.
    pub fn lines(&self) -> &[(Instant, String)] {
        &self.lines
    }

    /// Reads what was appended since the last call.
    pub fn poll(&mut self) {
        if self.file.is_none() {
            self.file = File::open(&self.path).ok();
        }
        let Some(f) = self.file.as_mut() else { return };
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return;
        }
        let now = Instant::now();
        for &b in &buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial)
                    .trim_end_matches('\r')
                    .to_string();
                self.lines.push((now, line));
                self.partial.clear();
            } else {
                self.partial.push(b);
            }
        }
    }

    /// Reads on until `done` says so (given the lines), `alive` says the
    /// guest's QEMU is gone, or `deadline` passes; returns whether `done`.
    pub fn wait(
        &mut self,
        deadline: Instant,
        mut alive: impl FnMut() -> bool,
        mut done: impl FnMut(&[(Instant, String)]) -> bool,
    ) -> bool {
        loop {
            self.poll();
            if done(&self.lines) {
                return true;
            }
            if Instant::now() >= deadline || !alive() {
                // What it printed before it went.
                self.poll();
                return done(&self.lines);
            }
            std::thread::sleep(FOLLOW);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn the_first_serial_port_goes_to_the_log() {
        let log = Path::new("/w/serial.log");
        let chardev = "-chardev file,id=roundtrip-serial,path=/w/serial.log,append=on -serial chardev:roundtrip-serial";
        assert_eq!(
            to_file(&v("-m 32 -serial stdio -kernel k"), log).unwrap(),
            v(&format!("-m 32 {chardev} -kernel k -display none"))
        );
        assert_eq!(
            to_file(&v("-m 32 -nographic"), log).unwrap(),
            v(&format!("-m 32 -display none {chardev}"))
        );
        assert_eq!(
            to_file(&v("-display none -m 32"), log).unwrap(),
            v(&format!("-display none -m 32 {chardev}"))
        );
        assert!(to_file(&v("-serial file:/x"), log).is_err());
    }

    #[test]
    fn reads_lines_as_the_file_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let mut f = Follow::new(&path);
        f.poll();
        assert!(f.lines().is_empty());
        std::fs::write(&path, "BOOT\r\ntick 1\ntick").unwrap();
        f.poll();
        let got: Vec<&str> = f.lines().iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(got, ["BOOT", "tick 1"]);
        use std::io::Write;
        let mut a = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        a.write_all(b" 2\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(f.wait(deadline, || true, |l| l.len() == 3));
        assert_eq!(f.lines()[2].1, "tick 2");
    }
}
