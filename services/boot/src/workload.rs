//! The workload file, `/etc/volant/workload.json`: what vmmd writes from a plugin's manifest
//! (and a plugin's image may carry), what kestrel starts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where kestrel reads the workload in the guest.
pub const WORKLOAD_FILE: &str = "/etc/volant/workload.json";

/// What the workload is: the manifest's `workload`, as vmmd passes it on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Program and arguments; the program is an absolute path.
    pub entrypoint: Vec<String>,
    /// Environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The port the workload serves HTTP on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_port: Option<u16>,
}

impl Workload {
    /// Checks what kestrel needs to start it.
    pub fn check(&self) -> Result<(), String> {
        match self.entrypoint.first() {
            None => return Err("workload: entrypoint is empty".into()),
            Some(p) if !p.starts_with('/') => {
                return Err(format!(
                    "workload: entrypoint {p:?} is not an absolute path"
                ));
            }
            _ => {}
        }
        if let Some(dir) = &self.workdir
            && !dir.starts_with('/')
        {
            return Err(format!("workload: workdir {dir:?} is not an absolute path"));
        }
        if let Some(key) = self
            .env
            .keys()
            .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return Err(format!("workload: env name {key:?} is not valid"));
        }
        Ok(())
    }

    /// Parses and checks the workload JSON.
    pub fn from_json(json: &[u8]) -> Result<Workload, String> {
        let w: Workload =
            serde_json::from_slice(json).map_err(|e| format!("workload JSON: {e}"))?;
        w.check()?;
        Ok(w)
    }

    /// The workload JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("strings, maps and numbers serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_round_trips() {
        let w = Workload {
            entrypoint: vec!["/bin/busybox".into(), "httpd".into(), "-f".into()],
            env: BTreeMap::from([("TOKEN".into(), "s3 cr\"et".into())]),
            workdir: Some("/srv".into()),
            http_port: Some(80),
        };
        assert_eq!(Workload::from_json(&w.to_json()).unwrap(), w);
        let bare = Workload {
            entrypoint: vec!["/bin/true".into()],
            ..Workload::default()
        };
        assert_eq!(bare.to_json(), br#"{"entrypoint":["/bin/true"]}"#);
        assert_eq!(Workload::from_json(&bare.to_json()).unwrap(), bare);
    }

    #[test]
    fn bad_workloads_are_refused_with_a_reason() {
        for (json, why) in [
            (r#"{"entrypoint":[]}"#, "entrypoint is empty"),
            (r#"{"entrypoint":["sh"]}"#, "not an absolute path"),
            (r#"{"entrypoint":["/x"],"workdir":"srv"}"#, "workdir"),
            (r#"{"entrypoint":["/x"],"env":{"A=B":"c"}}"#, "env name"),
            (r#"{"entrypoint":["/x"],"colour":1}"#, "unknown field"),
            (r#"{"entrypoint":"/x"}"#, "workload JSON"),
        ] {
            let e = Workload::from_json(json.as_bytes()).unwrap_err();
            assert!(e.contains(why), "{json}: {e}");
        }
    }
}
