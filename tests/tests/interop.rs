//! Standard gRPC clients from their registries, with their default options, against every
//! daemon: Python's `grpcio` (gRPC's C core, which sends a Unix socket's path as `:authority`)
//! and Node's `@grpc/grpc-js`, over each daemon's Unix socket and over TCP (mutual TLS is in
//! `mtls.rs`). Each daemon answers health overall and for its service by name (an unknown name
//! is NOT_FOUND), lists by reflection exactly its own service beside health and reflection, and
//! serves a call. `tests/run` installs the clients under `target/interop` and names it in
//! `VOLANT_INTEROP`.

use serde_json::{Value, json};
use volant_tests::{ControlPlane, Daemon, grpc_client};

/// The daemons, their service and a call that needs no argument.
const DAEMONS: [(&str, &str, &str); 4] = [
    ("ipamd", "volant.ipam.v1.Ipam", "ListPools"),
    ("netd", "volant.net.v1.Net", "ListNetworks"),
    ("vmmd", "volant.vmm.v1.Vmm", "ListVms"),
    ("proxyd", "volant.proxy.v1.Proxy", "ListRoutes"),
];

/// What a client should see of a daemon serving `service`.
fn expected(lang: &str, service: &str) -> Value {
    let mut want = json!({
        "health ": "SERVING",
        format!("health {service}"): "SERVING",
        "health volant.nope.v1.Nope": "NOT_FOUND",
        "call": "OK",
    });
    if lang == "python" {
        let mut listed = vec![
            service,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ];
        listed.sort();
        want["services"] = json!(listed);
    }
    want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_clients_with_their_defaults_reach_every_daemon() {
    let cp = ControlPlane::start().await;
    let run = cp.run_dir();
    for (daemon, service, method) in DAEMONS {
        let target = format!("unix:{}/{daemon}.sock", run.display());
        for lang in ["python", "node"] {
            let got = grpc_client(Some(&cp.host), lang, &[&target, service, method]);
            assert_eq!(
                got,
                expected(lang, service),
                "{lang} → {daemon} over its Unix socket"
            );
        }
    }
    // Over TCP: another ipamd (it touches no network), on loopback.
    let port = volant_tests::free_port();
    let listen = format!("tcp://127.0.0.1:{port}");
    let root = tempfile::tempdir().unwrap();
    let ipamd = Daemon::start(
        "ipamd",
        root.path(),
        &["--config", "/dev/null", "--listen", &listen],
    )
    .await;
    let target = format!("127.0.0.1:{port}");
    for lang in ["python", "node"] {
        let got = grpc_client(None, lang, &[&target, DAEMONS[0].1, DAEMONS[0].2]);
        assert_eq!(got, expected(lang, DAEMONS[0].1), "{lang} → ipamd over TCP");
    }
    drop(ipamd);
}

/// The README's Python example, as printed, against the daemons of a control plane (its socket
/// directory put for `/run/volant`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_python_example_runs_as_printed() {
    let cp = ControlPlane::start().await;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = &readme[readme.find("## Any gRPC client").expect("the section")..];
    let start = section.find("```python\n").expect("a python block") + "```python\n".len();
    let example = &section[start..start + section[start..].find("```").unwrap()];
    let example = example.replace("/run/volant", &cp.run_dir().display().to_string());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("example.py");
    std::fs::write(&file, example).unwrap();
    let python = std::path::Path::new(&std::env::var_os("VOLANT_INTEROP").expect("tests/run"))
        .join("venv/bin/python");
    let out = cp
        .host
        .sh(&format!("{} {} 2>&1", python.display(), file.display()));
    assert_eq!(
        out.trim(),
        "ipamd SERVING\nnetd SERVING\nvmmd SERVING\nproxyd SERVING",
        "{out}"
    );
}
