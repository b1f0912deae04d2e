//! The user's unix socket paths, kept reachable while two QEMUs of one VM
//! coexist on a host (see the module docs of `live`).

use std::path::{Path, PathBuf};

use crate::argv;
use crate::error::{Error, Result};
use crate::os;

/// The user's listening unix sockets, kept reachable across a local migration.
#[derive(Debug, Default, Clone)]
pub(super) struct SocketHandover {
    /// (the user's path, the source's socket linked aside, a name for the destination's)
    links: Vec<(PathBuf, PathBuf, PathBuf)>,
}

impl SocketHandover {
    pub(super) fn keep_source(args: &[String], pid: u32) -> Result<SocketHandover> {
        use std::os::unix::fs::FileTypeExt;
        let mut handover = SocketHandover::default();
        for w in args.windows(2) {
            let Some(path) = argv::unix_server_path(&w[0], &w[1]) else {
                continue;
            };
            let is_socket =
                std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket());
            if !is_socket || handover.links.iter().any(|(p, _, _)| *p == path) {
                continue;
            }
            let source = aside(&path, "source", pid);
            let dest = aside(&path, "destination", pid);
            let _ = std::fs::remove_file(&source);
            if let Err(e) = std::fs::hard_link(&path, &source) {
                handover.back_to_source();
                return Err(Error::file(
                    &path,
                    "keeping the source's socket reachable (a hard link beside it)",
                )(e));
            }
            handover.links.push((path, source, dest));
        }
        Ok(handover)
    }

    /// Right after the destination started (and bound the user's paths):
    /// the source's sockets back at the paths, the destination's linked
    /// aside, so that whoever connects during the migration reaches the
    /// VM that runs, not one waiting for its state.
    pub(super) fn source_answers(&self) {
        for (path, source, dest) in &self.links {
            let _ = std::fs::remove_file(dest);
            if std::fs::hard_link(path, dest).is_ok() && std::fs::rename(source, path).is_ok() {
                let _ = std::fs::hard_link(path, source);
            }
        }
    }

    /// Once the destination runs the guest: its sockets at the user's
    /// paths (the source's stay reachable aside). Done again, it changes
    /// nothing.
    pub(super) fn destination_answers(&self) {
        for (path, _, dest) in &self.links {
            if std::fs::rename(dest, path).is_ok() {
                let _ = std::fs::hard_link(path, dest);
            }
        }
    }

    /// The source's sockets back at the user's paths.
    pub(super) fn back_to_source(&mut self) {
        for (path, source, dest) in self.links.drain(..) {
            // The destination's, if it was linked aside, goes with it.
            let _ = std::fs::remove_file(&dest);
            let _ = std::fs::rename(&source, &path);
            // Where the path still is the source's socket, the two names
            // are links of one file and rename(2) leaves both: the aside
            // name must not stay beside the user's socket.
            let _ = std::fs::remove_file(&source);
        }
    }

    /// The destination's sockets (now at the user's paths) survive the
    /// source's cleanup under a second name.
    pub(super) fn before_source_quits(&self) {
        for (path, _, dest) in &self.links {
            let _ = std::fs::remove_file(dest);
            let _ = std::fs::hard_link(path, dest);
        }
    }

    pub(super) fn after_source_quit(&mut self) {
        for (path, source, dest) in self.links.drain(..) {
            // When the source did not unlink the path, both names are one
            // socket and rename leaves `dest` as it is.
            let _ = std::fs::rename(&dest, &path);
            let _ = std::fs::remove_file(&dest);
            let _ = std::fs::remove_file(&source);
        }
    }

    /// Where the source's socket for the user's `path` is kept while the
    /// destination has the path (the path itself when it is not handed over).
    pub(super) fn source_path(&self, path: &Path) -> PathBuf {
        self.links
            .iter()
            .find(|(p, _, _)| p == path)
            .map_or_else(|| path.to_path_buf(), |(_, source, _)| source.clone())
    }

    pub(super) fn kept_for_source(&mut self) -> Vec<PathBuf> {
        self.links.drain(..).map(|(_, source, _)| source).collect()
    }
}

fn aside(path: &Path, whose: &str, pid: u32) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".qemu-migrate-{whose}-{pid}"));
    path.with_file_name(name)
}

