//! What every daemon does around its own service: flags, config, directories, telemetry, serving
//! with health and reflection on `unix:` or `tcp://`, and a graceful SIGTERM.

use std::convert::Infallible;
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use crate::addr::Addr;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::mtls::MutualTls;
use crate::telemetry::{GrpcTraceLayer, Side, Telemetry};

/// The default directory of the services' sockets.
pub const DEFAULT_RUN_DIR: &str = "/run/volant";
/// How long in-flight calls may take to finish after SIGTERM.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The flags every daemon takes.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DaemonArgs {
    /// Shared config file; each service reads its own section [default: /etc/volant/volant.yaml,
    /// missing file = defaults]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Directory of this service's store and other state [default: /var/lib/volant/<service>]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Directory of the services' sockets [default: /run/volant]
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Listen address, unix:PATH or tcp://HOST:PORT [default: unix:<run-dir>/<service>.sock;
    /// the gateway: tcp://127.0.0.1:8080]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<Addr>,
    /// Serve Prometheus metrics at /metrics here, unix:PATH or tcp://HOST:PORT [default: not
    /// served; OTLP export follows OTEL_EXPORTER_OTLP_ENDPOINT either way]
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<Addr>,
}

/// A daemon's resolved settings: flags over its config section over defaults.
pub struct Daemon {
    /// The service's name, e.g. `ipamd`.
    pub name: &'static str,
    /// The whole configuration file.
    pub config: Config,
    /// Its state directory (created).
    pub state_dir: PathBuf,
    /// The socket directory (created).
    pub run_dir: PathBuf,
    /// Where it listens.
    pub listen: Addr,
    /// Mutual TLS for TCP between the services, when configured.
    pub tls: Option<MutualTls>,
    telemetry: Telemetry,
    metrics: Arc<Metrics>,
}

