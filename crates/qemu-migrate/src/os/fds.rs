//! What another process's file descriptors are, read from procfs: the
//! object behind `/proc/PID/fd/N`, the unix and TCP sockets of this host,
//! and which process holds a socket. A VM started by a launcher (libvirt,
//! podman) is given descriptors instead of paths; a restore needs the paths.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// What a process's descriptor refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdTarget {
    /// A file or device by its path (`/dev/net/tun`, a disk image).
    Path(PathBuf),
    /// A socket, by its inode.
    Socket(u64),
    /// A pipe, an anonymous inode (eventfd, memfd...) or anything else
    /// without a name: what the link says.
    Anonymous(String),
}

/// The object behind descriptor `fd` of process `pid`, or `None` when it is
/// not open (or the process cannot be read).
#[must_use]
pub fn fd_target(pid: u32, fd: i32) -> Option<FdTarget> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    let text = link.to_string_lossy();
    if let Some(inode) = text
        .strip_prefix("socket:[")
        .and_then(|r| r.strip_suffix(']'))
    {
        return inode.parse().ok().map(FdTarget::Socket);
    }
    if text.starts_with('/') && !text.ends_with(" (deleted)") {
        return Some(FdTarget::Path(link));
    }
    Some(FdTarget::Anonymous(text.into_owned()))
}

/// A copy of descriptor `fd` of process `pid`: the same open file (the
/// same listening socket, pipe or file offset), as `pidfd_getfd(2)` gives it
/// (Linux 5.6; the caller needs the right to trace `pid`: its own user's
/// process, or root).
///
/// # Errors
/// When the process is gone, the descriptor is not open, or the kernel
/// refuses (too old, or not permitted).
pub fn copy_fd_of(pid: u32, fd: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just opened and is owned by nobody else.
    let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags, and
    // returns a new descriptor (close-on-exec) or -1.
    let copy = unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        )
    };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor of ours.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(copy as i32) })
}

/// The descriptors of process `pid` that are listening TCP sockets, with
/// their addresses.
#[must_use]
pub fn tcp_listening_fds(pid: u32) -> Vec<(i32, SocketAddr)> {
    fds_among(pid, &tcp_listeners())
}

/// The descriptors of process `pid` whose socket is one of `sockets` (by
/// inode), with what `sockets` says of it, in descriptor order.
fn fds_among<T: Clone>(pid: u32, sockets: &BTreeMap<u64, T>) -> Vec<(i32, T)> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out: Vec<(i32, T)> = fds
        .flatten()
        .filter_map(|e| {
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            match fd_target(pid, fd)? {
                FdTarget::Socket(inode) => sockets.get(&inode).map(|a| (fd, a.clone())),
                _ => None,
            }
        })
        .collect();
    out.sort_unstable_by_key(|(fd, _)| *fd);
    out
}

/// The descriptors of process `pid` that are listening abstract unix
/// sockets, with their names (without the `@`).
#[must_use]
pub fn abstract_listening_fds(pid: u32) -> Vec<(i32, String)> {
    let names: BTreeMap<u64, String> = unix_sockets()
        .into_iter()
        .filter(|s| s.listening)
        .filter_map(|s| Some((s.inode, s.name.strip_prefix('@')?.to_string())))
        .collect();
    fds_among(pid, &names)
}

/// Whether descriptor `fd` of process `pid` is a terminal.
#[must_use]
pub fn fd_is_terminal(pid: u32, fd: i32) -> bool {
    matches!(fd_target(pid, fd), Some(FdTarget::Path(p))
        if p.starts_with("/dev/pts") || p.starts_with("/dev/tty") || p == std::path::Path::new("/dev/console"))
}

/// The network interface a tun/tap descriptor is attached to: the kernel's
/// tun driver shows it in fdinfo (`iff:\tNAME`).
#[must_use]
pub fn tap_interface(pid: u32, fd: i32) -> Option<String> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("iff:"))
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
}

/// Whether a tun/tap interface outlives the descriptors open on it
/// (`IFF_PERSIST` in `/sys/class/net/NAME/tun_flags`).
#[must_use]
pub fn tap_is_persistent(name: &str) -> bool {
    const IFF_PERSIST: u32 = 0x0800;
    std::fs::read_to_string(format!("/sys/class/net/{name}/tun_flags"))
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|f| f & IFF_PERSIST != 0)
}

/// A unix socket of this host, as `/proc/net/unix` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocket {
    /// Its inode (what `/proc/PID/fd/N` links to).
    pub inode: u64,
    /// The address it is bound to (a listener, or a connection it accepted):
    /// a path, or `@name` for an abstract one; empty for an unbound socket.
    pub name: String,
    /// Whether it listens.
    pub listening: bool,
}

