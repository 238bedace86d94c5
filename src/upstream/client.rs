//! The HTTP client the gateway talks to upstreams with: hyper-util's pooled
//! keep-alive client over a rustls connector (HTTP/1.1, and HTTP/2 where the upstream
//! offers it by ALPN).
//!
//! Roots are the system's plus webpki's; an upstream's `ca_file` adds its own. No
//! OpenSSL anywhere. This module only builds clients; sending is `pipeline::forward`'s.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};

use crate::error::{BoxError, StartupError};

/// Request bodies sent upstream: buffered JSON or a streamed upload.
pub type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

/// How long an idle pooled connection is kept. Shorter than the usual 60–120 s that
/// provider load balancers allow, so we close first and never write to a dead socket.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// An upstream's pooled clients: one that speaks h2 where the upstream offers it by
/// ALPN, and one held to HTTP/1.1 for protocol upgrades (WebSocket), which h2 cannot
/// carry.
#[derive(Debug)]
pub struct Clients {
    pub any: HttpClient,
    pub http1: HttpClient,
}

/// Builds the pooled clients of one upstream: they connect within `connect_timeout`
/// and trust the system roots, webpki's roots and, if given, the certificates in
/// `ca_file`.
pub fn build(connect_timeout: Duration, ca_file: Option<&Path>) -> Result<Clients, StartupError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(30)));

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| StartupError::Tls(error.to_string()))?
        .with_root_certificates(root_store(ca_file)?)
        .with_no_client_auth();
    let any = HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http.clone());
    let http1 =
        HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().wrap_connector(http);
    let pool = |connector| {
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector)
    };
    Ok(Clients { any: pool(any), http1: pool(http1) })
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
