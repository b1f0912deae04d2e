//! Whether a running VM's command line can be started again as written.
//!
//! Launchers (libvirt, podman) hand QEMU file descriptors instead of paths:
//! `-chardev socket,fd=N`, `-netdev tap,fd=N,vhostfd=M`, `-add-fd fd=N,set=S`
//! with `/dev/fdset/S`. A second QEMU started with the same words gets
//! whatever its own descriptor N is: nothing, or its monitor. And a VM may
//! depend on another process, a vhost-user backend or a TPM emulator
//! listening on a socket QEMU connected to. [`plan`] reads, while the VM
//! runs, what each descriptor is and who is at the other end of each socket:
//! a descriptor that has a name is re-created from it (a listening socket's
//! path or port, a tap's interface, an fd set's file), and what has none is
//! reported as [`Unreplayable`], with the words to supply it, before
//! anything irreversible happens.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::os::{self, FdTarget};

/// A part of the command line that cannot be started again as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unreplayable {
    /// The argument as it is in the recorded command line.
    pub arg: String,
    /// What it refers to and why that cannot be had again, in words.
    pub why: String,
}

impl Unreplayable {
    /// Whether `args` still hold this argument.
    #[must_use]
    pub fn is_in(&self, args: &[String]) -> bool {
        args.iter().any(|a| a == &self.arg)
    }
}

/// A process the VM depends on, at the other end of a socket QEMU
/// connected to (a vhost-user backend such as virtiofsd, a TPM emulator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// The socket QEMU connects to.
    pub socket: PathBuf,
    /// The backend's command line, argv\[0\] first, as it ran at the save.
    pub argv: Vec<String>,
    /// Its working directory.
    pub cwd: Option<PathBuf>,
}

impl Backend {
    /// The backend's program name, for messages.
    #[must_use]
    pub fn name(&self) -> &str {
        self.argv
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(a))
            .unwrap_or("?")
    }

    /// Whether something listens on its socket now.
    #[must_use]
    pub fn is_listening(&self) -> bool {
        let name = self.socket.to_string_lossy();
        os::unix_sockets()
            .iter()
            .any(|s| s.listening && s.name == name)
    }
}

/// The command line as it can be started again, and what it cannot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The arguments, with every re-creatable descriptor replaced by its name.
    pub args: Vec<String>,
    /// What was re-created, in words (`fd=3 → path=/run/x.sock`).
    pub recreated: Vec<String>,
    /// What could not be.
    pub unreplayable: Vec<Unreplayable>,
    /// The processes the VM depends on.
    pub backends: Vec<Backend>,
}

/// The `key=value` parts of an option, a value's doubled commas kept
/// doubled, so that a part written back stays as QEMU reads it.
fn split_opts(value: &str) -> Vec<String> {
    crate::argv::option_parts(value, crate::argv::Commas::KeepDoubled)
}

fn key_of(part: &str) -> Option<(&str, &str)> {
    part.split_once('=')
}

/// Keys whose value is a descriptor number (or several, colon-separated).
const FD_KEYS: &[&str] = &["fd", "fds", "vhostfd", "vhostfds"];

/// Reads what the running QEMU `pid`'s descriptors and sockets are, and
/// plans its command line `args` for a second QEMU.
#[must_use]
pub fn plan(pid: u32, args: &[String]) -> Plan {
    let mut plan = Plan {
        args: args.to_vec(),
        ..Plan::default()
    };
    let sockets = os::unix_sockets();
    let tcp = os::tcp_listeners();
    fd_sets(pid, &mut plan);
    let mut i = 0;
    while i + 1 < plan.args.len() {
        let option = plan.args[i].trim_start_matches('-').to_string();
        let value = plan.args[i + 1].clone();
        let parts = split_opts(&value);
        let has_fd = parts
            .iter()
            .filter_map(|p| key_of(p))
            .any(|(k, v)| FD_KEYS.contains(&k) && v.split(':').all(|n| n.parse::<i32>().is_ok()));
        if has_fd && option != "add-fd" {
            match recreate(pid, &option, &parts, &sockets, &tcp) {
                Ok((new, note)) => {
                    plan.recreated
                        .push(format!("-{option} {value} → {new} ({note})"));
                    plan.args[i + 1] = new;
                }
                Err(why) => plan.unreplayable.push(Unreplayable {
                    arg: value.clone(),
                    why,
                }),
            }
        }
        let client_path = match option.as_str() {
            "chardev" => socket_client_path(&parts),
            "netdev" => stream_client_path(&parts),
            _ => None,
        };
        if let Some(path) = client_path {
            if let Some(b) = backend(pid, &path, &sockets) {
                plan.backends.push(b);
            }
        }
        i += 1;
    }
    plan
}

