//! Which accelerator QEMU uses: KVM when it can really boot a guest, software emulation (TCG)
//! otherwise. `/dev/kvm` existing proves nothing (a nested KVM may run guests so slowly that
//! they never boot), so the answer comes from booting the VM's own kernel and initramfs under
//! KVM with `volant.probe=1`, which makes kestrel print `kestrel: probe ok` and power off at
//! once. The answer is cached per QEMU binary and kernel.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Mutex;

/// How long a guest may take to reach kestrel under KVM before KVM is judged unusable. A working
/// KVM boots it in about a second.
const PROBE_LIMIT: Duration = Duration::from_secs(10);

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
        let mtime = std::fs::metadata(kernel)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let key = format!("{}|{kernel}|{mtime}", qemu.display());
        let mut known = self.known.lock().await;
        if let Some(a) = known.get(&key) {
            return a.clone();
        }
        let works = probe(qemu, kernel, initramfs).await;
        let accel = if works { "kvm" } else { "tcg" };
        if works {
            tracing::info!("KVM boots guests here: using it");
        } else {
            tracing::warn!(
                "the guest did not boot under KVM within {PROBE_LIMIT:?}: using software \
                 emulation (TCG)"
            );
        }
        known.insert(key, accel.into());
        let tmp = self.cache.with_extension("tmp");
        let written = std::fs::write(&tmp, serde_json::to_vec(&*known).expect("JSON"))
            .and_then(|()| std::fs::rename(&tmp, &self.cache));
        if let Err(e) = written {
            tracing::warn!(
                "remembering the accelerator in {}: {e}",
                self.cache.display()
            );
        }
        accel.into()
    }
}

async fn probe(qemu: &Path, kernel: &str, initramfs: &str) -> bool {
    let child = tokio::process::Command::new(qemu)
        .args([
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
            "console=ttyS0 quiet panic=-1 volant.probe=1",
        ])
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
