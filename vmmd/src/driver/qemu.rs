//! The QEMU driver: `qemu-system-x86_64` with KVM when it works and software emulation (TCG)
//! otherwise, the `pc` machine, virtio-net on the TAP netd made, serial console to a log file,
//! lifecycle over QMP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::Instrument;

use super::qmp::Qmp;
use super::{Driver, LaunchSpec, Launched, Vsock, clear_socket, spawn, wait_ready};
use crate::process;
use crate::records::Paths;

/// How long QEMU may take to answer on QMP after it starts.
const READY_LIMIT: Duration = Duration::from_secs(20);

/// The QEMU driver.
pub struct Qemu {
    /// The `qemu-system-x86_64` binary.
    pub binary: PathBuf,
    /// The `vhost-device-vsock` binary, the vsock backend of vsock VMs.
    pub vsock_backend: PathBuf,
}

/// How long the vsock backend may take to open its vhost-user socket.
const BACKEND_LIMIT: Duration = Duration::from_secs(5);

impl Qemu {
    /// Starts the VM's vhost-device-vsock (the vhost-user server QEMU connects to) and waits
    /// for its socket.
    async fn start_backend(&self, spec: &LaunchSpec<'_>, v: &Vsock) -> Result<(), String> {
        self.release(spec.paths).await;
        clear_socket(&spec.paths.vhost_socket);
        clear_socket(&v.socket);
        let args = [
            "--guest-cid".to_string(),
            v.cid.to_string(),
            "--socket".into(),
            spec.paths.vhost_socket.display().to_string(),
            "--uds-path".into(),
            v.socket.display().to_string(),
        ];
        let (mut child, _) = spawn(
            &self.vsock_backend,
            &args,
            &spec.paths.hypervisor_log,
            spec.cgroup,
            spec.identity,
        )?;
        let socket = spec.paths.vhost_socket.clone();
        let waited = wait_ready(
            &mut child,
            &spec.paths.hypervisor_log,
            BACKEND_LIMIT,
            || {
                let exists = socket.exists();
                async move {
                    exists
                        .then_some(())
                        .ok_or_else(|| "no vhost-user socket yet".to_string())
                }
            },
        )
        .await;
        // The backend outlives this call; it is found again by its socket argument.
        drop(child);
        waited.map_err(|e| format!("vhost-device-vsock: {e}"))
    }
}

/// QEMU's `-sandbox` setting.
const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// QEMU's arguments for `spec`.
pub fn args(spec: &LaunchSpec<'_>) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("guest={},debug-threads=on", spec.name),
        "-accel".into(),
        // Without a cap TCG's translation cache may grow to 1 GiB per guest; 64 MiB keeps a
        // microVM small at little cost in speed.
        if spec.accel == "tcg" {
            "tcg,tb-size=64".into()
        } else {
            spec.accel.into()
        },
        "-machine".into(),
        // vhost-user needs guest memory the backend can map.
        if spec.vsock.is_some() {
            "pc,memory-backend=mem".into()
        } else {
            "pc".into()
        },
    ];
    if spec.accel == "kvm" {
        a.extend(["-cpu".into(), "host".into()]);
    }
    a.extend([
        "-smp".into(),
        spec.cpus.to_string(),
        "-m".into(),
        format!("{}M", spec.memory_mb),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-no-reboot".into(),
        // QEMU's seccomp filter: no obsolete system calls, no change of identity, no new
        // processes, no changes to scheduling or CPU affinity.
        "-sandbox".into(),
        SANDBOX.into(),
        "-display".into(),
        "none".into(),
        "-monitor".into(),
        "none".into(),
        "-kernel".into(),
        spec.kernel.into(),
        "-initrd".into(),
        spec.initramfs.into(),
        "-append".into(),
        spec.cmdline.into(),
        "-chardev".into(),
        format!(
            "file,id=serial0,path={},append=on",
            spec.paths.serial.display()
        ),
        "-serial".into(),
        "chardev:serial0".into(),
        "-qmp".into(),
        format!(
            "unix:{},server=on,wait=off",
            spec.paths.api_socket.display()
        ),
    ]);
    if spec.vsock.is_some() {
        a.extend([
            "-object".into(),
            format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                spec.memory_mb
            ),
            "-chardev".into(),
            format!(
                "socket,id=vsock0,path={}",
                spec.paths.vhost_socket.display()
            ),
            "-device".into(),
            "vhost-user-vsock-pci,chardev=vsock0".into(),
        ]);
    }
    if let Some(nic) = &spec.nic {
        a.extend([
            "-netdev".into(),
            format!(
                "tap,id=net0,ifname={},script=no,downscript=no,vhost=off",
                nic.tap
            ),
            "-device".into(),
            format!("virtio-net-pci,netdev=net0,mac={}", nic.mac),
        ]);
    }
    a
}

