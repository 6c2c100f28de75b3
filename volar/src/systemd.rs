//! `volar setup --install-systemd`: the daemons beside volar go to `<root>/usr/local/bin`, the
//! units of `deploy/systemd` (built into volar) to `<root>/etc/systemd/system`, and
//! `volant.target` is enabled — and, on the running system (root `/`), started.

use std::path::Path;
use std::process::Command;

use crate::client::Failure;

const UNITS: [(&str, &str); 7] = [
    (
        "volant.target",
        include_str!("../../deploy/systemd/volant.target"),
    ),
    (
        "volant-ipamd.service",
        include_str!("../../deploy/systemd/volant-ipamd.service"),
    ),
    (
        "volant-netd.service",
        include_str!("../../deploy/systemd/volant-netd.service"),
    ),
    (
        "volant-proxyd.service",
        include_str!("../../deploy/systemd/volant-proxyd.service"),
    ),
    (
        "volant-vmmd.service",
        include_str!("../../deploy/systemd/volant-vmmd.service"),
    ),
    (
        "volant-gateway.service",
        include_str!("../../deploy/systemd/volant-gateway.service"),
    ),
    (
        "volantd.service",
        include_str!("../../deploy/systemd/volantd.service"),
    ),
];
const DAEMONS: [&str; 5] = ["ipamd", "netd", "proxyd", "vmmd", "gateway"];

fn fail(what: String) -> impl FnOnce(std::io::Error) -> Failure {
    move |e| Failure(format!("{what}: {e}"))
}

fn systemctl(root: &Path, args: &[&str]) -> Result<(), Failure> {
    let mut cmd = Command::new("systemctl");
    if root != Path::new("/") {
        cmd.arg(format!("--root={}", root.display()));
    }
    let status = cmd
        .args(args)
        .status()
        .map_err(fail("running systemctl".into()))?;
    if status.success() {
        Ok(())
    } else {
        Err(Failure(format!(
            "systemctl {} failed: {status}",
            args.join(" ")
        )))
    }
}

/// Installs and enables the units under `root`; starts them when `root` is `/`. Returns what
/// was done, line by line.
pub fn install(root: &Path) -> Result<Vec<String>, Failure> {
    // systemctl --root resolves links wrongly through a path with `..` or a relative one.
    std::fs::create_dir_all(root).map_err(fail(format!("creating {}", root.display())))?;
    let root = &root
        .canonicalize()
        .map_err(fail(format!("resolving {}", root.display())))?;
    let here = std::env::current_exe().map_err(fail("finding volar's own path".into()))?;
    let from = here.parent().unwrap_or(Path::new("."));
    let bin = root.join("usr/local/bin");
    let units = root.join("etc/systemd/system");
    for dir in [&bin, &units] {
        std::fs::create_dir_all(dir).map_err(fail(format!("creating {}", dir.display())))?;
    }
    let mut done = Vec::new();
    for d in DAEMONS {
        let src = from.join(d);
        if !src.is_file() {
            return Err(Failure(format!(
                "{} is missing: volar installs the daemons built beside it (cargo build --release --workspace --bins)",
                src.display()
            )));
        }
        let dst = bin.join(d);
        if src != dst {
            // Through a temporary name: a running daemon's binary is replaced, not overwritten.
            let tmp = bin.join(format!(".{d}.new"));
            std::fs::copy(&src, &tmp).map_err(fail(format!("copying {}", src.display())))?;
            std::fs::rename(&tmp, &dst).map_err(fail(format!("installing {}", dst.display())))?;
        }
        done.push(format!("installed {}", dst.display()));
    }
    for (name, text) in UNITS {
        let dst = units.join(name);
        std::fs::write(&dst, text).map_err(fail(format!("writing {}", dst.display())))?;
        done.push(format!("wrote {}", dst.display()));
    }
    let names: Vec<&str> = UNITS.iter().map(|(n, _)| *n).collect();
    if root == Path::new("/") {
        systemctl(root, &["daemon-reload"])?;
        systemctl(root, &[&["enable"], names.as_slice()].concat())?;
        systemctl(root, &["start", "volant.target"])?;
        done.push("enabled and started volant.target".into());
    } else {
        systemctl(root, &[&["enable"], names.as_slice()].concat())?;
        done.push(format!("enabled volant.target under {}", root.display()));
    }
    Ok(done)
}
