//! Each VM's hypervisor and vsock backend run under an identity of their own: a uid (and a
//! group of the same number) from `vmmd.hypervisor_uids`, one per VM, so that an escape from
//! one hypervisor is a process that owns nothing but that VM's files: it cannot signal or
//! trace another VM's hypervisor, read its files or reach its sockets, nor reach vmmd's (mode
//! 0600, root's). It keeps no capability (switching from root to another uid drops them all),
//! and the only supplementary group is `/dev/kvm`'s, when there is one.
//!
//! What the hypervisor touches is the VM's own: its directory in the run directory (mode 0770,
//! owned by the VM's uid, group root: only that uid and root's group enter it, so the sockets
//! the hypervisor makes there, open to all under its umask of 0, reach vmmd and proxyd and
//! nobody else), its serial log and initramfs (owned by its uid, group root, mode 0640 and
//! 0400). vmmd needs `CAP_SETUID`, `CAP_SETGID`, `CAP_CHOWN` and `CAP_KILL` for this, and no
//! `CAP_DAC_OVERRIDE`: it reads and enters what is the VMs' through root's group.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The default range of hypervisor uids: far above any login or system user, and below the
/// ranges container runtimes usually take for user namespaces.
pub const DEFAULT_UIDS: &str = "1900000000-1900065535";

/// The uids VMs' hypervisors run as.
#[derive(Clone, Debug)]
pub struct Jail {
    first: u32,
    last: u32,
    /// The group of `/dev/kvm`, which hypervisors need to open it.
    kvm_gid: Option<u32>,
}

/// The identity one VM's processes take.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Its uid, and the gid of the same number.
    pub uid: u32,
    /// Supplementary groups.
    pub groups: Vec<libc::gid_t>,
}

impl Jail {
    /// Reads a range `FIRST-LAST`.
    pub fn parse(text: &str) -> Result<Jail, String> {
        let bad = || {
            format!(
                "vmmd.hypervisor_uids {text:?} must be FIRST-LAST, 1000 ≤ FIRST ≤ LAST < \
                 4294967295, e.g. {DEFAULT_UIDS}"
            )
        };
        let (a, b) = text.split_once('-').ok_or_else(bad)?;
        let first: u32 = a.trim().parse().map_err(|_| bad())?;
        let last: u32 = b.trim().parse().map_err(|_| bad())?;
        if first < 1000 || last < first || last == u32::MAX {
            return Err(bad());
        }
        let kvm_gid = std::fs::metadata("/dev/kvm")
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
            .filter(|g| *g != 0);
        Ok(Jail {
            first,
            last,
            kvm_gid,
        })
    }

    /// The lowest uid of the range that `taken` does not hold.
    pub fn free_uid(&self, taken: &HashSet<u32>) -> Option<u32> {
        (self.first..=self.last).find(|u| !taken.contains(u))
    }

    /// Whether `uid` is one of the range's.
    pub fn holds(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }

    /// The identity of the VM given `uid`.
    pub fn identity(&self, uid: u32) -> Identity {
        Identity {
            uid,
            groups: self.kvm_gid.into_iter().collect(),
        }
    }
}

/// Makes `dir` the VM's own: created if missing, mode 0770, owned by `uid`, group root. Its
/// parent must exist.
pub fn own_dir(dir: &Path, uid: u32) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(format!("preparing {}: {e}", dir.display()));
        }
        _ => {}
    }
    give(dir, uid, 0o770)
}

/// Gives `path` (created empty if missing) to `uid`, group root, with `mode`.
pub fn own_file(path: &Path, uid: u32, mode: u32) -> Result<(), String> {
    if std::fs::symlink_metadata(path).is_err() {
        std::fs::File::create(path).map_err(|e| format!("preparing {}: {e}", path.display()))?;
    }
    give(path, uid, mode)
}

/// Sets `path`'s mode, then its owner (once it is another user's, changing its mode would need
/// `CAP_FOWNER`); nothing when both are right already. Never follows a link.
fn give(path: &Path, uid: u32, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let err = |e: std::io::Error| format!("preparing {}: {e}", path.display());
    let meta = std::fs::symlink_metadata(path).map_err(err)?;
    if meta.file_type().is_symlink() {
        return Err(format!(
            "preparing {}: it is a symbolic link",
            path.display()
        ));
    }
    if meta.uid() == uid && meta.gid() == 0 && meta.mode() & 0o7777 == mode {
        return Ok(());
    }
    if meta.mode() & 0o7777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    std::os::unix::fs::lchown(path, Some(uid), Some(0)).map_err(err)
}

/// Takes `id` for the calling process: supplementary groups, gid, uid (which drops every
/// capability), and a umask of 0, so that the sockets it makes in its directory (which only
/// its uid and root's group enter) reach vmmd and proxyd. Called between fork and exec: system
/// calls only, no allocation.
pub fn enter(id: &Identity) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: plain system calls on values that outlive them.
    unsafe {
        check(libc::setgroups(id.groups.len(), id.groups.as_ptr()))?;
        check(libc::setresgid(id.uid, id.uid, id.uid))?;
        check(libc::setresuid(id.uid, id.uid, id.uid))?;
        libc::umask(0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_hand_out_the_lowest_free_uid() {
        let jail = Jail::parse(DEFAULT_UIDS).unwrap();
        let taken = HashSet::from([1_900_000_000, 1_900_000_001]);
        assert_eq!(jail.free_uid(&taken), Some(1_900_000_002));
        assert!(jail.holds(1_900_065_535) && !jail.holds(1_900_065_536));
        let full = Jail::parse("5000-5001").unwrap();
        assert_eq!(full.free_uid(&HashSet::from([5000, 5001])), None);
        for bad in ["", "5", "0-10", "10-5", "a-b", "5000-4294967295"] {
            assert!(Jail::parse(bad).is_err(), "{bad:?}");
        }
    }
}
