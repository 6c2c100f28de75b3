//! What vmmd remembers, in sled: plugins and VM records, written before every side effect and
//! made durable (group-committed) before a reply.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::manifest::{Hypervisor, Manifest, Mode};

/// The mark of a store whose VM records hold their port forwards.
pub const FORWARDS_IN_RECORDS: &str = "forwards-in-records";

/// A VM's place in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Being built; nothing is acknowledged yet.
    Creating,
    /// Its hypervisor runs; its guest has not said it is ready yet.
    Booting,
    /// Its guest said it is ready.
    Running,
    /// Being shut down.
    Stopping,
    /// Its hypervisor has stopped; the VM keeps its address and TAP.
    Stopped,
    /// Creating or running it failed; `error` says why.
    Failed,
    /// Being torn down.
    Deleting,
}

impl Status {
    /// Every state, in the order of a VM's life.
    pub const ALL: [Status; 7] = [
        Status::Creating,
        Status::Booting,
        Status::Running,
        Status::Stopping,
        Status::Stopped,
        Status::Failed,
        Status::Deleting,
    ];

    /// Whether its hypervisor runs (or is being stopped).
    pub fn up(self) -> bool {
        matches!(self, Status::Booting | Status::Running | Status::Stopping)
    }

    /// The name operators see.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Booting => "booting",
            Status::Running => "running",
            Status::Stopping => "stopping",
            Status::Stopped => "stopped",
            Status::Failed => "failed",
            Status::Deleting => "deleting",
        }
    }
}

/// A host port forwarded to a VM's port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The host's port.
    pub host_port: u16,
    /// The VM's port.
    pub guest_port: u16,
}

impl PortForward {
    /// A forward from the API's values: ports 1–65535, protocol `tcp` (also when empty) or
    /// `udp`.
    pub fn checked(protocol: &str, host_port: u32, guest_port: u32) -> Result<PortForward, String> {
        let port = |what: &str, p: u32| {
            u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{what} {p} is out of range 1–65535"))
        };
        let protocol = match protocol {
            "" | "tcp" => "tcp",
            "udp" => "udp",
            other => return Err(format!("protocol {other:?} is neither tcp nor udp")),
        };
        Ok(PortForward {
            protocol: protocol.into(),
            host_port: port("host_port", host_port)?,
            guest_port: port("guest_port", guest_port)?,
        })
    }

    /// Whether it uses the same host port as `other`.
    pub fn same_host_port(&self, other: &PortForward) -> bool {
        self.protocol == other.protocol && self.host_port == other.host_port
    }
}

/// An installed plugin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plugin {
    /// Its manifest.
    pub manifest: Manifest,
    /// When it was (last) installed.
    pub installed_at: SystemTime,
}

/// Everything about one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Its name, a DNS label.
    pub name: String,
    /// The plugin it was created from.
    pub plugin: String,
    /// The plugin's manifest as it was at creation.
    pub manifest: Manifest,
    /// Where it is in its life.
    pub status: Status,
    /// What went wrong last; empty when nothing did.
    pub error: String,
    /// Its hypervisor.
    pub hypervisor: Hypervisor,
    /// `kvm` or `tcg`, once launched.
    pub accel: String,
    /// Its networking.
    pub mode: Mode,
    /// Its network (bridge mode).
    pub network: String,
    /// The address asked for, if any.
    pub requested_ip: Option<IpAddr>,
    /// Its address, prefix length and gateway (bridge mode).
    pub ip: Option<IpAddr>,
    /// Prefix length of its network.
    pub prefix_len: u8,
    /// Its gateway.
    pub gateway: Option<IpAddr>,
    /// Its NIC's MAC (bridge mode).
    pub mac: String,
    /// Its TAP (bridge mode).
    pub tap: String,
    /// Its vsock context id (vsock mode), chosen when it is recorded.
    #[serde(default)]
    pub cid: Option<u32>,
    /// The host end of its vsock, `<run-dir>/vms/<vm>/vsock.sock` (vsock mode; a link to it is
    /// `<run-dir>/vsock-<cid>.sock`).
    #[serde(default)]
    pub vsock_socket: String,
    /// The uid (and gid) its hypervisor runs as; given at its first launch.
    #[serde(default)]
    pub uid: Option<u32>,
    /// vCPUs.
    pub cpu_cores: u32,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// What the request added to the kernel command line.
    pub extra_cmdline: String,
    /// The full kernel command line of the last launch.
    pub kernel_cmdline: String,
    /// The hypervisor's process while it runs, and its start time (clock ticks since boot,
    /// from /proc) to tell it from a later process with the same pid.
    pub pid: Option<u32>,
    /// See `pid`.
    pub pid_start: Option<u64>,
    /// When its current boot began (the boot deadline counts from it).
    #[serde(default)]
    pub boot_started: Option<SystemTime>,
    /// The host's boot it was launched under ([`crate::process::host_boot`]).
    #[serde(default)]
    pub host_boot: Option<String>,
    /// Its port forwards (bridge mode), in the order they were added.
    #[serde(default)]
    pub forwards: Vec<PortForward>,
    /// When it was created.
    pub created_at: SystemTime,
    /// When it last changed.
    pub updated_at: SystemTime,
}

