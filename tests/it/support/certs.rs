//! Test certificates: a CA made on the spot that signs a leaf for `localhost` and
//! `127.0.0.1`, written to a temporary directory for configs that take file paths.

use std::{path::PathBuf, sync::Arc};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};

pub struct TestCerts {
    pub ca_pem: String,
    leaf: rustls::pki_types::CertificateDer<'static>,
    ca: rustls::pki_types::CertificateDer<'static>,
    key_der: Vec<u8>,
    dir: tempfile::TempDir,
}

impl TestCerts {
    pub fn generate() -> Self {
        Self::try_generate().unwrap_or_else(|error| panic!("test certificates: {error}"))
    }

    fn try_generate() -> Result<Self, Box<dyn std::error::Error>> {
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.distinguished_name.push(DnType::CommonName, "spillway test CA");
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
        let key = KeyPair::generate()?;
        let leaf =
            CertificateParams::new(["localhost".to_owned(), "127.0.0.1".to_owned()])?.signed_by(&key, &ca)?;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        std::fs::write(dir.path().join("cert.pem"), leaf.pem() + &ca.pem())?;
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem())?;
        Ok(Self {
            ca_pem: ca.pem(),
            leaf: leaf.der().clone(),
            ca: ca.der().clone(),
            key_der: key.serialize_der(),
            dir,
        })
    }

    /// The CA alone, for a client's `ca_file`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The leaf and its CA, for a server's `cert`.
    pub fn cert_file(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    /// A rustls server config for the leaf, offering h2 and http/1.1 by ALPN.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(self.key_der.clone()).into();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|builder| {
                builder.with_no_client_auth().with_single_cert(vec![self.leaf.clone(), self.ca.clone()], key)
            })
            .unwrap_or_else(|error| panic!("test TLS server config: {error}"));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}