/// The first descriptor number a destination is given the source's
/// listening sockets at: above anything this process has open.
const FIRST_PASSED_FD: i32 = 200;

/// The source's listening sockets that have no path to link aside (see
/// [`SocketHandover`]): TCP ports and abstract unix names of monitors,
/// serial ports and gdb, handed to the destination. Two QEMUs cannot
/// listen at one address, and the source's must stay open until it quits:
/// the destination gets a copy of the very socket (`pidfd_getfd`) as a
/// passed descriptor, and its option becomes the `fd=` form of a socket
/// chardev. A later save reads the address back from the descriptor (see
/// `replay`).
#[derive(Debug, Default)]
pub(super) struct ListenerHandover {
    /// The destination's options.
    pub args: Vec<String>,
    /// The copies, and the numbers the destination gets them at.
    pub fds: Vec<(std::os::fd::OwnedFd, i32)>,
    /// The source's VNC listener, for the destination's VNC server once it
    /// runs (see [`vnc`]).
    pub vnc: Option<std::os::fd::OwnedFd>,
    /// Where the destination's VNC server listens until then.
    _vnc_dir: Option<tempfile::TempDir>,
}

/// A VNC server on TCP (`-vnc :1`, `-vnc 127.0.0.1:5,share=…`): its option
/// has no descriptor form, so the destination starts listening on a
/// private unix socket with the same options, and is then handed a copy of
/// the source's listener (`display-update`). Returns the destination's
/// options and the copy.
fn vnc(
    args: &[String],
    pid: u32,
    ports: &[(i32, std::net::SocketAddr)],
) -> Result<(
    Vec<String>,
    Option<std::os::fd::OwnedFd>,
    Option<tempfile::TempDir>,
)> {
    let Some(at) = args
        .iter()
        .position(|a| matches!(a.as_str(), "-vnc" | "--vnc"))
    else {
        return Ok((args.to_vec(), None, None));
    };
    let Some(value) = args.get(at + 1) else {
        return Ok((args.to_vec(), None, None));
    };
    let (display, options) = value.split_once(',').unwrap_or((value, ""));
    let number = display
        .rsplit_once(':')
        .filter(|_| !display.starts_with("unix:") && !display.starts_with("vsock:"))
        .and_then(|(_, d)| d.parse::<u16>().ok());
    let Some(number) = number else {
        return Ok((args.to_vec(), None, None));
    };
    if options
        .split(',')
        .any(|o| o.starts_with("websocket") || o.starts_with("to="))
    {
        // Another port (or a range) the tool does not hand over: QEMU's own
        // refusal, before any RAM moves, says which.
        return Ok((args.to_vec(), None, None));
    }
    let Some(&(fd, _)) = ports.iter().find(|(_, a)| a.port() == 5900 + number) else {
        return Ok((args.to_vec(), None, None));
    };
    let copy = os::copy_fd_of(pid, fd).map_err(|source| Error::Os {
        what: "taking a copy of the source's VNC listener for the destination",
        source,
    })?;
    let dir = tempfile::Builder::new()
        .prefix("qemu-migrate-vnc-")
        .tempdir()
        .map_err(Error::os(
            "creating a private directory for the destination's VNC",
        ))?;
    let mut out = args.to_vec();
    out[at + 1] = format!(
        "unix:{}{}{options}",
        dir.path().join("vnc.sock").display(),
        if options.is_empty() { "" } else { "," }
    );
    Ok((out, Some(copy), Some(dir)))
}

/// Where a server option listens, when no path does.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Listen {
    Port(u16),
    /// An abstract unix socket, by its name without the `@`.
    Abstract(String),
}

fn is_on(o: &str, key: &str) -> bool {
    o == key
        || [
            format!("{key}=on"),
            format!("{key}=yes"),
            format!("{key}=true"),
        ]
        .iter()
        .any(|v| v == o)
}

