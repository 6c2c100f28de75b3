//! Name resolution for egress: the system's resolver, or a static map (so that tests and
//! air-gapped hosts can name their servers honestly).

use std::collections::BTreeMap;
use std::net::IpAddr;

use volant_services::config::Resolver as Config;

/// Turns host names into addresses.
pub enum Resolver {
    /// getaddrinfo, on the blocking pool.
    System,
    /// A fixed map; other names do not resolve.
    Static(BTreeMap<String, IpAddr>),
}

impl Resolver {
    /// From the config; static names are normalised like requests' hosts.
    pub fn from_config(c: Option<&Config>) -> Result<Resolver, String> {
        Ok(match c.and_then(|c| c.static_hosts.as_ref()) {
            None => Resolver::System,
            Some(map) => {
                let mut m = BTreeMap::new();
                for (name, ip) in map {
                    match crate::rules::normalise(name)? {
                        crate::rules::Host::Name(n) => m.insert(n, *ip),
                        crate::rules::Host::Ip(_) => {
                            return Err(format!("resolver: {name:?} is an address, not a name"));
                        }
                    };
                }
                Resolver::Static(m)
            }
        })
    }

    /// Every address of `name` (already normalised).
    pub async fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        let found: Vec<IpAddr> = match self {
            Resolver::Static(m) => m.get(name).copied().into_iter().collect(),
            Resolver::System => tokio::net::lookup_host((name, 0))
                .await
                .map_err(|e| format!("{name} does not resolve: {e}"))?
                .map(|a| a.ip())
                .collect(),
        };
        if found.is_empty() {
            return Err(format!("{name} does not resolve"));
        }
        Ok(found)
    }
}
