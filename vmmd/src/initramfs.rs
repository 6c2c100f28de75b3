//! The initramfs a VM boots: its plugin's, followed by one more archive that holds the
//! workload (entrypoint, env, workdir) as `/etc/volant/workload.json`, where kestrel reads it.
//! The kernel unpacks concatenated archives in order, compressed or not, so the workload's file
//! replaces any the image carries. The workload, secrets in its env included, thus never
//! appears on a command line: not the guest kernel's, not the hypervisor's (which any local
//! user can read with `ps`), not the VM's record.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Where kestrel reads the workload, as the archive names it (no leading `/`).
fn workload_path() -> &'static str {
    volant_boot::WORKLOAD_FILE.trim_start_matches('/')
}

/// One `newc` (SVR4, no checksum) entry.
fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        if mode & 0o040000 != 0 { 2 } else { 1 },
        0, // mtime
        data.len() as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad(out);
    out.extend_from_slice(data);
    pad(out);
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The archive that holds `workload` as `/etc/volant/workload.json` (0600, root's).
pub fn workload_archive(workload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    entry(&mut out, 1, "etc", 0o040755, &[]);
    entry(&mut out, 2, "etc/volant", 0o040755, &[]);
    entry(&mut out, 3, workload_path(), 0o100600, workload);
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

/// Writes `base` followed by the workload's archive to `out`, readable by its owner alone, and
/// replaces `out` only once the whole file is written. Blocking.
pub fn compose(base: &Path, workload: &[u8], out: &Path) -> Result<(), String> {
    let tmp = out.with_extension("tmp");
    let written = (|| {
        let mut src = std::fs::File::open(base)
            .map_err(|e| format!("reading the initramfs {}: {e}", base.display()))?;
        let mut dst = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        let len = std::io::copy(&mut src, &mut dst)
            .map_err(|e| format!("copying the initramfs {}: {e}", base.display()))?;
        // Each archive starts on a 4-byte boundary.
        let gap = (4 - len % 4) % 4;
        dst.write_all(&[0u8; 3][..gap as usize])
            .and_then(|()| dst.write_all(&workload_archive(workload)))
            .and_then(|()| dst.sync_all())
            .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, out).map_err(|e| format!("writing {}: {e}", out.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn cpio_reads_the_workload_archive_back() {
        let json = br#"{"entrypoint":["/bin/sh"],"env":{"TOKEN":"s3cret"}}"#;
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.cpio");
        std::fs::write(&base, b"x").unwrap();
        let out = dir.path().join("initramfs");
        compose(&base, json, &out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[..4], b"x\0\0\0", "the base, then padding");
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // GNU cpio (tests/run installs it) extracts the appended archive as written.
        let archive = dir.path().join("workload.cpio");
        std::fs::write(&archive, &bytes[4..]).unwrap();
        let listed = std::process::Command::new("cpio")
            .args(["-i", "--quiet", "--to-stdout", workload_path()])
            .stdin(std::fs::File::open(&archive).unwrap())
            .output()
            .expect("cpio");
        assert!(listed.status.success(), "{listed:?}");
        assert_eq!(listed.stdout, json);
    }
}
