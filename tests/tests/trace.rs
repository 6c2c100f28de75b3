//! One trace per request: `volar vms create` against the real gateway and daemons, all exporting
//! to an in-test OTLP receiver. A bridge VM's create is one trace over gateway, vmmd, ipamd and
//! netd; a vsock VM's over gateway, vmmd and proxyd. Every span names its operation and carries
//! the VM's name; every request span (HTTP and gRPC, both sides) carries its outcome.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use volant_services::api::vmm::v1::DeleteVmRequest;
use volant_tests::otlp::{Receiver, Span};
use volant_tests::{ControlPlane, bin, host_and_upstream};

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
async fn a_create_is_one_trace_across_the_services() {
    let (host, up) = host_and_upstream();
    let receiver = Receiver::start(&host);
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str())];
    let cp = ControlPlane::start_in(host, up, &env, "").await;
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

    for vm in ["web", "safe"] {
        vmm.delete_vm(DeleteVmRequest {
            name: vm.into(),
            force: true,
        })
        .await
        .unwrap();
    }
}
