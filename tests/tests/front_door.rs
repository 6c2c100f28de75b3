//! Volant through the front door: the real daemons and the gateway in a fresh namespace, driven
//! only with volar and curl. Every answer passes through a recording proxy and is checked against
//! the OpenAPI document the gateway serves.

use std::process::Command;

use serde_json::Value;
use volant_tests::recorder::Recorder;
use volant_tests::{ControlPlane, Daemon, bin, contract, hello_manifest};

struct FrontDoor {
    proxy: Recorder,
    gateway: Daemon,
    cp: ControlPlane,
}

async fn front_door() -> FrontDoor {
    let cp = ControlPlane::start().await;
    let gateway = cp.gateway(&[]).await;
    let proxy = Recorder::start(&cp.host, "127.0.0.1:8080");
    FrontDoor { proxy, gateway, cp }
}

struct Run {
    ok: bool,
    out: String,
    err: String,
}

impl FrontDoor {
    /// Runs volar against the gateway (through the proxy), inside the host namespace.
    fn volar(&self, args: &[&str]) -> Run {
        self.volar_with(&[], args)
    }

    /// Runs volar as [`FrontDoor::volar`] does, with `env` added to its environment.
    fn volar_with(&self, env: &[(&str, &str)], args: &[&str]) -> Run {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.cp.host.name])
            .arg(bin("volar"))
            .args(["--api", &format!("http://{}", self.proxy.addr)])
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("volar");
        Run {
            ok: out.status.success(),
            out: String::from_utf8_lossy(&out.stdout).to_string(),
            err: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }

    /// curl against the gateway (through the proxy): status and body.
    fn curl(&self, method: &str, path: &str, body: Option<&str>, json: bool) -> (u16, String) {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.cp.host.name,
            "curl",
            "-sS",
            "-X",
            method,
        ])
        .args(["-o", "-", "-w", "\n%{http_code}"]);
        if json {
            cmd.args(["-H", "Content-Type: application/json"]);
        }
        if body.is_some() {
            cmd.args(["--data-binary", "@-"])
                .stdin(std::process::Stdio::piped());
        }
        cmd.arg(format!("http://{}/api/v1{path}", self.proxy.addr));
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("curl");
        if let Some(b) = body {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(b.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// Every recorded answer against the served OpenAPI document; no 5xx but `allowed`.
    fn check_contract(&self, allowed_5xx: usize) {
        let (code, doc) = self.curl("GET", "/openapi.json", None, false);
        assert_eq!(code, 200);
        let doc: Value = serde_json::from_str(&doc).unwrap();
        let exchanges = self.proxy.exchanges();
        assert!(
            exchanges.len() > 20,
            "only {} answers recorded",
            exchanges.len()
        );
        let failures: Vec<String> = exchanges
            .iter()
            .filter(|x| x.path != "/api/v1/openapi.json")
            .filter_map(|x| contract::check(&doc, x).err())
            .collect();
        assert!(
            failures.is_empty(),
            "answers off the contract:\n{}",
            failures.join("\n")
        );
        let server_errors = exchanges.iter().filter(|x| x.status >= 500).count();
        assert_eq!(server_errors, allowed_5xx, "unexpected 5xx answers");
    }
}

fn manifest_file(fd: &FrontDoor) -> String {
    let path = fd.cp.root.path().join("hello.json");
    std::fs::write(&path, hello_manifest()).unwrap();
    path.display().to_string()
}

/// The manifest's JSON Schema, served by the gateway and the body of `POST /api/v1/plugins` in
/// its OpenAPI document, says what the server accepts: the shipped manifest is valid, and each
/// manifest the server refuses with 400 is invalid by the schema too (Python's `jsonschema`,
/// from PyPI, draft 2020-12).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifest_schema_says_what_the_server_accepts() {
    let fd = front_door().await;
    let (code, schema) = fd.curl("GET", "/schemas/manifest.json", None, false);
    assert_eq!(code, 200, "{schema}");
    let (_, doc) = fd.curl("GET", "/openapi.json", None, false);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(
        doc["paths"]["/api/v1/plugins"]["post"]["requestBody"]["content"]["application/json"]["schema"]
            ["$ref"],
        "#/components/schemas/Manifest"
    );
    assert!(doc["components"]["schemas"]["Manifest"]["properties"]["workload"].is_object());
    // The server's constraints are stated: names, ports.
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["CreateVm"]["properties"]["name"]["maxLength"], 63,
        "{}",
        schemas["CreateVm"]
    );
    assert!(schemas["CreateVm"]["properties"]["name"]["pattern"].is_string());
    assert_eq!(
        schemas["AddPort"]["properties"]["host_port"]["maximum"],
        65535
    );
    assert_eq!(schemas["AddPort"]["properties"]["guest_port"]["minimum"], 1);
    assert_eq!(
        schemas["CreateNetwork"]["properties"]["name"]["maxLength"],
        15
    );
    let dir = tempfile::tempdir().unwrap();
    let schema_file = dir.path().join("schema.json");
    std::fs::write(&schema_file, &schema).unwrap();
    let python = std::path::Path::new(&std::env::var_os("VOLANT_INTEROP").expect("tests/run"))
        .join("venv/bin/python");
    let valid = |manifest: &Value| {
        let file = dir.path().join("manifest.json");
        std::fs::write(&file, manifest.to_string()).unwrap();
        let out = volant_tests::sh(&format!(
            "{} -c 'import json, sys, jsonschema; \
             v = jsonschema.Draft202012Validator(json.load(open(sys.argv[1]))); \
             print(v.is_valid(json.load(open(sys.argv[2]))))' {} {}",
            python.display(),
            schema_file.display(),
            file.display()
        ));
        out.trim() == "True"
    };
    let hello: Value = serde_json::from_str(&hello_manifest()).unwrap();
    let changed = |f: &dyn Fn(&mut Value)| {
        let mut m = hello.clone();
        f(&mut m);
        m
    };
    let cases = [
        ("as shipped", hello.clone()),
        (
            "no name",
            changed(&|m| drop(m.as_object_mut().unwrap().remove("name"))),
        ),
        ("an unknown field", changed(&|m| m["nmae"] = "x".into())),
        ("a bad name", changed(&|m| m["name"] = "Hello!".into())),
        (
            "no vCPU",
            changed(&|m| m["resources"]["cpu_cores"] = 0.into()),
        ),
        (
            "too little memory",
            changed(&|m| m["resources"]["memory_mb"] = 8.into()),
        ),
        (
            "a relative entrypoint",
            changed(&|m| m["workload"]["entrypoint"] = serde_json::json!(["bin/sh"])),
        ),
        (
            "a bad variable name",
            changed(&|m| m["workload"]["env"] = serde_json::json!({"1X": "y"})),
        ),
        (
            "a bad mode",
            changed(&|m| m["networking"]["mode"] = "tap".into()),
        ),
        (
            "port 0",
            changed(&|m| m["workload"]["http"]["port"] = 0.into()),
        ),
        ("a bad version", changed(&|m| m["version"] = "1 0".into())),
    ];
    for (what, manifest) in cases {
        let (code, answer) = fd.curl("POST", "/plugins", Some(&manifest.to_string()), true);
        let accepted = code == 200 || code == 201;
        assert!(accepted || code == 400, "{what}: {code} {answer}");
        assert_eq!(
            valid(&manifest),
            accepted,
            "{what}: the server answered {code} {answer}"
        );
    }
}

