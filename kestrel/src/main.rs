//! kestrel: PID 1 of a Volant guest. It mounts the basics, loads the kernel modules the image
//! lists, configures the network from the kernel command line, runs the workload, reaps
//! zombies, passes signals on, and powers the machine off when the workload exits or the power
//! button is pressed. Everything it does is reported on the console as `kestrel: …` lines; its
//! last, `kestrel: powering off`, is how the host tells a clean power-off from a crash.

mod button;
mod cmdline;
mod net;
mod supervisor;
mod system;
mod vsock;

use std::io::Write;
use std::path::Path;

use cmdline::{Boot, Mode, Workload};

const MODULES: &str = "/etc/volant/modules";
const WORKLOAD: &str = volant_boot::WORKLOAD_FILE;

fn say(line: &str) {
    println!("kestrel: {line}");
    let _ = std::io::stdout().flush();
}

fn fail(line: &str) -> ! {
    say(&format!("error: {line}"));
    say("powering off");
    system::power_off()
}

fn workload(boot: &Boot) -> Result<Workload, String> {
    if let Some(w) = &boot.workload {
        return Ok(w.clone());
    }
    match std::fs::read(WORKLOAD) {
        Ok(json) => Workload::from_json(&json).map_err(|e| format!("{WORKLOAD}: {e}")),
        Err(e) => Err(format!(
            "no workload: volant.workload is absent and {WORKLOAD} cannot be read ({e})"
        )),
    }
}

async fn start(boot: &Boot, w: &Workload) -> Result<i32, String> {
    let net = net::Net::connect()?;
    net.loopback().await?;
    if boot.mode == Mode::Bridge
        && let Some((ip, prefix)) = boot.ip
    {
        net.configure_eth0(ip, prefix, boot.gw).await?;
    }
    let names: Vec<String> = net
        .interfaces()
        .await?
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    say(&format!("interfaces {}", names.join(",")));
    let mut w = w.clone();
    if boot.mode == Mode::Vsock {
        if let Some(port) = boot.http_port.or(w.http_port) {
            vsock::ingress(boot.vsock_port, port)?;
            say(&format!(
                "vsock ingress port {} -> 127.0.0.1:{port}",
                boot.vsock_port
            ));
        }
        vsock::egress(boot.egress_port).await?;
        let proxy = format!(
            "http://{}:{}",
            vsock::EGRESS_LISTEN.0,
            vsock::EGRESS_LISTEN.1
        );
        for var in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            w.env
                .entry(var.to_string())
                .or_insert_with(|| proxy.clone());
        }
        say(&format!(
            "vsock egress {proxy} -> host port {}",
            boot.egress_port
        ));
    }
    let workload = supervisor::start(&w, boot.name.as_deref())?;
    if let Some(port) = boot.http_port.or(w.http_port) {
        serving(port).await;
    }
    let ip = boot
        .ip
        .map(|(ip, p)| format!("{ip}/{p}"))
        .unwrap_or_else(|| "none".into());
    let mode = match boot.mode {
        Mode::Bridge => "bridge",
        Mode::Vsock => "vsock",
    };
    say(&format!(
        "ready ip={ip} mode={mode} workload_pid={}",
        workload.pid()
    ));
    Ok(workload.wait(button::pressed()).await)
}

/// Waits until the workload accepts connections on `port`, so that `ready` means ready.
async fn serving(port: u16) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if tokio::time::Instant::now() > deadline {
            say(&format!(
                "warning: the workload does not accept connections on port {port}"
            ));
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn main() {
    say(&format!("starting {}", env!("CARGO_PKG_VERSION")));
    if std::process::id() != 1 {
        eprintln!("kestrel is the init of a Volant guest and must run as PID 1");
        std::process::exit(2);
    }
    if let Err(e) = system::mount_all() {
        fail(&e.to_string());
    }
    system::disable_ctrl_alt_del();
    let line = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let boot = match cmdline::parse(&line) {
        Ok(boot) => boot,
        Err(errors) => {
            for e in &errors {
                say(&format!("error: {e}"));
            }
            fail("the kernel command line is invalid");
        }
    };
    if boot.probe {
        say("probe ok");
        system::power_off();
    }
    match system::load_modules(Path::new(MODULES)) {
        Ok(loaded) if !loaded.is_empty() => say(&format!("modules {}", loaded.join(","))),
        Ok(_) => {}
        Err(e) => fail(&e),
    }
    if let Some(name) = &boot.name
        && let Err(e) = system::set_hostname(name)
    {
        say(&format!("warning: host name: {e}"));
    }
    if !boot.dns.is_empty()
        && let Err(e) = system::write_resolv(&boot.dns)
    {
        say(&format!("warning: /etc/resolv.conf: {e}"));
    }
    let w = workload(&boot).unwrap_or_else(|e| fail(&e));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("runtime: {e}")));
    match rt.block_on(start(&boot, &w)) {
        Ok(code) => say(&format!("workload exited with status {code}")),
        Err(e) => say(&format!("error: {e}")),
    }
    say("powering off");
    system::power_off();
}
