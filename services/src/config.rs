//! The shared configuration file, `/etc/volant/volant.yaml`: one section per service, plus the
//! networking block that every service agrees on.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ipnet::IpNet;
use serde::Deserialize;

use crate::addr::Addr;

/// Where the configuration lives unless `--config` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/volant/volant.yaml";

/// The name Volant's networking guide gives the file, beside [`DEFAULT_PATH`]: read when it is
/// the only one of the two.
pub const GUIDE_NAME: &str = "volantd.yaml";

/// The whole file. Every part has a default, so a missing file is a valid configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Directory of the services' sockets (default `/run/volant`).
    pub run_dir: Option<PathBuf>,
    /// The networking block of the seed configuration.
    pub networking: Networking,
    /// ipamd's own section.
    pub ipamd: ServiceConfig,
    /// netd's own section.
    pub netd: NetdConfig,
    /// vmmd's own section.
    pub vmmd: VmmdConfig,
    /// The gateway's own section.
    pub gateway: GatewayConfig,
    /// proxyd's section.
    pub proxyd: ProxydConfig,
    /// Mutual TLS for gRPC between the services over TCP; Unix sockets (mode 0600) never use it.
    pub tls: Option<MutualTls>,
    /// Sections this build does not know; reported as a warning, not an error, so that one file
    /// can serve several versions.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_norway::Value>,
    /// The file read, if any.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `tls`: every service listening on TCP presents `cert` and accepts only clients whose
/// certificate `ca` signed; every service dialling a peer over TCP presents `cert` and accepts
/// only a server certificate that `ca` signed and that names the host it dials.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MutualTls {
    /// The CA bundle (PEM) that signs every service's certificate.
    pub ca: PathBuf,
    /// This service's certificate chain (PEM), valid as server and client.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// The `networking` block.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Networking {
    /// The default bridge network, which is also the default address pool.
    pub bridge: Bridge,
}

/// `networking.bridge`: the default network `volant0`, `192.168.127.0/24`, gateway `.1`,
/// leasable range `.100`–`.254`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Bridge {
    /// Bridge (and pool) name.
    pub name: String,
    /// Subnet in CIDR notation.
    pub subnet: IpNet,
    /// The bridge's own address, the guests' gateway.
    pub gateway: IpAddr,
    /// The leasable addresses; the rest of the subnet is reserved.
    pub ip_range: IpRange,
}

/// An inclusive address range.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IpRange {
    /// First leasable address.
    pub start: IpAddr,
    /// Last leasable address.
    pub end: IpAddr,
}

impl Default for Bridge {
    fn default() -> Self {
        Bridge {
            name: "volant0".into(),
            subnet: "192.168.127.0/24".parse().expect("valid default subnet"),
            gateway: IpAddr::V4(Ipv4Addr::new(192, 168, 127, 1)),
            ip_range: IpRange {
                start: IpAddr::V4(Ipv4Addr::new(192, 168, 127, 100)),
                end: IpAddr::V4(Ipv4Addr::new(192, 168, 127, 254)),
            },
        }
    }
}

/// What every service section may say; flags override it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// The service's state directory.
    pub state_dir: Option<PathBuf>,
    /// The service's listen address (and where peers dial it).
    pub listen: Option<Addr>,
    /// Where to serve Prometheus metrics (`GET /metrics`) [default: not served].
    pub metrics_listen: Option<Addr>,
}

/// netd's section.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetdConfig {
    /// The state directory.
    pub state_dir: Option<PathBuf>,
    /// The listen address.
    pub listen: Option<Addr>,
    /// Where to serve Prometheus metrics (`GET /metrics`) [default: not served].
    pub metrics_listen: Option<Addr>,
    /// On SIGTERM, take out of the kernel everything netd made (TAPs, bridges, rules,
    /// forwarding) and keep only its records, which the next start makes real again: for
    /// containers, whose host changes should last only while they run [default: false, the
    /// network outlives netd's restarts].
    pub withdraw_on_exit: bool,
}