#[tonic::async_trait]
impl Driver for Qemu {
    async fn launch(&self, spec: &LaunchSpec<'_>) -> Result<Launched, String> {
        clear_socket(&spec.paths.api_socket);
        if let Some(v) = &spec.vsock {
            self.start_backend(spec, v)
                .instrument(tracing::info_span!(
                    "vsock.backend",
                    vm = spec.name,
                    cid = v.cid
                ))
                .await?;
        }
        let (mut child, spawned_in) = {
            let _span =
                tracing::info_span!("hypervisor.spawn", vm = spec.name, hypervisor = "qemu")
                    .entered();
            spawn(
                &self.binary,
                &args(spec),
                &spec.paths.hypervisor_log,
                spec.cgroup,
                spec.identity,
            )?
        };
        let api = spec.paths.api_socket.clone();
        let ready = tracing::info_span!("hypervisor.ready", vm = spec.name);
        wait_ready(&mut child, &spec.paths.hypervisor_log, READY_LIMIT, || {
            let api = api.clone();
            async move { Qmp::connect(&api).await.map(drop) }
        })
        .instrument(ready)
        .await?;
        Ok(Launched { child, spawned_in })
    }

    async fn request_shutdown(&self, api: &Path) -> Result<(), String> {
        // The ACPI power button, as Cloud Hypervisor's vm.power-button: kestrel hears it, stops
        // the workload and powers off.
        Qmp::connect(api)
            .await?
            .execute("system_powerdown", None)
            .await
            .map(drop)
    }

    async fn force_stop(&self, api: &Path) -> Result<(), String> {
        let mut qmp = Qmp::connect(api).await?;
        // QEMU may close the socket before it answers: that is success too.
        match qmp.execute("quit", None).await {
            Ok(_) => Ok(()),
            Err(e) if e.contains("closed") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn ping(&self, api: &Path) -> Result<(), String> {
        Qmp::connect(api)
            .await?
            .execute("query-status", None)
            .await
            .map(drop)
    }

    async fn release(&self, paths: &Paths) {
        let needle = paths.vhost_socket.display().to_string();
        let backends = process::blocking(move || process::find_by_arg(&needle)).await;
        for p in &backends {
            p.kill();
        }
        for p in backends {
            p.exited().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::Nic;
    use crate::records::Paths;

    #[test]
    fn arguments_for_a_bridge_vm() {
        let paths = Paths::of(
            Path::new("/var/lib/volant/vmmd"),
            Path::new("/run/volant"),
            "web",
        );
        let spec = LaunchSpec {
            name: "web",
            kernel: "/k",
            initramfs: "/i",
            cmdline: "console=ttyS0 volant.ip=192.168.127.100/24",
            cpus: 2,
            memory_mb: 256,
            nic: Some(Nic {
                tap: "vmtap-web".into(),
                mac: "02:00:00:00:00:01".into(),
            }),
            paths: &paths,
            accel: "tcg",
            cgroup: &[],
            identity: None,
            vsock: None,
        };
        let a = args(&spec).join(" ");
        for want in [
            "-accel tcg,tb-size=64 -machine pc -smp 2 -m 256M",
            "-no-reboot -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,\
             resourcecontrol=deny -display none",
            "-kernel /k -initrd /i -append console=ttyS0 volant.ip=192.168.127.100/24",
            "file,id=serial0,path=/var/lib/volant/vmmd/vms/web/serial.log,append=on",
            "-qmp unix:/run/volant/vms/web/api.sock,server=on,wait=off",
            "tap,id=net0,ifname=vmtap-web,script=no,downscript=no,vhost=off",
            "virtio-net-pci,netdev=net0,mac=02:00:00:00:00:01",
        ] {
            assert!(a.contains(want), "{want} missing from {a}");
        }
        assert!(!a.contains("-cpu host"), "no host CPU under TCG");
        assert!(!a.contains("vsock"), "no vsock device in bridge mode");
    }

    #[test]
    fn arguments_for_a_vsock_vm() {
        let paths = Paths::of(Path::new("/s"), Path::new("/run/volant"), "safe");
        let spec = LaunchSpec {
            name: "safe",
            kernel: "/k",
            initramfs: "/i",
            cmdline: "console=ttyS0 volant.mode=vsock",
            cpus: 1,
            memory_mb: 256,
            nic: None,
            vsock: Some(Vsock {
                cid: 3,
                socket: "/run/volant/vsock-3.sock".into(),
            }),
            paths: &paths,
            accel: "tcg",
            cgroup: &[],
            identity: None,
        };
        let a = args(&spec).join(" ");
        for want in [
            "-machine pc,memory-backend=mem",
            "-object memory-backend-memfd,id=mem,size=256M,share=on",
            "-chardev socket,id=vsock0,path=/run/volant/vms/safe/vhost.sock",
            "-device vhost-user-vsock-pci,chardev=vsock0",
        ] {
            assert!(a.contains(want), "{want} missing from {a}");
        }
        assert!(!a.contains("-netdev"), "no network device in vsock mode");
    }
}
