//! `volar setup --install-systemd --root DIR`: the daemons and units land under DIR and
//! `volant.target` with every service is enabled there (offline, as `systemctl --root` does).

use std::process::Command;

use volant_tests::bin;

#[test]
fn volar_installs_and_enables_the_systemd_units() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(bin("volar"))
        .args(["setup", "--install-systemd", "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let units = root.path().join("etc/systemd/system");
    for d in ["ipamd", "netd", "proxyd", "vmmd", "gateway"] {
        let installed = root.path().join("usr/local/bin").join(d);
        assert_eq!(
            std::fs::read(&installed).unwrap(),
            std::fs::read(bin(d)).unwrap(),
            "{d} installed as built"
        );
        let unit = format!("volant-{d}.service");
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/systemd")
            .join(&unit);
        assert_eq!(
            std::fs::read_to_string(units.join(&unit)).unwrap(),
            std::fs::read_to_string(shipped).unwrap()
        );
        // The link points inside the root's /etc, as systemd resolves it at boot.
        let link = std::fs::read_link(units.join("volant.target.wants").join(&unit));
        assert!(
            link.is_ok_and(|l| l.ends_with(&unit)),
            "{unit} is not enabled"
        );
    }
    assert!(std::fs::read_link(units.join("multi-user.target.wants/volant.target")).is_ok());
    let out = Command::new(bin("volar"))
        .args(["setup", "--root", "/tmp"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "--root without --install-systemd is refused"
    );
}
