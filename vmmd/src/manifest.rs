//! Plugin manifests: the JSON of `docs/manifest.md`, parsed strictly and checked, with the failing
//! field's path in every message.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use volant_services::validate::dns_label;

/// How a VM is networked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A TAP on a bridge, an address from the network's pool.
    #[default]
    Bridge,
    /// No network device; the host is reached over vsock.
    Vsock,
}

impl Mode {
    /// `bridge` or `vsock`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Bridge => "bridge",
            Mode::Vsock => "vsock",
        }
    }
}

/// Which hypervisor runs a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hypervisor {
    /// QEMU, with KVM when it works and software emulation otherwise.
    Qemu,
    /// Cloud Hypervisor (needs KVM).
    CloudHypervisor,
}

impl Hypervisor {
    /// `qemu` or `cloud-hypervisor`.
    pub fn as_str(self) -> &'static str {
        match self {
            Hypervisor::Qemu => "qemu",
            Hypervisor::CloudHypervisor => "cloud-hypervisor",
        }
    }
}

/// A plugin manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The plugin's name, a DNS label.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Kernel, initramfs and command line.
    pub boot: Boot,
    /// Default size of its VMs.
    #[serde(default)]
    pub resources: Resources,
    /// Default networking of its VMs.
    #[serde(default)]
    pub networking: Networking,
    /// What runs in the guest.
    pub workload: Workload,
    /// The hypervisor its VMs need, if any in particular.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<Hypervisor>,
}

/// `boot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    /// Path of the kernel (an uncompressed `vmlinux` boots fastest).
    pub kernel: String,
    /// Path of the initramfs, with kestrel as `/init`.
    pub initramfs: String,
    /// Extra kernel command line.
    #[serde(default)]
    pub cmdline: String,
}

/// `resources`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// vCPUs.
    #[serde(default = "one")]
    pub cpu_cores: u32,
    /// Memory in MiB.
    #[serde(default = "default_memory")]
    pub memory_mb: u32,
}

fn one() -> u32 {
    1
}

fn default_memory() -> u32 {
    256
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu_cores: one(),
            memory_mb: default_memory(),
        }
    }
}

/// `networking`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Networking {
    /// `bridge` (default) or `vsock`.
    #[serde(default)]
    pub mode: Mode,
    /// The vsock proxies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<Proxy>,
}

/// `networking.proxy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proxy {
    /// Ingress through the host's proxy.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The guest's vsock port of the ingress listener.
    #[serde(default = "ingress_port")]
    pub port: u16,
    /// Whether the workload may reach the outside through the egress proxy.
    #[serde(default)]
    pub allow_outbound: bool,
    /// Exact names and `*.suffix` patterns the workload may reach.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// The ports it may reach there [default: 80 and 443].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ports: Vec<u16>,
    /// Egress rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

fn yes() -> bool {
    true
}

fn ingress_port() -> u16 {
    8080
}

/// `networking.proxy.rate_limit`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub requests_per_second: u32,
    /// Burst size.
    pub burst: u32,
    /// Bytes per second through the egress proxy, both ways [default: proxyd's].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<u64>,
}

/// `workload`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Program and arguments; the program is an absolute path in the image.
    pub entrypoint: Vec<String>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The workload's HTTP service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Http>,
}

/// `workload.http`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    /// Whether it serves HTTP.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The port.
    pub port: u16,
    /// Where it answers, for documentation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
}

impl Workload {
    /// The HTTP port, if the workload serves HTTP.
    pub fn http_port(&self) -> Option<u16> {
        self.http.as_ref().filter(|h| h.enabled).map(|h| h.port)
    }
}

fn file(path: &str, field: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{field}: {path:?} is not an absolute path"));
    }
    match std::fs::metadata(Path::new(path)) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{field}: {path} is not a file")),
        Err(e) => Err(format!("{field}: {path}: {e}")),
    }
}