/// Paths of a VM's files.
pub struct Paths {
    /// Its directory in the state directory (serial log, hypervisor log).
    pub dir: PathBuf,
    /// The serial console's log.
    pub serial: PathBuf,
    /// The hypervisor's own output.
    pub hypervisor_log: PathBuf,
    /// The initramfs it boots: the plugin's with the workload appended.
    pub initramfs: PathBuf,
    /// The hypervisor's control socket (QMP or Cloud Hypervisor's API).
    pub api_socket: PathBuf,
    /// The lock file Cloud Hypervisor keeps beside its API socket.
    pub api_lock: PathBuf,
    /// The vhost-user socket between QEMU and its vsock backend (vsock mode).
    pub vhost_socket: PathBuf,
    /// The host end of its hybrid vsock (vsock mode).
    pub vsock: PathBuf,
    /// Its directory in the run directory, its hypervisor's own: the sockets above.
    pub jail: PathBuf,
    run_dir: PathBuf,
}

impl Paths {
    /// The paths of VM `name`.
    pub fn of(state_dir: &Path, run_dir: &Path, name: &str) -> Paths {
        let dir = state_dir.join("vms").join(name);
        let jail = run_dir.join("vms").join(name);
        Paths {
            serial: dir.join("serial.log"),
            hypervisor_log: dir.join("hypervisor.log"),
            initramfs: dir.join("initramfs"),
            api_socket: jail.join("api.sock"),
            api_lock: jail.join("api.sock.lock"),
            vhost_socket: jail.join("vhost.sock"),
            vsock: jail.join("vsock.sock"),
            run_dir: run_dir.to_path_buf(),
            jail,
            dir,
        }
    }

    /// The link `<run-dir>/vsock-<cid>.sock` to the host end of the hybrid vsock of context id
    /// `cid`, where operators look for it.
    pub fn vsock_link(&self, cid: u32) -> PathBuf {
        self.run_dir.join(format!("vsock-{cid}.sock"))
    }
}

/// The sled store of plugins and VMs.
pub struct Store {
    db: sled::Db,
}

fn err(e: impl std::fmt::Display) -> String {
    format!("vmmd store: {e}")
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("plain data serializes")
}

impl Store {
    /// Opens (or creates) the store in `dir` (a hypervisor that a killed vmmd was starting
    /// holds a copy of the store's lock from fork until it executes: see
    /// [`volant_services::store::open_sled`]).
    pub fn open(dir: &Path) -> Result<Store, String> {
        let db = volant_services::store::open_sled(&dir.join("vmm.sled"), 8 << 20)?;
        let store = Store { db };
        // A new store has nothing to migrate.
        if store.db.is_empty() {
            store.mark(FORWARDS_IN_RECORDS)?;
        }
        Ok(store)
    }

    fn scan<T: for<'de> Deserialize<'de>>(&self, prefix: &str) -> Result<Vec<T>, String> {
        self.db
            .scan_prefix(prefix)
            .map(|item| {
                let (_, v) = item.map_err(err)?;
                serde_json::from_slice(&v).map_err(err)
            })
            .collect()
    }

    /// Every plugin.
    pub fn plugins(&self) -> Result<Vec<Plugin>, String> {
        self.scan("plugin/")
    }

    /// Every VM.
    pub fn vms(&self) -> Result<Vec<VmRecord>, String> {
        self.scan("vm/")
    }

    /// Writes a plugin; durable after [`Store::flush`].
    pub fn put_plugin(&self, p: &Plugin) -> Result<(), String> {
        self.db
            .insert(format!("plugin/{}", p.manifest.name), json(p))
            .map(drop)
            .map_err(err)
    }

    /// Removes a plugin.
    pub fn delete_plugin(&self, name: &str) -> Result<(), String> {
        self.db
            .remove(format!("plugin/{name}"))
            .map(drop)
            .map_err(err)
    }

    /// Writes a VM record.
    pub fn put_vm(&self, vm: &VmRecord) -> Result<(), String> {
        self.db
            .insert(format!("vm/{}", vm.name), json(vm))
            .map(drop)
            .map_err(err)
    }

    /// Removes a VM record.
    pub fn delete_vm(&self, name: &str) -> Result<(), String> {
        self.db.remove(format!("vm/{name}")).map(drop).map_err(err)
    }

    /// Whether the store carries mark `name` (a one-time step it has been through).
    pub fn marked(&self, name: &str) -> Result<bool, String> {
        self.db.contains_key(format!("mark/{name}")).map_err(err)
    }

    /// Removes mark `name` (a store from before the step, in tests).
    #[cfg(test)]
    pub fn unmark(&self, name: &str) -> Result<(), String> {
        self.db
            .remove(format!("mark/{name}"))
            .map(drop)
            .map_err(err)
    }

    /// Sets mark `name`; durable after [`Store::flush`].
    pub fn mark(&self, name: &str) -> Result<(), String> {
        self.db
            .insert(format!("mark/{name}"), b"1".to_vec())
            .map(drop)
            .map_err(err)
    }

    /// Makes every write durable.
    pub fn flush(&self) -> Result<(), String> {
        self.db.flush().map(drop).map_err(err)
    }
}