/// A short-form server option (`tcp:H:P,server`, `telnet:…`,
/// `unix:NAME,server,abstract=on`): where it listens, and whether in telnet mode.
fn short_server(option: &str, value: &str) -> Option<(Listen, bool)> {
    let (kind, rest) = value.split_once(':')?;
    let mut parts = rest.split(',');
    let address = parts.next()?;
    let opts: Vec<&str> = parts.collect();
    let server = option == "-gdb" || opts.iter().any(|o| is_on(o, "server"));
    let telnet = kind == "telnet" || opts.iter().any(|o| is_on(o, "telnet"));
    let listen = match kind {
        "tcp" | "telnet" => Listen::Port(address.rsplit_once(':')?.1.parse().ok()?),
        "unix" if opts.iter().any(|o| is_on(o, "abstract")) => {
            Listen::Abstract(address.to_string())
        }
        _ => return None,
    };
    server.then_some((listen, telnet))
}

impl ListenerHandover {
    pub(super) fn prepare(args: &[String], pid: u32) -> Result<ListenerHandover> {
        let ports = os::tcp_listening_fds(pid);
        let names = os::abstract_listening_fds(pid);
        let (args, vnc, vnc_dir) = vnc(args, pid, &ports)?;
        let mut fds = Vec::new();
        let args = rewrite_servers(&args, &mut |listen| {
            let fd = match listen {
                Listen::Port(port) => ports.iter().find(|(_, a)| a.port() == *port).map(|p| p.0),
                Listen::Abstract(name) => names.iter().find(|(_, n)| n == name).map(|p| p.0),
            };
            let Some(fd) = fd else {
                return Ok(None);
            };
            let copy = os::copy_fd_of(pid, fd).map_err(|source| Error::Os {
                what: "taking a copy of the source's listening socket for the destination",
                source,
            })?;
            let number = FIRST_PASSED_FD + fds.len() as i32;
            fds.push((copy, number));
            Ok(Some(number))
        })?;
        Ok(ListenerHandover {
            args,
            fds,
            vnc,
            _vnc_dir: vnc_dir,
        })
    }
}

/// `args` with every server option whose socket `take` hands over (it
/// returns the descriptor number the destination gets) in its `fd=` form.
fn rewrite_servers(
    args: &[String],
    take: &mut dyn FnMut(&Listen) -> Result<Option<i32>>,
) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        // QEMU takes `--opt` for `-opt`.
        let option = match args[i].strip_prefix('-') {
            Some(o) if o.starts_with('-') => o,
            _ => args[i].as_str(),
        };
        if option == "-s" {
            // gdb's shorthand for -gdb tcp::1234.
            if let Some(n) = take(&Listen::Port(1234))? {
                let id = format!("qemu-migrate-listen{n}");
                out.extend([
                    "-chardev".into(),
                    format!("socket,id={id},fd={n},server=on,wait=off"),
                    "-gdb".into(),
                    format!("chardev:{id}"),
                ]);
                i += 1;
                continue;
            }
        }
        let Some(value) = args.get(i + 1) else {
            out.push(args[i].clone());
            break;
        };
        let short = matches!(
            option,
            "-monitor" | "-qmp" | "-qmp-pretty" | "-serial" | "-gdb"
        )
        .then(|| short_server(option, value))
        .flatten();
        if let Some((listen, telnet)) = short {
            if let Some(n) = take(&listen)? {
                let id = format!("qemu-migrate-listen{n}");
                let telnet = if telnet { ",telnet=on" } else { "" };
                out.extend([
                    "-chardev".into(),
                    format!("socket,id={id},fd={n},server=on,wait=off{telnet}"),
                ]);
                let (opt, val) = match option {
                    "-monitor" => ("-mon", format!("chardev={id},mode=readline")),
                    "-qmp" => ("-mon", format!("chardev={id},mode=control")),
                    "-qmp-pretty" => ("-mon", format!("chardev={id},mode=control,pretty=on")),
                    other => (other, format!("chardev:{id}")),
                };
                out.extend([opt.to_string(), val]);
                i += 2;
                continue;
            }
        }
        if option == "-chardev" {
            if let Some(rewritten) = chardev_by_fd(value, take)? {
                out.extend([args[i].clone(), rewritten]);
                i += 2;
                continue;
            }
        }
        out.push(args[i].clone());
        i += 1;
    }
    Ok(out)
}

