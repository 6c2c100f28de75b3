//! Allowlist decision time with 10,000 rules (half exact names, half `*.suffix` patterns), for
//! hits on both kinds and for misses; against a naive linear scan of the same rules as the
//! baseline. `cargo bench -p proxyd --bench allowlist`.

use std::hint::black_box;
use std::time::Instant;

use proxyd::rules::{Allowlist, Host, normalise};

const RULES: usize = 10_000;
const ROUNDS: usize = 200_000;

/// The obvious implementation: every rule, in order.
fn linear(rules: &[String], host: &str) -> bool {
    rules.iter().any(|r| match r.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => r == host,
    })
}

fn per_call_ns(rounds: usize, mut f: impl FnMut(usize) -> bool) -> f64 {
    let start = Instant::now();
    let mut yes = 0usize;
    for i in 0..rounds {
        yes += usize::from(black_box(f(i)));
    }
    black_box(yes);
    start.elapsed().as_nanos() as f64 / rounds as f64
}

fn main() {
    let rules: Vec<String> = (0..RULES)
        .map(|i| {
            if i % 2 == 0 {
                format!("svc{i}.example{}.com", i % 97)
            } else {
                format!("*.zone{i}.example.net")
            }
        })
        .collect();
    let list = Allowlist::new(&rules).expect("valid rules");
    let kinds: [(&str, Vec<String>); 3] = [
        (
            "exact hit",
            (0..1000)
                .map(|k| format!("svc{}.example{}.com", k * 2, (k * 2) % 97))
                .collect(),
        ),
        (
            "wildcard hit (3 labels deep)",
            (0..1000)
                .map(|k| format!("a.b.c.zone{}.example.net", k * 2 + 1))
                .collect(),
        ),
        (
            "miss",
            (0..1000)
                .map(|k| format!("api{k}.unlisted.example.org"))
                .collect(),
        ),
    ];
    println!(
        "| {RULES} rules | allowlist (ns/decision) | normalise + allowlist (ns) | linear scan baseline (ns) |"
    );
    println!("|---|---:|---:|---:|");
    for (what, hosts) in &kinds {
        let normalised: Vec<Host> = hosts.iter().map(|h| normalise(h).unwrap()).collect();
        let expect = *what != "miss";
        assert!(normalised.iter().all(|h| list.allows(h) == expect));
        let fast = per_call_ns(ROUNDS, |i| list.allows(&normalised[i % normalised.len()]));
        let full = per_call_ns(ROUNDS, |i| {
            list.allows(&normalise(&hosts[i % hosts.len()]).unwrap())
        });
        let slow = per_call_ns(ROUNDS / 100, |i| linear(&rules, &hosts[i % hosts.len()]));
        println!("| {what} | {fast:.0} | {full:.0} | {slow:.0} |");
    }
}
