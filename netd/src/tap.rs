//! Persistent TAP devices. The kernel refuses to create TAPs over rtnetlink, so they are made
//! the way `ip tuntap add` makes them: `/dev/net/tun`, `TUNSETIFF`, `TUNSETPERSIST`.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 203, int)`.
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
/// `_IOW('T', 204, int)`.
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;

/// Creates the persistent TAP `name` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, or opens the
/// existing one (while nothing is attached to it). The device outlives the file descriptor,
/// which is closed on return; a hypervisor attaches to it later. Its owner is `owner` (netd's
/// own user when `None`): only that user's processes (the VM's hypervisor, which needs no
/// `CAP_NET_ADMIN` for it) or holders of `CAP_NET_ADMIN` may attach. An unowned TAP takes any
/// local user who can open `/dev/net/tun`.
pub fn create(name: &str, owner: Option<u32>) -> io::Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("TAP name {name:?} must have 1 to 15 bytes"),
        ));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short | IFF_VNET_HDR;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the whole call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: geteuid cannot fail.
    let owner = owner.unwrap_or_else(|| unsafe { libc::geteuid() });
    // SAFETY: TUNSETOWNER takes a uid by value.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETOWNER, owner as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes an integer argument by value.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
