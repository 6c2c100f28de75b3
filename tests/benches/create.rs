//! How long creating a VM takes, and where the time goes: 20 creates (each deleted right after)
//! against the real ipamd, netd and vmmd (release builds) in a throwaway namespace, with their
//! spans exported over OTLP to a receiver in this process. Prints the control plane's share
//! (request in → hypervisor spawned) and each step's p50 from the spans, and the boot time to
//! `kestrel: ready` under TCG for the first three.
//!
//! `cargo build --release --workspace --bins && cargo bench -p volant-tests --bench create`
//! (as root, after tests/run has built the guest).

use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use volant_services::api::vmm::v1::{
    CreateVmRequest, DeleteVmRequest, InstallPluginRequest, StreamLogsRequest,
};
use volant_tests::otlp::{Receiver, Span};
use volant_tests::{ControlPlane, hello_manifest, host_and_upstream};

const CREATES: usize = 20;
const BOOTS: usize = 3;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn p(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[((values.len() as f64 * q) as usize).min(values.len() - 1)]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let (host, up) = host_and_upstream();
    let receiver = Receiver::start(&host);
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("RUST_LOG", "warn"),
    ];
    let cp = ControlPlane::start_in(host, up, &env, "").await;
    let mut vmm = cp.vmm();
    vmm.install_plugin(InstallPluginRequest {
        manifest_json: hello_manifest(),
    })
    .await
    .unwrap();

    let mut walls = Vec::new();
    let mut boots = Vec::new();
    for i in 0..CREATES {
        let name = format!("bench{i}");
        let t0 = Instant::now();
        vmm.create_vm(CreateVmRequest {
            name: name.clone(),
            plugin: "hello".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        walls.push(ms(t0.elapsed()));
        if i < BOOTS {
            let mut logs = vmm
                .stream_logs(StreamLogsRequest {
                    name: name.clone(),
                    follow: true,
                    previous: false,
                })
                .await
                .unwrap()
                .into_inner();
            let mut console = String::new();
            while let Some(Ok(chunk)) = logs.next().await {
                console.push_str(&String::from_utf8_lossy(&chunk.data));
                if console.contains("kestrel: ready") {
                    break;
                }
            }
            boots.push(ms(t0.elapsed()));
        }
        vmm.delete_vm(DeleteVmRequest { name, force: false })
            .await
            .unwrap();
    }

    let spans = receiver
        .wait_for(Duration::from_secs(10), |s| {
            s.iter()
                .filter(|x| x.name == "volant.vmm.v1.Vmm/CreateVm" && x.service == "vmmd")
                .count()
                >= CREATES
        })
        .await;
    let requests: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "volant.vmm.v1.Vmm/CreateVm" && s.service == "vmmd")
        .collect();
    assert_eq!(requests.len(), CREATES, "every create exported its span");
    let steps = [
        ("vm.record", "vmmd", "persist the VM as creating (durable)"),
        (
            "volant.ipam.v1.Ipam/Allocate",
            "ipamd",
            "ipamd: lease (durable)",
        ),
        ("ipamd.allocate", "vmmd", "  as vmmd sees it"),
        ("volant.net.v1.Net/CreateTap", "netd", "netd: TAP (durable)"),
        ("netd.create_tap", "vmmd", "  as vmmd sees it"),
        ("vm.prepare", "vmmd", "command line, accelerator, persist"),
        ("hypervisor.spawn", "vmmd", "spawn QEMU (fork/exec)"),
        (
            "hypervisor.ready",
            "vmmd",
            "QEMU start-up to QMP (excluded)",
        ),
        ("vm.booting", "vmmd", "persist booting (durable)"),
    ];
    println!("| step | p50 ms | p90 ms | max ms |");
    println!("|---|---:|---:|---:|");
    for (name, service, what) in steps {
        let mut d: Vec<f64> = requests
            .iter()
            .filter_map(|r| {
                spans
                    .iter()
                    .find(|s| s.trace_id == r.trace_id && s.name == name && s.service == service)
            })
            .map(|s| ms(s.duration()))
            .collect();
        if d.is_empty() {
            println!("| {what} (`{name}`) | – | – | – |");
            continue;
        }
        println!(
            "| {what} (`{name}`) | {:.2} | {:.2} | {:.2} |",
            p(&mut d, 0.5),
            p(&mut d, 0.9),
            p(&mut d, 1.0)
        );
    }
    let mut share: Vec<f64> = requests
        .iter()
        .filter_map(|r| {
            let spawn = spans
                .iter()
                .find(|s| s.trace_id == r.trace_id && s.name == "hypervisor.spawn")?;
            Some((spawn.end_ns.saturating_sub(r.start_ns)) as f64 / 1e6)
        })
        .collect();
    let mut total: Vec<f64> = requests.iter().map(|r| ms(r.duration())).collect();
    println!(
        "| **control plane: request in → hypervisor spawned** | **{:.2}** | {:.2} | {:.2} |",
        p(&mut share, 0.5),
        p(&mut share, 0.9),
        p(&mut share, 1.0)
    );
    println!(
        "| CreateVm in vmmd, end to end (incl. QEMU start-up) | {:.2} | {:.2} | {:.2} |",
        p(&mut total, 0.5),
        p(&mut total, 0.9),
        p(&mut total, 1.0)
    );
    println!(
        "| CreateVm as the client sees it | {:.2} | {:.2} | {:.2} |",
        p(&mut walls, 0.5),
        p(&mut walls, 0.9),
        p(&mut walls, 1.0)
    );
    println!(
        "| create → `kestrel: ready` (TCG, {} boots) | {:.0} | – | {:.0} |",
        boots.len(),
        p(&mut boots, 0.5),
        p(&mut boots, 1.0)
    );
    drop(cp);
}