/// The networking guide's troubleshooting section, each command as printed (the test's socket
/// directory put for `/var/run/volant`; what a person types after `socat`'s connection, typed
/// a moment later), against a vsock VM: its socket is listed, `socat` with
/// `CONNECT 8080` reaches kestrel's ingress and through it the workload, `volar debug ipam`
/// shows the leases, `volar vms logs --follow` follows the console, and a forced delete leaves
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guides_troubleshooting_commands_work_as_printed() {
    let fd = front_door().await;
    for args in [
        vec!["setup"],
        vec!["plugins", "install", "--manifest", &manifest_file(&fd)],
        vec![
            "vms",
            "create",
            "sec",
            "--plugin",
            "hello",
            "--network",
            "vsock",
        ],
        vec!["vms", "create", "web", "--plugin", "hello", "--no-wait"],
    ] {
        let r = fd.volar(&args);
        assert!(r.ok, "volar {args:?}: {}{}", r.out, r.err);
    }
    let run = fd.cp.run_dir().display().to_string();
    let guide = |command: &str| command.replace("/var/run/volant", &run);

    let listed = fd.cp.host.sh(&guide("ls -la /var/run/volant/vsock-*.sock"));
    assert!(listed.contains("vsock-3.sock"), "{listed}");
    let (_, answer) = fd.cp.host.try_sh(&guide(
        "(printf 'CONNECT 8080\n'; sleep 1; printf 'GET / HTTP/1.0\r\n\r\n'; sleep 3) | \
         timeout 10 socat - UNIX-CONNECT:/var/run/volant/vsock-3.sock",
    ));
    assert!(answer.starts_with("OK "), "{answer}");
    assert!(answer.contains("Hello from Volant"), "{answer}");

    let r = fd.volar(&["debug", "ipam"]);
    assert!(
        r.ok && r.out.contains("192.168.127.100") && r.out.contains("web"),
        "{}{}",
        r.out,
        r.err
    );
    let followed = fd.cp.host.sh(&format!(
        "timeout 3 {} --api http://{} vms logs sec --follow || true",
        volant_tests::bin("volar").display(),
        fd.proxy.addr
    ));
    assert!(followed.contains("kestrel: ready"), "{followed}");

    for vm in ["sec", "web"] {
        let r = fd.volar(&["vms", "delete", vm, "--force"]);
        assert!(r.ok, "{}", r.err);
    }
    let r = fd.volar(&["vms", "list"]);
    assert!(
        !r.out.contains("sec") && !r.out.contains("web"),
        "{}",
        r.out
    );
    let left = fd
        .cp
        .host
        .try_sh(&guide("ls /var/run/volant/vsock-*.sock"))
        .1;
    assert!(!left.contains("vsock-3.sock"), "{left}");
}

