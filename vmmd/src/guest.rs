//! What a boot of a guest said, read from its console and its hypervisor's log: whether kestrel
//! reported `ready`, and how the boot ended. A guest that powers off cleanly says so last
//! (`kestrel: powering off`); a hypervisor that ends without that line crashed or was killed,
//! whatever its exit status (Cloud Hypervisor exits 0 when a vCPU fails). Each boot has logs of
//! its own: the previous boot's are kept beside them, rotated at every launch.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::ExitStatus;

use crate::records::{Paths, Status};
use crate::states::Event;

/// What kestrel prints once the workload is up.
pub const READY: &str = "kestrel: ready";
/// kestrel's last line before a clean power-off.
const POWERING_OFF: &str = "kestrel: powering off";
/// How much of the end of a log is read to find how a boot ended.
const TAIL: u64 = 64 * 1024;

/// Keeps the previous boot's console and hypervisor log as `<log>.1`, so that this boot's
/// start empty.
pub fn rotate(paths: &Paths) {
    for log in [&paths.serial, &paths.hypervisor_log] {
        if log.exists() {
            let _ = std::fs::rename(log, previous(log));
        }
    }
}

/// The previous boot's copy of `log`.
pub fn previous(log: &Path) -> std::path::PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    name.into()
}

/// The last `TAIL` bytes of `path`, as text.
fn tail(path: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL)));
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Whether the console at `path` says `kestrel: ready` past byte `seen`; `seen` moves on to what
/// was read (less a line's worth, so that a line split between two reads is found).
pub fn said_ready(path: &Path, seen: &mut u64) -> bool {
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    if f.seek(SeekFrom::Start(*seen)).is_err() {
        return false;
    }
    let mut bytes = Vec::new();
    if f.read_to_end(&mut bytes).is_err() {
        return false;
    }
    let found = bytes.windows(READY.len()).any(|w| w == READY.as_bytes());
    *seen += (bytes.len() as u64).saturating_sub(READY.len() as u64);
    found
}

/// How a guest that powered off cleanly ended: why, when it was not simply asked to.
#[derive(Debug, PartialEq, Eq)]
pub struct PoweredOff {
    /// The workload's failure or kestrel's error, if it powered off because of one.
    pub why: Option<String>,
}

/// Whether the console's last kestrel line is the clean power-off, and why it came.
pub fn powered_off(console: &str) -> Option<PoweredOff> {
    let said: Vec<&str> = console
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter_map(|l| l.find("kestrel: ").map(|i| &l[i..]))
        .collect();
    let (last, before) = said.split_last()?;
    if *last != POWERING_OFF {
        return None;
    }
    let why = before.last().and_then(|l| {
        if let Some(code) = l.strip_prefix("kestrel: workload exited with status ") {
            (code.trim() != "0").then(|| format!("the workload exited with status {code}"))
        } else {
            l.strip_prefix("kestrel: error: ").map(str::to_string)
        }
    });
    Some(PoweredOff { why })
}

/// Why a hypervisor ended without a guest power-off: its exit status when known (vmmd started
/// it), else the last error line of its log, else that it simply ended.
pub fn crash_reason(status: Option<ExitStatus>, hypervisor_log: &str) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    let error_line = hypervisor_log
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.to_ascii_lowercase().contains("error"));
    match (
        status.and_then(|s| s.signal()),
        status.and_then(|s| s.code()),
    ) {
        (Some(sig), _) => format!("the hypervisor was killed by signal {sig}"),
        (_, Some(code)) if code != 0 => match error_line {
            Some(l) => format!("the hypervisor exited with status {code}: {l}"),
            None => format!("the hypervisor exited with status {code}"),
        },
        _ => match error_line {
            Some(l) => format!("the hypervisor ended without a guest power-off: {l}"),
            None => "the hypervisor exited without a guest power-off".into(),
        },
    }
}

/// What happened to a VM that was `was` when its hypervisor has ended with `status` (when
/// known): a clean power-off of a guest that was ready, else a failure with the reason.
pub fn ended(paths: &Paths, was: Status, status: Option<ExitStatus>) -> (Event, String) {
    match (powered_off(&tail(&paths.serial)), was) {
        (Some(off), Status::Running) => (Event::PoweredOff, off.why.unwrap_or_default()),
        (Some(off), _) => (
            Event::Failed,
            off.why
                .unwrap_or_else(|| "the guest powered off before it was ready".into()),
        ),
        (None, _) => (
            Event::Failed,
            crash_reason(status, &tail(&paths.hypervisor_log)),
        ),
    }
}