/// `socket,…,host=H,port=P,server=on` (or `path=NAME,abstract=on`) as
/// `socket,fd=N,…,server=on`.
fn chardev_by_fd(
    value: &str,
    take: &mut dyn FnMut(&Listen) -> Result<Option<i32>>,
) -> Result<Option<String>> {
    let parts: Vec<&str> = value.split(',').collect();
    if parts.first() != Some(&"socket") && parts.first() != Some(&"backend=socket") {
        return Ok(None);
    }
    if !parts.iter().any(|o| is_on(o, "server")) {
        return Ok(None);
    }
    let port = parts.iter().find_map(|p| p.strip_prefix("port="));
    let path = parts.iter().find_map(|p| p.strip_prefix("path="));
    let listen = match (port.and_then(|p| p.parse().ok()), path) {
        (Some(port), _) => Listen::Port(port),
        (None, Some(path)) if parts.iter().any(|o| is_on(o, "abstract")) => {
            Listen::Abstract(path.to_string())
        }
        _ => return Ok(None),
    };
    let Some(n) = take(&listen)? else {
        return Ok(None);
    };
    let mut kept: Vec<String> = parts
        .iter()
        .filter(|p| {
            let key = p.split_once('=').map_or(**p, |(k, _)| k);
            !matches!(
                key,
                "host"
                    | "port"
                    | "to"
                    | "ipv4"
                    | "ipv6"
                    | "numeric"
                    | "path"
                    | "abstract"
                    | "tight"
            )
        })
        .map(|p| (*p).to_string())
        .collect();
    kept.insert(1, format!("fd={n}"));
    Ok(Some(kept.join(",")))
}

/// The source's console for the destination. A VM on QEMU's stdio
/// (`-serial stdio`, `-nographic`) whose stdio is no terminal, as a launcher
/// runs it (kata's `/dev/null`, a test driver's pipe, a log file), goes on
/// printing to the same place: the destination gets copies of the source's
/// stdin and stdout. A terminal is refused: it belongs to the user's shell.
pub(super) fn console(vm: &crate::vm::Vm) -> Result<Vec<(std::os::fd::OwnedFd, i32)>> {
    if !argv::uses_stdio(vm.args()) {
        return Ok(Vec::new());
    }
    if os::fd_is_terminal(vm.pid(), 0) || os::fd_is_terminal(vm.pid(), 1) {
        return Err(Error::UsesTerminal);
    }
    [0, 1]
        .into_iter()
        .map(|n| {
            os::copy_fd_of(vm.pid(), n)
                .map(|fd| (fd, n))
                .map_err(|source| Error::Os {
                    what: "taking a copy of the source's stdio for the destination",
                    source,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn listening_servers_become_passed_descriptors_and_the_rest_stays() {
        let args = v("-m 64 -monitor telnet:127.0.0.1:4444,server,nowait -qmp tcp:localhost:4445,server=on,wait=off -chardev socket,id=c,host=::1,port=4446,server=on,wait=off,ipv6=on -monitor tcp:10.0.0.1:9,nowait -serial tcp::4447,server -s -qmp tcp:127.0.0.1:4448,server -qmp unix:qm,server=on,wait=off,abstract=on -chardev socket,id=a,path=hm,abstract=on,server=on -monitor unix:/run/m,server,nowait");
        let mut next = 200;
        let out = rewrite_servers(&args, &mut |listen| {
            // 4448 is not this QEMU's: left as written.
            Ok((*listen != Listen::Port(4448)).then(|| {
                next += 1;
                next - 1
            }))
        })
        .unwrap();
        assert_eq!(
            out,
            v("-m 64 -chardev socket,id=qemu-migrate-listen200,fd=200,server=on,wait=off,telnet=on -mon chardev=qemu-migrate-listen200,mode=readline -chardev socket,id=qemu-migrate-listen201,fd=201,server=on,wait=off -mon chardev=qemu-migrate-listen201,mode=control -chardev socket,fd=202,id=c,server=on,wait=off -monitor tcp:10.0.0.1:9,nowait -chardev socket,id=qemu-migrate-listen203,fd=203,server=on,wait=off -serial chardev:qemu-migrate-listen203 -chardev socket,id=qemu-migrate-listen204,fd=204,server=on,wait=off -gdb chardev:qemu-migrate-listen204 -qmp tcp:127.0.0.1:4448,server -chardev socket,id=qemu-migrate-listen205,fd=205,server=on,wait=off -mon chardev=qemu-migrate-listen205,mode=control -chardev socket,fd=206,id=a,server=on -monitor unix:/run/m,server,nowait")
        );
    }
}
