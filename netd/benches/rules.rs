//! A full iptables sync of netd's chains with 100 networks and 500 port forwards, in a throwaway
//! network namespace: from nothing, again with nothing to change, with one forward more, and
//! back to nothing. Prints a table. `cargo bench -p netd --bench rules` (as root; `BENCH_RUNS`
//! sets the 5 runs per row).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use netd::firewall::{self, Firewall, ForwardRules, NetRules, Rules};

fn rules(forwards: usize) -> Rules {
    let bridges: Vec<String> = (0..100).map(|i| format!("vbr{i}")).collect();
    let nets: Vec<NetRules<'_>> = bridges
        .iter()
        .enumerate()
        .map(|(i, b)| NetRules {
            bridge: b,
            subnet: format!("10.{}.{}.0/24", 100 + i / 250, i % 250)
                .parse()
                .unwrap(),
            nat: true,
        })
        .collect();
    let fwd: Vec<ForwardRules<'_>> = (0..forwards)
        .map(|i| {
            let net = i % 100;
            ForwardRules {
                protocol: "tcp",
                host_port: 20000 + i as u16,
                vm_ip: IpAddr::from([
                    10,
                    100 + (net / 250) as u8,
                    (net % 250) as u8,
                    100 + (i / 100) as u8,
                ]),
                vm_port: 80,
                bridge: &bridges[net],
            }
        })
        .collect();
    firewall::desired(&nets, &fwd)
}

fn sync(fw: &Firewall, r: Option<&Rules>) -> usize {
    fw.sync(r).unwrap().len()
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let ns = format!("volant-bench-rules-{}", std::process::id());
    let ok = std::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap();
    assert!(ok.success(), "ip netns add (as root)");
    let path = format!("/run/netns/{ns}");
    let table = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on a valid namespace fd affects only this thread and its children.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        let fw = Firewall::new().unwrap();
        let (full, more) = (rules(500), rules(501));
        let total = full.forward.len() + full.postrouting.len() + full.prerouting.len();
        let mut rows: Vec<(&str, Vec<Duration>, usize)> = Vec::new();
        let mut time = |what: &'static str, from: Option<&Rules>, to: Option<&Rules>| {
            let mut t = Vec::new();
            let mut changes = 0;
            for _ in 0..runs {
                sync(&fw, from);
                let t0 = Instant::now();
                changes = sync(&fw, to);
                t.push(t0.elapsed());
            }
            rows.push((what, t, changes));
        };
        time("from nothing", None, Some(&full));
        time("nothing to change", Some(&full), Some(&full));
        time("one forward more", Some(&full), Some(&more));
        time("back to nothing", Some(&full), None);
        (total, rows)
    })
    .join();
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &ns])
        .status();
    let (total, rows) = table.unwrap();
    println!("netd rule sync, 100 networks and 500 forwards ({total} rules), {runs} runs\n");
    println!("| sync | actions logged | median | min | max |\n|---|---:|---:|---:|---:|");
    for (what, mut t, changes) in rows {
        t.sort();
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        println!(
            "| {what} | {changes} | {} | {} | {} |",
            ms(t[t.len() / 2]),
            ms(t[0]),
            ms(t[t.len() - 1])
        );
    }
}
