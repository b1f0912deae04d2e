//! How a migration over TCP is secured, on both of its channels.
//!
//! - **QEMU's stream** uses QEMU's own TLS: a `tls-creds-psk` or
//!   `tls-creds-x509` object created through each QEMU's monitor (never on a
//!   command line) and named by the `tls-creds` migration parameter. The
//!   pre-shared key reaches QEMU as a `keys.psk` file in a private `0700`
//!   directory, `0600`, removed as soon as the sending QEMU read it and
//!   when the migration ends on the receiving side (or by a watchdog if
//!   the receiver is killed); certificates are read by QEMU from the
//!   user's directory, where they stay.
//! - **Our confirm channel** (who listens, then where the guest is) is
//!   authenticated with an HMAC-SHA256 challenge-response over nonces from
//!   both sides, keyed from the same pre-shared key, and every line the
//!   receiver sends after it carries a MAC over both nonces and its
//!   sequence number: a client without the key learns nothing, and nobody
//!   between the hosts can forge the "the guest runs here" that makes the
//!   source quit (or, worse, a "failed" that makes it resume while the
//!   guest runs on the destination too). It needs no second secret, and
//!   QEMU's TLS already keeps the guest's RAM secret; what the confirm
//!   lines say is not secret, only their origin matters.
//!
//! With x509 certificates the hosts share no secret (each holds its own
//! private key), so the confirm channel itself runs through TLS with the
//! same certificates (rustls, after the hello line): the receiver proves
//! its certificate for the host name in `--to` and verifies the sender's,
//! both against `ca-cert.pem`, as QEMU does for the stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::error::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// How a migration over TCP is secured.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Security {
    /// A pre-shared key both hosts hold: a file with one line, QEMU's own
    /// `keys.psk` form `IDENTITY:HEXKEY`, or the hex key alone (identity
    /// `qemu`); at least 16 bytes, readable by its owner only.
    Psk(PathBuf),
    /// Certificates as libvirt lays them out (`/etc/pki/qemu`):
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem` on the receiver,
    /// `ca-cert.pem`, `client-cert.pem`, `client-key.pem` on the sender.
    X509(PathBuf),
    /// Neither encrypted nor authenticated: guest RAM crosses the network
    /// in clear and anyone who reaches the port can send a VM.
    Insecure,
}

/// A fresh random key in a private directory (removed with it), for a
/// migration whose two ends this process runs, as the roundtrip check does.
///
/// # Errors
/// The directory or file cannot be made.
pub fn one_time_key() -> Result<(tempfile::TempDir, Security)> {
    let dir = tempfile::Builder::new()
        .prefix("qemu-migrate-key.")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .map_err(Error::os("creating a private directory for a key"))?;
    let path = dir.path().join("key");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(Error::file(&path, "writing a key"))?;
    f.write_all(format!("{}\n", encode_hex(&nonce()?)).as_bytes())
        .map_err(Error::file(&path, "writing a key"))?;
    Ok((dir, Security::Psk(path)))
}

/// The line `--insecure` prints on stderr.
pub const INSECURE_WARNING: &str = "qemu-migrate: --insecure: the migration is neither encrypted \
     nor authenticated; guest RAM crosses the network in clear, and anyone who reaches the port \
     can send a VM";

/// Which end of QEMU's TLS session a QEMU is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoint {
    /// The receiving QEMU.
    Server,
    /// The sending QEMU.
    Client,
}

/// The smallest pre-shared key accepted, in bytes.
const MIN_KEY: usize = 16;
/// QEMU's PSK identity when a key file names none (`username` defaults to it).
const DEFAULT_IDENTITY: &str = "qemu";
/// The id of the credentials object in either QEMU.
const CREDS_ID: &str = "qemu-migrate-tls";
/// The HMAC key of `--insecure`: public, so the protocol is one, and proves nothing.
const INSECURE_KEY: &[u8] = b"qemu-migrate insecure: no secret";

/// Loaded credentials: what QEMU gets, and the confirm channel's key.
pub(super) struct Credentials {
    kind: Kind,
    auth: [u8; 32],
}

enum Kind {
    Psk {
        identity: String,
        key: Vec<u8>,
    },
    X509 {
        dir: PathBuf,
        server: Option<Arc<rustls::ServerConfig>>,
        client: Option<Arc<rustls::ClientConfig>>,
    },
    Insecure,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Psk { identity, .. } => format!("psk (identity {identity}, key redacted)"),
            Kind::X509 { dir, .. } => format!("x509 {}", dir.display()),
            Kind::Insecure => "insecure".to_string(),
        };
        f.debug_struct("Credentials").field("kind", &kind).finish()
    }
}

impl Credentials {
    /// Reads and checks the key file or certificate directory.
    ///
    /// # Errors
    /// [`Error::NoSecurity`] when none was chosen; [`Error::BadCredentials`]
    /// for a missing, malformed, short or world-readable key, or a directory
    /// without the files `endpoint` needs.
    pub(super) fn load(security: Option<&Security>, endpoint: Endpoint) -> Result<Credentials> {
        match security.ok_or(Error::NoSecurity)? {
            Security::Psk(path) => {
                let (identity, key) = read_psk(path)?;
                // The identity too: QEMU looks the key up by it, so two
                // files that differ in it are refused here, in words.
                let mut label = b"qemu-migrate confirm channel, psk, identity ".to_vec();
                label.extend_from_slice(identity.as_bytes());
                let auth = derive(&key, &label);
                Ok(Credentials {
                    kind: Kind::Psk { identity, key },
                    auth,
                })
            }
            Security::X509(dir) => {
                let names: &[&str] = match endpoint {
                    Endpoint::Server => &["ca-cert.pem", "server-cert.pem", "server-key.pem"],
                    Endpoint::Client => &["ca-cert.pem", "client-cert.pem", "client-key.pem"],
                };
                for name in names {
                    let file = dir.join(name);
                    if let Err(e) = std::fs::File::open(&file) {
                        return Err(Error::BadCredentials {
                            path: file,
                            reason: format!(
                                "cannot be read ({e}); --tls-x509 names a directory laid out as \
                                 libvirt's /etc/pki/qemu: {}",
                                names.join(", ")
                            ),
                        });
                    }
                }
                let ca = std::fs::read(dir.join("ca-cert.pem")).map_err(Error::file(
                    dir.join("ca-cert.pem"),
                    "reading the CA certificate",
                ))?;
                // Inside the channel's TLS, which is what authenticates it,
                // the lines keep one protocol, keyed from the CA both name.
                let auth = derive(&ca, b"qemu-migrate confirm channel, x509 CA");
                let dir = std::fs::canonicalize(dir)
                    .map_err(Error::file(dir, "resolving the certificate directory"))?;
                let (server, client) = match endpoint {
                    Endpoint::Server => (Some(server_config(&dir)?), None),
                    Endpoint::Client => (None, Some(client_config(&dir)?)),
                };
                Ok(Credentials {
                    kind: Kind::X509 {
                        dir,
                        server,
                        client,
                    },
                    auth,
                })
            }
            Security::Insecure => Ok(Credentials {
                kind: Kind::Insecure,
                auth: derive(INSECURE_KEY, b"qemu-migrate confirm channel, insecure"),
            }),
        }
    }

    /// Whether QEMU's stream is encrypted.
    pub(super) fn is_tls(&self) -> bool {
        !matches!(self.kind, Kind::Insecure)
    }

    /// Creates the credentials in QEMU (pid `qemu_pid`) and sets its
    /// `tls-creds`; a key goes through a private directory, removed at once
    /// for a sending QEMU and with the returned value for a receiving one.
    /// Nothing for `--insecure`.
    ///
    /// # Errors
    /// The private directory cannot be made, or QEMU refuses the object.
    pub(super) fn install(
        &self,
        monitor: &mut qemu_monitor::Monitor,
        endpoint: Endpoint,
        qemu_pid: u32,
    ) -> Result<Option<Installed>> {
        let endpoint_name = match endpoint {
            Endpoint::Server => "server",
            Endpoint::Client => "client",
        };
        let mut props = serde_json::Map::new();
        props.insert("endpoint".into(), endpoint_name.into());
        let (qom_type, dir) = match &self.kind {
            Kind::Insecure => return Ok(None),
            Kind::Psk { identity, key } => {
                let dir = private_key_dir(identity, key, qemu_pid)?;
                props.insert("dir".into(), path_value(dir.path()));
                if endpoint == Endpoint::Client {
                    props.insert("username".into(), identity.as_str().into());
                }
                ("tls-creds-psk", Some(dir))
            }
            Kind::X509 { dir, .. } => {
                props.insert("dir".into(), path_value(dir));
                if endpoint == Endpoint::Server {
                    props.insert("verify-peer".into(), Value::Bool(true));
                }
                ("tls-creds-x509", None)
            }
        };
        // A leftover of an earlier run in this QEMU would make the add fail.
        let _ = monitor.set_migration_text_parameter("tls-creds", "");
        let _ = monitor.object_del(CREDS_ID);
        monitor.object_add(qom_type, CREDS_ID, &props)?;
        if let Err(e) = monitor.set_migration_text_parameter("tls-creds", CREDS_ID) {
            let _ = monitor.object_del(CREDS_ID);
            return Err(e.into());
        }
        // A sending QEMU read its key when the object was made
        // (crypto/tlscredspsk.c); only a receiving one reads it at each
        // handshake, so only its copy lives on.
        let dir = dir.filter(|_| endpoint == Endpoint::Server);
        Ok(Some(Installed { _dir: dir }))
    }

    /// The confirm channel's key.
    pub(super) fn auth_key(&self) -> &[u8; 32] {
        &self.auth
    }

    /// Whether the sender's confirm channel runs through TLS (x509).
    pub(super) fn has_client_tls(&self) -> bool {
        matches!(
            self.kind,
            Kind::X509 {
                client: Some(_),
                ..
            }
        )
    }

    /// The receiver's TLS for its confirm channel (x509 only).
    pub(super) fn server_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        match &self.kind {
            Kind::X509 { server, .. } => server.clone(),
            _ => None,
        }
    }

    /// The sender's end of the confirm channel: TLS to `host` with the
    /// certificates (x509), else the socket as it is.
    ///
    /// # Errors
    /// What failed in the handshake: the receiver's certificate, or ours.
    pub(super) fn client_conn(
        &self,
        tcp: TcpStream,
        host: &str,
        timeout: Duration,
    ) -> std::result::Result<Conn, String> {
        let Kind::X509 {
            client: Some(config),
            ..
        } = &self.kind
        else {
            return Ok(Conn::Plain(tcp));
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host} is not a host name for a certificate ({e})"))?;
        let mut conn =
            rustls::ClientConnection::new(Arc::clone(config), name).map_err(|e| e.to_string())?;
        let mut tcp = tcp;
        tcp.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)
                .map_err(|e| format!("the TLS handshake failed: {e}"))?;
        }
        Ok(Conn::Client(Box::new(rustls::StreamOwned::new(conn, tcp))))
    }
}

/// The crypto the confirm channel's TLS uses: ring, which builds with a
/// C compiler alone (aws-lc needs more). Its lack of post-quantum key
/// exchange is why rustls deprecates it as the default; the channel's
/// lines are not secret, only their origin matters.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem<T>(path: &Path, what: &str, parse: impl Fn(&[u8]) -> Option<T>) -> Result<T> {
    let bytes = std::fs::read(path).map_err(Error::file(path, "reading a certificate file"))?;
    parse(&bytes).ok_or_else(|| Error::BadCredentials {
        path: path.to_path_buf(),
        reason: format!("no {what} in PEM form in it"),
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    read_pem(path, "certificate", |b| {
        let v: Vec<_> = CertificateDer::pem_slice_iter(b)
            .collect::<std::result::Result<_, _>>()
            .ok()?;
        (!v.is_empty()).then_some(v)
    })
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    read_pem(path, "private key", |b| {
        PrivateKeyDer::from_pem_slice(b).ok()
    })
}

fn roots(dir: &Path) -> Result<Arc<rustls::RootCertStore>> {
    let path = dir.join("ca-cert.pem");
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&path)? {
        roots.add(c).map_err(|e| Error::BadCredentials {
            path: path.clone(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

fn bad_config(dir: &Path) -> impl Fn(rustls::Error) -> Error + '_ {
    move |e| Error::BadCredentials {
        path: dir.to_path_buf(),
        reason: format!("the certificates cannot be used: {e}"),
    }
}

fn server_config(dir: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(dir)?, provider())
            .build()
            .map_err(|e| Error::BadCredentials {
                path: dir.join("ca-cert.pem"),
                reason: format!("cannot verify clients with it: {e}"),
            })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(bad_config(dir))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(&dir.join("server-cert.pem"))?,
            private_key(&dir.join("server-key.pem"))?,
        )
        .map_err(bad_config(dir))?;
    // Nothing may follow the handshake but our own lines.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

fn client_config(dir: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(bad_config(dir))?
        .with_root_certificates(roots(dir)?)
        .with_client_auth_cert(
            certs(&dir.join("client-cert.pem"))?,
            private_key(&dir.join("client-key.pem"))?,
        )
        .map_err(bad_config(dir))?;
    Ok(Arc::new(config))
}

/// The receiver's end of a confirm channel that asked for TLS.
pub(super) fn server_conn(
    tcp: TcpStream,
    config: &Arc<rustls::ServerConfig>,
    timeout: Duration,
) -> Option<Conn> {
    let mut conn = rustls::ServerConnection::new(Arc::clone(config)).ok()?;
    let mut tcp = tcp;
    tcp.set_read_timeout(Some(timeout)).ok()?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).ok()?;
    }
    Some(Conn::Server(Box::new(rustls::StreamOwned::new(conn, tcp))))
}

/// A confirm channel's connection: the socket, or TLS over it (x509).
pub(super) enum Conn {
    Plain(TcpStream),
    Client(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    Server(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tls = !matches!(self, Conn::Plain(_));
        f.debug_struct("Conn")
            .field("tcp", self.tcp())
            .field("tls", &tls)
            .finish()
    }
}

impl Conn {
    /// The socket underneath.
    pub(super) fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Client(s) => &s.sock,
            Conn::Server(s) => &s.sock,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Client(s) => s.read(buf),
            Conn::Server(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Client(s) => s.write(buf),
            Conn::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Client(s) => s.flush(),
            Conn::Server(s) => s.flush(),
        }
    }
}

/// Credentials created in a QEMU; [`remove`] takes them out again.
#[derive(Debug)]
pub(super) struct Installed {
    _dir: Option<tempfile::TempDir>,
}

impl Installed {
    /// The private directory holding QEMU's copy of the key, if any.
    pub(super) fn key_dir(&self) -> Option<&Path> {
        self._dir.as_ref().map(tempfile::TempDir::path)
    }
}

/// Unsets `tls-creds` and deletes the credentials object, so that a later
/// save of that QEMU (through a pipe) is not wrapped in TLS.
pub(super) fn remove(monitor: &mut qemu_monitor::Monitor) {
    let _ = monitor.set_migration_text_parameter("tls-creds", "");
    let _ = monitor.object_del(CREDS_ID);
}

fn path_value(p: &Path) -> Value {
    Value::String(p.to_string_lossy().into_owned())
}

/// HMAC-SHA256 of `label` keyed with `secret`: a key for one purpose only.
fn derive(secret: &[u8], label: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(label);
    mac.finalize().into_bytes().into()
}

/// `IDENTITY:HEXKEY` or `HEXKEY`, from a file only its owner can read.
fn read_psk(path: &Path) -> Result<(String, Vec<u8>)> {
    let bad = |reason: String| Error::BadCredentials {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(Error::file(path, "reading the key file"))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(bad(format!(
            "the key file is readable or writable by others (mode {:o}): chmod 600 it",
            meta.permissions().mode() & 0o7777
        )));
    }
    if meta.uid() != crate::os::uid() && meta.uid() != 0 {
        return Err(bad("the key file belongs to another user".into()));
    }
    let text = std::fs::read_to_string(path).map_err(Error::file(path, "reading the key file"))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| bad("the key file is empty; make one with `head -c 32 /dev/urandom | xxd -p -c 64 > FILE`".into()))?;
    let (identity, hex) = match line.rsplit_once(':') {
        Some((id, hex)) => (id.to_string(), hex),
        None => (DEFAULT_IDENTITY.to_string(), line),
    };
    if identity.is_empty() || identity.contains([',', '\n', ' ']) {
        return Err(bad(
            "the identity before ':' must be a plain word (QEMU's keys.psk form IDENTITY:HEXKEY)"
                .into(),
        ));
    }
    let key = decode_hex(hex).ok_or_else(|| {
        bad("the key is not hexadecimal (QEMU's keys.psk form IDENTITY:HEXKEY, or the hex key alone)".into())
    })?;
    if key.len() < MIN_KEY {
        return Err(bad(format!(
            "the key is {} bytes; at least {MIN_KEY} are needed (`head -c 32 /dev/urandom | xxd -p -c 64`)",
            key.len()
        )));
    }
    Ok((identity, key))
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A private directory holding `keys.psk` for QEMU, readable by the user
/// QEMU runs as (a root `qemu-migrate` hands it to that user).
fn private_key_dir(identity: &str, key: &[u8], qemu_pid: u32) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("qemu-migrate-tls.")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .map_err(Error::os("creating a private directory for the key"))?;
    let file = dir.path().join("keys.psk");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&file)
        .map_err(Error::file(&file, "writing the key for QEMU"))?;
    f.write_all(format!("{identity}:{}\n", encode_hex(key)).as_bytes())
        .map_err(Error::file(&file, "writing the key for QEMU"))?;
    let me = crate::os::uid();
    if let Ok(meta) = std::fs::metadata(format!("/proc/{qemu_pid}")) {
        if me == 0 && meta.uid() != 0 {
            for p in [dir.path(), file.as_path()] {
                std::os::unix::fs::chown(p, Some(meta.uid()), Some(meta.gid()))
                    .map_err(Error::file(p, "handing the key to QEMU's user"))?;
            }
        }
    }
    Ok(dir)
}

/// 32 bytes from the kernel's random source.
fn nonce() -> Result<[u8; 32]> {
    let mut n = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .map_err(Error::os("reading /dev/urandom for a nonce"))?;
    Ok(n)
}

fn proof(key: &[u8; 32], role: &[u8], client: &[u8], server: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for part in [role, b"\0", client, server] {
        mac.update(part);
    }
    mac
}

/// The receiver's answer to a hello: its nonce and its proof.
#[derive(Debug, Serialize, Deserialize)]
struct Challenge {
    nonce: String,
    proof: String,
}

/// The client's proof.
#[derive(Debug, Serialize, Deserialize)]
struct Response {
    proof: String,
}

/// A line the receiver sends once both sides proved themselves.
#[derive(Debug, Serialize, Deserialize)]
struct Signed {
    said: String,
    mac: String,
}

/// Both sides' nonces, after the challenge-response; MACs lines.
#[derive(Debug)]
pub(super) struct Session {
    key: [u8; 32],
    client: [u8; 32],
    server: [u8; 32],
    sent: u64,
}

impl Session {
    /// `text` as a line the other side can check came from the receiver.
    pub(super) fn sign(&mut self, text: &str) -> String {
        let mac = self.line_mac(self.sent, text);
        self.sent += 1;
        let line = Signed {
            said: text.to_string(),
            mac: encode_hex(&mac.finalize().into_bytes()),
        };
        format!("{}\n", serde_json::to_string(&line).expect("serialises"))
    }

    /// The text of a signed line, if its MAC is right.
    pub(super) fn open(&mut self, line: &str) -> std::io::Result<String> {
        let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let signed: Signed =
            serde_json::from_str(line).map_err(|e| invalid(&format!("not a signed line: {e}")))?;
        let mac = decode_hex(&signed.mac).ok_or_else(|| invalid("a bad MAC"))?;
        self.line_mac(self.sent, &signed.said)
            .verify_slice(&mac)
            .map_err(|_| invalid("a line whose MAC is wrong (altered on the way?)"))?;
        self.sent += 1;
        Ok(signed.said)
    }

    fn line_mac(&self, seq: u64, text: &str) -> HmacSha256 {
        let mut mac = proof(&self.key, b"receiver line", &self.client, &self.server);
        mac.update(&seq.to_be_bytes());
        mac.update(text.as_bytes());
        mac
    }
}

/// The hello a confirm client opens with: its role, its nonce, and whether
/// TLS follows (x509).
pub(super) fn client_hello(key: &[u8; 32], tls: bool) -> Result<(String, ClientPending)> {
    let client = nonce()?;
    let hello = json!({ "qemu-migrate": "confirm", "nonce": encode_hex(&client), "tls": tls });
    Ok((format!("{hello}\n"), ClientPending { key: *key, client }))
}

/// A client that sent its hello and waits for the receiver's challenge.
#[derive(Debug)]
pub(super) struct ClientPending {
    key: [u8; 32],
    client: [u8; 32],
}

impl ClientPending {
    /// Checks the receiver's proof and sends ours.
    ///
    /// # Errors
    /// A description of what the receiver failed to prove or say.
    pub(super) fn finish(
        self,
        reader: &mut BufReader<Conn>,
        timeout: Duration,
    ) -> std::result::Result<Session, String> {
        reader
            .get_ref()
            .tcp()
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return Err("it closed the connection at the hello".into()),
            Err(e) => return Err(format!("no answer to the hello ({e})")),
            Ok(_) => {}
        }
        let challenge: Challenge = serde_json::from_str(&line)
            .map_err(|_| "it answered the hello with something else".to_string())?;
        let server: [u8; 32] = decode_hex(&challenge.nonce)
            .and_then(|n| n.try_into().ok())
            .ok_or("its nonce is malformed")?;
        let theirs = decode_hex(&challenge.proof).ok_or("its proof is malformed")?;
        proof(&self.key, b"receiver", &self.client, &server)
            .verify_slice(&theirs)
            .map_err(|_| {
                "it could not prove it holds the same key: the key files differ (key or identity), \
                 or it is not the receiver you meant"
                    .to_string()
            })?;
        let ours = proof(&self.key, b"sender", &self.client, &server).finalize();
        let response = Response {
            proof: encode_hex(&ours.into_bytes()),
        };
        let text = format!(
            "{}\n",
            serde_json::to_string(&response).expect("serialises")
        );
        reader
            .get_mut()
            .write_all(text.as_bytes())
            .map_err(|e| format!("sending our proof ({e})"))?;
        Ok(Session {
            key: self.key,
            client: self.client,
            server,
            sent: 0,
        })
    }
}

/// The receiver's side: the hello's nonce is given, the challenge sent,
/// and the client's proof checked; `None` for a client that cannot prove it
/// holds the key (it is dropped without a word).
pub(super) fn server_handshake(
    stream: &mut Conn,
    hello: &Value,
    key: &[u8; 32],
    timeout: Duration,
) -> Option<Session> {
    let client: [u8; 32] = decode_hex(hello.get("nonce")?.as_str()?)?.try_into().ok()?;
    let server = nonce().ok()?;
    let challenge = Challenge {
        nonce: encode_hex(&server),
        proof: encode_hex(
            &proof(key, b"receiver", &client, &server)
                .finalize()
                .into_bytes(),
        ),
    };
    let text = format!("{}\n", serde_json::to_string(&challenge).ok()?);
    stream.write_all(text.as_bytes()).ok()?;
    stream.tcp().set_read_timeout(Some(timeout)).ok()?;
    // Read byte by byte: nothing after the line may be taken from the socket.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 1024 {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
    let response: Response = serde_json::from_slice(&line).ok()?;
    let theirs = decode_hex(&response.proof)?;
    proof(key, b"sender", &client, &server)
        .verify_slice(&theirs)
        .ok()?;
    Some(Session {
        key: *key,
        client,
        server,
        sent: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let p = dir.join("key");
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_key_file_is_qemus_keys_psk_line_or_a_bare_hex_key_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let (id, key) = read_psk(&key_file(dir.path(), &format!("alice:{hex}\n"), 0o600)).unwrap();
        assert_eq!((id.as_str(), key.len()), ("alice", 32));
        let (id, _) = read_psk(&key_file(dir.path(), &format!("{hex}\n"), 0o400)).unwrap();
        assert_eq!(id, "qemu");
        let open = read_psk(&key_file(dir.path(), hex, 0o644)).unwrap_err();
        assert!(open.to_string().contains("chmod 600"), "{open}");
        let short = read_psk(&key_file(dir.path(), "00112233", 0o600)).unwrap_err();
        assert!(short.to_string().contains("at least 16"), "{short}");
        let junk = read_psk(&key_file(dir.path(), "not hex at all", 0o600)).unwrap_err();
        assert!(junk.to_string().contains("not hexadecimal"), "{junk}");
        let empty = read_psk(&key_file(dir.path(), "\n", 0o600)).unwrap_err();
        assert!(empty.to_string().contains("urandom"), "{empty}");
    }

    #[test]
    fn a_signed_line_opens_only_unaltered_in_order_and_under_the_same_key() {
        let session = |key: [u8; 32]| Session {
            key,
            client: [1; 32],
            server: [2; 32],
            sent: 0,
        };
        let mut rx = session([7; 32]);
        let a = rx.sign(r#"{"state":"listening"}"#);
        let b = rx.sign(r#"{"state":"running"}"#);
        let mut tx = session([7; 32]);
        assert_eq!(tx.open(a.trim()).unwrap(), r#"{"state":"listening"}"#);
        assert_eq!(tx.open(b.trim()).unwrap(), r#"{"state":"running"}"#);
        // Replayed out of order, altered, or under another key: refused.
        let mut tx = session([7; 32]);
        assert!(tx.open(b.trim()).is_err());
        let mut tx = session([7; 32]);
        assert!(tx.open(&a.replace("listening", "running")).is_err());
        let mut other = session([8; 32]);
        assert!(other.open(a.trim()).is_err());
    }
}
