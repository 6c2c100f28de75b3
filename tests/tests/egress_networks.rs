//! A VM must never reach a Volant network, whenever the network was made: proxyd learns every
//! network's subnet from vmmd, their owner, from the moment its pool exists (the real daemons,
//! in a namespace of their own). A public subnet (198.51.100.0/24, routed to the upstream
//! namespace) is reachable through egress until a network with that subnet is being made (its
//! pool made, as vmmd does first); then a request at work to it is cut and the next one is
//! refused; once the network is gone it is reachable again. The guest's side is played by
//! talking to a real vsock VM's egress socket directly, as kestrel forwards it.

use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use volant_services::api::ipam::v1::{CreatePoolRequest, DeletePoolRequest, Pool};
use volant_services::api::vmm::v1::{CreateVmRequest, InstallPluginRequest};
use volant_tests::{ControlPlane, hello_manifest, host_and_upstream};

const SERVER: &str = "198.51.100.7";

/// An HTTP server on SERVER:80 in the upstream namespace: `/slow` sends 300 bytes, one every
/// 100 ms; anything else `ok`.
fn upstream(cp: &ControlPlane) {
    let listener = cp
        .up
        .enter(|| std::net::TcpListener::bind((SERVER, 80)).unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut first = String::new();
                let _ = reader.read_line(&mut first);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let mut conn = conn;
                if first.starts_with("GET /slow ") {
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 300\r\n\r\n");
                    for _ in 0..300 {
                        std::thread::sleep(Duration::from_millis(100));
                        if conn.write_all(b".").is_err() {
                            return;
                        }
                    }
                } else {
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                }
                let _ = conn.read(&mut [0u8; 1]);
            });
        }
    });
}

/// `GET http://pub.example.test<path>` on a new connection to `egress`: the status, and the
/// connection.
async fn get(egress: &str, path: &str) -> (u16, String, tokio::net::UnixStream) {
    let mut s = tokio::net::UnixStream::connect(egress)
        .await
        .unwrap_or_else(|e| panic!("{egress}: {e}"));
    s.write_all(
        format!("GET http://pub.example.test{path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "closed before answering");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, s)
}

async fn status_within(egress: &str, want: u16, limit: Duration) -> String {
    let started = Instant::now();
    loop {
        let (status, head, mut s) = get(egress, "/").await;
        let mut body = vec![0u8; 200];
        let n = s.read(&mut body).await.unwrap_or(0);
        let text = format!("{head}{}", String::from_utf8_lossy(&body[..n]));
        if status == want {
            return text;
        }
        assert!(
            started.elapsed() < limit,
            "still {status}, not {want}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_never_reaches_a_volant_network_whenever_it_was_made() {
    let (host, up) = host_and_upstream();
    up.sh(&format!("ip addr add {SERVER}/24 dev eth0"));
    host.sh("ip route add 198.51.100.0/24 via 10.99.0.2");
    let cp = ControlPlane::start_with_config(
        host,
        up,
        &[],
        "",
        &format!("proxyd:\n  resolver:\n    static:\n      pub.example.test: {SERVER}\n"),
    )
    .await;
    upstream(&cp);
    let mut manifest: serde_json::Value = serde_json::from_str(&hello_manifest()).unwrap();
    manifest["name"] = "out".into();
    manifest["networking"] = serde_json::json!({
        "mode": "vsock",
        "proxy": { "allow_outbound": true, "allowed_domains": ["pub.example.test"] }
    });
    cp.vmm()
        .install_plugin(InstallPluginRequest {
            manifest_json: manifest.to_string(),
        })
        .await
        .unwrap();
    cp.vmm()
        .create_vm(CreateVmRequest {
            name: "a".into(),
            plugin: "out".into(),
            memory_mb: 64,
            ..Default::default()
        })
        .await
        .unwrap();
    let egress = cp.egress_socket("a").await;

    // A public subnet: reachable, and a slow answer is under way.
    status_within(&egress, 200, Duration::from_secs(5)).await;
    let (status, _, mut slow) = get(&egress, "/slow").await;
    assert_eq!(status, 200);

    // A network with that subnet is made: the answer under way is cut, the next is refused.
    let mut ipam = cp.ipam();
    ipam.create_pool(CreatePoolRequest {
        pool: Some(Pool {
            name: "pubnet".into(),
            subnet: "198.51.100.0/24".into(),
            gateway: "198.51.100.1".into(),
            range_start: "198.51.100.100".into(),
            range_end: "198.51.100.200".into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(cut.is_ok(), "the answer under way went on");
    assert!(rest.len() < 300, "the whole answer came: {}", rest.len());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let refused = status_within(&egress, 403, Duration::from_secs(3)).await;
    assert!(refused.contains("Volant"), "{refused}");

    // The network is gone: reachable again.
    ipam.delete_pool(DeletePoolRequest {
        name: "pubnet".into(),
        force: true,
    })
    .await
    .unwrap();
    status_within(&egress, 200, Duration::from_secs(5)).await;
}