/// vmmd's section: where it lives, and how it runs hypervisors.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmmdConfig {
    /// The state directory.
    pub state_dir: Option<PathBuf>,
    /// The listen address.
    pub listen: Option<Addr>,
    /// Where to serve Prometheus metrics (`GET /metrics`) [default: not served].
    pub metrics_listen: Option<Addr>,
    /// `qemu` or `cloud-hypervisor`; by default (`auto`) Cloud Hypervisor when its binary is
    /// found and boots the VM's kernel on this host (probed once), else QEMU. A plugin's
    /// manifest may ask for one.
    pub hypervisor: Option<String>,
    /// `auto` (default: probe whether KVM can boot a guest), `kvm` or `tcg`.
    pub accel: Option<String>,
    /// Where probe results are remembered [default: <state_dir>/accel.json].
    pub accel_cache: Option<PathBuf>,
    /// The QEMU binary [default: qemu-system-x86_64 from PATH].
    pub qemu_binary: Option<PathBuf>,
    /// The Cloud Hypervisor binary [default: cloud-hypervisor from PATH].
    pub cloud_hypervisor_binary: Option<PathBuf>,
    /// The vsock backend QEMU uses for vsock VMs [default: vhost-device-vsock from PATH, else
    /// ~/.cargo/bin].
    pub vhost_device_vsock_binary: Option<PathBuf>,
    /// Name servers given to guests [default: 1.1.1.1, 8.8.8.8].
    pub dns: Option<Vec<IpAddr>>,
    /// How long a guest has to shut down cleanly before its hypervisor is stopped [default: 10].
    pub stop_timeout_secs: Option<u64>,
    /// How long a booting guest has to say it is ready before the VM is `failed` and its
    /// hypervisor stopped [default: 120].
    pub boot_timeout_secs: Option<u64>,
    /// How often vmmd compares its VMs with the leases, TAPs and routes of the peers and
    /// removes what no VM holds; also soon after a peer was unreachable [default: 30, ≥ 1].
    pub reconcile_interval_secs: Option<u64>,
    /// The cgroup subtree, under vmmd's own cgroup, that holds a cgroup per VM with its CPU,
    /// memory and process limits [default: volant-vms].
    pub cgroup: Option<String>,
    /// Whether VMs run under those limits; `false` runs them unlimited, for hosts where vmmd
    /// cannot create cgroups [default: true].
    pub resource_limits: Option<bool>,
    /// The uids hypervisors run as, one per VM, `FIRST-LAST` [default: 1900000000-1900065535].
    pub hypervisor_uids: Option<String>,
}

/// The gateway's section: where it listens and how it locks its doors.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// The state directory (unused today; accepted like every service's).
    pub state_dir: Option<PathBuf>,
    /// The listen address [default: tcp://127.0.0.1:8080].
    pub listen: Option<Addr>,
    /// Where to serve Prometheus metrics (`GET /metrics`) [default: not served].
    pub metrics_listen: Option<Addr>,
    /// SHA-256 hashes (hex) of the API keys; when any is set, every endpoint but
    /// `/api/v1/health` needs `Authorization: Bearer <key>`.
    pub api_key_hashes: Vec<String>,
    /// TLS with these files (PEM); re-read on SIGHUP.
    pub tls: Option<Tls>,
    /// Requests per second and burst per client address [default: 1000, 2000].
    pub requests_per_second: Option<u32>,
    /// See `requests_per_second`.
    pub burst: Option<u32>,
    /// Serve without API keys on an address other hosts (and the VMs on the bridge) can reach;
    /// refused at start unless written here, and warned of at every start.
    pub allow_unauthenticated: bool,
    /// Connections held from one client address; past it a connection is closed at once
    /// [default: 256].
    pub max_connections_per_client: Option<u32>,
    /// Connections held in all [default: 8192, or half the open-file limit if lower].
    pub max_connections: Option<u32>,
}

