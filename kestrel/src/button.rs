//! The power button. An ACPI power-button press (QEMU's `system_powerdown`, Cloud Hypervisor's
//! `vm.power-button`) reaches the kernel's button driver, which reports it as `KEY_POWER` on an
//! input device; kestrel reads every input device (`/dev/input/event*`, evdev) and takes a press
//! as a request to shut down cleanly.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

/// `EV_KEY` and `KEY_POWER` from `linux/input-event-codes.h`.
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// `struct input_event` on 64-bit Linux: a `timeval`, then type, code and value.
const EVENT_SIZE: usize = 24;

/// Whether `event` is a press of the power key.
fn is_power_press(event: &[u8]) -> bool {
    let kind = u16::from_ne_bytes([event[16], event[17]]);
    let code = u16::from_ne_bytes([event[18], event[19]]);
    let value = i32::from_ne_bytes([event[20], event[21], event[22], event[23]]);
    kind == EV_KEY && code == KEY_POWER && value == 1
}

fn open(path: &std::path::Path) -> std::io::Result<AsyncFd<OwnedFd>> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: a valid NUL-terminated path; the descriptor returned is owned here.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and nothing else owns it; the AsyncFd owns it for its life.
    unsafe { AsyncFd::register(OwnedFd::from_raw_fd(fd)) }.map_err(|e| e.into_parts().1)
}

/// Reads `dev` until the power key is pressed on it (true) or it fails (false).
async fn watch(dev: AsyncFd<OwnedFd>) -> bool {
    let mut buf = [0u8; EVENT_SIZE * 16];
    loop {
        let Ok(mut ready) = dev.readable().await else {
            return false;
        };
        // SAFETY: `buf` is valid for `buf.len()` writable bytes.
        let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock {
                ready.clear_ready();
                continue;
            }
            return false;
        }
        if n == 0 {
            return false;
        }
        if buf[..n as usize]
            .chunks_exact(EVENT_SIZE)
            .any(is_power_press)
        {
            return true;
        }
    }
}

/// Resolves when the power button is pressed; never, on a machine without one. Says which
/// devices it listens to.
pub async fn pressed() {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut names = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/dev/input") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if !name.starts_with("event") {
                continue;
            }
            match open(&entry.path()) {
                Ok(dev) => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        if watch(dev).await {
                            let _ = tx.send(()).await;
                        }
                    });
                    names.push(name);
                }
                Err(e) => crate::say(&format!("warning: /dev/input/{name}: {e}")),
            }
        }
    }
    drop(tx);
    if names.is_empty() {
        crate::say("warning: no input device: the power button cannot be heard");
        return std::future::pending().await;
    }
    names.sort();
    crate::say(&format!("power button: listening on {}", names.join(",")));
    if rx.recv().await.is_none() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> [u8; EVENT_SIZE] {
        let mut e = [0u8; EVENT_SIZE];
        e[16..18].copy_from_slice(&kind.to_ne_bytes());
        e[18..20].copy_from_slice(&code.to_ne_bytes());
        e[20..24].copy_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_a_press_of_the_power_key_counts() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)), "release");
        assert!(!is_power_press(&event(EV_KEY, 30, 1)), "another key");
        assert!(!is_power_press(&event(0, KEY_POWER, 1)), "a sync event");
    }
}
