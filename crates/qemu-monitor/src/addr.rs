use std::fmt;
use std::io;
use std::os::unix::net::SocketAddr;
use std::path::PathBuf;

/// Where a monitor listens: a socket file, or a Linux abstract socket name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorAddr {
    Path(PathBuf),
    /// An abstract socket, written `@name` as nc and ss do.
    Abstract(String),
}

impl MonitorAddr {
    /// Parses `@name` as an abstract socket and anything else as a path.
    pub fn parse(s: &str) -> MonitorAddr {
        match s.strip_prefix('@') {
            Some(name) => MonitorAddr::Abstract(name.to_string()),
            None => MonitorAddr::Path(PathBuf::from(s)),
        }
    }

    pub(crate) fn socket_addr(&self) -> io::Result<SocketAddr> {
        match self {
            MonitorAddr::Path(p) => SocketAddr::from_pathname(p),
            MonitorAddr::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())
            }
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