/// `-add-fd fd=N,set=S`: where the descriptor is a file, every
/// `/dev/fdset/S` becomes that file and the `-add-fd` goes.
fn fd_sets(pid: u32, plan: &mut Plan) {
    let mut i = 0;
    while i + 1 < plan.args.len() {
        if plan.args[i].trim_start_matches('-') != "add-fd" {
            i += 1;
            continue;
        }
        let value = plan.args[i + 1].clone();
        let parts = split_opts(&value);
        let get = |k: &str| {
            parts
                .iter()
                .filter_map(|p| key_of(p))
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.to_string())
        };
        let (Some(fd), Some(set)) = (get("fd"), get("set")) else {
            i += 2;
            continue;
        };
        let target = fd.parse().ok().and_then(|fd| os::fd_target(pid, fd));
        let set_path = format!("/dev/fdset/{set}");
        match target {
            Some(FdTarget::Path(path)) => {
                let file = path.to_string_lossy().replace(',', ",,");
                for a in &mut plan.args {
                    if a.contains(&set_path) {
                        *a = a.replace(&set_path, &file);
                    }
                }
                plan.recreated
                    .push(format!("-add-fd {value} → {} ({set_path})", path.display()));
                plan.args.drain(i..i + 2);
            }
            other => {
                plan.unreplayable.push(Unreplayable {
                    arg: value,
                    why: format!(
                        "descriptor {fd} of fd set {set} is {}, which has no name to open again",
                        describe(other.as_ref())
                    ),
                });
                i += 2;
            }
        }
    }
}

fn describe(target: Option<&FdTarget>) -> String {
    match target {
        None => "not open in QEMU".into(),
        Some(FdTarget::Path(p)) => p.display().to_string(),
        Some(FdTarget::Socket(_)) => "a socket".into(),
        Some(FdTarget::Anonymous(a)) => a.clone(),
    }
}

/// The option value with its descriptors replaced by names, and a note.
fn recreate(
    pid: u32,
    option: &str,
    parts: &[String],
    sockets: &[os::UnixSocket],
    tcp: &std::collections::BTreeMap<u64, std::net::SocketAddr>,
) -> std::result::Result<(String, String), String> {
    let kind = parts.first().map(String::as_str).unwrap_or_default();
    let kind = kind.strip_prefix("type=").unwrap_or(kind);
    let mut out: Vec<String> = Vec::with_capacity(parts.len() + 2);
    let mut notes = Vec::new();
    for part in parts {
        let Some((key, v)) = key_of(part) else {
            out.push(part.clone());
            continue;
        };
        if !FD_KEYS.contains(&key) {
            out.push(part.clone());
            continue;
        }
        let fds: Vec<i32> = v.split(':').filter_map(|n| n.parse().ok()).collect();
        let first = fds[0];
        let target = os::fd_target(pid, first);
        match (option, kind, key, &target) {
            ("chardev", "socket", "fd", Some(FdTarget::Socket(inode))) => {
                if let Some(s) = sockets.iter().find(|s| s.inode == *inode && s.listening) {
                    if let Some(name) = s.name.strip_prefix('@') {
                        out.push(format!("abstract=on,path={}", name.replace(',', ",,")));
                    } else if !s.name.is_empty() {
                        out.push(format!("path={}", s.name.replace(',', ",,")));
                    } else {
                        return Err(format!("descriptor {first} is an unnamed listening socket"));
                    }
                    notes.push(format!("descriptor {first} listens on {}", s.name));
                } else if let Some(addr) = tcp.get(inode) {
                    out.push(format!("host={},port={}", addr.ip(), addr.port()));
                    notes.push(format!("descriptor {first} listens on {addr}"));
                } else {
                    return Err(format!(
                        "descriptor {first} is a connected socket: the process at its other end \
                         cannot be connected to again by a new QEMU"
                    ));
                }
                if !parts.iter().any(|p| p.starts_with("server")) {
                    out.push("server=on".into());
                }
            }
            ("netdev", "tap", "fd" | "fds", Some(FdTarget::Path(p)))
                if p == Path::new("/dev/net/tun") =>
            {
                let Some(ifname) = os::tap_interface(pid, first) else {
                    return Err(format!(
                        "descriptor {first} is a tap that names no interface"
                    ));
                };
                if !os::tap_is_persistent(&ifname) {
                    return Err(format!(
                        "descriptor {first} is tap interface {ifname}, which is not persistent: \
                         it goes away with this QEMU (make it persistent, or supply another)"
                    ));
                }
                out.push(format!("ifname={ifname},script=no,downscript=no"));
                if fds.len() > 1 {
                    out.push(format!("queues={}", fds.len()));
                }
                notes.push(format!("descriptor {first} is tap interface {ifname}"));
            }
            (_, _, "vhostfd" | "vhostfds", Some(FdTarget::Path(p)))
                if p.starts_with("/dev/vhost-") =>
            {
                // QEMU opens the vhost device itself when asked to.
                out.push("vhost=on".into());
                notes.push(format!("descriptor {first} is {}", p.display()));
            }
            _ => {
                return Err(format!(
                    "descriptor {first} ({key}=) is {}, which a new QEMU cannot open again",
                    describe(target.as_ref())
                ))
            }
        }
    }
    out.dedup();
    Ok((out.join(","), notes.join("; ")))
}

