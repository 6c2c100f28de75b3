//! `deploy/quickstart` as the README runs it, in a network namespace of its own with every file
//! under `VOLANT_PREFIX` (and the daemons of this build, `VOLANT_BIN`): `up` brings the demo VM,
//! the user adds a VM of their own, then `down` and `purge` in the README's order leave the
//! namespace exactly as before the first `up` — links, iptables and nftables rules, IPv4
//! forwarding, the operator's own rules — with no hypervisor left running and nothing left
//! under the prefix.

use std::process::Command;

use volant_tests::{Netns, bin, bin_dir, firewall_save, processes_by_arg};

/// What the host looks like: its links, its iptables and nftables rules, IPv4 forwarding.
/// Empty base chains that accept everything are left out of the nftables rules: iptables makes
/// them when a rule is first added to a built-in chain, and they change nothing.
fn host_state(ns: &Netns) -> (String, String, String, String) {
    let mut nft = Vec::new();
    let mut chain: Vec<String> = Vec::new();
    for line in ns.sh("nft list ruleset").lines() {
        if line.starts_with("\tchain ") || !chain.is_empty() {
            chain.push(line.to_string());
            if line == "\t}" {
                let empty = chain.len() == 3 && chain[1].ends_with("policy accept;");
                if !empty {
                    nft.append(&mut chain);
                }
                chain.clear();
            }
        } else if !line.trim().is_empty() {
            nft.push(line.to_string());
        }
    }
    (
        ns.sh("ip -o link show | cut -d: -f2 | sort"),
        firewall_save(ns),
        nft.join("\n"),
        ns.sh("cat /proc/sys/net/ipv4/ip_forward"),
    )
}

fn quickstart(ns: &Netns, prefix: &std::path::Path, command: &str) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .arg("--")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/quickstart"))
        .arg(command)
        .env("VOLANT_PREFIX", prefix)
        .env("VOLANT_BIN", bin_dir())
        .output()
        .expect("quickstart");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "quickstart {command}: {text}");
    text
}

#[test]
fn purge_after_down_leaves_the_host_as_it_was() {
    let ns = Netns::new("qs");
    // Forwarding off, as on a fresh host (a new namespace inherits the machine's), and rules of
    // the operator's own, which must stay as they are.
    ns.sh("ip link set lo up; sysctl -qw net.ipv4.ip_forward=0; \
         iptables -A FORWARD -s 10.98.0.0/16 -j ACCEPT; \
         iptables -t nat -A POSTROUTING -s 10.98.0.0/16 -o lo -j MASQUERADE");
    let before = host_state(&ns);
    let prefix = tempfile::tempdir().unwrap();
    // Each VM's hypervisor runs as a uid of its own, which must reach its directories.
    std::fs::set_permissions(
        prefix.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let config = prefix.path().join("etc/volant/volant.yaml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(
        &config,
        format!(
            "run_dir: {}/run/volant\nvmmd:\n  cgroup: {}\n",
            prefix.path().display(),
            volant_tests::cgroup_of(prefix.path())
        ),
    )
    .unwrap();

    let up = quickstart(&ns, prefix.path(), "up");
    assert!(up.contains("curl http://192.168.127.100/"), "{up}");
    let volar = format!("{} --api http://127.0.0.1:8080", bin("volar").display());
    ns.sh(&format!("{volar} vms create vm1 --plugin hello --no-wait"));
    let run = prefix.path().join("run/volant").display().to_string();
    let hypervisors = processes_by_arg(&format!("{run}/vms/"));
    assert!(
        hypervisors.len() >= 2,
        "two hypervisors run: {hypervisors:?}"
    );

    quickstart(&ns, prefix.path(), "down");
    let purged = quickstart(&ns, prefix.path(), "purge");
    assert!(purged.contains("deleting the VM vm1"), "{purged}");
    let after = host_state(&ns);
    assert_eq!(after, before, "{purged}");
    let left: Vec<_> = processes_by_arg(&prefix.path().display().to_string());
    assert!(left.is_empty(), "still running: {left:?}");
    for dir in [
        "var/lib/volant",
        "run/volant",
        "var/log/volant",
        "etc/volant/volant.yaml",
    ] {
        assert!(!prefix.path().join(dir).exists(), "{dir} is left");
    }
}
