//! The JSON shapes of the REST API (`docs/api.md`), with their OpenAPI schemas, and the
//! conversions from the services' messages.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use volant_services::api::{ipam::v1 as ipam, net::v1 as net, vmm::v1 as vmm};

/// A point in time, written as RFC 3339 (UTC, milliseconds) straight into the JSON.
pub struct Time(std::time::SystemTime);

impl Serialize for Time {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(self.0))
    }
}

/// A service's timestamp, if it has one at or after 1970.
pub fn time(t: Option<prost_types::Timestamp>) -> Option<Time> {
    let t = t?;
    let d = std::time::Duration::new(u64::try_from(t.seconds).ok()?, u32::try_from(t.nanos).ok()?);
    Some(Time(std::time::UNIX_EPOCH + d))
}

fn some(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// A VM.
#[derive(Serialize, ToSchema)]
pub struct Vm {
    /// A DNS label.
    pub name: String,
    /// `creating`, `booting` (its guest not yet ready), `running`, `stopping`, `stopped`,
    /// `failed` (`error` says why) or `deleting`.
    pub status: String,
    /// The plugin it was created from.
    pub plugin: String,
    /// `qemu` or `cloud-hypervisor`.
    pub hypervisor: String,
    /// `bridge` or `vsock`.
    pub network_mode: String,
    /// Its network (bridge mode).
    pub network: Option<String>,
    /// Its address (bridge mode).
    pub ip_address: Option<String>,
    /// Its NIC's MAC (bridge mode).
    pub mac_address: Option<String>,
    /// Its TAP device (bridge mode).
    pub tap_device: Option<String>,
    /// Its vsock context id (vsock mode).
    pub vsock_cid: Option<u32>,
    /// The host end of its vsock (vsock mode).
    pub vsock_socket: Option<String>,
    /// The hypervisor's process id while it runs.
    pub pid: Option<i64>,
    /// vCPUs.
    pub cpu_cores: u32,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// RFC 3339.
    #[schema(value_type = Option<String>)]
    pub created_at: Option<Time>,
    /// RFC 3339.
    #[schema(value_type = Option<String>)]
    pub updated_at: Option<Time>,
    /// Why it failed, or what went wrong last.
    pub error: Option<String>,
    /// In a create's answer only: what else the create did (a bridge made by hand adopted as
    /// the VM's network).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The status as operators spell it.
pub fn status(s: i32) -> String {
    match vmm::VmStatus::try_from(s).unwrap_or(vmm::VmStatus::Unspecified) {
        vmm::VmStatus::Creating => "creating",
        vmm::VmStatus::Booting => "booting",
        vmm::VmStatus::Running => "running",
        vmm::VmStatus::Stopping => "stopping",
        vmm::VmStatus::Stopped => "stopped",
        vmm::VmStatus::Failed => "failed",
        vmm::VmStatus::Deleting => "deleting",
        vmm::VmStatus::Unspecified => "unknown",
    }
    .into()
}

impl From<vmm::Vm> for Vm {
    fn from(v: vmm::Vm) -> Vm {
        Vm {
            status: status(v.status),
            name: v.name,
            plugin: v.plugin,
            hypervisor: v.hypervisor,
            network_mode: v.network_mode,
            network: some(v.network),
            ip_address: some(v.ip_address),
            mac_address: some(v.mac_address),
            tap_device: some(v.tap_device),
            vsock_cid: (v.vsock_cid != 0).then_some(v.vsock_cid),
            vsock_socket: some(v.vsock_socket),
            pid: (v.pid != 0).then_some(v.pid),
            cpu_cores: v.cpu_cores,
            memory_mb: v.memory_mb,
            created_at: time(v.created_at),
            updated_at: time(v.updated_at),
            error: some(v.error),
            notes: Vec::new(),
        }
    }
}

/// `POST /vms`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// A DNS label.
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", max_length = 63)]
    pub name: String,
    /// An installed plugin.
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", max_length = 63)]
    pub plugin: String,
    /// vCPUs [default: the plugin's].
    #[schema(minimum = 1, maximum = 64)]
    pub cpu_cores: Option<u32>,
    /// MiB [default: the plugin's].
    #[schema(minimum = 64, maximum = 65536)]
    pub memory_mb: Option<u32>,
    /// `bridge` (the default network), `bridge=<network>` or `vsock` [default: the plugin's].
    #[schema(pattern = "^(bridge|vsock|bridge=[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)?$")]
    pub network: Option<String>,
    /// A fixed address inside the network's range.
    pub ip: Option<String>,
    /// Appended to the plugin's kernel command line (`volant.*` parameters are refused).
    #[schema(max_length = 512)]
    pub kernel_cmdline: Option<String>,
}

/// An address range.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IpRange {
    /// First address.
    pub start: String,
    /// Last address.
    pub end: String,
}