/// A `-chardev socket` QEMU connected to, with another process listening
/// (or having accepted) at its path: a backend the VM depends on.
fn is_server(parts: &[String]) -> bool {
    parts.iter().any(|p| {
        matches!(
            p.as_str(),
            "server" | "server=on" | "server=yes" | "server=true"
        )
    })
}

/// The unix path a `-chardev socket` connects to (not one it listens on).
fn socket_client_path(parts: &[String]) -> Option<String> {
    if parts.first().map(String::as_str) != Some("socket") || is_server(parts) {
        return None;
    }
    let path = parts.iter().find_map(|p| p.strip_prefix("path="))?;
    (!path.is_empty()).then(|| path.to_string())
}

/// The unix path a `-netdev stream` connects to (a user-mode network
/// daemon such as gvproxy or passt, as podman machine wires it).
fn stream_client_path(parts: &[String]) -> Option<String> {
    let kind = parts.first()?;
    if kind != "stream" && kind != "type=stream" || is_server(parts) {
        return None;
    }
    if !parts.iter().any(|p| p == "addr.type=unix") {
        return None;
    }
    let path = parts.iter().find_map(|p| p.strip_prefix("addr.path="))?;
    (!path.is_empty()).then(|| path.to_string())
}

fn backend(qemu: u32, path: &str, sockets: &[os::UnixSocket]) -> Option<Backend> {
    let inodes: Vec<u64> = sockets
        .iter()
        .filter(|s| s.name == path)
        .map(|s| s.inode)
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let holder = os::socket_holders(&inodes, qemu).into_iter().next()?;
    let argv = os::process_info(holder).ok().map(|i| {
        let mut a = vec![i.binary.to_string_lossy().into_owned()];
        a.extend(i.args);
        a
    })?;
    Some(Backend {
        socket: PathBuf::from(path.replace(",,", ",")),
        argv,
        cwd: os::process_cwd(holder),
    })
}

/// How long a backend started again may take to listen on its socket.
const BACKEND_START: std::time::Duration = std::time::Duration::from_secs(10);

/// Refuses, before any QEMU starts, a backend that is not running and
/// whose program is gone.
///
/// # Errors
/// [`Error::NotReplayable`] naming the backend and its socket.
pub fn check_backends(backends: &[Backend]) -> Result<()> {
    let items: Vec<String> = backends
        .iter()
        .filter(|b| !b.is_listening())
        .filter(|b| b.argv.first().is_none_or(|p| !Path::new(p).is_file()))
        .map(|b| {
            format!(
                "the VM depends on {} at {}, which is not running, and its program {} is gone: \
                 start it so that it listens there, then restore",
                b.name(),
                b.socket.display(),
                b.argv.first().map_or("?", String::as_str)
            )
        })
        .collect();
    if items.is_empty() {
        Ok(())
    } else {
        Err(Error::NotReplayable {
            verb: "restore",
            items,
        })
    }
}

/// Backends started for a restore: ended again if the restore fails.
#[derive(Debug, Default)]
pub struct Started {
    children: Vec<std::process::Child>,
}

impl Started {
    /// The restore succeeded: the backends stay, serving the new QEMU (and
    /// outlive this process from now on).
    pub fn keep(mut self) {
        for c in self.children.drain(..) {
            crate::os::keeper::release(c.id());
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            crate::os::keeper::release(c.id());
            let _ = c.wait();
        }
    }
}

