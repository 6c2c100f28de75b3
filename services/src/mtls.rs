//! Mutual TLS between the services over TCP (the config's `tls` section): the PEM files are read
//! and checked once at start, then turned into tonic's server and client settings. Both sides
//! present a certificate signed by the shared CA and accept only peers the CA signed; a client
//! also checks that the server's certificate names the host it dials.

use std::path::Path;

use anyhow::{Context as _, bail};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::addr::Addr;
use crate::config;

/// The loaded `tls` section.
#[derive(Clone, Debug)]
pub struct MutualTls {
    ca: Certificate,
    identity: Identity,
}

fn pem(what: &str, path: &Path, marker: &str) -> anyhow::Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("tls.{what}: reading {}", path.display()))?;
    if !String::from_utf8_lossy(&bytes).contains(marker) {
        bail!(
            "tls.{what}: {} holds no PEM block with {marker:?}",
            path.display()
        );
    }
    Ok(bytes)
}

impl MutualTls {
    /// Reads the CA, certificate and key named by the config; a missing file or one that is not
    /// PEM of the right kind is an error that names it.
    pub fn load(c: &config::MutualTls) -> anyhow::Result<MutualTls> {
        let ca = pem("ca", &c.ca, "CERTIFICATE")?;
        let cert = pem("cert", &c.cert, "CERTIFICATE")?;
        let key = pem("key", &c.key, "PRIVATE KEY")?;
        Ok(MutualTls {
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(cert, key),
        })
    }

    /// A server that requires a client certificate signed by the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    /// A client of `addr` that presents this service's certificate and accepts only a server
    /// certificate the CA signed for the host it dials.
    pub fn client(&self, addr: &Addr) -> ClientTlsConfig {
        let host = match addr {
            Addr::Tcp(hostport) => hostport
                .rsplit_once(':')
                .map_or(hostport.as_str(), |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            Addr::Unix(_) => String::new(),
        };
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(host)
    }
}