/// A certificate chain and its key, PEM files.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// proxyd's section: its two data planes and the egress rules' knobs.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxydConfig {
    /// The state directory (registered routes).
    pub state_dir: Option<PathBuf>,
    /// The gRPC listen address.
    pub listen: Option<Addr>,
    /// Where to serve Prometheus metrics (`GET /metrics`) [default: not served].
    pub metrics_listen: Option<Addr>,
    /// The ingress HTTP listener [default: unix:<run-dir>/proxyd-ingress.sock].
    pub ingress: Option<Addr>,
    /// How egress resolves names: the system's resolver, or a static map
    /// `{ static: { name: address, ... } }`.
    pub resolver: Option<Resolver>,
    /// A PEM bundle of extra CAs trusted (besides the webpki roots) when proxyd originates TLS.
    pub extra_ca: Option<PathBuf>,
    /// Addresses egress must never reach besides the built-in list (the Volant subnets are added
    /// from the networking block), as CIDRs.
    pub deny: Vec<ipnet::IpNet>,
    /// Requests per second and burst when a VM's manifest sets none [default: 50, 100].
    pub requests_per_second: Option<u32>,
    /// See `requests_per_second`.
    pub burst: Option<u32>,
    /// Bytes per second through egress, per VM [default: 12.5 MB/s].
    pub bytes_per_second: Option<u64>,
    /// Concurrent upstream connections per VM, tunnels and forwarded requests alike; taken
    /// before dialling [default: 64]. `max_tunnels` is its former name.
    #[serde(alias = "max_tunnels")]
    pub max_upstreams: Option<u32>,
    /// Concurrent connections from one VM to its egress proxy; past it a connection is
    /// answered 429 and closed [default: 256].
    pub max_connections: Option<u32>,
    /// Seconds an egress connection may sit idle [default: 60].
    pub idle_timeout_secs: Option<u64>,
    /// Seconds an egress connection may live [default: 3600].
    pub total_timeout_secs: Option<u64>,
    /// Largest ingress request body in bytes [default: 1 GiB].
    pub max_body_bytes: Option<u64>,
    /// Seconds an ingress request may take, body included [default: 300].
    pub request_timeout_secs: Option<u64>,
    /// Threads serving the ingress, each with its own connections [default: 1, which serves
    /// tens of thousands of requests a second at the least CPU per request].
    pub ingress_threads: Option<u16>,
}

/// How proxyd resolves names: the system's resolver unless a static map is given.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Resolver {
    /// A fixed map of names to addresses; other names do not resolve.
    #[serde(rename = "static")]
    pub static_hosts: Option<BTreeMap<String, IpAddr>>,
}

impl Config {
    /// Reads the configuration. With no explicit path a missing default file means defaults; an
    /// explicit path that does not exist is an error, since it is most likely a typo.
    /// Without an explicit path, the networking guide's `volantd.yaml` beside the default file
    /// is read when it is the only one; with both, a daemon refuses to start rather than ignore
    /// one.
    pub fn load(explicit: Option<&Path>) -> anyhow::Result<Config> {
        Config::load_from(explicit, Path::new(DEFAULT_PATH))
    }

    fn load_from(explicit: Option<&Path>, default: &Path) -> anyhow::Result<Config> {
        let guide = default.with_file_name(GUIDE_NAME);
        let path = match explicit {
            Some(path) => path.to_path_buf(),
            None => match (default.exists(), guide.exists()) {
                (true, true) => anyhow::bail!(
                    "both {} and {} exist, and Volant reads one: move the settings of {} (the \
                     networking guide's name for the file) into {} and remove it",
                    default.display(),
                    guide.display(),
                    guide.display(),
                    default.display()
                ),
                (false, true) => guide,
                _ => default.to_path_buf(),
            },
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => {
                return Ok(Config::default());
            }
            Err(e) => return Err(e).with_context(|| format!("reading config {}", path.display())),
        };
        let mut config =
            Config::parse(&text).with_context(|| format!("config {}", path.display()))?;
        config.source = Some(path);
        Ok(config)
    }