fn domain(pattern: &str) -> bool {
    let name = pattern.strip_prefix("*.").unwrap_or(pattern);
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b >= 0x80)
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl Manifest {
    /// Parses a manifest and checks every field; errors start with the field's path.
    pub fn parse(json: &str) -> Result<Manifest, String> {
        if !json.trim_start().starts_with('{') {
            return Err("manifest: expected a JSON object such as {\"name\": …}".into());
        }
        let de = &mut serde_json::Deserializer::from_str(json);
        let m: Manifest = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            if path == "." || path == "?" {
                format!("manifest: {}", e.inner())
            } else {
                format!("{path}: {}", e.inner())
            }
        })?;
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<(), String> {
        dns_label("name", &self.name)?;
        let version_ok = !self.version.is_empty()
            && self.version.len() <= 64
            && self
                .version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b));
        if !version_ok {
            return Err(format!(
                "version: {:?} is not a version such as 1.0.0",
                self.version
            ));
        }
        file(&self.boot.kernel, "boot.kernel")?;
        file(&self.boot.initramfs, "boot.initramfs")?;
        if self.boot.cmdline.len() > 1024 {
            return Err("boot.cmdline: longer than 1024 bytes".into());
        }
        volant_boot::check_user_text(&self.boot.cmdline)
            .map_err(|e| format!("boot.cmdline: {e}"))?;
        if !(1..=64).contains(&self.resources.cpu_cores) {
            return Err(format!(
                "resources.cpu_cores: {} is out of range 1–64",
                self.resources.cpu_cores
            ));
        }
        if !(64..=65536).contains(&self.resources.memory_mb) {
            return Err(format!(
                "resources.memory_mb: {} is out of range 64–65536",
                self.resources.memory_mb
            ));
        }
        if let Some(p) = &self.networking.proxy {
            if p.port == 0 {
                return Err("networking.proxy.port: 0 is not a port".into());
            }
            if let Some(i) = p.allowed_ports.iter().position(|p| *p == 0) {
                return Err(format!(
                    "networking.proxy.allowed_ports[{i}]: 0 is not a port (1–65535)"
                ));
            }
            for (i, d) in p.allowed_domains.iter().enumerate() {
                let ip = d.parse::<std::net::IpAddr>().is_ok();
                if !ip && !domain(d) {
                    return Err(format!(
                        "networking.proxy.allowed_domains[{i}]: {d:?} is neither a host name, \
                         a *.suffix pattern nor an IP address"
                    ));
                }
            }
            if let Some(r) = &p.rate_limit
                && (r.requests_per_second == 0 || r.burst == 0)
            {
                return Err(
                    "networking.proxy.rate_limit: requests_per_second and burst must be at \
                     least 1"
                        .into(),
                );
            }
        }
        match self.workload.entrypoint.first() {
            None => return Err("workload.entrypoint: is empty".into()),
            Some(p) if !p.starts_with('/') => {
                return Err(format!(
                    "workload.entrypoint[0]: {p:?} is not an absolute path"
                ));
            }
            _ => {}
        }
        for key in self.workload.env.keys() {
            let ok = !key.is_empty()
                && !key.as_bytes()[0].is_ascii_digit()
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(format!("workload.env: {key:?} is not a variable name"));
            }
        }
        if let Some(dir) = &self.workload.workdir
            && !dir.starts_with('/')
        {
            return Err(format!("workload.workdir: {dir:?} is not an absolute path"));
        }
        if let Some(h) = &self.workload.http
            && h.port == 0
        {
            return Err("workload.http.port: 0 is not a port".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (tempfile::TempDir, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        let i = dir.path().join("initrd");
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&i, b"i").unwrap();
        (dir, k.display().to_string(), i.display().to_string())
    }

    fn manifest(kernel: &str, initramfs: &str) -> serde_json::Value {
        serde_json::json!({
            "name": "secure-app", "version": "1.0.0",
            "boot": { "kernel": kernel, "initramfs": initramfs, "cmdline": "console=ttyS0" },
            "resources": { "cpu_cores": 1, "memory_mb": 256 },
            "networking": {
                "mode": "vsock",
                "proxy": { "enabled": true, "port": 8080, "allow_outbound": true,
                           "allowed_domains": ["api.example.com", "*.googleapis.com"],
                           "rate_limit": { "requests_per_second": 50, "burst": 100 } }
            },
            "workload": { "entrypoint": ["/usr/bin/myapp"], "env": {},
                          "http": { "enabled": true, "port": 3000, "base_url": "http://localhost:3000" } }
        })
    }

    #[test]
    fn the_interfaces_example_parses() {
        let (_d, k, i) = files();
        let m = Manifest::parse(&manifest(&k, &i).to_string()).unwrap();
        assert_eq!(m.networking.mode, Mode::Vsock);
        assert_eq!(m.workload.http_port(), Some(3000));
        assert_eq!(m.networking.proxy.unwrap().allowed_domains.len(), 2);
    }

    #[test]
    fn errors_carry_the_field_path() {
        let (_d, k, i) = files();
        let set = |path: &[&str], v: serde_json::Value| {
            let mut m = manifest(&k, &i);
            let mut cur = &mut m;
            for p in &path[..path.len() - 1] {
                cur = &mut cur[*p];
            }
            cur[path[path.len() - 1]] = v;
            m.to_string()
        };
        let cases = [
            (
                set(&["name"], "Bad_Name".into()),
                "name \"Bad_Name\" contains",
            ),
            (set(&["version"], "".into()), "version:"),
            (
                set(&["boot", "kernel"], "relative".into()),
                "boot.kernel: \"relative\"",
            ),
            (
                set(&["boot", "kernel"], "/nonexistent/vmlinux".into()),
                "boot.kernel: /nonexistent/vmlinux",
            ),
            (
                set(&["boot", "initramfs"], 5.into()),
                "boot.initramfs: invalid type: integer",
            ),
            (
                set(&["boot", "cmdline"], "volant.ip=1.2.3.4/24".into()),
                "set by vmmd",
            ),
            (
                set(
                    &["boot", "cmdline"],
                    r#"quiet "volant.workload=e30" "volant.ip=1.2.3.4/24""#.into(),
                ),
                "boot.cmdline: \"volant.workload\": volant.* parameters are set by vmmd",
            ),
            (
                set(&["resources", "cpu_cores"], 0.into()),
                "resources.cpu_cores: 0",
            ),
            (
                set(&["resources", "memory_mb"], 16.into()),
                "resources.memory_mb: 16",
            ),
            (
                set(&["resources", "memory_mb"], (-1).into()),
                "resources.memory_mb: invalid value",
            ),
            (
                set(&["networking", "mode"], "tap".into()),
                "networking.mode: unknown variant `tap`",
            ),
            (
                set(
                    &["networking", "proxy", "allowed_domains"],
                    serde_json::json!(["ok.com", "bad domain"]),
                ),
                "allowed_domains[1]",
            ),
            (
                set(&["networking", "proxy", "rate_limit", "burst"], 0.into()),
                "rate_limit",
            ),
            (
                set(
                    &["networking", "proxy", "allowed_ports"],
                    serde_json::json!([443, 0]),
                ),
                "allowed_ports[1]: 0 is not a port",
            ),
            (
                set(
                    &["networking", "proxy", "allowed_ports"],
                    serde_json::json!([443, 70000]),
                ),
                "networking.proxy.allowed_ports[1]: invalid value: integer `70000`",
            ),
            (
                set(&["networking", "proxy", "colour"], "red".into()),
                "networking.proxy.colour: unknown field `colour`, expected one of",
            ),
            (
                set(&["workload", "entrypoint"], serde_json::json!([])),
                "workload.entrypoint: is empty",
            ),
            (
                set(&["workload", "entrypoint"], serde_json::json!(["myapp"])),
                "workload.entrypoint[0]",
            ),
            (
                set(&["workload", "env"], serde_json::json!({"A=B": "1"})),
                "workload.env",
            ),
            (
                set(&["workload", "http", "port"], 0.into()),
                "workload.http.port",
            ),
            (
                set(&["workload", "http", "port"], 70000.into()),
                "workload.http.port: invalid value",
            ),
            (
                set(&["hypervisor"], "firecracker".into()),
                "hypervisor: unknown variant",
            ),
            (set(&["extra"], 1.into()), "unknown field `extra`"),
            ("{".to_string(), "manifest: EOF"),
            ("[]".to_string(), "manifest: expected a JSON object"),
        ];
        for (json, why) in cases {
            let err = Manifest::parse(&json).unwrap_err();
            assert!(err.contains(why), "{why}: got {err}");
        }
        let mut m = manifest(&k, &i);
        m.as_object_mut().unwrap().remove("workload");
        let err = Manifest::parse(&m.to_string()).unwrap_err();
        assert!(err.contains("missing field `workload`"), "{err}");
    }
}