/// A network: a bridge and its address pool.
#[derive(Serialize, ToSchema)]
pub struct Network {
    /// The bridge's name.
    pub name: String,
    /// CIDR.
    pub subnet: String,
    /// The bridge's address.
    pub gateway: String,
    /// The leasable addresses (absent when the network has no pool).
    pub ip_range: Option<IpRange>,
    /// Masquerade outgoing traffic.
    pub nat: bool,
    /// Addresses in the range.
    pub capacity: Option<u64>,
    /// Addresses leased.
    pub leased: Option<u64>,
    /// The bridge as the kernel has it.
    pub status: Option<NetworkStatus>,
}

/// What the kernel has of a network.
#[derive(Serialize, ToSchema)]
pub struct NetworkStatus {
    /// The bridge exists.
    pub bridge_present: bool,
    /// It is up.
    pub bridge_up: bool,
    /// It carries the gateway address.
    pub address_present: bool,
    /// IPv4 forwarding is on.
    pub forwarding: bool,
    /// The MASQUERADE rule is in place.
    pub nat_rule: bool,
    /// The forward rules are in place.
    pub forward_rules: bool,
    /// Attached ports: name → VM (empty for ports that are not a VM's).
    pub ports: BTreeMap<String, String>,
    /// netd's rules for this network, as `iptables -S` prints them.
    pub rules: Vec<String>,
}

impl Network {
    /// Joins netd's network and ipamd's pool of the same name.
    pub fn join(n: Option<net::Network>, p: Option<ipam::Pool>) -> Option<Network> {
        let name = n
            .as_ref()
            .map(|n| n.name.clone())
            .or_else(|| p.as_ref().map(|p| p.name.clone()))?;
        Some(Network {
            subnet: n
                .as_ref()
                .map(|n| n.subnet.clone())
                .or_else(|| p.as_ref().map(|p| p.subnet.clone()))
                .unwrap_or_default(),
            gateway: n
                .as_ref()
                .map(|n| n.gateway.clone())
                .or_else(|| p.as_ref().map(|p| p.gateway.clone()))
                .unwrap_or_default(),
            ip_range: p.as_ref().map(|p| IpRange {
                start: p.range_start.clone(),
                end: p.range_end.clone(),
            }),
            nat: n.as_ref().is_some_and(|n| n.nat),
            capacity: p.as_ref().map(|p| p.capacity),
            leased: p.as_ref().map(|p| p.leased),
            status: n.and_then(|n| n.status).map(|s| NetworkStatus {
                bridge_present: s.bridge_present,
                bridge_up: s.bridge_up,
                address_present: s.address_present,
                forwarding: s.forwarding,
                nat_rule: s.nat_rule,
                forward_rules: s.forward_rules,
                ports: s.ports.into_iter().map(|p| (p.name, p.vm)).collect(),
                rules: s.rules,
            }),
            name,
        })
    }
}

/// `POST /networks`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNetwork {
    /// The bridge's name (a DNS label of at most 15 characters).
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$", max_length = 15)]
    pub name: String,
    /// CIDR.
    pub subnet: String,
    /// The bridge's address [default: the first address of the subnet].
    pub gateway: Option<String>,
    /// The leasable addresses [default: .100–.254 in a /24 whose gateway lies below .100, as
    /// for the default network; else every address after the gateway].
    pub ip_range: Option<IpRange>,
    /// Masquerade outgoing traffic [default: true].
    pub nat: Option<bool>,
}

/// `PATCH /networks/{name}`: what may change of a network (its subnet and gateway never do).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateNetwork {
    /// Masquerade outgoing traffic.
    pub nat: bool,
}

