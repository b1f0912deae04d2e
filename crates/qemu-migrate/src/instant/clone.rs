//! A second VM from the same saved state while the first runs: the same
//! options, but sockets and logs of its own (QEMU removes a listening
//! socket's path before it binds, so a clone with the first VM's options
//! would take its monitor away), and no writable disk that both would write.

use std::path::PathBuf;

use crate::argv;

/// Options that attach a disk image, writable unless marked otherwise.
const DISK_OPTIONS: &[&str] = &[
    "-hda",
    "-hdb",
    "-hdc",
    "-hdd",
    "-sd",
    "-mtdblock",
    "-pflash",
];

fn canonical(a: &str) -> &str {
    if a.starts_with("--") && a.len() > 2 {
        &a[1..]
    } else {
        a
    }
}

/// The first writable disk `args` attach, in words, other than the files
/// in `own` (a checkpoint's fresh overlays, made for this clone alone).
fn writable_disk(args: &[String], own: &[PathBuf]) -> Option<String> {
    if args.iter().any(|a| canonical(a) == "-snapshot") {
        // Every write goes to a temporary overlay.
        return None;
    }
    let opts = |v: &str| -> Vec<String> { v.split(',').map(str::to_string).collect() };
    let on = |v: &[String], key: &str| {
        v.iter().any(|o| {
            matches!(
                o.as_str()
                    .strip_prefix(key)
                    .and_then(|r| r.strip_prefix('=')),
                Some("on" | "true" | "yes")
            )
        })
    };
    for w in args.windows(2) {
        let (opt, value) = (canonical(&w[0]), w[1].as_str());
        if DISK_OPTIONS.contains(&opt) {
            return Some(format!("{opt} {value}"));
        }
        if opt == "-drive" {
            let o = opts(value);
            let file = o.iter().find_map(|o| o.strip_prefix("file="));
            let read_only = on(&o, "readonly")
                || on(&o, "read-only")
                || on(&o, "snapshot")
                || o.iter().any(|o| o == "media=cdrom");
            if file.is_some_and(|f| !own.iter().any(|p| p.as_os_str() == f)) && !read_only {
                return Some(format!("-drive {value}"));
            }
        }
    }
    // A -blockdev chain's nodes below its top and their file nodes are
    // read-only to the VM: only what it writes counts.
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    crate::checkpoint::cmdline::writable_blockdev_files(args, &cwd)
        .into_iter()
        .find(|f| !own.contains(f))
        .map(|f| format!("-blockdev … {}", f.display()))
}

/// The files a VM run with `args` creates or writes by path, other than
/// disks: listening sockets, serial and chardev log files, QEMU's own log.
fn own_paths(args: &[String]) -> Vec<(usize, PathBuf)> {
    let mut out = Vec::new();
    for (i, w) in args.windows(2).enumerate() {
        let (opt, value) = (canonical(&w[0]), w[1].as_str());
        if let Some(p) = argv::unix_server_path(opt, value) {
            out.push((i + 1, p));
            continue;
        }
        match opt {
            "-serial" | "-parallel" | "-monitor" => {
                if let Some(p) = value.strip_prefix("file:") {
                    out.push((i + 1, PathBuf::from(p)));
                }
            }
            "-chardev" => {
                for o in value.split(',') {
                    let path = o.strip_prefix("logfile=").or_else(|| {
                        value
                            .starts_with("file,")
                            .then(|| o.strip_prefix("path="))
                            .flatten()
                    });
                    if let Some(p) = path {
                        out.push((i + 1, PathBuf::from(p)));
                    }
                }
            }
            "-D" => out.push((i + 1, PathBuf::from(value))),
            _ => {}
        }
    }
    out
}

fn with_suffix(p: &std::path::Path, n: u32) -> PathBuf {
    let mut name = p.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".clone{n}"));
    p.with_file_name(name)
}

/// The first N whose paths are all free, reserved by creating the first of
/// them (QEMU replaces it with its socket or log): clones started at the same
/// time get different numbers.
fn reserve(paths: &[(usize, PathBuf)]) -> Result<u32, String> {
    let Some((_, first)) = paths.first() else {
        return Ok(1);
    };
    for n in 1..10_000 {
        if paths
            .iter()
            .skip(1)
            .any(|(_, p)| with_suffix(p, n).exists())
        {
            continue;
        }
        let claim = with_suffix(first, n);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&claim)
        {
            Ok(_) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("{}: {e}", claim.display())),
        }
    }
    Err(format!("no free clone number for {}", first.display()))
}

