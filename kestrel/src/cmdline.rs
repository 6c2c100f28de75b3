//! The kernel command line, as vmmd writes it:
//!
//! `volant.mode=bridge|vsock volant.ip=<ip>/<prefix> volant.gw=<ip> volant.dns=<ip>[,<ip>]
//! volant.http_port=<port> volant.vsock_port=<port> volant.egress_port=<port>
//! volant.name=<vm> volant.workload=<base64url of the workload JSON> volant.probe=1`
//!
//! Every problem is collected, so the console names them all at once.

use std::net::Ipv4Addr;

use base64::Engine as _;
pub use volant_boot::Workload;

/// The longest `volant.workload` value accepted.
pub const MAX_WORKLOAD: usize = 2048;

/// How the VM is networked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// eth0 on a bridge, configured from `volant.ip` and `volant.gw`.
    Bridge,
    /// No network device; the host is reached over vsock.
    Vsock,
}

/// Everything kestrel reads from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Boot {
    /// Networking mode.
    pub mode: Mode,
    /// eth0's address and prefix length (bridge mode).
    pub ip: Option<(Ipv4Addr, u8)>,
    /// Default gateway (bridge mode).
    pub gw: Option<Ipv4Addr>,
    /// Name servers.
    pub dns: Vec<Ipv4Addr>,
    /// The workload's HTTP port, when it serves HTTP.
    pub http_port: Option<u16>,
    /// The vsock port kestrel listens on for ingress.
    pub vsock_port: u32,
    /// The host's vsock port of the egress proxy.
    pub egress_port: u32,
    /// The VM's name, used as the hostname.
    pub name: Option<String>,
    /// The workload, when the command line carries it.
    pub workload: Option<Workload>,
    /// Only prove that the guest boots, then power off.
    pub probe: bool,
}

impl Default for Boot {
    fn default() -> Self {
        Boot {
            mode: Mode::Bridge,
            ip: None,
            gw: None,
            dns: Vec::new(),
            http_port: None,
            vsock_port: 8080,
            egress_port: 3128,
            name: None,
            workload: None,
            probe: false,
        }
    }
}

fn port(key: &str, value: &str) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{key}={value}: not a port (1-65535)")),
    }
}

fn ipv4(key: &str, value: &str) -> Result<Ipv4Addr, String> {
    value
        .parse()
        .map_err(|_| format!("{key}={value}: not an IPv4 address"))
}

