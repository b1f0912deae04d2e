//! Where a live migration goes: parsed from `local` or `tcp:HOST:PORT`, and
//! the local destination QEMU started with the source's command line.

use crate::error::{Error, Result};
use crate::vm::{Console, LaunchOptions, Vm};

/// Where the VM goes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Destination {
    /// A new QEMU on this host, same command line, over a private unix socket.
    Local,
    /// A `qemu-migrate receive --listen tcp:HOST:PORT` on another host.
    Tcp {
        /// The receiver's host name or address.
        host: String,
        /// Its port.
        port: u16,
    },
}

impl std::str::FromStr for Destination {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "local" | "unix" => Ok(Destination::Local),
            _ => {
                let (host, port) = parse_tcp(s)?;
                Ok(Destination::Tcp { host, port })
            }
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Local => f.write_str("local"),
            Destination::Tcp { host, port } => write!(f, "{}", tcp_uri(host, *port)),
        }
    }
}

/// `tcp:HOST:PORT` (`tcp:[::1]:PORT` for IPv6) → host and port.
///
/// # Errors
/// [`Error::BadAddress`] for anything else.
pub fn parse_tcp(s: &str) -> Result<(String, u16)> {
    let bad = || Error::BadAddress {
        given: s.to_string(),
        expected: "local, unix or tcp:HOST:PORT",
    };
    let rest = s.strip_prefix("tcp:").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

pub(super) fn tcp_uri(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("tcp:[{host}]:{port}")
    } else {
        format!("tcp:{host}:{port}")
    }
}

/// Starts the local destination (`binary args`), listening on a unix socket
/// in a private directory.
pub(super) fn start_local(
    vm: &Vm,
    binary: &std::path::Path,
    args: &[String],
    passed: Vec<(std::os::fd::OwnedFd, i32)>,
) -> Result<(Vm, crate::os::RunDir, String)> {
    // Locked while this run lives: a dead run's is removed by the next one.
    let dir = crate::os::RunDir::new("live-")?;
    let mut options = LaunchOptions::new(Console::Null, vm.env().clone());
    options.passed = passed
        .into_iter()
        .map(|(fd, n)| (std::sync::Arc::new(fd), n))
        .collect();
    let mut dest = Vm::launch_incoming(binary, args, &options)?;
    let uri = format!("unix:{}", dir.path().join("migrate.sock").display());
    dest.monitor.migrate_incoming(&uri)?;
    Ok((dest, dir, uri))
}

/// The local destination's QEMU and options: the source's, or another
/// (newer) QEMU given the source's versioned machine type, so that it
/// resolves no alias to its own newer version. An older QEMU is refused.
pub(super) fn local_qemu(
    vm: &Vm,
    qemu: Option<&std::path::Path>,
) -> Result<(
    std::path::PathBuf,
    Vec<String>,
    Option<crate::machine::Pinned>,
)> {
    let source = vm.binary().to_path_buf();
    let binary = match qemu {
        // A binary that is not there is said so, with what to do.
        Some(q) => crate::trust::recorded_qemu(None, Some(q))?.0,
        None => source.clone(),
    };
    if binary == source {
        return Ok((binary, vm.args().to_vec(), None));
    }
    let theirs = crate::vm::binary_version(&binary, vm.env())?;
    if theirs < vm.version() {
        return Err(Error::OlderDestination {
            destination: theirs,
            source_version: vm.version(),
        });
    }
    let Some(running) = crate::machine::resolve(&source, vm.env(), vm.args())? else {
        return Ok((binary, vm.args().to_vec(), None));
    };
    // Only a QEMU that would resolve the alias to a later version needs the pin.
    let theirs = crate::machine::resolve(&binary, vm.env(), vm.args())?;
    match crate::machine::pin(vm.args(), &running) {
        Some((args, pinned))
            if theirs
                .as_deref()
                .is_some_and(|t| crate::machine::is_newer(t, &running)) =>
        {
            Ok((binary, args, Some(pinned)))
        }
        _ => Ok((binary, vm.args().to_vec(), None)),
    }
}
