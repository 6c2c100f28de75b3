//! The Cloud Hypervisor driver: `cloud-hypervisor --api-socket path=…`, then its REST API over
//! that socket (`vmm.ping`, `vm.create`, `vm.boot`, `vm.info`, `vm.power-button`, `vm.shutdown`,
//! `vmm.shutdown`). The guest's address travels on the kernel command line: Cloud Hypervisor's
//! own `ip`/`mask` only configure the host side of a TAP it creates itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tracing::Instrument;

use super::{Driver, LaunchSpec, Launched, clear_socket, spawn, wait_ready};

/// How long Cloud Hypervisor may take to answer after it starts.
const READY_LIMIT: Duration = Duration::from_secs(10);

/// The Cloud Hypervisor driver.
pub struct CloudHypervisor {
    /// The `cloud-hypervisor` binary.
    pub binary: PathBuf,
}

/// The `VmConfig` of `vm.create` for `spec`.
pub fn vm_config(spec: &LaunchSpec<'_>) -> Value {
    let mut config = json!({
        "cpus": { "boot_vcpus": spec.cpus, "max_vcpus": spec.cpus },
        "memory": { "size": u64::from(spec.memory_mb) << 20 },
        "payload": {
            "kernel": spec.kernel,
            "initramfs": spec.initramfs,
            "cmdline": spec.cmdline,
        },
        "serial": { "mode": "File", "file": spec.paths.serial },
        "console": { "mode": "Off" },
    });
    if let Some(v) = &spec.vsock {
        config["vsock"] = json!({ "cid": v.cid, "socket": v.socket });
    }
    if let Some(nic) = &spec.nic {
        config["net"] = json!([{ "tap": nic.tap, "mac": nic.mac }]);
    }
    config
}

/// A client of Cloud Hypervisor's REST API on a Unix socket.
pub struct Api<'a> {
    socket: &'a Path,
}

impl<'a> Api<'a> {
    /// The API behind `socket`.
    pub fn new(socket: &'a Path) -> Api<'a> {
        Api { socket }
    }

    /// One request to `/api/v1/<endpoint>`; a non-2xx answer is an error carrying its body.
    pub async fn call(
        &self,
        method: Method,
        endpoint: &str,
        body: Option<&Value>,
    ) -> Result<Bytes, String> {
        let stream = volant_services::daemon::connect_unix(self.socket)
            .await
            .map_err(|e| format!("{}: {e}", self.socket.display()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("cloud-hypervisor API: {e}"))?;
        tokio::spawn(conn);
        let bytes = body
            .map(|b| Bytes::from(serde_json::to_vec(b).expect("JSON")))
            .unwrap_or_default();
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("http://localhost/api/v1/{endpoint}"))
            .header(http::header::HOST, "localhost");
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(bytes)).map_err(|e| e.to_string())?;
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| format!("cloud-hypervisor {method} {endpoint}: {e}"))?;
        let status = res.status();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("cloud-hypervisor {endpoint}: {e}"))?
            .to_bytes();
        if status.is_success() || status == StatusCode::NO_CONTENT {
            Ok(body)
        } else {
            Err(format!(
                "cloud-hypervisor {method} {endpoint}: {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ))
        }
    }

    /// Creates and boots the VM described by `spec` in a running VMM.
    pub async fn create_and_boot(&self, spec: &LaunchSpec<'_>) -> Result<(), String> {
        self.call(Method::PUT, "vm.create", Some(&vm_config(spec)))
            .await?;
        self.call(Method::PUT, "vm.boot", None).await.map(drop)
    }
}

#[tonic::async_trait]
impl Driver for CloudHypervisor {
    async fn launch(&self, spec: &LaunchSpec<'_>) -> Result<Launched, String> {
        // What an earlier process left: its API socket and lock, and the vsock socket it bound
        // (a leftover one makes vm.boot fail with "Address already in use").
        clear_socket(&spec.paths.api_socket);
        clear_socket(&spec.paths.api_lock);
        if let Some(v) = &spec.vsock {
            clear_socket(&v.socket);
        }
        let args = vec![
            "--api-socket".to_string(),
            format!("path={}", spec.paths.api_socket.display()),
        ];
        let (mut child, spawned_in) = {
            let _span = tracing::info_span!(
                "hypervisor.spawn",
                vm = spec.name,
                hypervisor = "cloud-hypervisor"
            )
            .entered();
            spawn(
                &self.binary,
                &args,
                &spec.paths.hypervisor_log,
                spec.cgroup,
                spec.identity,
            )?
        };
        let api = Api::new(&spec.paths.api_socket);
        wait_ready(
            &mut child,
            &spec.paths.hypervisor_log,
            READY_LIMIT,
            || async { api.call(Method::GET, "vmm.ping", None).await.map(drop) },
        )
        .instrument(tracing::info_span!("hypervisor.ready", vm = spec.name))
        .await?;
        if let Err(e) = api.create_and_boot(spec).await {
            let _ = child.kill().await;
            return Err(e);
        }
        Ok(Launched { child, spawned_in })
    }

    async fn request_shutdown(&self, api: &Path) -> Result<(), String> {
        Api::new(api)
            .call(Method::PUT, "vm.power-button", None)
            .await
            .map(drop)
    }