/// Every unix socket of this network namespace.
#[must_use]
pub fn unix_sockets() -> Vec<UnixSocket> {
    // __SO_ACCEPTCON in the Flags column (net/unix/af_unix.c).
    const ACCEPTCON: u32 = 1 << 16;
    let Ok(text) = std::fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let _num = cols.next()?;
            let _refs = cols.next()?;
            let _proto = cols.next()?;
            let flags = u32::from_str_radix(cols.next()?, 16).ok()?;
            let _type = cols.next()?;
            let _state = cols.next()?;
            let inode = cols.next()?.parse().ok()?;
            let name = cols.collect::<Vec<_>>().join(" ");
            Some(UnixSocket {
                inode,
                name,
                listening: flags & ACCEPTCON != 0,
            })
        })
        .collect()
}

/// Whether process `pid` listens on the unix socket at `path`, read from
/// `/proc` without connecting to it (a connection would be a client the
/// listener has to serve).
#[must_use]
pub fn listens_on(pid: u32, path: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let inodes: Vec<u64> = fds
        .flatten()
        .filter_map(|fd| {
            let link = std::fs::read_link(fd.path()).ok()?;
            let l = link.to_str()?;
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    let cwd = process_cwd(pid).unwrap_or_default();
    let want = std::fs::canonicalize(path).ok();
    unix_sockets()
        .iter()
        .filter(|s| s.listening && inodes.contains(&s.inode) && !s.name.is_empty())
        .any(|s| {
            let bound = cwd.join(&s.name);
            bound == path || std::fs::canonicalize(&bound).ok() == want && want.is_some()
        })
}

/// A listening TCP socket of this host: its inode and address.
#[must_use]
pub fn tcp_listeners() -> BTreeMap<u64, SocketAddr> {
    const LISTEN: &str = "0A";
    let mut out = BTreeMap::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != LISTEN {
                continue;
            }
            if let (Some(addr), Ok(inode)) = (proc_net_addr(cols[1], v6), cols[9].parse()) {
                out.insert(inode, addr);
            }
        }
    }
    out
}

/// The process at the other end of this process's TCP connection from
/// `local` to `peer`: the holder of the socket whose local address is
/// `peer` and whose remote one is `local` (the kernel's tables; an IPv4
/// connection to a dual-stack listener is listed with mapped addresses).
#[must_use]
pub fn tcp_peer_process(local: SocketAddr, peer: SocketAddr) -> Option<u32> {
    let same = |a: SocketAddr, b: SocketAddr| {
        a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
    };
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 {
                continue;
            }
            let (Some(l), Some(r)) = (proc_net_addr(cols[1], v6), proc_net_addr(cols[2], v6))
            else {
                continue;
            };
            if same(l, peer) && same(r, local) {
                let inode: u64 = cols[9].parse().ok()?;
                return socket_holders(&[inode], std::process::id())
                    .into_iter()
                    .next();
            }
        }
    }
    None
}

/// `0100007F:115C` (the kernel's byte order per 32-bit word) as an address.
fn proc_net_addr(text: &str, v6: bool) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).map(u32::from_be))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip = if v6 {
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate().take(4) {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        IpAddr::V4(Ipv4Addr::from(words.first()?.to_be_bytes()))
    };
    Some(SocketAddr::new(ip, port))
}

/// The processes that hold socket `inode` open, other than `except`.
#[must_use]
pub fn socket_holders(inodes: &[u64], except: u32) -> Vec<u32> {
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == except {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|l| wanted.iter().any(|w| l.as_os_str() == w.as_str()))
        });
        if holds {
            out.push(pid);
        }
    }
    out
}

/// A process's working directory.
#[must_use]
pub fn process_cwd(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernels_socket_addresses() {
        assert_eq!(
            proc_net_addr("0100007F:115C", false),
            Some("127.0.0.1:4444".parse().unwrap())
        );
        assert_eq!(
            proc_net_addr("00000000000000000000000001000000:0016", true),
            Some("[::1]:22".parse().unwrap())
        );
    }

    #[test]
    fn finds_a_listening_socket_of_this_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        use std::os::fd::AsRawFd;
        let fd = listener.as_raw_fd();
        let Some(FdTarget::Socket(inode)) = fd_target(std::process::id(), fd) else {
            panic!("not a socket");
        };
        let found = unix_sockets()
            .into_iter()
            .find(|s| s.inode == inode)
            .unwrap();
        assert!(found.listening);
        assert_eq!(found.name, path.to_string_lossy());
    }
}
