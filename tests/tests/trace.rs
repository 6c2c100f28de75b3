//! Traces and metrics of the real gateway and daemons, all exporting to an in-test OTLP receiver
//! and serving Prometheus' text format on `metrics_listen`.
//!
//! One trace per request: a bridge VM's create (`volar vms create`) is one trace over gateway,
//! vmmd, ipamd and netd; a vsock VM's over gateway, vmmd and proxyd; a request through the proxy
//! route goes on into proxyd's ingress span; an egress request of the guest is a decision span.
//! Every span names its operation and carries the VM's name; every request span (HTTP and gRPC,
//! both sides) carries its outcome. The metrics count what happened, and follow it back down
//! when the VMs are deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use volant_services::api::vmm::v1::{DeleteVmRequest, GetVmRequest, VmStatus};
use volant_tests::otlp::{Receiver, Span};
use volant_tests::{ControlPlane, Netns, bin, host_and_upstream};

/// Where each daemon serves its metrics, inside the host namespace.
const METRICS: [(&str, &str); 5] = [
    ("ipamd", "127.0.0.1:9101"),
    ("netd", "127.0.0.1:9102"),
    ("proxyd", "127.0.0.1:9103"),
    ("vmmd", "127.0.0.1:9104"),
    ("gateway", "127.0.0.1:9105"),
];

fn metrics_config() -> (String, String) {
    let at = |svc: &str| METRICS.iter().find(|(s, _)| *s == svc).unwrap().1;
    let sections = ["ipamd", "netd", "proxyd", "gateway"]
        .iter()
        .map(|svc| format!("{svc}:\n  metrics_listen: tcp://{}\n", at(svc)))
        .collect();
    let vmmd = format!(
        "  stop_timeout_secs: 5\n  metrics_listen: tcp://{}",
        at("vmmd")
    );
    (vmmd, sections)
}

/// `service`'s metrics in Prometheus' text format.
fn scrape(ns: &Netns, service: &str) -> String {
    let addr = METRICS.iter().find(|(s, _)| *s == service).unwrap().1;
    let (code, body) = ns.http_get(addr, "/metrics").expect("scrape");
    assert_eq!(code, 200, "{service}: {body}");
    body
}

/// The value of the sample `series` (name and labels, exactly as written) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until `service`'s sample `series` is `want`.
async fn until_sample(ns: &Netns, service: &str, series: &str, want: f64) {
    let mut text = String::new();
    for _ in 0..100 {
        text = scrape(ns, service);
        if sample(&text, series) == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{service}: {series} is not {want} in:\n{text}");
}

/// The trace whose root is the gateway's `POST /api/v1/vms` for `vm`.
fn trace_of<'a>(spans: &'a [Span], vm: &str) -> Option<Vec<&'a Span>> {
    let root = spans.iter().find(|s| {
        s.service == "gateway"
            && s.name == "POST /api/v1/vms"
            && s.attributes.get("vm").map(String::as_str) == Some(vm)
    })?;
    Some(
        spans
            .iter()
            .filter(|s| s.trace_id == root.trace_id)
            .collect(),
    )
}

fn services(trace: &[&Span]) -> BTreeSet<String> {
    trace.iter().map(|s| s.service.clone()).collect()
}

fn names(trace: &[&Span]) -> BTreeSet<String> {
    trace
        .iter()
        .map(|s| format!("{}: {}", s.service, s.name))
        .collect()
}

