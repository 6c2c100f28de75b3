//! What a guest boots with, besides its plugin's kernel and initramfs: the kernel command line
//! vmmd writes (the plugin's and the request's text first, checked, then vmmd's own `volant.*`
//! parameters) and the workload file kestrel reads.

use std::net::IpAddr;

use crate::manifest::Manifest;
use crate::records::VmRecord;

/// The kernel's command-line limit on x86 (COMMAND_LINE_SIZE, including the NUL).
const CMDLINE_MAX: usize = 2048;

/// The workload as kestrel reads it from `/etc/volant/workload.json`.
pub fn workload_json(m: &Manifest) -> Vec<u8> {
    volant_boot::Workload {
        entrypoint: m.workload.entrypoint.clone(),
        env: m.workload.env.clone(),
        workdir: m.workload.workdir.clone(),
        http_port: m.workload.http_port(),
    }
    .to_json()
}

fn netmask(prefix: u8) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

/// The kernel command line of a VM: the plugin's and the request's text first (checked to name
/// no `volant.*` parameter and to close its quotes), then vmmd's parameters, each once.
pub fn cmdline(r: &VmRecord, dns: &[IpAddr]) -> Result<String, String> {
    let m = &r.manifest;
    let mut parts: Vec<String> = Vec::new();
    for (what, text) in [
        ("boot.cmdline", &m.boot.cmdline),
        ("kernel_cmdline", &r.extra_cmdline),
    ] {
        volant_boot::check_user_text(text).map_err(|e| format!("{what}: {e}"))?;
        if !text.is_empty() {
            parts.push(text.clone());
        }
    }
    parts.push(format!("volant.mode={}", r.mode.as_str()));
    parts.push(format!("volant.name={}", r.name));
    if let (Some(ip), Some(gw)) = (r.ip, r.gateway) {
        parts.push(format!("volant.ip={ip}/{}", r.prefix_len));
        parts.push(format!("volant.gw={gw}"));
        parts.push(format!(
            "ip={ip}::{gw}:{}:{}:eth0:off",
            netmask(r.prefix_len),
            r.name
        ));
    }
    if !dns.is_empty() {
        let list: Vec<String> = dns.iter().map(|d| d.to_string()).collect();
        parts.push(format!("volant.dns={}", list.join(",")));
    }
    if let Some(port) = m.workload.http_port() {
        parts.push(format!("volant.http_port={port}"));
    }
    if r.mode == crate::manifest::Mode::Vsock {
        let port = m.networking.proxy.as_ref().map_or(8080, |p| p.port);
        parts.push(format!("volant.vsock_port={port} volant.egress_port=3128"));
    }
    let line = parts.join(" ");
    if line.len() >= CMDLINE_MAX {
        return Err(format!(
            "the kernel command line would be {} bytes; the limit is {}: shorten boot.cmdline or \
             kernel_cmdline",
            line.len(),
            CMDLINE_MAX - 1
        ));
    }
    Ok(line)
}
