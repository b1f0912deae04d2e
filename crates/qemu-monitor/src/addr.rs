use std::fmt;
use std::io;
use std::os::unix::net::SocketAddr;
use std::path::PathBuf;

/// Where a monitor listens: a socket file, a Linux abstract socket name, or
/// a TCP port (`-monitor tcp:HOST:PORT,server,nowait`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorAddr {
    /// A unix socket file.
    Path(PathBuf),
    /// An abstract socket, written `@name` as nc and ss do.
    Abstract(String),
    /// A TCP monitor: a host name or address, and a port.
    Tcp {
        /// The host name or address.
        host: String,
        /// The port.
        port: u16,
    },
}

impl MonitorAddr {
    /// Parses `@name` as an abstract socket and anything else as a path.
    pub fn parse(s: &str) -> MonitorAddr {
        match s.strip_prefix('@') {
            Some(name) => MonitorAddr::Abstract(name.to_string()),
            None => MonitorAddr::Path(PathBuf::from(s)),
        }
    }

    /// A TCP monitor's address; `[::1]` may be written with brackets, as in a URL.
    pub fn tcp(host: &str, port: u16) -> MonitorAddr {
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        MonitorAddr::Tcp {
            host: host.to_string(),
            port,
        }
    }

    /// The unix socket address; a TCP address has none.
    pub(crate) fn socket_addr(&self) -> io::Result<SocketAddr> {
        match self {
            MonitorAddr::Path(p) => SocketAddr::from_pathname(p),
            MonitorAddr::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())
            }
            MonitorAddr::Tcp { .. } => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a TCP address is not a unix socket",
            )),
        }
    }
}

impl From<PathBuf> for MonitorAddr {
    fn from(p: PathBuf) -> Self {
        MonitorAddr::Path(p)
    }
}

impl From<&std::path::Path> for MonitorAddr {
    fn from(p: &std::path::Path) -> Self {
        MonitorAddr::Path(p.to_path_buf())
    }
}

impl fmt::Display for MonitorAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MonitorAddr::Path(p) => write!(f, "{}", p.display()),
            MonitorAddr::Abstract(name) => write!(f, "@{name}"),
            MonitorAddr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            MonitorAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl From<&str> for MonitorAddr {
    fn from(s: &str) -> Self {
        MonitorAddr::parse(s)
    }
}

impl From<String> for MonitorAddr {
    fn from(s: String) -> Self {
        MonitorAddr::parse(&s)
    }
}
