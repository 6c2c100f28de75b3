//! ipamd as a real process: its socket, health and reflection, the allocation order, crashes,
//! concurrency, bad input and configuration.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use volant_services::Channel;
use volant_services::api::ipam::v1::ipam_client::IpamClient;
use volant_services::api::ipam::v1::{
    AllocateRequest, CreatePoolRequest, DeletePoolRequest, GetLeaseRequest, GetPoolRequest,
    ListLeasesRequest, ListPoolsRequest, Pool, ReleaseRequest, ReleaseVmRequest, get_lease_request,
    release_request,
};
use volant_tests::{Daemon, run};

type Client = IpamClient<Channel>;

async fn ipamd(root: &std::path::Path) -> (Daemon, Client) {
    let d = Daemon::start("ipamd", root, &[]).await;
    let c = IpamClient::new(d.channel());
    (d, c)
}

async fn allocate(c: &mut Client, pool: &str, vm: &str) -> Result<String, tonic::Status> {
    let req = AllocateRequest {
        pool: pool.into(),
        vm: vm.into(),
        requested_ip: None,
    };
    Ok(c.allocate(req).await?.into_inner().lease.unwrap().ip)
}

async fn leases(c: &mut Client) -> Vec<(String, String, String)> {
    c.list_leases(ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leases
        .into_iter()
        .map(|l| (l.pool, l.ip, l.vm))
        .collect()
}

async fn create_pool(c: &mut Client, name: &str, subnet: &str) {
    c.create_pool(CreatePoolRequest {
        pool: Some(Pool {
            name: name.into(),
            subnet: subnet.into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn serves_health_and_reflection_on_a_private_socket_and_stops_cleanly() {
    let root = tempfile::tempdir().unwrap();
    let (mut d, _) = ipamd(root.path()).await;
    let sock = d.run_dir.join("ipamd.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");

    let mut health = HealthClient::new(d.channel());
    for service in ["", "volant.ipam.v1.Ipam"] {
        let reply = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(reply.into_inner().status, 1, "{service:?} SERVING");
    }

    let mut reflection = ServerReflectionClient::new(d.channel());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["volant.ipam.v1.Ipam", "grpc.health.v1.Health"] {
        assert!(names.contains(want), "{want} missing from {names:?}");
    }
    drop(replies);

    let status = d.terminate();
    assert!(status.success(), "SIGTERM exit status {status}");
    assert!(!sock.exists(), "socket removed on exit");
}

#[tokio::test]
async fn first_free_address_in_numeric_order_until_exhausted() {
    let root = tempfile::tempdir().unwrap();
    let (_d, mut c) = ipamd(root.path()).await;
    for i in 100..=254 {
        let ip = allocate(&mut c, "volant0", &format!("vm-{i}"))
            .await
            .unwrap();
        assert_eq!(ip, format!("192.168.127.{i}"));
    }
    let err = allocate(&mut c, "volant0", "vm-156th").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("no free address"),
        "{}",
        err.message()
    );

    // Asking again for the same VM returns its lease.
    assert_eq!(
        allocate(&mut c, "volant0", "vm-120").await.unwrap(),
        "192.168.127.120"
    );

    let released = c
        .release(ReleaseRequest {
            pool: "volant0".into(),
            target: Some(release_request::Target::Ip("192.168.127.150".into())),
        })
        .await
        .unwrap()
        .into_inner()
        .released
        .unwrap();
    assert_eq!(released.vm, "vm-150");
    assert_eq!(
        allocate(&mut c, "volant0", "late").await.unwrap(),
        "192.168.127.150"
    );

    let lease = c
        .get_lease(GetLeaseRequest {
            pool: "volant0".into(),
            target: Some(get_lease_request::Target::Vm("late".into())),
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(
        (lease.ip.as_str(), lease.prefix_len),
        ("192.168.127.150", 24)
    );
    assert_eq!(lease.gateway, "192.168.127.1");
    assert!(lease.leased_at.is_some());

    let all = leases(&mut c).await;
    assert_eq!(all.len(), 155);
    let ips: Vec<u8> = all
        .iter()
        .map(|(_, ip, _)| ip.rsplit('.').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        ips.windows(2).all(|w| w[0] < w[1]),
        "listed in numeric order"
    );

    let pool = c
        .get_pool(GetPoolRequest {
            name: "volant0".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .pool
        .unwrap();
    assert_eq!((pool.capacity, pool.leased), (155, 155));
}

#[tokio::test]
async fn release_vm_and_release_are_idempotent_across_pools() {
    let root = tempfile::tempdir().unwrap();
    let (_d, mut c) = ipamd(root.path()).await;
    create_pool(&mut c, "volant1", "192.168.128.0/24").await;
    allocate(&mut c, "volant0", "web").await.unwrap();
    assert_eq!(
        allocate(&mut c, "volant1", "web").await.unwrap(),
        "192.168.128.100"
    );
    for expected in [2, 0] {
        let released = c
            .release_vm(ReleaseVmRequest { vm: "web".into() })
            .await
            .unwrap()
            .into_inner()
            .released;
        assert_eq!(released.len(), expected);
    }
    let again = c
        .release(ReleaseRequest {
            pool: "volant0".into(),
            target: Some(release_request::Target::Vm("web".into())),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.released.is_none());
    assert!(leases(&mut c).await.is_empty());
}

/// Clients allocate and release as fast as they can while ipamd is killed with SIGKILL, three
/// times. After every restart each acknowledged lease is there with its address, each
/// acknowledged release stays released, and no address or VM appears twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_leases_survive_kill_9_with_calls_in_flight() {
    let root = tempfile::tempdir().unwrap();
    let (mut d, mut c) = ipamd(root.path()).await;
    create_pool(&mut c, "big", "10.200.0.0/16").await;
    // vm → Some(ip) when an allocation was acknowledged, None when its release was.
    let acked: Arc<Mutex<HashMap<String, Option<String>>>> = Arc::default();
    for round in 0..3 {
        let mut workers = Vec::new();
        for w in 0..16 {
            let mut c = IpamClient::new(d.channel());
            let acked = acked.clone();
            workers.push(tokio::spawn(async move {
                for i in 0.. {
                    let vm = format!("r{round}-w{w}-{i}");
                    match allocate(&mut c, "big", &vm).await {
                        Ok(ip) => acked.lock().unwrap().insert(vm.clone(), Some(ip)),
                        Err(_) => return,
                    };
                    if i % 3 == 0 {
                        let req = ReleaseVmRequest { vm: vm.clone() };
                        let outcome = c.release_vm(req).await;
                        let mut acked = acked.lock().unwrap();
                        match outcome {
                            Ok(_) => acked.insert(vm, None),
                            // A release cut off by the crash may or may not have happened.
                            Err(_) => return drop(acked.remove(&vm)),
                        };
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(400 + 150 * round)).await;
        d.kill9();
        for w in workers {
            w.await.unwrap();
        }
        d.restart().await;
        c = IpamClient::new(d.channel());

        let stored = leases(&mut c).await;
        let mut by_ip = BTreeMap::new();
        let mut by_vm = BTreeMap::new();
        for (pool, ip, vm) in &stored {
            assert!(
                by_ip.insert((pool.clone(), ip.clone()), vm).is_none(),
                "{ip} twice"
            );
            assert!(
                by_vm.insert((pool.clone(), vm.clone()), ip).is_none(),
                "{vm} twice"
            );
        }
        let acked = acked.lock().unwrap();
        assert!(
            acked.len() > 50,
            "round {round}: only {} calls acknowledged",
            acked.len()
        );
        for (vm, ip) in acked.iter() {
            let found = by_vm.get(&("big".to_string(), vm.clone()));
            match ip {
                Some(ip) => assert_eq!(found, Some(&ip), "acknowledged lease of {vm} lost"),
                None => assert_eq!(found, None, "acknowledged release of {vm} undone"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_clients_share_155_addresses() {
    let root = tempfile::tempdir().unwrap();
    let (d, _) = ipamd(root.path()).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(200));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = IpamClient::new(d.channel());
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            // Connect first, then all call at once.
            c.list_pools(ListPoolsRequest {}).await.unwrap();
            barrier.wait().await;
            allocate(&mut c, "volant0", &format!("client-{i}")).await
        }));
    }
    let mut ips = BTreeSet::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(ip) => assert!(ips.insert(ip.clone()), "{ip} handed out twice"),
            Err(e) if e.code() == Code::ResourceExhausted => refused += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((ips.len(), refused), (155, 45));
    let mut c = IpamClient::new(d.channel());
    assert_eq!(leases(&mut c).await.len(), 155);
}

#[tokio::test]
async fn bad_input_is_refused_with_a_reason_and_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let (_d, mut c) = ipamd(root.path()).await;
    create_pool(&mut c, "volant1", "10.9.0.0/24").await;
    allocate(&mut c, "volant0", "web").await.unwrap();
    allocate(&mut c, "volant1", "web").await.unwrap();
    let before = (
        c.list_pools(ListPoolsRequest {})
            .await
            .unwrap()
            .into_inner(),
        leases(&mut c).await,
    );

    let pool = |name: &str, subnet: &str, gw: &str, start: &str, end: &str| CreatePoolRequest {
        pool: Some(Pool {
            name: name.into(),
            subnet: subnet.into(),
            gateway: gw.into(),
            range_start: start.into(),
            range_end: end.into(),
            ..Default::default()
        }),
    };
    let creates = [
        (
            pool("p", "10.1.0.0", "", "", ""),
            Code::InvalidArgument,
            "CIDR",
        ),
        (
            pool("p", "10.1.0.0/40", "", "", ""),
            Code::InvalidArgument,
            "CIDR",
        ),
        (
            pool("p", "10.1.0.7/24", "", "", ""),
            Code::InvalidArgument,
            "host bits",
        ),
        (
            pool("p", "10.1.0.0/24", "10.1.0.x", "", ""),
            Code::InvalidArgument,
            "not an IP address",
        ),
        (
            pool("p", "10.1.0.0/24", "10.1.0.1", "10.1.0.10", "10.1.1.10"),
            Code::InvalidArgument,
            "outside the subnet",
        ),
        (
            pool("p", "10.1.0.0/24", "10.1.0.1", "10.1.0.90", "10.1.0.10"),
            Code::InvalidArgument,
            "comes after",
        ),
        (
            pool("p", "10.1.0.0/24", "10.1.0.50", "10.1.0.10", "10.1.0.90"),
            Code::InvalidArgument,
            "inside the range",
        ),
        (
            pool("p", "10.1.0.0/24", "10.1.0.1", "10.1.0.0", "10.1.0.10"),
            Code::InvalidArgument,
            "network address",
        ),
        (
            pool("p", "10.1.0.0/24", "10.1.0.1", "10.1.0.10", "10.1.0.255"),
            Code::InvalidArgument,
            "broadcast address",
        ),
        (
            pool("p", "192.168.0.0/16", "", "", ""),
            Code::InvalidArgument,
            "overlaps pool \"volant0\"",
        ),
        (
            pool("Bad_Name", "10.1.0.0/24", "", "", ""),
            Code::InvalidArgument,
            "pool name",
        ),
        (
            pool("-p", "10.1.0.0/24", "", "", ""),
            Code::InvalidArgument,
            "pool name",
        ),
        (
            pool(&"p".repeat(64), "10.1.0.0/24", "", "", ""),
            Code::InvalidArgument,
            "at most 63",
        ),
        (
            pool("p", "fd00::/64", "", "", ""),
            Code::InvalidArgument,
            "IPv6",
        ),
        (
            pool("volant1", "10.10.0.0/24", "", "", ""),
            Code::AlreadyExists,
            "already exists",
        ),
        (
            CreatePoolRequest { pool: None },
            Code::InvalidArgument,
            "pool is required",
        ),
    ];
    for (req, code, why) in creates {
        let err = c.create_pool(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        assert!(err.message().contains(why), "{req:?}: {}", err.message());
    }

    let alloc = |pool: &str, vm: &str, ip: Option<&str>| AllocateRequest {
        pool: pool.into(),
        vm: vm.into(),
        requested_ip: ip.map(Into::into),
    };
    let allocs = [
        (
            alloc("volant0", "", None),
            Code::InvalidArgument,
            "vm is required",
        ),
        (
            alloc("volant0", "Web!", None),
            Code::InvalidArgument,
            "vm \"Web!\"",
        ),
        (
            alloc("nope", "db", None),
            Code::NotFound,
            "pool \"nope\" does not exist",
        ),
        (
            alloc("No Pool", "db", None),
            Code::InvalidArgument,
            "pool \"No Pool\"",
        ),
        (
            alloc("volant0", "db", Some("192.168.127.50")),
            Code::InvalidArgument,
            "outside the range",
        ),
        (
            alloc("volant0", "db", Some("192.168.127.1")),
            Code::InvalidArgument,
            "outside the range",
        ),
        (
            alloc("volant0", "db", Some("10.9.0.5")),
            Code::InvalidArgument,
            "outside the range",
        ),
        (
            alloc("volant0", "db", Some("not-an-ip")),
            Code::InvalidArgument,
            "not an IP address",
        ),
        (
            alloc("volant0", "db", Some("192.168.127.100")),
            Code::AlreadyExists,
            "leased to vm \"web\"",
        ),
        (
            alloc("volant0", "web", Some("192.168.127.101")),
            Code::FailedPrecondition,
            "already holds",
        ),
    ];
    for (req, code, why) in allocs {
        let err = c.allocate(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        assert!(err.message().contains(why), "{req:?}: {}", err.message());
    }

    let rel = |pool: &str, t: Option<release_request::Target>| ReleaseRequest {
        pool: pool.into(),
        target: t,
    };
    let releases = [
        (rel("volant0", None), Code::InvalidArgument, "set ip or vm"),
        (
            rel("volant0", Some(release_request::Target::Ip("1.2.3".into()))),
            Code::InvalidArgument,
            "not an IP address",
        ),
        (
            rel("volant0", Some(release_request::Target::Vm("UPPER".into()))),
            Code::InvalidArgument,
            "vm \"UPPER\"",
        ),
        (
            rel("nope", Some(release_request::Target::Vm("web".into()))),
            Code::NotFound,
            "does not exist",
        ),
    ];
    for (req, code, why) in releases {
        let err = c.release(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        assert!(err.message().contains(why), "{req:?}: {}", err.message());
    }

    let err = c
        .release_vm(ReleaseVmRequest { vm: "a b".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .get_lease(GetLeaseRequest {
            pool: "volant0".into(),
            target: Some(get_lease_request::Target::Vm("db".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = c
        .list_leases(ListLeasesRequest {
            pool: "nope".into(),
            vm: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let del = |name: &str, force: bool| DeletePoolRequest {
        name: name.into(),
        force,
    };
    let err = c.delete_pool(del("volant1", false)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("1 lease"), "{}", err.message());
    // The config's pool goes only with force (the config brings it back at the next start).
    let err = c.delete_pool(del("volant0", false)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("config file"), "{}", err.message());
    let err = c.delete_pool(del("BAD", true)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let after = (
        c.list_pools(ListPoolsRequest {})
            .await
            .unwrap()
            .into_inner(),
        leases(&mut c).await,
    );
    assert_eq!(before, after, "bad input changed state");

    // The forced delete that is allowed releases the pool's leases with it.
    let reply = c
        .delete_pool(del("volant1", true))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.deleted);
    assert_eq!(reply.released.len(), 1);
    assert!(
        !c.delete_pool(del("volant1", false))
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
}

#[tokio::test]
async fn the_config_file_defines_the_default_pool_and_tcp_listening_works() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("volant.yaml");
    std::fs::write(
        &config,
        "networking:\n  bridge:\n    name: volant9\n    subnet: 10.77.0.0/24\n    gateway: 10.77.0.1\n    \
         ip_range: { start: 10.77.0.10, end: 10.77.0.20 }\n",
    )
    .unwrap();
    let port = volant_tests::free_port();
    let listen = format!("tcp://127.0.0.1:{port}");
    let d = Daemon::start(
        "ipamd",
        root.path(),
        &["--config", config.to_str().unwrap(), "--listen", &listen],
    )
    .await;
    let mut c = IpamClient::new(d.channel());
    let pools = c
        .list_pools(ListPoolsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pools;
    assert_eq!(pools.len(), 1);
    let p = &pools[0];
    assert_eq!(
        (
            p.name.as_str(),
            p.subnet.as_str(),
            p.range_start.as_str(),
            p.range_end.as_str()
        ),
        ("volant9", "10.77.0.0/24", "10.77.0.10", "10.77.0.20")
    );
    assert_eq!(p.capacity, 11);
    assert_eq!(
        allocate(&mut c, "volant9", "a").await.unwrap(),
        "10.77.0.10"
    );
}

#[test]
fn a_bad_config_or_address_stops_the_start_with_a_reason() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().to_str().unwrap();
    let bad = root.path().join("bad.yaml");
    std::fs::write(&bad, "networking:\n  bridge:\n    subnet: 10.77.0.0/24\n").unwrap();
    let overlap = root.path().join("range.yaml");
    std::fs::write(
        &overlap,
        "networking:\n  bridge:\n    ip_range: { start: 192.168.127.10, end: 192.168.127.300 }\n",
    )
    .unwrap();
    let state = format!("{dir}/state");
    let run_dir = format!("{dir}/run");
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["--config", bad.to_str().unwrap()],
            "gateway 192.168.127.1 is outside the subnet 10.77.0.0/24",
        ),
        (vec!["--config", overlap.to_str().unwrap()], "ip_range"),
        (
            vec!["--config", "/nonexistent/volant.yaml"],
            "/nonexistent/volant.yaml",
        ),
        (vec!["--listen", "http://x"], "tcp://HOST:PORT"),
    ];
    for (extra, why) in cases {
        let mut args = vec!["--state-dir", &state, "--run-dir", &run_dir];
        args.extend(extra.iter().copied());
        let (status, out) = run("ipamd", &args, Duration::from_secs(20));
        assert!(!status.success(), "{args:?} started");
        assert!(out.contains(why), "{args:?}: {out}");
    }
}

#[tokio::test]
async fn a_daemon_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let root = tempfile::tempdir().unwrap();
    let notify = root.path().join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    systemd
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut d = Daemon::start_with(
        None,
        "ipamd",
        root.path(),
        &[],
        &[("NOTIFY_SOCKET", notify.to_str().unwrap())],
    )
    .await;
    let mut buf = [0u8; 64];
    let n = systemd.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    assert!(d.terminate().success());
    let n = systemd.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
}
