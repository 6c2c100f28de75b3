//! The harness of the end-to-end suite: it starts the real daemons as separate processes, each
//! with its own state and run directories, waits until they serve, and kills them — gently or
//! with SIGKILL — on demand and when a test ends, also when it fails.
//!
//! The binaries come from `VOLANT_BIN_DIR`, else the workspace's `target/debug`: `tests/run`
//! builds them before running the suite.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use volant_services::{Addr, Channel, dial};

/// The directory of the binaries under test.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("VOLANT_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"))
}

/// The path of binary `name`, which must have been built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which \
         tests/run does), or point VOLANT_BIN_DIR at them",
        path.display()
    );
    path
}

/// A daemon under test, started from its real binary.
pub struct Daemon {
    name: String,
    args: Vec<String>,
    child: Option<Child>,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Its run directory.
    pub run_dir: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `name` with `--state-dir <root>/<name>/state --run-dir <root>/run` plus `extra`
    /// arguments, and waits until its health service answers SERVING.
    pub async fn start(name: &str, root: &Path, extra: &[&str]) -> Daemon {
        let state_dir = root.join(name).join("state");
        let run_dir = root.join("run");
        let mut args = vec![
            "--state-dir".to_string(),
            state_dir.display().to_string(),
            "--run-dir".to_string(),
            run_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut daemon = Daemon {
            name: name.to_string(),
            args,
            child: None,
            log: root.join(format!("{name}.log")),
            state_dir,
            run_dir,
        };
        daemon.restart().await;
        daemon
    }

    /// The address it listens on (its Unix socket unless `--listen` was given).
    pub fn addr(&self) -> Addr {
        match self.args.iter().position(|a| a == "--listen") {
            Some(i) => self.args[i + 1].parse().expect("valid --listen"),
            None => Addr::Unix(self.run_dir.join(format!("{}.sock", self.name))),
        }
    }

    /// A channel to it.
    pub fn channel(&self) -> Channel {
        dial(&self.addr()).expect("dial")
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Starts it (again) with the same arguments and waits until it serves.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(bin(&self.name))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.name));
        self.child = Some(child);
        self.wait_serving(Duration::from_secs(20)).await;
    }

    async fn wait_serving(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut health = HealthClient::new(self.channel());
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited with {status} before serving:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            let req = HealthCheckRequest {
                service: String::new(),
            };
            if let Ok(reply) = health.check(req).await
                && reply.into_inner().status == ServingStatus::Serving as i32
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not serve within {limit:?}:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What it has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it with SIGKILL, as a crash would, and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for it to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        child.wait().expect("wait")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a binary to completion (e.g. a daemon that must refuse to start) and returns its exit
/// status and combined output.
pub fn run(name: &str, args: &[&str], limit: Duration) -> (ExitStatus, String) {
    let mut child = Command::new(bin(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            return (status, text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} {args:?} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