impl Daemon {
    /// Reads the config, resolves the settings, creates the directories and starts telemetry.
    /// Must be called inside a Tokio runtime.
    pub fn start(name: &'static str, args: DaemonArgs) -> anyhow::Result<Daemon> {
        let config = Config::load(args.config.as_deref())?;
        let telemetry = Telemetry::init(name)?;
        match &config.source {
            Some(path) => tracing::info!("config: {}", path.display()),
            None => tracing::info!("config: none found, defaults throughout"),
        }
        for key in config.unknown.keys() {
            tracing::warn!("config: ignoring section {key:?}, which this build does not know");
        }
        let section = config.section(name).unwrap_or_default();
        let run_dir = args
            .run_dir
            .or_else(|| config.run_dir.clone())
            .unwrap_or_else(|| DEFAULT_RUN_DIR.into());
        let state_dir = args
            .state_dir
            .or(section.state_dir)
            .unwrap_or_else(|| Path::new("/var/lib/volant").join(name));
        let listen = args
            .listen
            .or(section.listen)
            .unwrap_or_else(|| match name {
                // The REST API is for curl; every other service listens on its Unix socket.
                "gateway" => Addr::Tcp("127.0.0.1:8080".into()),
                _ => Addr::Unix(run_dir.join(format!("{name}.sock"))),
            });
        for dir in [&run_dir, &state_dir] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating directory {}", dir.display()))?;
        }
        let tls = config.tls.as_ref().map(MutualTls::load).transpose()?;
        let metrics_listen = args.metrics_listen.or(section.metrics_listen);
        let metrics = Arc::new(Metrics::init(name, metrics_listen.is_some())?);
        if let Some(addr) = &metrics_listen {
            metrics.clone().serve(addr).context("metrics_listen")?;
        }
        let files = raise_file_limit();
        tracing::debug!(files, "open files allowed");
        Ok(Daemon {
            name,
            config,
            state_dir,
            run_dir,
            listen,
            tls,
            telemetry,
            metrics,
        })
    }

    /// Where the peer service `peer` listens: its configured address, else its socket in the
    /// run directory.
    pub fn peer(&self, peer: &str) -> Addr {
        self.config
            .section(peer)
            .and_then(|s| s.listen)
            .unwrap_or_else(|| Addr::Unix(self.run_dir.join(format!("{peer}.sock"))))
    }

    /// A channel to the peer service `peer` (mutual TLS over TCP when configured).
    pub fn dial_peer(&self, peer: &str) -> anyhow::Result<crate::Channel> {
        crate::dial_with(&self.peer(peer), self.tls.as_ref())
    }

    /// Binds the listen address: a Unix socket (mode 0600, a stale one replaced, a live one
    /// refused) or TCP.
    pub fn bind(&self) -> anyhow::Result<Listener> {
        bind(&self.listen)
    }

    /// Runs the server that `serve` makes from the bound listener until SIGTERM or SIGINT;
    /// then the server's stop future resolves (it stops accepting and drains in-flight
    /// requests) and the server has [`DRAIN_TIMEOUT`] to finish before the daemon exits anyway.
    pub async fn run<F, Fut>(self, serve: F) -> anyhow::Result<()>
    where
        F: FnOnce(Listener, Stop) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let listener = self.bind()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stop: Stop = Box::pin(async {
            let _ = stop_rx.await;
        });
        let mut serving = tokio::spawn(serve(listener, stop));
        tracing::info!(listen = %self.listen, "{} serving", self.name);
        notify_systemd("READY=1");
        let early = tokio::select! {
            _ = terminate.recv() => None,
            _ = interrupt.recv() => None,
            r = &mut serving => Some(r),
        };
        let result = match early {
            Some(r) => r.context("server task")?,
            None => {
                tracing::info!("{} draining", self.name);
                notify_systemd("STOPPING=1");
                let _ = stop_tx.send(());
                match tokio::time::timeout(DRAIN_TIMEOUT, serving).await {
                    Ok(r) => r.context("server task")?,
                    Err(_) => {
                        tracing::warn!("drain timed out after {DRAIN_TIMEOUT:?}; exiting");
                        Ok(())
                    }
                }
            }
        };
        if let Addr::Unix(path) = &self.listen {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("{} stopped", self.name);
        self.metrics.shutdown();
        self.telemetry.shutdown();
        result
    }

    /// Serves `services` plus health and reflection until SIGTERM or SIGINT, then reports
    /// NOT_SERVING, drains in-flight calls (for at most [`DRAIN_TIMEOUT`]) and returns.
    pub async fn serve(self, services: Services) -> anyhow::Result<()> {
        let (reporter, health) = tonic_health::server::health_reporter();
        let names = services.names.clone();
        for svc in names.iter().copied().chain([""]) {
            reporter
                .set_service_status(svc, ServingStatus::Serving)
                .await;
        }
        // Reflection lists exactly what this daemon serves: its services, health, reflection.
        let listed: Vec<&'static str> = names
            .iter()
            .copied()
            .chain([
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ])
            .collect();
        let reflection = || {
            listed.iter().fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(crate::api::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
                |b, name| b.with_service_name(*name),
            )
        };
        let routes = services
            .routes
            .add_service(health)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?);
        let tls = self.tls.as_ref().map(MutualTls::server);
        self.run(move |listener, stop| async move {
            let stopped = async move {
                stop.await;
                for svc in names.iter().copied().chain([""]) {
                    reporter
                        .set_service_status(svc, ServingStatus::NotServing)
                        .await;
                }
            };
            let mut builder = tonic::transport::Server::builder();
            if let (Listener::Tcp(_), Some(tls)) = (&listener, tls) {
                builder = builder.tls_config(tls).context("mutual TLS")?;
            }
            let mut server = builder.layer(GrpcTraceLayer(Side::Server));
            let router = server.add_routes(routes);
            match listener {
                Listener::Unix(l) => {
                    let incoming = tokio_stream::StreamExt::map(UnixListenerStream::new(l), |c| {
                        c.map(crate::authority::Authority::new)
                    });
                    router.serve_with_incoming_shutdown(incoming, stopped).await
                }
                Listener::Tcp(l) => {
                    router
                        .serve_with_incoming_shutdown(TcpListenerStream::new(l), stopped)
                        .await
                }
            }
            .context("serving")
        })
        .await
    }
}