/// `args` for a clone: its own paths (`PATH.cloneN`, the first N whose paths
/// are all free) and the renames made; or why it cannot be cloned. The
/// files in `own` are the clone's alone (a checkpoint's fresh overlays).
pub(super) fn clone_args(
    args: &[String],
    own: &[PathBuf],
) -> Result<(Vec<String>, super::Renamed), String> {
    if let Some(disk) = writable_disk(args, own) {
        return Err(format!(
            "a clone would share the writable disk of `{disk}` with the VM that runs from the \
             same state; give the clone a copy (or add -snapshot, or make the disk read-only)"
        ));
    }
    // Paths in directories that are gone are dropped from a restore anyway
    // (argv::restart_options).
    let paths: Vec<(usize, PathBuf)> = own_paths(args)
        .into_iter()
        .filter(|(_, p)| {
            p.parent()
                .is_none_or(|d| d.as_os_str().is_empty() || d.is_dir())
        })
        .collect();
    let n = reserve(&paths)?;
    let mut out = args.to_vec();
    let mut renamed = Vec::new();
    for (i, p) in paths {
        let new = with_suffix(&p, n);
        out[i] = out[i].replace(&p.display().to_string(), &new.display().to_string());
        renamed.push((p, new));
    }
    Ok((out, renamed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn a_clone_gets_its_own_sockets_and_logs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let given = format!(
            "-m 32 -monitor unix:{d}/qemu-sock,server,nowait -serial file:{d}/serial.log -chardev socket,id=c,path={d}/c.sock,server=on,wait=off"
        );
        let (args, renamed) = clone_args(&v(&given), &[]).expect("no disks");
        assert_eq!(
            args,
            v(&format!("-m 32 -monitor unix:{d}/qemu-sock.clone1,server,nowait -serial file:{d}/serial.log.clone1 -chardev socket,id=c,path={d}/c.sock.clone1,server=on,wait=off"))
        );
        assert_eq!(renamed.len(), 3);
        // The next one, while the first is reserved, gets its own number.
        let (args, _) = clone_args(&v(&given), &[]).expect("no disks");
        assert!(args[3].contains("qemu-sock.clone2"), "{args:?}");
    }

    #[test]
    fn a_writable_disk_refuses_a_clone_and_a_read_only_one_does_not() {
        let clone = |s: &str| clone_args(&v(s), &[]);
        assert!(clone("-m 32 -drive file=disk.qcow2,if=virtio").is_err());
        assert!(clone("-m 32 -hda disk.img").is_err());
        assert!(clone("-m 32 -blockdev driver=file,filename=d.img,node-name=f").is_err());
        assert!(clone("-m 32 -drive file=disk.qcow2,if=virtio,readonly=on").is_ok());
        assert!(clone("-m 32 -cdrom x.iso -drive file=a.iso,media=cdrom").is_ok());
        assert!(clone("-m 32 -hda disk.img -snapshot").is_ok());
        assert!(clone("-m 32 -blockdev driver=file,filename=/d.img,node-name=f -blockdev driver=raw,node-name=r,file=f,read-only=on").is_ok());
    }

    #[test]
    fn a_checkpoints_fresh_overlay_is_the_clones_own() {
        let own = [PathBuf::from("/o/ck.virtio0.2.qcow2")];
        assert!(clone_args(
            &v("-m 32 -drive file=/o/ck.virtio0.2.qcow2,format=qcow2"),
            &own
        )
        .is_ok());
        let blockdev = v(
            r#"-m 32 -blockdev {"driver":"file","filename":"/d/top.qcow2","node-name":"s"} -blockdev {"driver":"qcow2","node-name":"under-1","file":"s","read-only":true} -blockdev {"driver":"qcow2","node-name":"top","file":{"driver":"file","filename":"/o/ck.virtio0.2.qcow2"},"backing":"under-1"}"#,
        );
        assert!(clone_args(&blockdev, &own).is_ok());
        assert!(clone_args(&blockdev, &[]).is_err());
    }
}
