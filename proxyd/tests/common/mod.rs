//! A host-side hybrid-vsock endpoint and a proxyd process, shared by proxyd's tests and
//! benchmarks. The endpoint speaks the `CONNECT <port>`/`OK <n>` handshake like Cloud Hypervisor
//! and vhost-device-vsock, then serves HTTP/1.1 (it echoes bodies), so proxyd can be measured and
//! tested on its own; the end-to-end tests use real guests instead.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use volant_services::api::proxy::v1::proxy_client::ProxyClient;
use volant_services::api::proxy::v1::{EgressPolicy, RegisterVmRequest, Route};

/// How the endpoint behaves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Handshake, then HTTP: bodies echoed, `x-seen-*` headers report what arrived.
    Serve,
    /// Close without `OK`, as when nothing listens in the guest.
    Refuse,
}

/// Starts the endpoint at `path`; returns the count of connections it accepted.
pub fn endpoint(path: PathBuf, mode: Mode) -> Arc<AtomicUsize> {
    let listener = UnixListener::bind(&path).unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while s.read(&mut b).await.unwrap_or(0) == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                if mode == Mode::Refuse || !line.starts_with(b"CONNECT ") {
                    return;
                }
                s.write_all(b"OK 1073741824\n").await.unwrap();
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let mut res = hyper::Response::builder()
                            .header("x-seen-path", req.uri().to_string())
                            .header(
                                "x-seen-proxy-authorization",
                                req.headers()
                                    .contains_key("proxy-authorization")
                                    .to_string(),
                            )
                            .header(
                                "x-seen-keep-alive",
                                req.headers().contains_key("keep-alive").to_string(),
                            );
                        if let Some(v) = req.headers().get("x-custom") {
                            res = res.header("x-seen-custom", v);
                        }
                        Ok::<_, hyper::Error>(res.body(req.into_body()).unwrap())
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    count
}

/// A proxyd process in `dir` (config `yaml`), killed when dropped.
pub struct Proxyd {
    child: Child,
    /// Its run directory.
    pub run: PathBuf,
    dir: PathBuf,
    config: PathBuf,
}

impl Proxyd {
    /// Starts proxyd with `yaml` as its config and waits until it answers.
    pub async fn start(dir: &Path, yaml: &str) -> Proxyd {
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let config = dir.join("volant.yaml");
        std::fs::write(&config, yaml).unwrap();
        let mut p = Proxyd {
            child: spawn(dir, &config, &run),
            run,
            dir: dir.into(),
            config,
        };
        p.wait().await;
        p
    }

    fn grpc(&self) -> ProxyClient<volant_services::Channel> {
        ProxyClient::new(
            volant_services::dial(&volant_services::Addr::Unix(self.run.join("proxyd.sock")))
                .unwrap(),
        )
    }

    async fn wait(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut api = self.grpc();
        while api
            .list_routes(volant_services::api::proxy::v1::ListRoutesRequest {})
            .await
            .is_err()
        {
            assert!(self.child.try_wait().unwrap().is_none(), "proxyd exited");
            assert!(Instant::now() < deadline, "proxyd did not start");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The gRPC API.
    pub fn api(&self) -> ProxyClient<volant_services::Channel> {
        self.grpc()
    }

    /// Registers VM `vm` with context id `cid` at the hybrid socket `socket`.
    pub async fn register(&self, vm: &str, cid: u32, socket: &Path, egress: EgressPolicy) -> Route {
        let route = Route {
            vm: vm.into(),
            cid,
            socket: socket.display().to_string(),
            ingress_port: 8080,
            egress: Some(egress),
            egress_socket: String::new(),
        };
        self.api()
            .register_vm(RegisterVmRequest { route: Some(route) })
            .await
            .unwrap()
            .into_inner()
            .route
            .unwrap()
    }

    /// `kill -9`, then a new process over the same state.
    pub async fn crash_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = spawn(&self.dir, &self.config, &self.run);
        self.wait().await;
    }
}

fn spawn(dir: &Path, config: &Path, run: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_proxyd"))
        .arg("--config")
        .arg(config)
        .arg("--run-dir")
        .arg(run)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap()
}

impl Drop for Proxyd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
