//! Accepting connections: plaintext or TLS (rustls), optional mutual TLS, and
//! certificates reloaded from disk without a restart.
//!
//! Every accepted connection becomes a [`Conn`], whose [`ConnInfo`] reaches
//! each request's extensions; the authenticator counts connections per
//! principal through it. TLS handshakes run in their own tasks, bounded by
//! [`HANDSHAKE_TIMEOUT`], so a slow or hostile client cannot hold up others.
//!
//! Reload: a task compares the modification time and size of the certificate,
//! key and client CA files every `reload_interval`; when one changed it builds
//! a new configuration and, if that succeeds, new handshakes use it (open
//! connections keep theirs). A configuration that fails to load is logged and
//! counted (`freshd_tls_reloads{result="error"}`), and the old one stays.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::auth::ConnectionUse;
use crate::metrics::Metrics;

/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The server's certificate chain, PEM.
    pub cert: PathBuf,
    /// The server's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates, PEM, that client certificates must chain to; when
    /// set, every client must present one (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
}

/// A TLS configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {message}")]
pub struct TlsError {
    what: &'static str,
    path: String,
    message: String,
}

fn fail(what: &'static str, path: &Path, message: impl ToString) -> TlsError {
    TlsError {
        what,
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(what, path, e))?;
    if certs.is_empty() {
        return Err(fail(what, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// Builds the rustls server configuration `config` describes.
pub fn load(config: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs("tls_cert", &config.cert)?;
    let key =
        PrivateKeyDer::from_pem_file(&config.key).map_err(|e| fail("tls_key", &config.key, e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| fail("tls_cert", &config.cert, e))?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certs("tls_client_ca", ca)? {
                roots.add(cert).map_err(|e| fail("tls_client_ca", ca, e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| fail("tls_client_ca", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .map_err(|e| fail("tls_cert and tls_key", &config.cert, e))?;
    // gRPC runs over HTTP/2 only.
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(server))
}

/// What identifies a file's content for reload purposes.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The current TLS configuration, swapped on reload.
pub struct Reloadable {
    config: TlsConfig,
    current: RwLock<Arc<rustls::ServerConfig>>,
    stamps: parking_lot::Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl Reloadable {
    /// Loads `config` now; fails if it does not load.
    pub fn new(config: TlsConfig) -> Result<Arc<Self>, TlsError> {
        let current = load(&config)?;
        let stamps = Self::stamps_of(&config);
        Ok(Arc::new(Self {
            config,
            current: RwLock::new(current),
            stamps: parking_lot::Mutex::new(stamps),
        }))
    }

    fn stamps_of(config: &TlsConfig) -> Vec<Option<(SystemTime, u64)>> {
        let mut files = vec![config.cert.as_path(), config.key.as_path()];
        files.extend(config.client_ca.as_deref());
        files.into_iter().map(stamp).collect()
    }

    /// Reloads if a file changed. `Some(result)` when it tried.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let stamps = Self::stamps_of(&self.config);
        {
            let mut known = self.stamps.lock();
            if *known == stamps {
                return None;
            }
            *known = stamps;
        }
        Some(load(&self.config).map(|c| *self.current.write() = c))
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().clone())
    }

    /// Checks the files every `reload_interval`, and when `hangup` changes
    /// (a SIGHUP), forever.
    pub async fn watch(
        self: Arc<Self>,
        metrics: Arc<Metrics>,
        mut hangup: tokio::sync::watch::Receiver<()>,
    ) {
        let mut tick = tokio::time::interval(self.config.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            crate::server::tick_or_hangup(&mut tick, &mut hangup).await;
            let this = self.clone();
            // Reading and parsing files blocks.
            let outcome = tokio::task::spawn_blocking(move || this.reload_if_changed())
                .await
                .ok()
                .flatten();
            match outcome {
                None => {}
                Some(Ok(())) => {
                    metrics.tls_reload("ok");
                    tracing::info!(cert = %self.config.cert.display(), "reloaded the TLS certificates");
                }
                Some(Err(e)) => {
                    metrics.tls_reload("error");
                    tracing::error!(error = %e, "cannot reload the TLS certificates; keeping the previous ones");
                }
            }
        }
    }
}

/// What a request learns of its connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// Quota accounting for the principals using it.
    pub usage: Arc<ConnectionUse>,
}

/// An accepted connection, plain or TLS-terminated.
pub struct Conn {
    io: Io,
    info: ConnInfo,
}

enum Io {
    /// Shared with the connection's state, through which a fan-out writes
    /// a parked stream's notices to the socket itself ([`Conn::socket`]).
    Plain(Arc<TcpStream>),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    /// What requests on this connection learn of it.
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }

    /// A plain connection on `socket`.
    #[cfg(test)]
    pub(crate) fn plain(socket: TcpStream, info: ConnInfo) -> Self {
        Conn {
            io: Io::Plain(Arc::new(socket)),
            info,
        }
    }

    /// The plain TCP socket under the connection, which others than its
    /// reader may write (between whole writes of the reader's own:
    /// `crate::conn` keeps the order); none under TLS, whose records only
    /// the stream's owner may write.
    pub(crate) fn socket(&self) -> Option<Arc<TcpStream>> {
        match &self.io {
            Io::Plain(s) => Some(s.clone()),
            Io::Tls(_) => None,
        }
    }
}

/// Reads what `socket` holds into `buf`. A read that does not fill `buf`
/// took everything there was, so it also clears the read readiness it was
/// made under (as tokio's own `TcpStream` does): the next poll waits for
/// the socket instead of trying a read that would block. Readiness that
/// came after the read is newer and stays.
fn read_clearing(socket: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let len = buf.len();
    let mut got = None;
    let tried = socket.try_io(tokio::io::Interest::READABLE, || {
        let n = socket.try_read(buf)?;
        got = Some(n);
        if n > 0 && n < len {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match (got, tried) {
        (Some(n), _) => Ok(n),
        (None, Err(e)) => Err(e),
        // The closure records every read it makes.
        (None, Ok(())) => Err(io::ErrorKind::WouldBlock.into()),
    }
}

/// A shared socket's reads and writes: wait for readiness, then try; a try
/// that would block clears the readiness, so the next wait registers.
fn retry<T>(
    cx: &mut Context<'_>,
    ready: impl Fn(&mut Context<'_>) -> Poll<io::Result<()>>,
    mut attempt: impl FnMut() -> io::Result<T>,
) -> Poll<io::Result<T>> {
    loop {
        std::task::ready!(ready(cx))?;
        match attempt() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            done => return Poll::Ready(done),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => {
                let read = retry(
                    cx,
                    |cx| s.poll_read_ready(cx),
                    || read_clearing(s, buf.initialize_unfilled()),
                );
                read.map_ok(|n| buf.advance(n))
            }
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => retry(cx, |cx| s.poll_write_ready(cx), || s.try_write(buf)),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => retry(
                cx,
                |cx| s.poll_write_ready(cx),
                || s.try_write_vectored(bufs),
            ),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(_) => true,
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(_) => Poll::Ready(Ok(())),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => {
                Poll::Ready(socket2::SockRef::from(s.as_ref()).shutdown(std::net::Shutdown::Write))
            }
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Turns on TCP keepalive for `socket`: after `idle` without traffic the
/// kernel probes the peer, every third of `idle` (at least 1 s), and closes
/// the connection after 3 probes go unanswered. A client whose host
/// vanished then stops holding its connection and its Watch streams, as
/// Redis's `tcp-keepalive` does for its clients. On Linux the same bound,
/// `idle` plus the probes, also holds for data sent and never acknowledged
/// (`TCP_USER_TIMEOUT`): keepalive probes only go out on an idle
/// connection, and a stream whose notices are in flight to a vanished host
/// would otherwise wait for the kernel's retransmissions to give up (about
/// 15 minutes).
pub(crate) fn set_keepalive(socket: &TcpStream, idle: Duration) -> std::io::Result<()> {
    let params = socket2::TcpKeepalive::new().with_time(idle);
    let socket = socket2::SockRef::from(socket);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let params = {
        let interval = (idle / 3).max(Duration::from_secs(1));
        socket.set_tcp_user_timeout(Some(idle + 3 * interval))?;
        params.with_interval(interval).with_retries(3)
    };
    socket.set_tcp_keepalive(&params)
}

/// The accepted connections of `listener`, TLS-terminated when `tls` is set.
/// Accepting stops, and the listener closes, when the receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<Reloadable>>,
    metrics: Arc<Metrics>,
    keepalive: Option<Duration>,
) -> mpsc::Receiver<Conn> {
    let (tx, rx) = mpsc::channel::<Conn>(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (socket, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: keep serving the
                    // connections we have and try again shortly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Nagle's algorithm would hold small responses back for tens of ms.
            let _ = socket.set_nodelay(true);
            if let Some(idle) = keepalive {
                if let Err(e) = set_keepalive(&socket, idle) {
                    tracing::debug!(error = %e, "TCP keepalive not set");
                }
            }
            let info = ConnInfo {
                remote: Some(remote),
                tls: tls.is_some(),
                usage: Arc::new(ConnectionUse::default()),
            };
            match &tls {
                None => {
                    let conn = Conn {
                        io: Io::Plain(Arc::new(socket)),
                        info,
                    };
                    if tx.send(conn).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let acceptor = tls.acceptor();
                    let tx = tx.clone();
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await
                        {
                            Ok(Ok(stream)) => {
                                let conn = Conn {
                                    io: Io::Tls(Box::new(stream)),
                                    info,
                                };
                                let _ = tx.send(conn).await;
                            }
                            Ok(Err(e)) => {
                                metrics.tls_handshake_failed();
                                tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            }
                            Err(_) => {
                                metrics.tls_handshake_failed();
                                tracing::debug!(%remote, "TLS handshake timed out");
                            }
                        }
                    });
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepted connections carry the kernel's keepalive probes as configured
    /// (after the idle time, every third of it, 3 probes), or none.
    #[tokio::test]
    async fn accepted_connections_get_tcp_keepalive() {
        for keepalive in [Some(Duration::from_secs(60)), None] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let metrics = Arc::new(Metrics::disabled());
            let mut conns = incoming(listener, None, metrics, keepalive);
            let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let conn = conns.recv().await.expect("a connection");
            let socket = conn.socket().expect("a plain TCP socket");
            let socket = socket2::SockRef::from(socket.as_ref());
            assert_eq!(socket.keepalive().unwrap(), keepalive.is_some());
            if keepalive.is_some() {
                assert_eq!(
                    socket.tcp_keepalive_time().unwrap(),
                    Duration::from_secs(60)
                );
                #[cfg(target_os = "linux")]
                {
                    assert_eq!(
                        socket.tcp_keepalive_interval().unwrap(),
                        Duration::from_secs(20)
                    );
                    assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);
                    assert_eq!(
                        socket.tcp_user_timeout().unwrap(),
                        Some(Duration::from_secs(120)),
                        "unacknowledged data is given up after as long"
                    );
                }
            } else {
                #[cfg(target_os = "linux")]
                assert_eq!(socket.tcp_user_timeout().unwrap(), None);
            }
        }
    }
}
