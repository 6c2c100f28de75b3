//! A cgroup per VM, so that no guest can starve the host or its neighbours: its hypervisor and
//! vsock backend join it before they execute, and it caps their CPU time at the VM's
//! `cpu_cores`, their memory at its `memory_mb` plus the hypervisor's own needs, and their
//! processes and threads.
//!
//! VM cgroups live under vmmd's own cgroup, in a subtree named by the config (`vmmd.cgroup`):
//! `<own>/<subtree>/<vm>` in each of the cgroup v1 hierarchies `cpu`, `memory` and `pids`, or in
//! the unified v2 hierarchy. Under v2, where a cgroup with processes cannot hand controllers to
//! its children, vmmd first moves itself into `<own>/supervisor` (systemd's `Delegate=yes`
//! gives it that subtree).

use std::fs::File;
use std::path::{Path, PathBuf};

/// What a VM's hypervisor needs beyond the guest's memory: its own code and heap, TCG's
/// translation cache (capped at 64 MiB), device and I/O buffers, the vsock backend.
pub const OVERHEAD_MB: u64 = 320;
/// Processes and threads of one VM: the hypervisor's vCPU, I/O and worker threads and the
/// vsock backend's, with room; a compromised hypervisor cannot fork-bomb the host.
pub const PIDS_MAX: u32 = 512;
/// The CFS period the CPU quota is counted in.
const PERIOD_US: u64 = 100_000;

/// What a VM may use.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// vCPUs: the CPU time of this many host CPUs at most.
    pub cpus: u32,
    /// Guest memory in MiB.
    pub memory_mb: u32,
}

impl Limits {
    /// The memory limit in bytes.
    pub fn memory_bytes(&self) -> u64 {
        (u64::from(self.memory_mb) + OVERHEAD_MB) << 20
    }

    /// The CPU quota per [`PERIOD_US`].
    pub fn quota_us(&self) -> u64 {
        u64::from(self.cpus.max(1)) * PERIOD_US
    }
}

/// The cgroup hierarchies vmmd places VMs in.
#[derive(Clone, Debug)]
pub enum Cgroups {
    /// cgroup v2: the subtree's directory.
    V2(PathBuf),
    /// cgroup v1: the subtree's directory in the `cpu`, `memory` and `pids` hierarchies.
    V1 {
        /// In the `cpu` hierarchy.
        cpu: PathBuf,
        /// In the `memory` hierarchy.
        memory: PathBuf,
        /// In the `pids` hierarchy.
        pids: PathBuf,
    },
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
}

fn mkdir(path: &Path) -> Result<(), String> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(format!("creating cgroup {}: {e}", path.display()))
        }
        _ => Ok(()),
    }
}

/// vmmd's own cgroup in the hierarchy whose `/proc/self/cgroup` line matches `controller`
/// (`""` for the unified one).
fn own(controller: &str) -> Result<String, String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    text.lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
            list.split(',')
                .any(|c| c == controller)
                .then(|| path.to_string())
        })
        .ok_or_else(|| format!("vmmd is in no {controller:?} cgroup"))
}

impl Cgroups {
    /// Finds (and on v2 prepares) the subtree `name` under vmmd's own cgroups.
    pub fn discover(root: &Path, name: &str) -> Result<Cgroups, String> {
        if root.join("cgroup.controllers").exists() {
            let mut own = root.join(own("")?.trim_start_matches('/'));
            if own.ends_with("supervisor") {
                own.pop();
            }
            let supervisor = own.join("supervisor");
            mkdir(&supervisor)?;
            write(&supervisor.join("cgroup.procs"), "0")?;
            let subtree = own.join(name);
            write(&own.join("cgroup.subtree_control"), "+cpu +memory +pids")?;
            mkdir(&subtree)?;
            write(
                &subtree.join("cgroup.subtree_control"),
                "+cpu +memory +pids",
            )?;
            return Ok(Cgroups::V2(subtree));
        }
        let dir = |c: &str| -> Result<PathBuf, String> {
            let base = root.join(c);
            if !base.join("cgroup.procs").exists() {
                return Err(format!(
                    "no cgroup v1 {c} hierarchy at {} and no cgroup v2 at {}",
                    base.display(),
                    root.display()
                ));
            }
            let dir = base.join(own(c)?.trim_start_matches('/')).join(name);
            mkdir(&dir)?;
            Ok(dir)
        };
        Ok(Cgroups::V1 {
            cpu: dir("cpu")?,
            memory: dir("memory")?,
            pids: dir("pids")?,
        })
    }