    async fn force_stop(&self, api: &Path) -> Result<(), String> {
        let api = Api::new(api);
        // The VM may be off already; the VMM must go either way.
        let _ = api.call(Method::PUT, "vm.shutdown", None).await;
        match api.call(Method::PUT, "vmm.shutdown", None).await {
            Ok(_) => Ok(()),
            // The VMM exits as it answers.
            Err(e) if e.contains("connection closed") || e.contains("IncompleteMessage") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn ping(&self, api: &Path) -> Result<(), String> {
        Api::new(api)
            .call(Method::GET, "vm.info", None)
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    //! These tests check the request encoding against an HTTP double that answers with the
    //! shapes Cloud Hypervisor's API documents (204 for commands, JSON for queries), in
    //! milliseconds; `tests/tests/cloud_hypervisor.rs` runs the driver against the real binary.

    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use http::Response;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use tokio::net::UnixListener;

    use super::*;
    use crate::driver::{Nic, Vsock};
    use crate::records::Paths;

    type Seen = Arc<Mutex<Vec<(String, String, Value)>>>;

    fn double(socket: &Path, seen: Seen) {
        let listener = UnixListener::bind(socket).unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            seen.lock().unwrap().push((method, path.clone(), json));
                            let res = match path.as_str() {
                                "/api/v1/vmm.ping" => Response::builder()
                                    .status(200)
                                    .body(Full::new(Bytes::from(r#"{"version":"v48.0"}"#))),
                                "/api/v1/vm.snapshot" => Response::builder()
                                    .status(500)
                                    .body(Full::new(Bytes::from("not supported"))),
                                _ => Response::builder()
                                    .status(204)
                                    .body(Full::new(Bytes::new())),
                            };
                            Ok::<_, Infallible>(res.unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }

    #[tokio::test]
    async fn create_and_boot_send_the_documented_requests() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::of(dir.path(), dir.path(), "web");
        std::fs::create_dir_all(&paths.jail).unwrap();
        let seen: Seen = Arc::default();
        double(&paths.api_socket, seen.clone());
        let spec = LaunchSpec {
            name: "web",
            kernel: "/k",
            initramfs: "/i",
            cmdline: "console=ttyS0 volant.ip=192.168.127.100/24",
            cpus: 2,
            memory_mb: 256,
            vsock: None,
            nic: Some(Nic {
                tap: "vmtap-web".into(),
                mac: "02:00:00:00:00:01".into(),
            }),
            paths: &paths,
            accel: "kvm",
            cgroup: &[],
            identity: None,
        };
        let api = Api::new(&paths.api_socket);
        api.call(Method::GET, "vmm.ping", None).await.unwrap();
        api.create_and_boot(&spec).await.unwrap();
        let err = api
            .call(Method::PUT, "vm.snapshot", None)
            .await
            .unwrap_err();
        assert!(
            err.contains("500") && err.contains("not supported"),
            "{err}"
        );
        let ch = CloudHypervisor {
            binary: "cloud-hypervisor".into(),
        };
        ch.ping(&paths.api_socket).await.unwrap();
        ch.request_shutdown(&paths.api_socket).await.unwrap();
        ch.force_stop(&paths.api_socket).await.unwrap();

        let seen = seen.lock().unwrap();
        let calls: Vec<(&str, &str)> = seen
            .iter()
            .map(|(m, p, _)| (m.as_str(), p.as_str()))
            .collect();
        assert_eq!(
            calls[..3],
            [
                ("GET", "/api/v1/vmm.ping"),
                ("PUT", "/api/v1/vm.create"),
                ("PUT", "/api/v1/vm.boot")
            ]
        );
        assert_eq!(
            calls[4..],
            [
                ("GET", "/api/v1/vm.info"),
                ("PUT", "/api/v1/vm.power-button"),
                ("PUT", "/api/v1/vm.shutdown"),
                ("PUT", "/api/v1/vmm.shutdown")
            ]
        );
        let config = &seen[1].2;
        assert_eq!(config["payload"]["kernel"], "/k");
        assert_eq!(config["payload"]["initramfs"], "/i");
        assert_eq!(config["payload"]["cmdline"], spec.cmdline);
        assert_eq!(config["cpus"]["boot_vcpus"], 2);
        assert_eq!(config["memory"]["size"], 256u64 << 20);
        assert_eq!(config["net"][0]["tap"], "vmtap-web");
        assert_eq!(config["net"][0]["mac"], "02:00:00:00:00:01");
        assert_eq!(config["serial"]["mode"], "File");
        assert_eq!(config["console"]["mode"], "Off");
        assert!(config.get("vsock").is_none());
    }

    #[test]
    fn a_vsock_vm_gets_a_vsock_device_and_no_nic() {
        let paths = Paths::of(Path::new("/s"), Path::new("/run/volant"), "safe");
        let spec = LaunchSpec {
            name: "safe",
            kernel: "/k",
            initramfs: "/i",
            cmdline: "console=ttyS0 volant.mode=vsock",
            cpus: 1,
            memory_mb: 128,
            vsock: Some(Vsock {
                cid: 7,
                socket: "/run/volant/vsock-7.sock".into(),
            }),
            nic: None,
            paths: &paths,
            accel: "kvm",
            cgroup: &[],
            identity: None,
        };
        let config = vm_config(&spec);
        assert_eq!(config["vsock"]["cid"], 7);
        assert_eq!(config["vsock"]["socket"], "/run/volant/vsock-7.sock");
        assert!(config.get("net").is_none());
    }
}