/// The trace is one tree: one root (the gateway's span), every other span's parent in it.
fn check_tree(trace: &[&Span], vm: &str) {
    let ids: BTreeMap<&str, &Span> = trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let roots: Vec<&&Span> = trace.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 1, "one root: {:#?}", names(trace));
    assert_eq!(roots[0].service, "gateway");
    for s in trace {
        assert!(
            s.parent.is_empty() || ids.contains_key(s.parent.as_str()),
            "{}: {} hangs off a span outside the trace",
            s.service,
            s.name
        );
        assert_eq!(
            s.attributes.get("vm").map(String::as_str),
            Some(vm),
            "{}: {} does not name the VM: {:?}",
            s.service,
            s.name,
            s.attributes
        );
        let request = s.attributes.contains_key("rpc.system")
            || s.attributes.contains_key("http.request.method");
        if request {
            assert_eq!(
                s.attributes.get("outcome").map(String::as_str),
                Some("ok"),
                "{}: {} has no outcome: {:?}",
                s.service,
                s.name,
                s.attributes
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_and_metrics_follow_each_request() {
    let (host, up) = host_and_upstream();
    let receiver = Receiver::start(&host);
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
    ];
    let (vmmd, sections) = metrics_config();
    let cp = ControlPlane::start_with_config(host, up, &env, &vmmd, &sections).await;
    let _gateway = cp.gateway(&env).await;
    let mut vmm = cp.vmm();
    cp.install_hello().await;
    for (vm, network) in [("web", "bridge"), ("safe", "vsock")] {
        let out = Command::new("ip")
            .args(["netns", "exec", &cp.host.name])
            .arg(bin("volar"))
            .args(["--api", "http://127.0.0.1:8080", "vms", "create", vm])
            .args(["--plugin", "hello", "--network", network, "--no-wait"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every service exports in batches; wait until both traces are whole.
    let spans = receiver
        .wait_for(Duration::from_secs(30), |spans| {
            let whole = |vm: &str, want: &[&str]| {
                trace_of(spans, vm).is_some_and(|t| {
                    let s = services(&t);
                    want.iter().all(|w| s.contains(*w)) && t.iter().any(|s| s.name == "vm.booting")
                })
            };
            whole("web", &["gateway", "vmmd", "ipamd", "netd"])
                && whole("safe", &["gateway", "vmmd", "proxyd"])
        })
        .await;

    let web = trace_of(&spans, "web").expect("a trace for web");
    check_tree(&web, "web");
    let web_names = names(&web);
    for want in [
        "gateway: POST /api/v1/vms",
        "gateway: volant.vmm.v1.Vmm/CreateVm",
        "vmmd: volant.vmm.v1.Vmm/CreateVm",
        "vmmd: vm.record",
        "vmmd: ipamd.allocate",
        "vmmd: volant.ipam.v1.Ipam/Allocate",
        "ipamd: volant.ipam.v1.Ipam/Allocate",
        "vmmd: netd.create_tap",
        "netd: volant.net.v1.Net/CreateTap",
        "vmmd: hypervisor.launch",
        "vmmd: vm.booting",
    ] {
        assert!(
            web_names.contains(want),
            "{want} missing from {web_names:#?}"
        );
    }

    let safe = trace_of(&spans, "safe").expect("a trace for safe");
    check_tree(&safe, "safe");
    let safe_names = names(&safe);
    for want in [
        "vmmd: proxyd.register",
        "proxyd: volant.proxy.v1.Proxy/RegisterVm",
        "vmmd: vsock.backend",
    ] {
        assert!(
            safe_names.contains(want),
            "{want} missing from {safe_names:#?}"
        );
    }
    assert!(
        !services(&safe).contains("ipamd") && !services(&safe).contains("netd"),
        "a vsock VM needs no address and no TAP: {safe_names:#?}"
    );

    proxied_and_egress(&cp, &receiver).await;
    metrics(&cp, &receiver).await;

    for vm in ["web", "safe"] {
        vmm.delete_vm(DeleteVmRequest {
            name: vm.into(),
            force: true,
        })
        .await
        .unwrap();
    }
    // Gauges follow the deletes back down.
    until_sample(
        &cp.host,
        "vmmd",
        "volant_vms{volant_vm_state=\"running\"}",
        0.0,
    )
    .await;
    until_sample(
        &cp.host,
        "ipamd",
        "volant_ipam_leases{volant_pool=\"volant0\"}",
        0.0,
    )
    .await;
    until_sample(
        &cp.host,
        "netd",
        "volant_netd_taps{volant_network=\"volant0\"}",
        0.0,
    )
    .await;
}

/// Waits until both VMs run, then sends a request through the proxy route to the vsock VM and
/// an egress request of its guest: the first goes on in proxyd's ingress span, inside the
/// gateway's trace; the second is a decision span of its own.
async fn proxied_and_egress(cp: &ControlPlane, receiver: &Receiver) {
    let mut vmm = cp.vmm();
    for vm in ["web", "safe"] {
        let mut status = 0;
        for _ in 0..600 {
            let got = vmm.get_vm(GetVmRequest { name: vm.into() }).await.unwrap();
            status = got.into_inner().vm.unwrap().status;
            if status == VmStatus::Running as i32 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(status, VmStatus::Running as i32, "{vm} never ran");
    }
    let (code, page) = cp
        .host
        .http_get("127.0.0.1:8080", "/api/v1/vms/safe/proxy/")
        .unwrap();
    assert_eq!(code, 200, "{page}");

    let egress = cp.egress_socket("safe").await;
    let mut s = tokio::net::UnixStream::connect(&egress).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        b"GET http://denied.example.test/ HTTP/1.1\r\nhost: denied.example.test\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut answer)
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");

    let spans = receiver
        .wait_for(Duration::from_secs(30), |spans| {
            let joined = |i: &Span| spans.iter().any(|s| s.span_id == i.parent);
            spans
                .iter()
                .any(|s| s.service == "proxyd" && s.name == "ingress GET" && joined(s))
                && spans.iter().any(|s| s.name == "egress.decision")
        })
        .await;
    let ingress = spans
        .iter()
        .find(|s| s.service == "proxyd" && s.name == "ingress GET")
        .expect("proxyd's ingress span");
    assert_eq!(
        ingress.attributes.get("vm").map(String::as_str),
        Some("safe")
    );
    assert_eq!(
        ingress
            .attributes
            .get("http.response.status_code")
            .map(String::as_str),
        Some("200")
    );
    let parent = spans
        .iter()
        .find(|s| s.span_id == ingress.parent)
        .expect("the ingress span's parent was exported");
    assert_eq!(parent.trace_id, ingress.trace_id);
    assert_eq!(parent.service, "gateway", "{parent:?}");
    assert!(
        parent.name.starts_with("GET /api/v1/vms/{name}/proxy"),
        "{parent:?}"
    );

    let decision = spans.iter().find(|s| s.name == "egress.decision").unwrap();
    assert_eq!(decision.service, "proxyd");
    assert!(
        decision.parent.is_empty(),
        "a decision is a trace of its own"
    );
    for (k, v) in [
        ("vm", "safe"),
        ("server.address", "denied.example.test"),
        ("server.port", "80"),
        ("http.request.method", "GET"),
        ("volant.decision", "deny"),
    ] {
        assert_eq!(
            decision.attributes.get(k).map(String::as_str),
            Some(v),
            "{k}: {decision:?}"
        );
    }
}

/// Each daemon's Prometheus endpoint counts what the test did, and the same instruments reach
/// the OTLP receiver; the endpoint serves nothing but `GET /metrics`.
async fn metrics(cp: &ControlPlane, receiver: &Receiver) {
    let ns = &cp.host;
    let vmmd = scrape(ns, "vmmd");
    for (series, want) in [
        ("volant_vms{volant_vm_state=\"running\"}", 2.0),
        ("volant_vms{volant_vm_state=\"failed\"}", 0.0),
        (
            "volant_vm_operation_duration_seconds_count{volant_operation=\"create\"}",
            2.0,
        ),
    ] {
        assert_eq!(sample(&vmmd, series), Some(want), "{series} in:\n{vmmd}");
    }
    let ipamd = scrape(ns, "ipamd");
    assert_eq!(
        sample(&ipamd, "volant_ipam_pool_size{volant_pool=\"volant0\"}"),
        Some(155.0),
        "{ipamd}"
    );
    assert_eq!(
        sample(&ipamd, "volant_ipam_leases{volant_pool=\"volant0\"}"),
        Some(1.0),
        "{ipamd}"
    );
    let netd = scrape(ns, "netd");
    assert_eq!(
        sample(&netd, "volant_netd_taps{volant_network=\"volant0\"}"),
        Some(1.0),
        "{netd}"
    );
    assert!(
        sample(&netd, "volant_netd_rule_sync_duration_seconds_count{volant_outcome=\"ok\",volant_table=\"iptables\"}")
            .is_some_and(|n| n >= 1.0),
        "{netd}"
    );
    let proxyd = scrape(ns, "proxyd");
    for (series, want) in [
        (
            "volant_proxy_ingress_duration_seconds_count{http_request_method=\"GET\",http_response_status_code=\"200\"}",
            1.0,
        ),
        ("volant_proxy_egress_tunnels", 0.0),
    ] {
        assert_eq!(
            sample(&proxyd, series),
            Some(want),
            "{series} in:\n{proxyd}"
        );
    }
    assert!(
        proxyd
            .lines()
            .any(|l| l.starts_with("volant_proxy_egress_decisions_total{volant_decision=\"deny\"")),
        "{proxyd}"
    );
    let gateway = scrape(ns, "gateway");
    assert_eq!(
        sample(
            &gateway,
            "http_server_request_duration_seconds_count{http_request_method=\"POST\",http_response_status_code=\"201\",http_route=\"/api/v1/vms\"}"
        ),
        Some(2.0),
        "{gateway}"
    );
    for text in [&vmmd, &ipamd, &netd, &proxyd, &gateway] {
        assert!(text.contains("# TYPE "), "{text}");
        assert!(text.contains("target_info{service_name="), "{text}");
    }
    // Nothing but GET /metrics there.
    let addr = METRICS[0].1;
    assert_eq!(ns.http_get(addr, "/").unwrap().0, 404);
    assert_eq!(ns.http_get(addr, "/metrics/../api").unwrap().0, 404);

    // The same instruments over OTLP, every second.
    let want = [
        ("vmmd", "volant.vms"),
        ("vmmd", "volant.vm.operation.duration"),
        ("ipamd", "volant.ipam.leases"),
        ("netd", "volant.netd.rule_sync.duration"),
        ("proxyd", "volant.proxy.ingress.duration"),
        ("gateway", "http.server.request.duration"),
    ];
    let mut names = Default::default();
    for _ in 0..100 {
        names = receiver.metric_names();
        if want
            .iter()
            .all(|(s, m)| names.contains(&(s.to_string(), m.to_string())))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("OTLP metrics missing; received {names:#?}");
}
