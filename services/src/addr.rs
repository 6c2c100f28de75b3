//! Listen and dial addresses: `unix:<path>` or `tcp://<host>:<port>`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where a service listens or where a peer is dialled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    /// A Unix domain socket at this path.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

impl FromStr for Addr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if path.is_empty() {
                return Err(format!(
                    "{s:?} names no socket path; write unix:/run/volant/svc.sock"
                ));
            }
            if !path.starts_with('/') {
                return Err(format!("{s:?}: the socket path must be absolute"));
            }
            return Ok(Addr::Unix(PathBuf::from(path)));
        }
        if let Some(hostport) = s.strip_prefix("tcp://") {
            let valid = hostport
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(format!(
                    "{s:?}: expected tcp://HOST:PORT, e.g. tcp://127.0.0.1:8080"
                ));
            }
            return Ok(Addr::Tcp(hostport.to_string()));
        }
        Err(format!(
            "{s:?} is not an address: use unix:/path/to.sock or tcp://HOST:PORT"
        ))
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(hp) => write!(f, "tcp://{hp}"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Addr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        assert_eq!(
            "unix:/run/volant/ipamd.sock".parse::<Addr>().unwrap(),
            Addr::Unix("/run/volant/ipamd.sock".into())
        );
        assert_eq!(
            "unix:///tmp/x.sock".parse::<Addr>().unwrap(),
            Addr::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            "tcp://127.0.0.1:8080".parse::<Addr>().unwrap(),
            Addr::Tcp("127.0.0.1:8080".into())
        );
        assert_eq!(
            "tcp://[::1]:9".parse::<Addr>().unwrap().to_string(),
            "tcp://[::1]:9"
        );
    }

    #[test]
    fn refuses_bad_forms() {
        for bad in [
            "",
            "unix:",
            "unix:relative.sock",
            "tcp://host",
            "tcp://:80",
            "tcp://h:99999",
            "http://x:1",
        ] {
            let err = bad.parse::<Addr>().unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
    }
}