/// Parses the command line. Unknown `volant.*` keys are reported as errors too: a typo must not
/// go unnoticed; and so is a key given twice (vmmd writes each once): the guest does not boot.
pub fn parse(cmdline: &str) -> Result<Boot, Vec<String>> {
    let mut boot = Boot::default();
    let mut errors = Vec::new();
    // Split as the kernel splits it; every volant.* parameter at most once.
    let params = volant_boot::volant_params(cmdline).map_err(|e| vec![e])?;
    for (key, value) in &params {
        let (key, value) = (key.as_str(), value.as_str());
        let full = format!("volant.{key}");
        let result: Result<(), String> = (|| {
            match key {
                "mode" => {
                    boot.mode = match value {
                        "bridge" => Mode::Bridge,
                        "vsock" => Mode::Vsock,
                        _ => return Err(format!("{full}={value}: expected bridge or vsock")),
                    }
                }
                "ip" => {
                    let (ip, prefix) = value
                        .split_once('/')
                        .ok_or_else(|| format!("{full}={value}: expected <ip>/<prefix>"))?;
                    let prefix = prefix
                        .parse::<u8>()
                        .ok()
                        .filter(|p| *p <= 32)
                        .ok_or_else(|| format!("{full}={value}: prefix must be 0-32"))?;
                    boot.ip = Some((ipv4(&full, ip)?, prefix));
                }
                "gw" => boot.gw = Some(ipv4(&full, value)?),
                "dns" => {
                    boot.dns = value
                        .split(',')
                        .map(|ip| ipv4(&full, ip))
                        .collect::<Result<_, _>>()?
                }
                "http_port" => boot.http_port = Some(port(&full, value)?),
                "vsock_port" => boot.vsock_port = port(&full, value)?.into(),
                "egress_port" => boot.egress_port = port(&full, value)?.into(),
                "name" => {
                    let ok = !value.is_empty()
                        && value.len() <= 63
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
                    if !ok {
                        return Err(format!("{full}={value}: not a host name"));
                    }
                    boot.name = Some(value.to_string());
                }
                "workload" => {
                    if value.len() > MAX_WORKLOAD {
                        return Err(format!(
                            "{full}: {} bytes, longer than {MAX_WORKLOAD}; refused",
                            value.len()
                        ));
                    }
                    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(value.trim_end_matches('='))
                        .map_err(|e| format!("{full}: not base64url ({e}); refused"))?;
                    boot.workload = Some(Workload::from_json(&json)?);
                }
                "probe" => boot.probe = value == "1" || value.is_empty(),
                _ => return Err(format!("{full}: unknown parameter")),
            }
            Ok(())
        })();
        if let Err(e) = result {
            errors.push(e);
        }
    }
    if boot.mode == Mode::Bridge && !boot.probe && boot.ip.is_none() {
        errors.push("volant.ip is required in bridge mode".into());
    }
    if boot.gw.is_some() && boot.ip.is_none() {
        errors.push("volant.gw given without volant.ip".into());
    }
    if errors.is_empty() {
        Ok(boot)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(json: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    #[test]
    fn a_full_bridge_command_line() {
        let w =
            b64(r#"{"entrypoint":["/bin/busybox","httpd","-f"],"env":{"A":"1"},"http_port":80}"#);
        let line = format!(
            "console=ttyS0 panic=-1 volant.mode=bridge volant.ip=192.168.127.100/24 \
             volant.gw=192.168.127.1 volant.dns=1.1.1.1,8.8.8.8 volant.http_port=80 \
             volant.name=web volant.workload={w} ip=192.168.127.100::192.168.127.1:255.255.255.0"
        );
        let boot = parse(&line).unwrap();
        assert_eq!(boot.mode, Mode::Bridge);
        assert_eq!(boot.ip, Some(("192.168.127.100".parse().unwrap(), 24)));
        assert_eq!(boot.gw, Some("192.168.127.1".parse().unwrap()));
        assert_eq!(boot.dns.len(), 2);
        assert_eq!(boot.http_port, Some(80));
        assert_eq!(boot.name.as_deref(), Some("web"));
        let w = boot.workload.unwrap();
        assert_eq!(w.entrypoint, ["/bin/busybox", "httpd", "-f"]);
        assert_eq!(w.env["A"], "1");
        assert_eq!((boot.vsock_port, boot.egress_port), (8080, 3128));
    }

    #[test]
    fn vsock_needs_no_address_and_quotes_are_honoured() {
        let boot = parse("volant.mode=vsock \"volant.name=db\" volant.vsock_port=9000").unwrap();
        assert_eq!(boot.mode, Mode::Vsock);
        assert_eq!(boot.vsock_port, 9000);
        assert_eq!(boot.name.as_deref(), Some("db"));
        assert!(parse("volant.probe=1").unwrap().probe);
    }

    #[test]
    fn a_parameter_given_twice_stops_the_boot() {
        // What an injected `"volant.ip=…"` in user text would look like, whichever comes first.
        for line in [
            "volant.mode=bridge \"volant.ip=192.168.127.200/24\" volant.ip=192.168.127.101/24",
            "volant.ip=192.168.127.101/24 volant.mode=bridge volant.ip=192.168.127.200/24",
            "volant.mode=vsock volant.name=a \"volant.name=pwned\"",
        ] {
            let errors = parse(line).unwrap_err();
            assert!(errors[0].contains("more than once"), "{line}: {errors:?}");
        }
    }

    #[test]
    fn bad_values_are_all_reported() {
        let too_long = "A".repeat(MAX_WORKLOAD + 1);
        let cases = [
            (
                "volant.mode=tap volant.ip=1.2.3.4/24",
                "expected bridge or vsock",
            ),
            ("volant.ip=1.2.3.4", "expected <ip>/<prefix>"),
            ("volant.ip=1.2.3.4/33", "prefix must be 0-32"),
            ("volant.ip=1.2.3/24", "not an IPv4 address"),
            (
                "volant.ip=1.2.3.4/24 volant.gw=x",
                "volant.gw=x: not an IPv4",
            ),
            ("volant.ip=1.2.3.4/24 volant.dns=1.1.1.1,", "volant.dns"),
            ("volant.ip=1.2.3.4/24 volant.http_port=0", "not a port"),
            ("volant.ip=1.2.3.4/24 volant.http_port=70000", "not a port"),
            ("volant.ip=1.2.3.4/24 volant.name=a_b", "not a host name"),
            (
                "volant.ip=1.2.3.4/24 volant.colour=red",
                "unknown parameter",
            ),
            ("volant.mode=bridge", "volant.ip is required"),
            ("volant.mode=vsock volant.gw=1.1.1.1", "without volant.ip"),
            ("volant.mode=vsock volant.workload=!!!", "not base64url"),
        ];
        for (line, why) in cases {
            let errs = parse(line).unwrap_err();
            assert!(errs.iter().any(|e| e.contains(why)), "{line}: {errs:?}");
        }
        let errs = parse(&format!("volant.mode=vsock volant.workload={too_long}")).unwrap_err();
        assert!(errs[0].contains("longer than 2048"), "{errs:?}");
        let errs = parse("volant.ip=x volant.gw=y volant.http_port=z").unwrap_err();
        // Three bad values, and so no address for bridge mode: every problem at once.
        assert_eq!(errs.len(), 4, "{errs:?}");
    }

    #[test]
    fn bad_workloads_are_refused() {
        let cases = [
            (r#"{"entrypoint":[]}"#, "entrypoint is empty"),
            (r#"{"entrypoint":["httpd"]}"#, "not an absolute path"),
            (r#"{"entrypoint":["/x"],"workdir":"tmp"}"#, "workdir"),
            (r#"{"entrypoint":["/x"],"env":{"A=B":"1"}}"#, "env name"),
            (r#"{"entrypoint":["/x"],"colour":"red"}"#, "unknown field"),
            (r#"{"entrypoint":"/x"}"#, "workload JSON"),
            ("not json", "workload JSON"),
        ];
        for (json, why) in cases {
            let line = format!("volant.mode=vsock volant.workload={}", b64(json));
            let errs = parse(&line).unwrap_err();
            assert!(errs.iter().any(|e| e.contains(why)), "{json}: {errs:?}");
        }
    }
}
