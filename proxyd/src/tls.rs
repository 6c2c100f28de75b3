//! The TLS client configuration proxyd uses when it originates TLS: the webpki roots plus an
//! optional bundle of extra CAs, full certificate and host name validation.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

/// Builds the client configuration.
pub fn client_config(extra_ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading extra_ca {}", path.display()))?
        {
            let cert = cert.with_context(|| format!("parsing extra_ca {}", path.display()))?;
            roots.add(cert).with_context(|| {
                format!("extra_ca {}: a certificate is not a CA", path.display())
            })?;
            added += 1;
        }
        anyhow::ensure!(
            added > 0,
            "extra_ca {} holds no certificate",
            path.display()
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
