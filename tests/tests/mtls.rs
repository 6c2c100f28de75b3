//! Mutual TLS between the services over TCP: ipamd listens on loopback TCP with the config's
//! `tls` section; the gateway dials it with its own certificate (its health shows ipamd `ok`);
//! a plaintext client, a TLS client without a certificate and one whose certificate another CA
//! signed are all turned away; a server certificate from another CA is refused by the client;
//! a broken `tls` section stops a daemon at start with a message naming the file. Python's
//! `grpcio` and Node's `@grpc/grpc-js` with their defaults are served with the CA's certificate
//! and turned away with another's.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use volant_services::api::ipam::v1::ListPoolsRequest;
use volant_services::api::ipam::v1::ipam_client::IpamClient;
use volant_tests::{Pki, bin, free_port};

/// A CA and a certificate for 127.0.0.1 it signed, as PEM files `<tag>-{ca,cert,key}.pem`.
fn pki(dir: &Path, tag: &str) -> [String; 3] {
    Pki::new(tag, "127.0.0.1").write(dir, tag)
}

/// A daemon started with `config`, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(name: &str, dir: &Path, config: &Path, extra: &[&str]) -> Proc {
    Proc(spawn(name, dir, config, extra))
}

fn spawn(name: &str, dir: &Path, config: &Path, extra: &[&str]) -> Child {
    Command::new(bin(name))
        .arg("--config")
        .arg(config)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--state-dir")
        .arg(dir.join(name))
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn config(dir: &Path, file: &str, tls: &[String; 3], ipamd: u16) -> std::path::PathBuf {
    let path = dir.join(file);
    std::fs::write(
        &path,
        format!(
            "ipamd:\n  listen: tcp://127.0.0.1:{ipamd}\ntls:\n  ca: {}\n  cert: {}\n  key: {}\n",
            tls[0], tls[1], tls[2]
        ),
    )
    .unwrap();
    path
}

/// ListPools over `endpoint`, within a few seconds.
async fn list_pools(endpoint: Endpoint) -> Result<(), String> {
    let channel = endpoint
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    IpamClient::new(channel)
        .list_pools(ListPoolsRequest {})
        .await
        .map(drop)
        .map_err(|e| format!("{e:?}"))
}

fn tls_client(ca: &str, identity: Option<(&str, &str)>) -> ClientTlsConfig {
    let mut c = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("127.0.0.1");
    if let Some((cert, key)) = identity {
        c = c.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    c
}

/// The gateway's view of ipamd from /api/v1/health.
fn ipamd_health(gateway: u16) -> String {
    let out = volant_tests::sh(&format!(
        "curl -sS --max-time 10 http://127.0.0.1:{gateway}/api/v1/health || true"
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v["services"]["ipamd"].as_str().unwrap_or(&out).to_string()
}

async fn eventually(what: &str, mut ok: impl AsyncFnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match ok().await {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_speak_mutual_tls_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = pki(d, "good");
    let other = pki(d, "other");
    let port = free_port();
    let https = format!("https://127.0.0.1:{port}");
    let conf = config(d, "volant.yaml", &good, port);
    let ipamd = start("ipamd", d, &conf, &[]);

    // A client with a certificate the CA signed is served.
    let trusted = || {
        Endpoint::from_shared(https.clone())
            .unwrap()
            .tls_config(tls_client(&good[0], Some((&good[1], &good[2]))))
            .unwrap()
    };
    eventually("a trusted client", async || list_pools(trusted()).await).await;

    // Standard clients with their default options and the same certificate (see interop.rs);
    // without one they are turned away too.
    let target = format!("127.0.0.1:{port}");
    for lang in ["python", "node"] {
        let args = [
            &target,
            "volant.ipam.v1.Ipam",
            "ListPools",
            &good[0],
            &good[1],
            &good[2],
        ];
        let got = volant_tests::grpc_client(None, lang, &args);
        assert_eq!(got["call"], "OK", "{lang} over mutual TLS: {got}");
        assert_eq!(
            got["health volant.ipam.v1.Ipam"], "SERVING",
            "{lang}: {got}"
        );
        let args = [
            &target,
            "volant.ipam.v1.Ipam",
            "ListPools",
            &good[0],
            &other[1],
            &other[2],
        ];
        let got = volant_tests::grpc_client(None, lang, &args);
        assert_ne!(
            got["call"], "OK",
            "{lang} with another CA's certificate: {got}"
        );
    }

    // Everyone else is turned away.
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
    assert!(list_pools(plain).await.is_err(), "plaintext");
    let anonymous = Endpoint::from_shared(https.clone())
        .unwrap()
        .tls_config(tls_client(&good[0], None))
        .unwrap();
    assert!(
        list_pools(anonymous).await.is_err(),
        "no client certificate"
    );
    let stranger = Endpoint::from_shared(https.clone())
        .unwrap()
        .tls_config(tls_client(&good[0], Some((&other[1], &other[2]))))
        .unwrap();
    assert!(
        list_pools(stranger).await.is_err(),
        "a client certificate another CA signed"
    );

    // Service to service: the gateway dials ipamd with the same section.
    let gw_port = free_port();
    let listen = format!("tcp://127.0.0.1:{gw_port}");
    let gateway = start("gateway", d, &conf, &["--listen", &listen]);
    eventually(
        "the gateway reaches ipamd over mutual TLS",
        async || match ipamd_health(gw_port) {
            s if s == "ok" => Ok(()),
            s => Err(s),
        },
    )
    .await;

    // An ipamd whose certificate another CA signed is not trusted by the gateway.
    drop(ipamd);
    let impostor_conf = config(d, "impostor.yaml", &other, port);
    let impostor = start("ipamd", d, &impostor_conf, &[]);
    let impostor_endpoint = Endpoint::from_shared(https.clone())
        .unwrap()
        .tls_config(tls_client(&other[0], Some((&other[1], &other[2]))))
        .unwrap();
    eventually("the impostor serves its own CA", async || {
        list_pools(impostor_endpoint.clone()).await
    })
    .await;
    let health = ipamd_health(gw_port);
    assert!(health.starts_with("unavailable"), "{health}");
    drop((impostor, gateway));

    // A broken section stops a daemon at start, naming the file.
    let missing = [
        good[0].clone(),
        good[1].clone(),
        d.join("nope.pem").display().to_string(),
    ];
    let broken = config(d, "broken.yaml", &missing, free_port());
    let out = spawn("ipamd", d, &broken, &[]).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("tls.key") && err.contains("nope.pem"), "{err}");
    let swapped = [good[0].clone(), good[2].clone(), good[1].clone()];
    let broken = config(d, "swapped.yaml", &swapped, free_port());
    let out = spawn("ipamd", d, &broken, &[]).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("tls.cert") && err.contains("CERTIFICATE"),
        "{err}"
    );

    // The ingress speaks plain HTTP: on TCP it would bypass mutual TLS, so proxyd refuses.
    let ingress = config(d, "ingress.yaml", &good, free_port());
    let mut text = std::fs::read_to_string(&ingress).unwrap();
    text.push_str(&format!(
        "proxyd:\n  ingress: tcp://127.0.0.1:{}\n",
        free_port()
    ));
    std::fs::write(&ingress, text).unwrap();
    let out = spawn("proxyd", d, &ingress, &[])
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("Unix socket"), "{err}");
}
