//! 200 VM creates at once against the default pool of 155 addresses, with the real daemons
//! and QEMU: exactly 155 VMs run, 45 creates fail cleanly with RESOURCE_EXHAUSTED (HTTP 409)
//! and leave nothing behind, not even a record, and deleting them all leaves nothing behind.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Endpoint;
use volant_services::Addr;
use volant_services::api::vmm::v1::DeleteVmRequest;
use volant_services::api::vmm::v1::vmm_client::VmmClient;
use volant_tests::invariants::{control_plane, converge, request, snapshot, up};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency() {
    let cp = control_plane().await;
    // 200 creates on two cores take longer than a client's default deadline.
    let Addr::Unix(sock) = cp.vmmd.addr() else {
        unreachable!("vmmd listens on its Unix socket")
    };
    let patient = Endpoint::from_shared(format!("unix:{}", sock.display()))
        .unwrap()
        .timeout(Duration::from_secs(1200))
        .connect_lazy();
    let started = Instant::now();
    let creates: Vec<_> = (0..200)
        .map(|i| {
            let mut vmm = VmmClient::new(patient.clone());
            tokio::spawn(async move { vmm.create_vm(request(&format!("p{i}"), "")).await })
        })
        .collect();
    let mut codes = BTreeMap::new();
    for c in creates {
        let code = match c.await.unwrap() {
            Ok(_) => Code::Ok,
            Err(e) => {
                assert!(
                    e.message().contains("no free address"),
                    "a refusal says why: {}",
                    e.message()
                );
                e.code()
            }
        };
        *codes.entry(format!("{code:?}")).or_insert(0) += 1;
    }
    let wall = started.elapsed();
    let bad = converge(&cp, Duration::from_secs(60)).await;
    let s = snapshot(&cp).await.unwrap();
    let running = s.vms.values().filter(|v| up(v.status)).count();
    println!(
        "200 concurrent creates in {:.1} s: {codes:?}; {running} booting or running, {} leases, {} TAPs, {} hypervisors",
        wall.as_secs_f64(),
        s.leases.len(),
        s.links.len(),
        s.hypervisors.len()
    );
    assert_eq!(codes.get("Ok"), Some(&155), "{codes:?}");
    assert_eq!(codes.get("ResourceExhausted"), Some(&45), "{codes:?}");
    assert_eq!(running, 155);
    assert_eq!(
        (s.leases.len(), s.links.len(), s.hypervisors.len()),
        (155, 155, 155)
    );
    assert!(bad.is_empty(), "{bad:#?}");
    // A refused create leaves no VM behind: its name is free for a retry.
    assert_eq!(s.vms.len(), 155, "{:?}", s.vms.keys().collect::<Vec<_>>());
    let names: Vec<String> = s.vms.into_keys().collect();
    let deletes: Vec<_> = names
        .into_iter()
        .map(|name| {
            let mut vmm = cp.vmm();
            tokio::spawn(async move {
                vmm.delete_vm(DeleteVmRequest { name, force: true })
                    .await
                    .map(drop)
            })
        })
        .collect();
    for d in deletes {
        d.await.unwrap().unwrap();
    }
    let bad = converge(&cp, Duration::from_secs(60)).await;
    assert!(bad.is_empty(), "{bad:#?}");
    let s = snapshot(&cp).await.unwrap();
    assert!(s.vms.is_empty() && s.leases.is_empty() && s.links.is_empty());
    assert!(s.hypervisors.is_empty());
}
