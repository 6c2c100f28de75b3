//! Which accelerator QEMU uses: KVM when it can really boot a guest, software emulation (TCG)
//! otherwise; and whether Cloud Hypervisor (KVM only) can boot one at all, for `hypervisor:
//! auto`. `/dev/kvm` existing proves nothing (a nested KVM may run guests so slowly that they
//! never boot, or kill them on the way), so the answer comes from booting the VM's own kernel
//! and initramfs with `volant.probe=1`, which makes kestrel print `kestrel: probe ok` and power
//! off at once. Answers are cached per binary and kernel.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Mutex;

/// How long a guest may take to reach kestrel under KVM before KVM is judged unusable. A working
/// KVM boots it in about a second.
const PROBE_LIMIT: Duration = Duration::from_secs(10);
/// The kernel command line of a probe.
const PROBE_CMDLINE: &str = "console=ttyS0 quiet panic=-1 volant.probe=1";

/// The accelerator choice and its cache.
pub struct Accel {
    forced: Option<String>,
    cache: PathBuf,
    known: Mutex<BTreeMap<String, String>>,
}

fn kvm_openable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

impl Accel {
    /// `forced` is `kvm` or `tcg` from the config (no probing), or `None` for auto; `cache` is
    /// the file that remembers probe results.
    pub fn new(forced: Option<String>, cache: PathBuf) -> Accel {
        let known = std::fs::read(&cache)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Accel {
            forced,
            cache,
            known: Mutex::new(known),
        }
    }

    /// `kvm` or `tcg` for QEMU booting `kernel` with `initramfs`.
    pub async fn choose(&self, qemu: &Path, kernel: &str, initramfs: &str) -> String {
        if let Some(f) = &self.forced {
            return f.clone();
        }
        if !kvm_openable() {
            return "tcg".into();
        }
        let works = self
            .probed(qemu, kernel, || probe(qemu_probe(qemu, kernel, initramfs)))
            .await;
        if works { "kvm" } else { "tcg" }.into()
    }

    /// Whether Cloud Hypervisor at `binary` boots `kernel` with `initramfs` on this host.
    pub async fn cloud_hypervisor_boots(
        &self,
        binary: &Path,
        kernel: &str,
        initramfs: &str,
    ) -> bool {
        kvm_openable()
            && self
                .probed(binary, kernel, || {
                    probe(cloud_hypervisor_probe(binary, kernel, initramfs))
                })
                .await
    }

    /// The remembered answer for `binary` booting `kernel`, else `probe`'s, remembered.
    async fn probed<F: std::future::Future<Output = bool>>(
        &self,
        binary: &Path,
        kernel: &str,
        probe: impl FnOnce() -> F,
    ) -> bool {
        let mtime = std::fs::metadata(kernel)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let key = format!("{}|{kernel}|{mtime}", binary.display());
        let mut known = self.known.lock().await;
        // "kvm": KVM boots guests with this binary; "tcg": it does not, emulation only.
        if let Some(a) = known.get(&key) {
            return a == "kvm";
        }
        let works = probe().await;
        let name = binary.file_name().map(|n| n.to_string_lossy().to_string());
        if works {
            tracing::info!(binary = ?name, "KVM boots guests here: using it");
        } else {
            tracing::warn!(
                binary = ?name,
                "the guest did not boot under KVM within {PROBE_LIMIT:?}: not using KVM with \
                 it (QEMU emulates instead)"
            );
        }
        known.insert(key, if works { "kvm" } else { "tcg" }.into());
        let tmp = self.cache.with_extension("tmp");
        let written = std::fs::write(&tmp, serde_json::to_vec(&*known).expect("JSON"))
            .and_then(|()| std::fs::rename(&tmp, &self.cache));
        if let Err(e) = written {
            tracing::warn!(
                "remembering the accelerator in {}: {e}",
                self.cache.display()
            );
        }
        works
    }
}

/// QEMU under KVM, the serial console on its output.
fn qemu_probe(qemu: &Path, kernel: &str, initramfs: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(qemu);
    c.args([
        "-accel",
        "kvm",
        "-machine",
        "pc",
        "-cpu",
        "host",
        "-m",
        "128M",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-kernel",
        kernel,
        "-initrd",
        initramfs,
        "-append",
        PROBE_CMDLINE,
    ]);
    c
}

/// Cloud Hypervisor without an API socket, the serial console on its output.
fn cloud_hypervisor_probe(binary: &Path, kernel: &str, initramfs: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(binary);
    c.args([
        "--kernel",
        kernel,
        "--initramfs",
        initramfs,
        "--cmdline",
        PROBE_CMDLINE,
    ])
    .args([
        "--cpus",
        "boot=1",
        "--memory",
        "size=128M",
        "--serial",
        "tty",
    ])
    .args(["--console", "off"]);
    c
}

/// Whether the guest `cmd` starts says `kestrel: probe ok` on its output within the limit.
async fn probe(mut cmd: tokio::process::Command) -> bool {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let Some(out) = child.stdout.take() else {
        return false;
    };
    let mut lines = BufReader::new(out).lines();
    let booted = tokio::time::timeout(PROBE_LIMIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("kestrel: probe ok") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    let _ = child.kill().await;
    booted
}