    /// Parses the text of a configuration file.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let blank = text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
        if blank {
            return Ok(Config::default());
        }
        Ok(serde_norway::from_str(text)?)
    }

    /// The common settings of the service called `name`, if this build knows it.
    pub fn section(&self, name: &str) -> Option<ServiceConfig> {
        match name {
            "ipamd" => Some(self.ipamd.clone()),
            "netd" => Some(ServiceConfig {
                state_dir: self.netd.state_dir.clone(),
                listen: self.netd.listen.clone(),
                metrics_listen: self.netd.metrics_listen.clone(),
            }),
            "gateway" => Some(ServiceConfig {
                state_dir: self.gateway.state_dir.clone(),
                listen: self.gateway.listen.clone(),
                metrics_listen: self.gateway.metrics_listen.clone(),
            }),
            "proxyd" => Some(ServiceConfig {
                state_dir: self.proxyd.state_dir.clone(),
                listen: self.proxyd.listen.clone(),
                metrics_listen: self.proxyd.metrics_listen.clone(),
            }),
            "vmmd" => Some(ServiceConfig {
                state_dir: self.vmmd.state_dir.clone(),
                listen: self.vmmd.listen.clone(),
                metrics_listen: self.vmmd.metrics_listen.clone(),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guides_file_is_read_alone_and_refused_beside_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("volant.yaml");
        let guide = dir.path().join(GUIDE_NAME);
        assert!(Config::load_from(None, &default).unwrap().source.is_none());
        std::fs::write(&guide, "networking:\n  bridge:\n    subnet: 10.1.0.0/24\n").unwrap();
        let c = Config::load_from(None, &default).unwrap();
        assert_eq!(c.source.as_deref(), Some(guide.as_path()));
        assert_eq!(c.networking.bridge.subnet.to_string(), "10.1.0.0/24");
        std::fs::write(&default, "").unwrap();
        let e = format!("{:#}", Config::load_from(None, &default).unwrap_err());
        assert!(
            e.contains("volantd.yaml") && e.contains("volant.yaml"),
            "{e}"
        );
        let explicit = Config::load_from(Some(&default), &default).unwrap();
        assert_eq!(explicit.source.as_deref(), Some(default.as_path()));
    }

    #[test]
    fn accepts_the_seed_block_as_is() {
        let seed = "networking:\n  bridge:\n    name: volant0\n    subnet: 192.168.127.0/24\n    \
                    gateway: 192.168.127.1\n    ip_range: { start: 192.168.127.100, end: 192.168.127.254 }\n";
        let c = Config::parse(seed).unwrap();
        assert_eq!(c.networking.bridge, Bridge::default());
        assert!(c.unknown.is_empty());
    }

    #[test]
    fn empty_and_comment_only_files_are_defaults() {
        for text in ["", "\n\n", "# nothing here\n"] {
            let c = Config::parse(text).unwrap();
            assert_eq!(c.networking.bridge, Bridge::default());
        }
    }

    #[test]
    fn sections_and_unknown_sections() {
        let c = Config::parse(
            "run_dir: /tmp/r\nipamd:\n  state_dir: /tmp/s\n  listen: tcp://127.0.0.1:7000\nfuture: {a: 1}\n",
        )
        .unwrap();
        assert_eq!(c.run_dir.as_deref(), Some(Path::new("/tmp/r")));
        let s = c.section("ipamd").unwrap();
        assert_eq!(s.state_dir.as_deref(), Some(Path::new("/tmp/s")));
        assert_eq!(s.listen, Some(Addr::Tcp("127.0.0.1:7000".into())));
        assert!(c.unknown.contains_key("future"));
    }

    #[test]
    fn the_shipped_sample_parses() {
        let c = Config::parse(include_str!("../../deploy/volant.yaml")).unwrap();
        assert!(c.unknown.is_empty(), "{:?}", c.unknown.keys());
        assert_eq!(c.networking.bridge, Bridge::default());
    }

    #[test]
    fn proxyd_resolver() {
        let c = Config::parse(
            "proxyd:\n  resolver:\n    static:\n      api.example.com: 203.0.113.7\n",
        )
        .unwrap();
        let map = c.proxyd.resolver.unwrap().static_hosts.unwrap();
        assert_eq!(
            map["api.example.com"],
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        assert!(Config::parse("proxyd:\n  resolver:\n    static:\n      a.com: nope\n").is_err());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "networking:\n  bridge:\n    subnet: 10.0.0.0/99\n",
                "subnet",
            ),
            ("networking:\n  bridge:\n    colour: red\n", "colour"),
            ("ipamd:\n  listen: http://x\n", "tcp://HOST:PORT at line 2"),
            ("ipamd:\n  state_dri: /x\n", "state_dri"),
        ];
        for (text, needle) in cases {
            let err = format!("{:#}", Config::parse(text).unwrap_err());
            assert!(err.contains(needle), "{text:?} → {err}");
        }
    }

    #[test]
    fn missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.yaml");
        let err = Config::load(Some(&missing)).unwrap_err();
        assert!(format!("{err:#}").contains("nope.yaml"));
    }
}