    /// The directories of VM `vm`, one per hierarchy.
    pub fn dirs(&self, vm: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V2(subtree) => vec![subtree.join(vm)],
            Cgroups::V1 { cpu, memory, pids } => {
                [cpu, memory, pids].iter().map(|d| d.join(vm)).collect()
            }
        }
    }

    /// Creates VM `vm`'s cgroup with `limits` (or sets them anew) and opens its `cgroup.procs`
    /// files, which the hypervisor writes itself into before it executes.
    pub fn prepare(&self, vm: &str, limits: Limits) -> Result<Vec<File>, String> {
        let dirs = self.dirs(vm);
        for d in &dirs {
            mkdir(d)?;
        }
        let (memory, quota) = (limits.memory_bytes(), limits.quota_us());
        match self {
            Cgroups::V2(_) => {
                let d = &dirs[0];
                write(&d.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
                write(&d.join("memory.max"), &memory.to_string())?;
                write(&d.join("memory.swap.max"), "0").ok();
                write(&d.join("pids.max"), &PIDS_MAX.to_string())?;
            }
            Cgroups::V1 { .. } => {
                write(&dirs[0].join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(&dirs[0].join("cpu.cfs_quota_us"), &quota.to_string())?;
                write(&dirs[1].join("memory.limit_in_bytes"), &memory.to_string())?;
                write(&dirs[2].join("pids.max"), &PIDS_MAX.to_string())?;
            }
        }
        dirs.iter()
            .map(|d| {
                let procs = d.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&procs)
                    .map_err(|e| format!("opening {}: {e}", procs.display()))
            })
            .collect()
    }

    /// Removes VM `vm`'s cgroup, once nothing runs in it. Idempotent.
    pub fn remove(&self, vm: &str) -> Result<(), String> {
        for d in self.dirs(vm) {
            match std::fs::remove_dir(&d) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("removing cgroup {}: {e}", d.display()));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The VMs that have a cgroup.
    pub fn vms(&self) -> Vec<String> {
        let subtree = match self {
            Cgroups::V2(s) => s,
            Cgroups::V1 { memory, .. } => memory,
        };
        std::fs::read_dir(subtree)
            .map(|entries| {
                entries
                    .filter_map(|e| {
                        let e = e.ok()?;
                        e.file_type().ok()?.is_dir().then_some(())?;
                        e.file_name().into_string().ok()
                    })
                    .filter(|n| n != "supervisor")
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Writes the calling process into each of `procs` (open `cgroup.procs` files). Called between
/// fork and exec: one `write` per file, nothing else.
pub fn join(procs: &[std::os::fd::RawFd]) -> std::io::Result<()> {
    for fd in procs {
        // SAFETY: write(2) on a descriptor the caller keeps open, from a static buffer.
        if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Checks a `vmmd.cgroup` name: one path component.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "vmmd.cgroup {name:?} must be one name of letters, digits, '-', '_' and '.' (not \
             first), at most 64"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_request() {
        let l = Limits {
            cpus: 2,
            memory_mb: 256,
        };
        assert_eq!(l.quota_us(), 200_000);
        assert_eq!(l.memory_bytes(), (256 + OVERHEAD_MB) << 20);
    }

    #[test]
    fn names_are_one_component() {
        assert!(check_name("volant-vms").is_ok());
        for bad in ["", "..", ".x", "a/b", "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_cgroup_with_its_limits_is_made_and_removed() {
        let root = Path::new("/sys/fs/cgroup");
        let name = format!("volant-unit-{}", std::process::id());
        let groups = Cgroups::discover(root, &name).expect("a cgroup hierarchy (run as root)");
        let limits = Limits {
            cpus: 1,
            memory_mb: 64,
        };
        let procs = groups.prepare("vm1", limits).unwrap();
        assert_eq!(groups.vms(), ["vm1"]);
        let read = |d: &PathBuf, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
        let dirs = groups.dirs("vm1");
        match &groups {
            Cgroups::V1 { .. } => {
                assert_eq!(read(&dirs[0], "cpu.cfs_quota_us").trim(), "100000");
                assert_eq!(
                    read(&dirs[1], "memory.limit_in_bytes").trim(),
                    limits.memory_bytes().to_string()
                );
                assert_eq!(read(&dirs[2], "pids.max").trim(), "512");
            }
            Cgroups::V2(_) => {
                assert_eq!(read(&dirs[0], "cpu.max").trim(), "100000 100000");
            }
        }
        drop(procs);
        groups.remove("vm1").unwrap();
        groups.remove("vm1").unwrap();
        assert!(groups.vms().is_empty());
        let parents = match &groups {
            Cgroups::V2(s) => vec![s.clone()],
            Cgroups::V1 { cpu, memory, pids } => vec![cpu.clone(), memory.clone(), pids.clone()],
        };
        for p in parents {
            std::fs::remove_dir(&p).unwrap();
        }
    }
}
