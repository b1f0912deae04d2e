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

    /// A monitor's address as a user writes it, in any of the forms QEMU's
    /// own options use, so that the text after `-monitor`, `-qmp` or in a
    /// `-chardev socket` can be pasted as it is:
    /// - `unix:PATH[,server,nowait…]`, a path, or `@name` (abstract);
    /// - `tcp:HOST:PORT[,…]` and `telnet:HOST:PORT[,…]` (an empty host, as in
    ///   `tcp::4444,server`, is this machine), `[::1]:PORT`, or `HOST:PORT`
    ///   where no such file exists.
    ///
    /// ```
    /// use qemu_monitor::MonitorAddr;
    /// assert_eq!(MonitorAddr::from_option("telnet:localhost:4444,server,nowait"),
    ///            Ok(MonitorAddr::tcp("localhost", 4444)));
    /// assert_eq!(MonitorAddr::from_option("unix:/run/m.sock,server=on,wait=off"),
    ///            Ok(MonitorAddr::parse("/run/m.sock")));
    /// ```
    ///
    /// # Errors
    /// A `tcp:` or `telnet:` address without a port number, in words.
    pub fn from_option(s: &str) -> Result<MonitorAddr, String> {
        if let Some(rest) = s.strip_prefix("unix:") {
            return Ok(MonitorAddr::parse(&first_value(rest)));
        }
        let tcp = s.strip_prefix("tcp:").or_else(|| s.strip_prefix("telnet:"));
        if let Some(rest) = tcp {
            let value = first_value(rest);
            let (host, port) = value
                .rsplit_once(':')
                .ok_or_else(|| format!("{s}: a TCP monitor is written tcp:HOST:PORT"))?;
            let port = port
                .parse()
                .map_err(|_| format!("{s}: port {port:?} is not a number"))?;
            let host = if host.is_empty() { "localhost" } else { host };
            return Ok(MonitorAddr::tcp(host, port));
        }
        if !s.starts_with('@') && !s.contains('/') && !std::path::Path::new(s).exists() {
            if let Some((host, port)) = s.rsplit_once(':') {
                if let Ok(port) = port.parse() {
                    if !host.is_empty() {
                        return Ok(MonitorAddr::tcp(host, port));
                    }
                }
            }
        }
        Ok(MonitorAddr::parse(s))
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

/// The first value of a QEMU option text: up to the first single comma
/// (`,,` is a comma of the value).
fn first_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
            } else {
                break;
            }
        }
        out.push(c);
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_launchers_write_is_read() {
        let ok = |s: &str| MonitorAddr::from_option(s).unwrap();
        assert_eq!(ok("/tmp/qemu-sock"), MonitorAddr::parse("/tmp/qemu-sock"));
        assert_eq!(
            ok("unix:/tmp/a,,b,server,nowait"),
            MonitorAddr::parse("/tmp/a,b")
        );
        assert_eq!(ok("@qemu-mon"), MonitorAddr::Abstract("qemu-mon".into()));
        assert_eq!(
            ok("tcp:127.0.0.1:4444,server,nowait"),
            MonitorAddr::tcp("127.0.0.1", 4444)
        );
        assert_eq!(ok("tcp::4444,server"), MonitorAddr::tcp("localhost", 4444));
        assert_eq!(
            ok("telnet:[::1]:7100,server=on"),
            MonitorAddr::tcp("::1", 7100)
        );
        assert_eq!(ok("localhost:55555"), MonitorAddr::tcp("localhost", 55555));
        assert_eq!(ok("[::1]:55555"), MonitorAddr::tcp("::1", 55555));
        assert_eq!(ok("relative.sock"), MonitorAddr::parse("relative.sock"));
        assert!(MonitorAddr::from_option("tcp:localhost").is_err());
        assert!(MonitorAddr::from_option("tcp:localhost:x").is_err());
    }
}