/// Starts every backend nobody serves now from its recorded command line,
/// in its own session, and waits until it listens on its socket.
///
/// # Errors
/// [`Error::NotReplayable`] when one cannot be started, exits, or does not
/// listen in time, with what it is.
pub fn start_backends(backends: &[Backend]) -> Result<Started> {
    use std::os::unix::process::CommandExt;
    let mut started = Started::default();
    for b in backends.iter().filter(|b| !b.is_listening()) {
        let Some((program, rest)) = b.argv.split_first() else {
            continue;
        };
        let mut cmd = std::process::Command::new(program);
        cmd.args(rest)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0);
        if let Some(cwd) = b.cwd.as_ref().filter(|d| d.is_dir()) {
            cmd.current_dir(cwd);
        }
        // Until the restore succeeds, it ends with this process.
        crate::os::keeper::end_with_us(&mut cmd)?;
        let refuse = |why: String| Error::NotReplayable {
            verb: "restore",
            items: vec![format!(
                "the VM depends on {} at {}: {why}",
                b.name(),
                b.socket.display()
            )],
        };
        let mut child = cmd
            .spawn()
            .map_err(|e| refuse(format!("starting \"{}\" failed: {e}", b.argv.join(" "))))?;
        let deadline = std::time::Instant::now() + BACKEND_START;
        loop {
            if b.is_listening() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(refuse(format!(
                    "\"{}\" ended ({status}) before it listened",
                    b.argv.join(" ")
                )));
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                crate::os::keeper::release(child.id());
                let _ = child.wait();
                return Err(refuse(format!(
                    "\"{}\" did not listen within {} s",
                    b.argv.join(" "),
                    BACKEND_START.as_secs()
                )));
            }
            // The kernel's socket table has no event to wait on.
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        started.children.push(child);
    }
    Ok(started)
}

/// `args` with every `(old, new)` substring replacement applied
/// (`restore --replace OLD NEW`); an `old` found nowhere is an error.
///
/// # Errors
/// The first `old` that no argument contains.
pub fn replace(
    args: &[String],
    replacements: &[(String, String)],
) -> std::result::Result<Vec<String>, String> {
    let mut out = args.to_vec();
    for (old, new) in replacements {
        let mut found = false;
        for a in &mut out {
            if a.contains(old.as_str()) {
                *a = a.replace(old.as_str(), new);
                found = true;
            }
        }
        if !found {
            return Err(old.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_paths_a_vm_connects_to() {
        let parts = |v: &str| split_opts(v);
        assert_eq!(
            stream_client_path(&parts(
                "stream,id=vlan,server=off,addr.type=unix,addr.path=/run/gvproxy.sock"
            )),
            Some("/run/gvproxy.sock".into())
        );
        assert_eq!(
            stream_client_path(&parts("stream,id=n,server=on,addr.type=unix,addr.path=/x")),
            None
        );
        assert_eq!(
            stream_client_path(&parts("stream,id=n,addr.type=inet,addr.host=h,addr.port=1")),
            None
        );
        assert_eq!(
            socket_client_path(&parts("socket,id=chrtpm,path=/run/swtpm.sock")),
            Some("/run/swtpm.sock".into())
        );
        assert_eq!(
            socket_client_path(&parts("socket,id=m,path=/m,server=on,wait=off")),
            None
        );
    }
    use std::os::fd::AsRawFd;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn a_passed_listening_socket_becomes_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mon.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let fd = l.as_raw_fd();
        let args = v(&format!(
            "-m 32 -chardev socket,id=charmonitor,fd={fd},server=on,wait=off -mon chardev=charmonitor,mode=control"
        ));
        let plan = plan(std::process::id(), &args);
        assert!(plan.unreplayable.is_empty(), "{plan:?}");
        assert_eq!(
            plan.args[3],
            format!(
                "socket,id=charmonitor,path={},server=on,wait=off",
                path.display()
            )
        );
    }

    #[test]
    fn a_pipe_or_an_unopened_descriptor_is_reported_not_replayed() {
        let (r, _w) = std::io::pipe().unwrap();
        let args = v(&format!(
            "-netdev socket,id=n,fd={} -chardev socket,id=c,fd=987",
            r.as_raw_fd()
        ));
        let plan = plan(std::process::id(), &args);
        assert_eq!(plan.unreplayable.len(), 2, "{plan:?}");
        assert!(plan.unreplayable[0].why.contains("pipe:"), "{plan:?}");
        assert!(plan.unreplayable[1].why.contains("not open"), "{plan:?}");
        assert_eq!(plan.args, args);
    }

    #[test]
    fn an_fd_set_of_a_file_becomes_the_file() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let fd = f.as_file().as_raw_fd();
        let args = v(&format!(
            "-add-fd fd={fd},set=2 -drive file=/dev/fdset/2,if=virtio,format=raw"
        ));
        let plan = plan(std::process::id(), &args);
        assert!(plan.unreplayable.is_empty(), "{plan:?}");
        assert_eq!(
            plan.args,
            vec![
                "-drive".to_string(),
                format!("file={},if=virtio,format=raw", f.path().display())
            ]
        );
    }

    #[test]
    fn replacements_must_match_something() {
        let args = v("-chardev socket,id=c,fd=3");
        assert_eq!(
            replace(&args, &[("fd=3".into(), "path=/x".into())]).unwrap(),
            v("-chardev socket,id=c,path=/x")
        );
        assert_eq!(
            replace(&args, &[("fd=4".into(), "x".into())]),
            Err("fd=4".into())
        );
    }
}