/// A bound listen address.
pub enum Listener {
    /// A Unix socket.
    Unix(UnixListener),
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Listener {
    /// The next connection, of either kind.
    pub async fn accept(&self) -> std::io::Result<Box<dyn Io>> {
        Ok(match self {
            Listener::Unix(l) => Box::new(l.accept().await?.0),
            Listener::Tcp(l) => Box::new(l.accept().await?.0),
        })
    }
}

/// Raises the soft limit of open files to the hard one (a daemon holds a descriptor per
/// connection, and the usual soft limit is 1024); returns the limit now in force.
pub fn raise_file_limit() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 1024;
        }
        if l.rlim_cur < l.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                l = raised;
            }
        }
    }
    l.rlim_cur
}

/// A byte stream of any kind (Unix, TCP, TLS), for code that accepts or dials several.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Resolves when the server should stop accepting and drain.
pub type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The gRPC services a daemon serves, beside health and reflection.
#[derive(Default)]
pub struct Services {
    routes: Routes,
    names: Vec<&'static str>,
}

impl Services {
    /// Adds one generated service server.
    pub fn with<S>(mut self, svc: S) -> Self
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes = self.routes.add_service(svc);
        self
    }
}

/// Tells systemd (`Type=notify` units) how the daemon is doing, when it runs under systemd:
/// a datagram to `$NOTIFY_SOCKET` (a path, or an abstract name after `@`).
fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    let addr = match target.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&target),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &a));
    if let Err(e) = sent {
        tracing::warn!("telling systemd {state:?} through {target}: {e}");
    }
}

/// Binds `addr`: a Unix socket (mode 0600, a stale one replaced, a live one refused) or TCP.
/// Must be called inside a Tokio runtime.
pub fn bind(addr: &Addr) -> anyhow::Result<Listener> {
    Ok(match addr {
        Addr::Unix(path) => Listener::Unix(bind_unix(path)?),
        Addr::Tcp(hostport) => {
            let listening = || format!("listening on tcp://{hostport}");
            let l = std::net::TcpListener::bind(hostport).with_context(listening)?;
            l.set_nonblocking(true).with_context(listening)?;
            Listener::Tcp(TcpListener::from_std(l).with_context(listening)?)
        }
    })
}

/// Binds a Unix socket with mode 0600, replacing a stale socket file but never a live one.
pub fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating directory {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "{} is in use by a running process; stop it or choose another --listen",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("listening on unix:{}", path.display()))?;
    chmod_socket(path, 0o600).with_context(|| format!("securing {}", path.display()))?;
    Ok(listener)
}

/// The socket file at `path` itself, opened without following a link: a symbolic link (or
/// anything but a socket) there is refused. Where another user may rename entries of the
/// directory (a VM's directory is its hypervisor's), a socket swapped for a link must not lead
/// root elsewhere.
fn socket_file(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: open(2) on a NUL-terminated path that outlives the call.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let meta = std::fs::metadata(proc_fd(&fd))?;
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::other(format!(
            "{} is not a socket (a link or another file took its place)",
            path.display()
        )));
    }
    Ok(fd)
}

fn proc_fd(fd: &std::os::fd::OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Connects to the Unix socket at `path`, never through a symbolic link in its place.
pub async fn connect_unix(path: &Path) -> std::io::Result<tokio::net::UnixStream> {
    let fd = socket_file(path)?;
    tokio::net::UnixStream::connect(proc_fd(&fd)).await
}

/// Sets the mode of the socket file at `path`, never through a symbolic link in its place.
pub fn chmod_socket(path: &Path, mode: u32) -> std::io::Result<()> {
    let fd = socket_file(path)?;
    std::fs::set_permissions(proc_fd(&fd), std::fs::Permissions::from_mode(mode))
}

/// Runs a daemon: transparent huge pages off for the process first (an allocator that commits
/// memory in large arenas, like mimalloc, would otherwise turn each first touch into 2 MiB of
/// resident memory), then `run` on a multi-threaded Tokio runtime; its error becomes the exit
/// code as [`exit`] says.
pub fn main<F: Future<Output = anyhow::Result<()>>>(
    name: &str,
    run: impl FnOnce() -> F,
) -> std::process::ExitCode {
    // SAFETY: prctl(PR_SET_THP_DISABLE) only sets a flag of this process.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => exit(name, rt.block_on(run())),
        Err(e) => exit(
            name,
            Err(anyhow::Error::new(e).context("starting the runtime")),
        ),
    }
}

/// Prints a daemon's fatal error the way an operator reads it and turns it into an exit code.
fn exit(name: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