/// The networking guide's "multiple networks" recipe, line by line: a bridge made by hand, then
/// a VM on it. The bridge is adopted on first use (its pool from its own address, .100–.254,
/// NAT as for any network), and the answer says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guides_hand_made_bridge_is_adopted_on_first_use() {
    let fd = front_door().await;
    let r = fd.volar(&["setup"]);
    assert!(r.ok, "{}", r.err);
    let r = fd.volar(&["plugins", "install", "--manifest", &manifest_file(&fd)]);
    assert!(r.ok, "{}", r.err);
    fd.cp.host.sh(
        "ip link add volant1 type bridge; ip addr add 192.168.128.1/24 dev volant1; \
         ip link set volant1 up",
    );
    let r = fd.volar(&[
        "vms",
        "create",
        "vm1",
        "--plugin",
        "hello",
        "--network",
        "bridge=volant1",
    ]);
    assert!(r.ok, "{}{}", r.out, r.err);
    assert!(
        r.err
            .contains("adopted the bridge volant1 (192.168.128.1/24)"),
        "{}",
        r.err
    );
    assert!(r.out.contains("192.168.128.100"), "{}", r.out);
    let (_, page) = fd.cp.host.http_get("192.168.128.100:80", "/").unwrap();
    assert!(page.contains("Hello from Volant"), "{page}");
    let rules = volant_tests::firewall_save(&fd.cp.host);
    assert!(
        rules.contains("-s 192.168.128.0/24 ! -o volant1 -j MASQUERADE"),
        "{rules}"
    );
    let r = fd.volar(&["-o", "json", "networks", "list"]);
    let nets: Value = serde_json::from_str(&r.out).unwrap();
    let adopted = nets
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "volant1")
        .unwrap_or_else(|| panic!("{}", r.out));
    assert_eq!(adopted["ip_range"]["start"], "192.168.128.100", "{adopted}");
    assert_eq!(adopted["ip_range"]["end"], "192.168.128.254", "{adopted}");
    // A network created without a range follows the same convention.
    let r = fd.volar(&["networks", "create", "n2", "--subnet", "10.55.0.0/24"]);
    assert!(r.ok, "{}", r.err);
    let (_, n2) = fd.curl("GET", "/networks/n2", None, false);
    assert!(n2.contains(r#""start":"10.55.0.100""#), "{n2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_through_volar_and_curl() {
    let fd = front_door().await;
    let (code, health) = fd.curl("GET", "/health", None, false);
    assert_eq!(code, 200, "{health}");
    assert!(health.contains(r#""status":"ok""#), "{health}");

    let r = fd.volar(&["setup"]);
    assert!(r.ok, "{}", r.err);
    assert!(
        r.out.contains("volant0") && r.out.contains("192.168.127.0/24"),
        "{}",
        r.out
    );

    let r = fd.volar(&["plugins", "install", "--manifest", &manifest_file(&fd)]);
    assert!(r.ok, "{}", r.err);
    let r = fd.volar(&["plugins", "list"]);
    assert!(
        r.out.contains("hello") && r.out.contains("1.0.0"),
        "{}",
        r.out
    );

    // A local API is reached directly whatever http_proxy says, and plain http needs no system
    // CA store (a fresh Debian has none).
    let bare = [
        ("http_proxy", "http://127.0.0.1:9"),
        ("HTTP_PROXY", "http://127.0.0.1:9"),
        ("SSL_CERT_FILE", "/nonexistent"),
        ("SSL_CERT_DIR", "/nonexistent"),
    ];
    let r = fd.volar_with(&bare, &["plugins", "list"]);
    assert!(r.ok && r.out.contains("hello"), "{}{}", r.out, r.err);

    // Create waits until the guest reports ready.
    let r = fd.volar(&["vms", "create", "web", "--plugin", "hello"]);
    assert!(r.ok, "{}", r.err);
    assert!(
        r.out.contains("running") && r.out.contains("192.168.127.100"),
        "{}",
        r.out
    );
    let r = fd.volar(&["vms", "list"]);
    assert!(
        r.out.lines().next().unwrap().starts_with("NAME"),
        "{}",
        r.out
    );
    assert!(
        r.out.contains("web") && r.out.contains("running"),
        "{}",
        r.out
    );
    let r = fd.volar(&["-o", "json", "vms", "get", "web"]);
    let vm: Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(
        (vm["status"].as_str(), vm["ip_address"].as_str()),
        (Some("running"), Some("192.168.127.100"))
    );

    // curl the VM itself, and read its console.
    let (_, page) = fd.cp.host.http_get("192.168.127.100:80", "/").unwrap();
    assert!(page.contains("Hello from Volant"), "{page}");
    // From inside the VM, the guide's example of VM-to-host traffic: the health on the bridge's
    // gateway address, and nothing else there.
    let fetch = |url: &str| {
        fd.cp
            .host
            .http_get("192.168.127.100:80", &format!("/cgi-bin/fetch?{url}"))
            .unwrap()
            .1
    };
    let mut health = String::new();
    for _ in 0..50 {
        health = fetch("http://192.168.127.1:8080/api/v1/health");
        if health.contains(r#""status":"ok""#) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(health.contains(r#""status":"ok""#), "{health}");
    // Its own record, like a cloud's metadata service: known by its address and TAP.
    let me: Value = serde_json::from_str(&fetch("http://192.168.127.1:8080/api/v1/self"))
        .expect("the VM's own record");
    assert_eq!(
        (me["name"].as_str(), me["ip_address"].as_str()),
        (Some("web"), Some("192.168.127.100"))
    );
    // The host is no VM, whatever it sends.
    let (code, body) = fd
        .cp
        .host
        .http_get("192.168.127.1:8080", "/api/v1/self")
        .unwrap();
    assert_eq!(code, 404, "{body}");
    for path in [
        "/api/v1/vms",
        "/api/v1/plugins",
        "/api/v1/openapi.json",
        "/api/v1/vms/web/proxy/",
    ] {
        let refused = fetch(&format!("http://192.168.127.1:8080{path}"));
        assert!(
            !refused.contains("hello") && !refused.contains("Hello"),
            "{path}: {refused}"
        );
        assert!(refused.contains("fetch failed"), "{path}: {refused}");
    }
    // The same page through the gateway's proxy route (bridge mode: the VM's address).
    let (code, page) = fd.curl("GET", "/vms/web/proxy/", None, false);
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("Hello from Volant"), "{page}");
    let (code, page) = fd.curl("GET", "/vms/web/proxy/cgi-bin/whoami?x=1", None, false);
    assert_eq!(code, 200, "{page}");
    let r = fd.volar(&["vms", "logs", "web"]);
    assert!(
        r.out.contains("kestrel: ready ip=192.168.127.100/24"),
        "{}",
        r.out
    );

    // A port forward, reached from the upstream namespace.
    let r = fd.volar(&[
        "ports",
        "add",
        "web",
        "--host-port",
        "8080",
        "--guest-port",
        "80",
    ]);
    assert!(r.ok, "{}", r.err);
    let (code, who) = fd
        .cp
        .up
        .http_get("10.99.0.1:8080", "/cgi-bin/whoami")
        .unwrap();
    assert_eq!((code, who.trim()), (200, "web"));
    let r = fd.volar(&["ports", "list", "web"]);
    assert!(r.out.contains("8080") && r.out.contains("tcp"), "{}", r.out);
    let r = fd.volar(&[
        "ports",
        "add",
        "web",
        "--host-port",
        "8080",
        "--guest-port",
        "81",
    ]);
    assert!(!r.ok && r.err.contains("already forwards"), "{}", r.err);

    // Restart waits for the new boot's guest: the workload answers as soon as volar returns,
    // at the same address, through the forward.
    let r = fd.volar(&["vms", "restart", "web"]);
    assert!(r.ok && r.out.contains("running"), "{}{}", r.out, r.err);
    let (code, who) = fd
        .cp
        .up
        .http_get("10.99.0.1:8080", "/cgi-bin/whoami")
        .unwrap();
    assert_eq!((code, who.trim()), (200, "web"));
    // Each boot has its own console; the previous one is kept, and shows the clean power-off.
    let r = fd.volar(&["vms", "logs", "web"]);
    assert_eq!(r.out.matches("kestrel: ready").count(), 1, "{}", r.out);
    let r = fd.volar(&["vms", "logs", "web", "--previous"]);
    assert_eq!(r.out.matches("kestrel: ready").count(), 1, "{}", r.out);
    assert!(r.out.contains("kestrel: powering off"), "{}", r.out);
    // Starting it now boots nothing, and volar does not wait for a boot that will not come.
    let r = fd.volar(&["vms", "start", "web", "--timeout", "20"]);
    assert!(r.ok && r.out.contains("running"), "{}{}", r.out, r.err);

    // The lease table as the guide shows it.
    let r = fd.volar(&["debug", "ipam"]);
    let mut lines = r.out.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["IP", "VM", "LEASED_AT"]
    );
    assert!(
        lines.next().unwrap().starts_with("192.168.127.100  web"),
        "{}",
        r.out
    );
    let (code, leases) = fd.curl("GET", "/ipam/leases?network=volant0", None, false);
    assert_eq!(code, 200);
    assert!(leases.contains(r#""vm":"web""#), "{leases}");

    // Errors are on stderr with the API's message and a non-zero exit.
    let r = fd.volar(&["vms", "get", "nope"]);
    assert!(
        !r.ok && r.err.starts_with("volar: error:") && r.err.contains("does not exist"),
        "{}",
        r.err
    );

    // Events arrive as server-sent events while the VM goes.
    let mut events = Command::new("ip")
        .args([
            "netns",
            "exec",
            &fd.cp.host.name,
            "curl",
            "-sN",
            "--max-time",
            "30",
        ])
        .arg(format!("http://{}/api/v1/events", fd.proxy.addr))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let r = fd.volar(&["vms", "delete", "web"]);
    assert!(r.ok, "{}", r.err);
    let r = fd.volar(&["vms", "delete", "web"]);
    assert!(r.ok, "deleting twice is fine: {}", r.err);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let _ = events.kill();
    let seen = String::from_utf8_lossy(&events.wait_with_output().unwrap().stdout).to_string();
    assert!(
        seen.contains("event: vm") && seen.contains(r#""status":"deleted""#),
        "{seen}"
    );

    let r = fd.volar(&["vms", "list"]);
    assert_eq!(
        r.out.trim(),
        "NAME  STATUS  PLUGIN  NETWORK  IP  HYPERVISOR  PID"
    );
    let (_, leases) = fd.curl("GET", "/ipam/leases", None, false);
    assert_eq!(leases.trim(), "[]");
    let r = fd.volar(&["completions", "bash"]);
    assert!(r.ok && r.out.contains("_volar"), "completions");
    let r = fd.volar(&["man"]);
    assert!(r.ok && r.out.contains(".TH volar"), "man page");
    fd.check_contract(0);
    drop(fd.gateway);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_400_that_names_the_problem_at_every_endpoint() {
    let mut fd = front_door().await;
    let (code, body) = fd.curl("POST", "/plugins", Some(&hello_manifest()), true);
    assert_eq!(code, 201, "{body}");
    let long = "a".repeat(64);
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(2 << 20));
    let bad_manifest = hello_manifest().replace("\"cmdline\"", "\"colour\": 1, \"cmdline\"");
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"#.into()),
            400,
            "malformed JSON",
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","plugin":"hello","colour":1}"#.into()),
            400,
            "unknown field `colour`",
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":5,"plugin":"hello"}"#.into()),
            400,
            "name: invalid type: integer",
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a"}"#.into()),
            400,
            "missing field `plugin`",
        ),
        (
            "POST",
            "/vms".into(),
            Some(format!(r#"{{"name":"{long}","plugin":"hello"}}"#)),
            400,
            "at most 63",
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"Bad_Name","plugin":"hello"}"#.into()),
            400,
            "lower-case",
        ),
        (
            "GET",
            "/vms/Bad_Name/proxy/".into(),
            None,
            400,
            "lower-case",
        ),
        (
            "GET",
            "/vms/nope/proxy/x".into(),
            None,
            404,
            "vm \"nope\" does not exist",
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","plugin":"nope"}"#.into()),
            404,
            "not installed",
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","plugin":"hello","network":"tap"}"#.into()),
            400,
            "bridge=<network>",
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","plugin":"hello","ip":"x"}"#.into()),
            400,
            "not an IP address",
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","plugin":"hello","cpu_cores":100}"#.into()),
            400,
            "cpu_cores 100",
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","plugin":"hello","memory_mb":16}"#.into()),
            400,
            "memory_mb 16",
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","plugin":"hello","kernel_cmdline":"volant.ip=1"}"#.into()),
            400,
            "set by vmmd",
        ),
        (
            "POST",
            "/vms".into(),
            // Quoted as the kernel reads it: still vmmd's parameters.
            Some(
                r#"{"name":"a","plugin":"hello","kernel_cmdline":"\"volant.name=pwned\" \"volant.ip=192.168.127.200/24\""}"#
                    .into(),
            ),
            400,
            "\"volant.name\": volant.* parameters are set by vmmd",
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","plugin":"hello","kernel_cmdline":"quiet a=\"b"}"#.into()),
            400,
            "a double quote is not closed",
        ),
        ("POST", "/vms".into(), Some(big), 400, "larger than"),
        ("GET", "/vms/Bad_Name".into(), None, 400, "lower-case"),
        ("GET", "/vms/nope".into(), None, 404, "does not exist"),
        (
            "DELETE",
            "/vms/nope?force=maybe".into(),
            None,
            400,
            "invalid query string",
        ),
        (
            "DELETE",
            "/vms/nope?colour=red".into(),
            None,
            400,
            "unknown field `colour`",
        ),
        (
            "POST",
            "/vms/nope/start".into(),
            None,
            404,
            "does not exist",
        ),
        ("POST", "/vms/nope/stop".into(), None, 404, "does not exist"),
        (
            "POST",
            "/vms/nope/restart".into(),
            None,
            404,
            "does not exist",
        ),
        ("GET", "/vms/nope/logs".into(), None, 404, "does not exist"),
        ("GET", "/vms/nope/ports".into(), None, 404, "does not exist"),
        (
            "POST",
            "/vms/nope/ports".into(),
            Some(r#"{"host_port":8080,"guest_port":80}"#.into()),
            404,
            "does not exist",
        ),
        (
            "POST",
            "/vms/nope/ports".into(),
            Some(r#"{"host_port":"x"}"#.into()),
            400,
            "host_port: invalid type",
        ),
        (
            "DELETE",
            "/vms/nope/ports/abc".into(),
            None,
            400,
            "invalid path",
        ),
        (
            "DELETE",
            "/vms/nope/ports/80".into(),
            None,
            404,
            "does not exist",
        ),
        (
            "POST",
            "/networks".into(),
            Some(r#"{"name":"x1","subnet":"bad"}"#.into()),
            400,
            "CIDR",
        ),
        (
            "POST",
            "/networks".into(),
            Some(r#"{"name":"Bad!","subnet":"10.7.0.0/24"}"#.into()),
            400,
            "network name",
        ),
        (
            "POST",
            "/networks".into(),
            Some(r#"{"name":"x1","subnet":"192.168.0.0/16"}"#.into()),
            400,
            "overlaps",
        ),
        (
            "POST",
            "/networks".into(),
            Some(r#"{"name":"volant0","subnet":"10.7.0.0/24"}"#.into()),
            409,
            "already exists",
        ),
        (
            "POST",
            "/networks".into(),
            Some(r#"{"name":"mc","subnet":"224.0.0.0/24"}"#.into()),
            400,
            "multicast",
        ),
        (
            "POST",
            "/networks".into(),
            Some(r#"{"name":"lo1","subnet":"127.0.0.0/24"}"#.into()),
            400,
            "loopback",
        ),
        (
            "POST",
            "/networks".into(),
            Some(r#"{"name":"meta","subnet":"169.254.169.0/24"}"#.into()),
            400,
            "link-local",
        ),
        (
            "POST",
            "/networks".into(),
            Some(r#"{"name":"all","subnet":"0.0.0.0/0"}"#.into()),
            400,
            "overlaps 0.0.0.0/8",
        ),
        (
            "POST",
            "/networks".into(),
            // The same network with NAT off: create is create, it changes nothing.
            Some(
                r#"{"name":"volant0","subnet":"192.168.127.0/24","gateway":"192.168.127.1","ip_range":{"start":"192.168.127.100","end":"192.168.127.254"},"nat":false}"#
                    .into(),
            ),
            409,
            "already exists with nat true",
        ),
        (
            "PATCH",
            "/networks/volant0".into(),
            Some(r#"{"nat":false}"#.into()),
            412,
            "defined by the config file",
        ),
        (
            "PATCH",
            "/networks/nope".into(),
            Some(r#"{"nat":false}"#.into()),
            404,
            "does not exist",
        ),
        (
            "PATCH",
            "/networks/volant0".into(),
            Some(r#"{"subnet":"10.7.0.0/24"}"#.into()),
            400,
            "unknown field `subnet`",
        ),
        (
            "POST",
            "/networks".into(),
            Some(r#"{"name":"x1","subnet":"10.7.0.0/24","ip_range":{"start":"10.7.0.9"}}"#.into()),
            400,
            "missing field `end`",
        ),
        (
            "POST",
            "/networks".into(),
            Some(r#"{"name":"x1","subnet":"10.7.0.0/24","nat":"yes"}"#.into()),
            400,
            "nat: invalid type",
        ),
        ("GET", "/networks/nope".into(), None, 404, "does not exist"),
        (
            "DELETE",
            "/networks/volant0".into(),
            None,
            412,
            "config file",
        ),
        ("DELETE", "/networks/Bad!".into(), None, 400, "network name"),
        (
            "GET",
            "/ipam/leases?network=nope".into(),
            None,
            404,
            "does not exist",
        ),
        ("GET", "/ipam/leases?network=Bad!".into(), None, 400, "pool"),
        (
            "POST",
            "/plugins".into(),
            Some("[]".into()),
            400,
            "expected a JSON object",
        ),
        (
            "POST",
            "/plugins".into(),
            Some(bad_manifest),
            400,
            "boot.colour: unknown field",
        ),
        ("GET", "/plugins/nope".into(), None, 404, "not installed"),
        ("DELETE", "/plugins/Bad_".into(), None, 400, "plugin name"),
        ("GET", "/nope".into(), None, 404, "no such endpoint"),
        ("PUT", "/vms".into(), None, 405, "not allowed"),
        // A network without an address pool: refused, and no failed VM is left to block a
        // retry once the network exists (`GET /vms` below is still empty).
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"vm1","plugin":"hello","network":"bridge=volant9"}"#.into()),
            404,
            "has no address pool",
        ),
    ];
    let before = fd.curl("GET", "/networks", None, false).1;
    for (method, path, body, status, why) in &cases {
        let (code, answer) = fd.curl(method, path, body.as_deref(), true);
        assert_eq!(code, *status, "{method} {path}: {answer}");
        let v: Value =
            serde_json::from_str(&answer).unwrap_or_else(|_| panic!("{method} {path}: {answer}"));
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(why),
            "{method} {path}: {error:?} lacks {why:?}"
        );
        assert!(
            v["details"]["code"].is_string(),
            "{method} {path}: {answer}"
        );
    }
    let (code, answer) = fd.curl(
        "POST",
        "/vms",
        Some(r#"{"name":"a","plugin":"hello"}"#),
        false,
    );
    assert_eq!(code, 400, "no content type: {answer}");
    assert!(
        answer.contains("Content-Type: application/json"),
        "{answer}"
    );
    assert_eq!(
        fd.curl("GET", "/networks", None, false).1,
        before,
        "bad input changed nothing"
    );
    assert!(
        volant_tests::firewall_save(&fd.cp.host).contains("MASQUERADE"),
        "volant0 lost its NAT"
    );

    // A network made through the API changes its NAT through an update.
    let (code, made) = fd.curl(
        "POST",
        "/networks",
        Some(r#"{"name":"nn1","subnet":"10.77.0.0/24"}"#),
        true,
    );
    assert_eq!(code, 201, "{made}");
    let (code, changed) = fd.curl("PATCH", "/networks/nn1", Some(r#"{"nat":false}"#), true);
    assert_eq!(code, 200, "{changed}");
    assert!(changed.contains(r#""nat":false"#), "{changed}");
    assert!(!volant_tests::firewall_save(&fd.cp.host).contains("10.77.0.0/24 ! -o nn1"));
    let (code, _) = fd.curl("DELETE", "/networks/nn1", None, false);
    assert_eq!(code, 204);
    assert_eq!(fd.curl("GET", "/vms", None, false).1.trim(), "[]");

    // A service that is down: 503 naming it, quickly, not a hang.
    fd.cp.ipamd.kill9();
    let started = std::time::Instant::now();
    let (code, answer) = fd.curl("GET", "/ipam/leases", None, false);
    assert_eq!(code, 503, "{answer}");
    assert!(answer.contains("ipamd did not answer"), "{answer}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let (code, health) = fd.curl("GET", "/health", None, false);
    assert_eq!(code, 503);
    assert!(
        health.contains(r#""status":"degraded""#) && health.contains(r#""vmmd":"ok""#),
        "{health}"
    );
    fd.check_contract(2);
}

/// Schemathesis (PyPI, pinned) against the document the gateway serves, for a bounded time:
/// positive and negative data, examples, coverage, fuzzing and stateful phases, every check.
/// No answer may be a 5xx or off the document. The proxy route is left out: what it answers
/// is the workload's (the document says so with its `default` answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_nothing_off_the_document() {
    let fd = front_door().await;
    let (_, doc) = fd.curl("GET", "/openapi.json", None, false);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    let mut ids = std::collections::BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap();
            assert!(ids.insert(id.to_string()), "operationId {id} twice");
            for (status, answer) in op["responses"].as_object().unwrap() {
                assert!(
                    answer["description"].is_string(),
                    "{method} {path} {status} has no description"
                );
            }
            for p in op["parameters"].as_array().into_iter().flatten() {
                assert!(p["schema"].is_object(), "{method} {path}: {p}");
            }
        }
    }
    let events = &doc["paths"]["/api/v1/events"]["get"]["responses"]["200"];
    assert!(
        events["description"]
            .as_str()
            .unwrap()
            .contains("event: vm"),
        "{events}"
    );
    let installed = fd.volar(&["plugins", "install", "--manifest", &manifest_file(&fd)]);
    assert!(installed.ok, "{}", installed.err);
    let interop = std::path::PathBuf::from(std::env::var_os("VOLANT_INTEROP").expect("tests/run"));
    let report = fd.cp.root.path().join("schemathesis.xml");
    let out = Command::new("ip")
        .args(["netns", "exec", &fd.cp.host.name])
        .arg(interop.join("venv/bin/schemathesis"))
        .arg("--config-file")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemathesis.toml"))
        .args(["run", "http://127.0.0.1:8080/api/v1/openapi.json"])
        .args(["--checks", "all", "--mode", "all", "--max-time", "90"])
        .args(["--exclude-path-regex", "/proxy"])
        .args(["--seed", "1", "--no-color", "--workers", "2"])
        .args(["--generation-database", "none"])
        .arg("--report-junit-path")
        .arg(&report)
        .args(["--report", "junit"])
        .current_dir(fd.cp.root.path())
        .output()
        .expect("schemathesis");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("passed"), "{text}");
}
