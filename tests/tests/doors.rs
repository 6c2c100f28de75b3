//! The gateway's locked doors, with curl against the real gateway: TLS (rustls) with its
//! certificate re-read on SIGHUP, API keys configured as hashes (health stays open), and a
//! request-rate limit per client.

use std::path::Path;
use std::time::Duration;

use volant_tests::{ControlPlane, Pki, bin, host_and_upstream};

/// A CA and a `localhost` certificate it signed, written as PEM files under `dir` with `tag`.
fn pki(dir: &Path, tag: &str) -> (String, String, String) {
    let [ca, cert, key] = Pki::new(tag, "localhost").write(dir, tag);
    (ca, cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_keys_and_a_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, cert1, key1) = pki(dir.path(), "one");
    let (ca2, cert2, key2) = pki(dir.path(), "two");
    let (cert, key) = (
        dir.path().join("cert.pem").display().to_string(),
        dir.path().join("key.pem").display().to_string(),
    );
    std::fs::copy(&cert1, &cert).unwrap();
    std::fs::copy(&key1, &key).unwrap();
    // The config holds the key's hash, as an operator would write it.
    let out = volant_tests::sh("printf %s s3cret-key | sha256sum");
    let hash = out.split_whitespace().next().unwrap().to_string();
    let (host, up) = host_and_upstream();
    let sections = format!(
        "gateway:\n  api_key_hashes: [{hash}]\n  tls: {{ cert: {cert}, key: {key} }}\n  \
         requests_per_second: 5\n  burst: 20\n"
    );
    let cp = ControlPlane::start_with_config(host, up, &[], "", &sections).await;
    let gateway = cp.gateway(&[]).await;
    let curl = |args: &str| -> (bool, String) {
        cp.host.try_sh(&format!(
            "curl -sS -o /dev/stderr -w '%{{http_code}}' {args} 2>&1"
        ))
    };
    let url = "https://localhost:8080/api/v1";

    // TLS only, with the configured certificate.
    let (ok, out) = curl(&format!("--cacert {ca1} {url}/health"));
    assert!(ok && out.ends_with("200"), "{out}");
    let (ok, out) = curl("http://localhost:8080/api/v1/health");
    assert!(!ok || !out.ends_with("200"), "plain HTTP answered: {out}");
    let (ok, _) = curl(&format!("--cacert {ca2} {url}/health"));
    assert!(!ok, "a certificate from another CA was accepted");

    // Keys: every endpoint but health needs one.
    let (_, out) = curl(&format!("--cacert {ca1} -D - {url}/vms"));
    assert!(out.ends_with("401"), "{out}");
    assert!(
        out.to_lowercase().contains("www-authenticate: bearer"),
        "{out}"
    );
    assert!(out.contains("Authorization: Bearer"), "{out}");
    let (_, out) = curl(&format!(
        "--cacert {ca1} -H 'Authorization: Bearer wrong' {url}/vms"
    ));
    assert!(out.ends_with("401"), "{out}");
    let (_, out) = curl(&format!(
        "--cacert {ca1} -H 'Authorization: Bearer s3cret-key' {url}/vms"
    ));
    assert!(out.ends_with("200"), "{out}");
    let (_, out) = curl(&format!(
        "--cacert {ca1} -H 'Authorization: Bearer s3cret-key' {url}/networks"
    ));
    assert!(out.ends_with("200"), "{out}");

    // volar speaks TLS with a private CA and sends its key.
    let volar = |args: &str| {
        cp.host.try_sh(&format!(
            "{} --api https://localhost:8080 --cacert {ca1} {args} 2>&1",
            bin("volar").display()
        ))
    };
    let (ok, out) = volar("--token s3cret-key -o json networks list");
    assert!(ok && out.contains("volant0"), "{out}");
    let (ok, out) = volar("--token wrong vms list");
    assert!(!ok && out.contains("valid API key"), "{out}");
    let (ok, out) = volar("vms list");
    assert!(!ok && out.contains("Authorization: Bearer"), "{out}");
    // Also on a machine without a system CA store: the given CA alone.
    let (ok, out) = cp.host.try_sh(&format!(
        "SSL_CERT_FILE=/nonexistent SSL_CERT_DIR=/nonexistent {} --api https://localhost:8080 \
         --cacert {ca1} --token s3cret-key networks list 2>&1",
        bin("volar").display()
    ));
    assert!(ok && out.contains("volant0"), "{out}");

    // SIGHUP: the new certificate serves new connections.
    std::fs::copy(&cert2, &cert).unwrap();
    std::fs::copy(&key2, &key).unwrap();
    // SAFETY: kill(2) on the gateway this test started.
    unsafe { libc::kill(gateway.pid() as i32, libc::SIGHUP) };
    let mut reloaded = false;
    for _ in 0..50 {
        if curl(&format!("--cacert {ca2} {url}/health"))
            .1
            .ends_with("200")
        {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "the certificate was not reloaded on SIGHUP");

    // The rate limit: a burst of 20, then 5 a second, per client.
    let mut answers = Vec::new();
    for _ in 0..40 {
        answers.push(curl(&format!("--cacert {ca2} -D - {url}/health")).1);
    }
    let limited: Vec<&String> = answers.iter().filter(|a| a.ends_with("429")).collect();
    assert!(!limited.is_empty(), "no 429 in {answers:?}");
    for a in limited {
        assert!(a.to_lowercase().contains("retry-after: 1"), "{a}");
    }

    // The key appears nowhere in the gateway's log.
    assert!(
        !gateway.log_text().contains("s3cret-key"),
        "the API key was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_open_door_without_keys_unless_written() {
    let (host, up) = host_and_upstream();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    std::fs::write(dir.path().join("volant.yaml"), "").unwrap();
    // Addresses other hosts (and the VMs on a bridge) reach: refused before anything is bound
    // (inside the test's namespace all the same).
    for listen in [
        "tcp://0.0.0.0:8097",
        "tcp://[::]:8097",
        "tcp://10.99.0.1:8097",
    ] {
        let (ok, out) = host.try_sh(&format!(
            "timeout 10 {} --config {root}/volant.yaml --state-dir {root}/gw --run-dir {root}/run \
             --listen {listen} 2>&1",
            bin("gateway").display()
        ));
        assert!(!ok, "{listen}: {out}");
        assert!(
            out.contains("no API key is set") && out.contains("allow_unauthenticated"),
            "{listen}: {out}"
        );
    }

    // Written in as many words: it starts, and says so at every start.
    let cp = ControlPlane::start_with_config(
        host,
        up,
        &[],
        "",
        "gateway:\n  allow_unauthenticated: true\n",
    )
    .await;
    let cfg = cp.root.path().join("volant.yaml");
    let mut gateway = volant_tests::Daemon::start_with(
        Some(&cp.host),
        "gateway",
        cp.root.path(),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            "tcp://0.0.0.0:8097",
        ],
        &[],
    )
    .await;
    for _ in 0..2 {
        let log = gateway.log_text();
        assert!(
            log.contains("WARN") && log.contains("WITHOUT API keys"),
            "{log}"
        );
        gateway.terminate();
        gateway.restart().await;
    }
    assert_eq!(gateway.log_text().matches("WITHOUT API keys").count(), 3);
}

/// `volant-flood` processes in `ns` holding `n` connections in all from 127.0.0.2 to the
/// gateway, each with half a request head; returns them and how many connected.
fn flood(ns: &volant_tests::Netns, n: usize) -> (Vec<std::process::Child>, usize) {
    let mut floods = Vec::new();
    for _ in 0..n.div_ceil(10_000) {
        floods.push(
            std::process::Command::new("ip")
                .args(["netns", "exec", &ns.name])
                .arg(bin("volant-flood"))
                .args(["127.0.0.2", "127.0.0.1:8080", &n.min(10_000).to_string()])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    let mut connected = 0;
    for f in &mut floods {
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(f.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        connected += line.trim().parse::<usize>().unwrap();
    }
    (floods, connected)
}

/// `GET /api/v1/health` `n` times from 127.0.0.1 inside `ns`; the latencies, sorted.
fn health_latencies(ns: &volant_tests::Netns, n: usize) -> Vec<Duration> {
    ns.enter(move || {
        use std::io::{Read, Write};
        let mut took = Vec::new();
        for _ in 0..n {
            let started = std::time::Instant::now();
            let mut s = std::net::TcpStream::connect("127.0.0.1:8080").unwrap();
            s.write_all(b"GET /api/v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            took.push(started.elapsed());
        }
        took.sort();
        took
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_holding_twenty_thousand_connections_leaves_health_fast() {
    let (host, up) = host_and_upstream();
    let cp = ControlPlane::start_with_config(host, up, &[], "", "").await;
    let gateway = cp.gateway(&[]).await;
    let pid = gateway.pid();
    let (floods, connected) = flood(&cp.host, 20_000);
    assert!(connected > 10_000, "only {connected} connections");
    let took = health_latencies(&cp.host, 200);
    let (p50, p99) = (took[took.len() / 2], took[took.len() * 99 / 100]);
    let files = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!(
        "{connected} connections held by one client: health p50 {p50:?} p99 {p99:?}, the \
         gateway holds {files} descriptors, RSS {rss_kib} KiB"
    );
    assert!(p99 <= Duration::from_millis(50), "p99 {p99:?}");
    assert!(files < 1000, "the gateway holds {files} descriptors");
    assert!(rss_kib < 64 << 10, "RSS {rss_kib} KiB");
    for mut f in floods {
        let _ = f.kill();
        let _ = f.wait();
    }
    assert!(!gateway.log_text().contains("Too many open files"));
}
