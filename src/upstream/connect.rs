//! Opening a connection to an upstream: its host resolved, TCP connected within
//! `connect_timeout` (no Nagle, keepalive probes), and for `https` a rustls handshake
//! that checks the certificate against the system roots, webpki's and the upstream's
//! `ca_file`, offering HTTP/1.1 by ALPN. No OpenSSL anywhere. Speaking HTTP over the
//! connection is the pool's business.

use std::{
    io,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::error::StartupError;

/// Keepalive probes on upstream connections, so a pooled one that died quietly is
/// found out.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Where one upstream is, and how to reach it.
pub struct Target {
    /// The host as the resolver takes it (an IPv6 address without its brackets).
    host: String,
    port: u16,
    /// For `https`: the TLS client and the name the certificate must have.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("dns error: {0}")]
    Dns(#[source] io::Error),
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[source] io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
}

impl Target {
    /// The target of `base_url` (absolute, `http` or `https`), trusting `ca_file`'s
    /// certificates on top of the system's and webpki's.
    pub fn new(
        base_url: &Uri,
        connect_timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<Self, StartupError> {
        let https = base_url.scheme_str() == Some("https");
        let host = base_url.host().ok_or_else(|| StartupError::Other(format!("{base_url}: no host")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = base_url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = match https {
            false => None,
            true => {
                let name = ServerName::try_from(host.clone())
                    .map_err(|error| StartupError::Tls(format!("{base_url}: {error}")))?;
                Some((TlsConnector::from(client_config(ca_file)?), name))
            }
        };
        Ok(Self { host, port, tls, connect_timeout })
    }

    /// A new connection, within `connect_timeout` in all (resolving included). The
    /// addresses the host resolves to are tried in turn, each given an equal share of
    /// the time left.
    pub async fn connect(&self) -> Result<Stream, ConnectError> {
        let deadline = Instant::now() + self.connect_timeout;
        let timeout = ConnectError::Timeout(self.connect_timeout);
        let resolved =
            tokio::time::timeout_at(deadline, tokio::net::lookup_host((self.host.as_str(), self.port)));
        let addresses: Vec<SocketAddr> = resolved
            .await
            .map_err(|_| ConnectError::Timeout(self.connect_timeout))?
            .map_err(ConnectError::Dns)?
            .collect();
        let mut failed = ConnectError::Dns(io::Error::new(io::ErrorKind::NotFound, "no address"));
        let mut tcp = None;
        for (index, address) in addresses.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let share = left / u32::try_from(addresses.len() - index).unwrap_or(1);
            match tokio::time::timeout(share, TcpStream::connect(address)).await {
                Ok(Ok(stream)) => {
                    tcp = Some(stream);
                    break;
                }
                Ok(Err(error)) => failed = ConnectError::Io(error),
                Err(_) => failed = ConnectError::Timeout(self.connect_timeout),
            }
        }
        let tcp = tcp.ok_or(failed)?;
        tcp.set_nodelay(true).map_err(ConnectError::Io)?;
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive).map_err(ConnectError::Io)?;
        let Some((connector, name)) = &self.tls else { return Ok(Stream::Plain(tcp)) };
        match tokio::time::timeout_at(deadline, connector.connect(name.clone(), tcp)).await {
            Ok(Ok(stream)) => Ok(Stream::Tls(Box::new(stream))),
            Ok(Err(error)) => Err(ConnectError::Tls(error)),
            Err(_) => Err(timeout),
        }
    }
}

/// The rustls client for `https` upstreams: HTTP/1.1 by ALPN, the system roots,
/// webpki's and `ca_file`'s.
fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, StartupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| StartupError::Tls(error.to_string()))?
        .with_root_certificates(root_store(ca_file)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore, StartupError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // Unreadable system certificates are not fatal: webpki's roots still apply.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|error| StartupError::Tls(format!("{}: {error}", path.display())))?;
        if certs.is_empty() {
            return Err(StartupError::Tls(format!("{}: no certificates found", path.display())));
        }
        for cert in certs {
            roots.add(cert).map_err(|error| StartupError::Tls(format!("{}: {error}", path.display())))?;
        }
    }
    Ok(roots)
}

/// An open connection to an upstream, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Plain(_) => "Stream::Plain",
            Self::Tls(_) => "Stream::Tls",
        })
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(stream) => stream.is_write_vectored(),
            Self::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}