/// A lease.
#[derive(Serialize, ToSchema)]
pub struct Lease {
    /// The address.
    pub ip: String,
    /// The VM holding it.
    pub vm: String,
    /// Its network.
    pub network: String,
    /// RFC 3339.
    #[schema(value_type = Option<String>)]
    pub leased_at: Option<Time>,
}

impl From<ipam::Lease> for Lease {
    fn from(l: ipam::Lease) -> Lease {
        Lease {
            ip: l.ip,
            vm: l.vm,
            network: l.pool,
            leased_at: time(l.leased_at),
        }
    }
}

/// A port forward of a VM.
#[derive(Serialize, ToSchema)]
pub struct Port {
    /// The host's port.
    pub host_port: u32,
    /// The VM's port.
    pub guest_port: u32,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The VM's address.
    pub vm_ip: String,
    /// The VM.
    pub vm: String,
}

impl Port {
    /// Forward `f` of VM `vm` at `vm_ip`.
    pub fn of(vm: &str, vm_ip: &str, f: &vmm::PortForward) -> Port {
        Port {
            host_port: f.host_port,
            guest_port: f.guest_port,
            protocol: f.protocol.clone(),
            vm_ip: vm_ip.to_string(),
            vm: vm.to_string(),
        }
    }
}

/// `POST /vms/{name}/ports`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddPort {
    /// The host's port.
    #[schema(minimum = 1, maximum = 65535)]
    pub host_port: u32,
    /// The VM's port.
    #[schema(minimum = 1, maximum = 65535)]
    pub guest_port: u32,
    /// `tcp` or `udp` [default: tcp].
    #[schema(pattern = "^(tcp|udp)$")]
    pub protocol: Option<String>,
}

/// A plugin.
#[derive(Serialize, ToSchema)]
pub struct Plugin {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// `bridge` or `vsock`.
    pub network_mode: String,
    /// RFC 3339.
    #[schema(value_type = Option<String>)]
    pub installed_at: Option<Time>,
    /// The manifest.
    #[schema(value_type = Object)]
    pub manifest: serde_json::Value,
}

impl From<vmm::Plugin> for Plugin {
    fn from(p: vmm::Plugin) -> Plugin {
        Plugin {
            manifest: serde_json::from_str(&p.manifest_json).unwrap_or_default(),
            name: p.name,
            version: p.version,
            network_mode: p.network_mode,
            installed_at: time(p.installed_at),
        }
    }
}

/// `GET /health`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok` when every service serves, else `degraded`.
    pub status: String,
    /// Each service: `ok` or why not.
    pub services: BTreeMap<String, String>,
}

/// A VM state change, as `GET /events` sends it.
#[derive(Serialize, ToSchema)]
pub struct Event {
    /// The VM.
    pub name: String,
    /// Its status now (`deleted` once gone).
    pub status: String,
    /// Its status before.
    pub previous: String,
    /// RFC 3339.
    #[schema(value_type = Option<String>)]
    pub at: Option<Time>,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// The VM now (absent once deleted).
    pub vm: Option<Vm>,
}

impl From<vmm::VmEvent> for Event {
    fn from(e: vmm::VmEvent) -> Event {
        Event {
            status: if e.deleted {
                "deleted".into()
            } else {
                status(e.status)
            },
            previous: status(e.previous),
            name: e.name,
            at: time(e.at),
            error: some(e.error),
            vm: e.vm.map(Vm::from),
        }
    }
}

/// A JSON array answer, written into one buffer sized for it up front (a VM is about 500 bytes of
/// JSON), so that long lists are not copied over and over while they grow.
pub struct List<T>(pub Vec<T>);

impl<T: Serialize> axum::response::IntoResponse for List<T> {
    fn into_response(self) -> axum::response::Response {
        let mut buf = Vec::with_capacity(64 + 512 * self.0.len());
        match serde_json::to_writer(&mut buf, &self.0) {
            Ok(()) => (
                [(
                    axum::http::header::CONTENT_TYPE,
                    axum::http::HeaderValue::from_static("application/json"),
                )],
                buf,
            )
                .into_response(),
            Err(e) => crate::error::ApiError::from(tonic::Status::internal(format!(
                "the answer did not serialize: {e}"
            )))
            .into_response(),
        }
    }
}