/// The last lines the console holds, for a message.
pub fn last_lines(paths: &Paths, n: usize) -> String {
    let text = tail(&paths.serial);
    let lines: Vec<&str> = text.lines().rev().take(n).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    #[test]
    fn a_clean_power_off_is_the_last_thing_kestrel_says() {
        let asked = "kestrel: ready ip=none mode=vsock\nkestrel: power button, stopping the \
                     workload\nvolant-echo: SIGTERM\nkestrel: workload exited with status 0\n\
                     kestrel: powering off\n[   12.3] reboot: Power down\n";
        assert_eq!(powered_off(asked), Some(PoweredOff { why: None }));
        let failed =
            "kestrel: ready\nkestrel: workload exited with status 3\nkestrel: powering off\n";
        assert_eq!(
            powered_off(failed).unwrap().why.as_deref(),
            Some("the workload exited with status 3")
        );
        let error = "kestrel: error: no workload\r\nkestrel: powering off\r\n";
        assert_eq!(
            powered_off(error).unwrap().why.as_deref(),
            Some("no workload")
        );
        // The kernel writes over a line kestrel began; what follows "kestrel: " still counts.
        assert!(powered_off("[ 1.0] x kestrel: powering off\n").is_some());
        for crashed in [
            "",
            "kestrel: ready\n",
            "kestrel: powering off\nkestrel: starting 0.1.0\n",
            "Kernel panic - not syncing\n",
        ] {
            assert_eq!(powered_off(crashed), None, "{crashed:?}");
        }
    }

    #[test]
    fn a_crash_says_what_is_known_of_it() {
        let killed = ExitStatus::from_raw(9);
        assert_eq!(
            crash_reason(Some(killed), ""),
            "the hypervisor was killed by signal 9"
        );
        let log = "cloud-hypervisor: 26.1s: <vcpu0> ERROR:vmm/src/cpu.rs:1175 -- VCPU generated \
                   error: VcpuUnhandledKvmExit\nsomething else\n";
        assert_eq!(
            crash_reason(Some(ExitStatus::from_raw(0)), log),
            "the hypervisor ended without a guest power-off: cloud-hypervisor: 26.1s: <vcpu0> \
             ERROR:vmm/src/cpu.rs:1175 -- VCPU generated error: VcpuUnhandledKvmExit"
        );
        assert_eq!(
            crash_reason(None, "all fine\n"),
            "the hypervisor exited without a guest power-off"
        );
        assert_eq!(
            crash_reason(
                Some(ExitStatus::from_raw(1 << 8)),
                "qemu: error: no kernel\n"
            ),
            "the hypervisor exited with status 1: qemu: error: no kernel"
        );
    }

    #[test]
    fn ready_is_found_however_the_console_grows() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut seen = 0;
        assert!(!said_ready(&log, &mut seen), "no console yet");
        std::fs::write(&log, "booting...\nkestrel: rea").unwrap();
        assert!(!said_ready(&log, &mut seen));
        std::fs::write(&log, "booting...\nkestrel: ready ip=none mode=vsock\n").unwrap();
        assert!(
            said_ready(&log, &mut seen),
            "a line split between two reads"
        );
    }

    #[test]
    fn each_boot_has_logs_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::of(dir.path(), dir.path(), "vm");
        std::fs::create_dir_all(&paths.dir).unwrap();
        std::fs::write(&paths.serial, "kestrel: ready\nkestrel: powering off\n").unwrap();
        assert_eq!(
            ended(&paths, Status::Running, None),
            (Event::PoweredOff, String::new())
        );
        assert_eq!(ended(&paths, Status::Booting, None).0, Event::Failed);
        rotate(&paths);
        assert!(!paths.serial.exists());
        assert!(previous(&paths.serial).exists());
        std::fs::write(
            &paths.hypervisor_log,
            "VCPU generated error: InternalError\n",
        )
        .unwrap();
        assert_eq!(
            ended(&paths, Status::Running, Some(ExitStatus::from_raw(0))),
            (
                Event::Failed,
                "the hypervisor ended without a guest power-off: VCPU generated error: \
                 InternalError"
                    .into()
            )
        );
    }
}
