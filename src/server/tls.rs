//! TLS for the gateway's listener (rustls, ring): certificate chain and key from PEM
//! files, ALPN offering h2 and http/1.1.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::{config::TlsFiles, error::StartupError};

pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, StartupError> {
    let failed = |what: &std::path::Path, error: &dyn std::fmt::Display| {
        StartupError::Tls(format!("{}: {error}", what.display()))
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|error| failed(&files.cert, &error))?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|error| failed(&files.key, &error))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| StartupError::Tls(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|error| failed(&files.cert, &error))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
