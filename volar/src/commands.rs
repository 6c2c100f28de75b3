//! What each command does with the API.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use crate::cli::{Cli, Command, Debug, Networks, Output, Plugins, Ports, Setup, Vms, Wait};
use crate::client::{Api, Failure};
use crate::output::{cell, rows, table};

const VM_COLUMNS: [&str; 7] = [
    "name",
    "status",
    "plugin",
    "network",
    "ip_address",
    "hypervisor",
    "pid",
];

fn print(out: Output, value: &Value, headers: &[&str], fields: &[&str]) {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(value).expect("JSON")),
        Output::Table if value.is_array() => print!("{}", table(headers, &rows(value, fields))),
        Output::Table => print!("{}", table(headers, &rows(&json!([value]), fields))),
    }
}

fn vm(out: Output, v: &Value) {
    print(
        out,
        v,
        &[
            "name",
            "status",
            "plugin",
            "network",
            "ip",
            "hypervisor",
            "pid",
        ],
        &VM_COLUMNS,
    );
    if out == Output::Table && !cell(v, "error").starts_with('-') {
        eprintln!("error: {}", cell(v, "error"));
    }
}

fn range(text: &str) -> Result<Value, Failure> {
    let (start, end) = text.split_once('-').ok_or_else(|| {
        Failure(format!(
            "--range {text:?}: write START-END, e.g. 10.0.0.100-10.0.0.200"
        ))
    })?;
    Ok(json!({ "start": start.trim(), "end": end.trim() }))
}

fn network_body(
    name: &str,
    subnet: &str,
    gateway: &Option<String>,
    r: &Option<String>,
    no_nat: bool,
) -> Result<Value, Failure> {
    let mut body = json!({ "name": name, "subnet": subnet, "nat": !no_nat });
    if let Some(g) = gateway {
        body["gateway"] = g.clone().into();
    }
    if let Some(r) = r {
        body["ip_range"] = range(r)?;
    }
    Ok(body)
}

/// Waits until `name` is `running` (vmmd makes it so when its guest reports ready), showing a
/// spinner with the VM's state when stderr is a terminal.
async fn wait_ready(api: &Api, name: &str, limit: Duration) -> Result<(), Failure> {
    let frames = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    let spin = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut i = 0;
    let result = loop {
        let v = api.call(Method::GET, &format!("/vms/{name}"), None).await?;
        let status = cell(&v, "status");
        match status.as_str() {
            "running" => break Ok(()),
            "failed" | "stopped" | "deleting" => {
                break Err(Failure(format!(
                    "vm {name} is {status} before its guest was ready: {}; see `volar vms logs \
                     {name}`",
                    cell(&v, "error")
                )));
            }
            _ => {}
        }
        if start.elapsed() > limit {
            break Err(Failure(format!(
                "the guest of {name} was not ready after {}s (it is {status}); see `volar vms \
                 logs {name}`",
                limit.as_secs()
            )));
        }
        if spin {
            eprint!(
                "\r{} {name}: {status}… {}s ",
                frames[i % frames.len()],
                start.elapsed().as_secs()
            );
            let _ = std::io::stderr().flush();
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if spin {
        eprint!("\r\x1b[2K");
    }
    result
}

/// Starts or restarts `name` (`action`) and, unless told not to, waits until its guest is ready.
async fn boot(api: &Api, out: Output, name: &str, action: &str, wait: Wait) -> Result<(), Failure> {
    let mut v = api
        .call(Method::POST, &format!("/vms/{name}/{action}"), None)
        .await?;
    if !wait.no_wait {
        wait_ready(api, name, Duration::from_secs(wait.timeout)).await?;
        v = api.call(Method::GET, &format!("/vms/{name}"), None).await?;
    }
    vm(out, &v);
    Ok(())
}

/// Runs the command.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    let api = Api::new(&cli.api, cli.token.clone(), cli.cacert.as_deref())?;
    let out = cli.output;
    match cli.command {
        Command::Setup(Setup {
            install_systemd: true,
            root,
            ..
        }) => {
            for line in crate::systemd::install(&root)? {
                println!("{line}");
            }
        }
        Command::Setup(Setup {
            bridge,
            subnet,
            gateway,
            range: r,
            no_nat,
            ..
        }) => {
            let mut body = network_body(&bridge, &subnet, &gateway, &r, no_nat)?;
            if r.is_none() && subnet == "192.168.127.0/24" {
                body["ip_range"] = json!({ "start": "192.168.127.100", "end": "192.168.127.254" });
            }
            let n = api.call(Method::POST, "/networks", Some(&body)).await?;
            print(
                out,
                &n,
                &["name", "subnet", "gateway", "nat"],
                &["name", "subnet", "gateway", "nat"],
            );
        }
        Command::Vms(cmd) => vms(&api, out, cmd).await?,
        Command::Plugins(cmd) => match cmd {
            Plugins::Install { manifest } => {
                let text = std::fs::read_to_string(&manifest)
                    .map_err(|e| Failure(format!("reading {}: {e}", manifest.display())))?;
                let body: Value = serde_json::from_str(&text)
                    .map_err(|e| Failure(format!("{}: not JSON: {e}", manifest.display())))?;
                let p = api.call(Method::POST, "/plugins", Some(&body)).await?;
                print(
                    out,
                    &p,
                    &["name", "version", "network"],
                    &["name", "version", "network_mode"],
                );
            }
            Plugins::List => {
                let list = api.call(Method::GET, "/plugins", None).await?;
                print(
                    out,
                    &list,
                    &["name", "version", "network", "installed"],
                    &["name", "version", "network_mode", "installed_at"],
                );
            }
            Plugins::Show { name } => {
                let p = api
                    .call(Method::GET, &format!("/plugins/{name}"), None)
                    .await?;
                match out {
                    Output::Json => print(out, &p, &[], &[]),
                    Output::Table => println!(
                        "{}",
                        serde_json::to_string_pretty(&p["manifest"]).expect("JSON")
                    ),
                }
            }
            Plugins::Remove { name } => {
                api.call(Method::DELETE, &format!("/plugins/{name}"), None)
                    .await?;
            }
        },
        Command::Networks(cmd) => match cmd {
            Networks::List => {
                let list = api.call(Method::GET, "/networks", None).await?;
                let mut table_rows = Vec::new();
                for n in list.as_array().into_iter().flatten() {
                    let range = match &n["ip_range"] {
                        Value::Null => "-".to_string(),
                        r => format!("{}-{}", cell(r, "start"), cell(r, "end")),
                    };
                    table_rows.push(vec![
                        cell(n, "name"),
                        cell(n, "subnet"),
                        cell(n, "gateway"),
                        range,
                        cell(n, "nat"),
                        format!("{}/{}", cell(n, "leased"), cell(n, "capacity")),
                    ]);
                }
                match out {
                    Output::Json => print(out, &list, &[], &[]),
                    Output::Table => print!(
                        "{}",
                        table(
                            &["name", "subnet", "gateway", "range", "nat", "leased"],
                            &table_rows
                        )
                    ),
                }
            }
            Networks::Create {
                name,
                subnet,
                gateway,
                range: r,
                no_nat,
            } => {
                let body = network_body(&name, &subnet, &gateway, &r, no_nat)?;
                let n = api.call(Method::POST, "/networks", Some(&body)).await?;
                print(
                    out,
                    &n,
                    &["name", "subnet", "gateway", "nat"],
                    &["name", "subnet", "gateway", "nat"],
                );
            }
            Networks::Delete { name, force } => {
                api.call(
                    Method::DELETE,
                    &format!("/networks/{name}?force={force}"),
                    None,
                )
                .await?;
            }
        },
        Command::Ports(cmd) => match cmd {
            Ports::Add {
                vm,
                host_port,
                guest_port,
                protocol,
            } => {
                let body = json!({ "host_port": host_port, "guest_port": guest_port, "protocol": protocol });
                let p = api
                    .call(Method::POST, &format!("/vms/{vm}/ports"), Some(&body))
                    .await?;
                print(
                    out,
                    &p,
                    &["host port", "guest port", "protocol", "vm ip"],
                    &["host_port", "guest_port", "protocol", "vm_ip"],
                );
            }
            Ports::List { vm } => {
                let list = api
                    .call(Method::GET, &format!("/vms/{vm}/ports"), None)
                    .await?;
                print(
                    out,
                    &list,
                    &["host port", "guest port", "protocol", "vm ip"],
                    &["host_port", "guest_port", "protocol", "vm_ip"],
                );
            }
            Ports::Remove {
                vm,
                host_port,
                protocol,
            } => {
                let path = format!("/vms/{vm}/ports/{host_port}?protocol={protocol}");
                api.call(Method::DELETE, &path, None).await?;
            }
        },
        Command::Debug(Debug::Ipam { network }) => {
            let path = match network {
                Some(n) => format!("/ipam/leases?network={n}"),
                None => "/ipam/leases".into(),
            };
            let list = api.call(Method::GET, &path, None).await?;
            print(
                out,
                &list,
                &["ip", "vm", "leased_at"],
                &["ip", "vm", "leased_at"],
            );
        }
        Command::Completions { .. } | Command::Man { .. } => unreachable!("handled before"),
    }
    Ok(())
}

async fn vms(api: &Api, out: Output, cmd: Vms) -> Result<(), Failure> {
    match cmd {
        Vms::Create {
            name,
            plugin,
            cpu,
            memory,
            network,
            ip,
            kernel_cmdline,
            wait,
        } => {
            let body = json!({
                "name": name, "plugin": plugin, "cpu_cores": cpu, "memory_mb": memory,
                "network": network, "ip": ip, "kernel_cmdline": kernel_cmdline,
            });
            let spin = std::io::stderr().is_terminal() && !wait.no_wait;
            if spin {
                eprint!("⠋ {name}: creating… ");
                let _ = std::io::stderr().flush();
            }
            let created = api.call(Method::POST, "/vms", Some(&body)).await;
            if spin {
                eprint!("\r\x1b[2K");
            }
            let mut v = created?;
            for note in v["notes"].as_array().into_iter().flatten() {
                eprintln!("{name}: {}", note.as_str().unwrap_or_default());
            }
            if !wait.no_wait {
                wait_ready(api, &name, Duration::from_secs(wait.timeout)).await?;
                v = api.call(Method::GET, &format!("/vms/{name}"), None).await?;
            }
            vm(out, &v);
        }
        Vms::List => {
            let list = api.call(Method::GET, "/vms", None).await?;
            print(
                out,
                &list,
                &[
                    "name",
                    "status",
                    "plugin",
                    "network",
                    "ip",
                    "hypervisor",
                    "pid",
                ],
                &VM_COLUMNS,
            );
        }
        Vms::Get { name } => vm(
            out,
            &api.call(Method::GET, &format!("/vms/{name}"), None).await?,
        ),
        Vms::Delete { name, force } => {
            api.call(Method::DELETE, &format!("/vms/{name}?force={force}"), None)
                .await?;
        }
        Vms::Start { name, wait } => boot(api, out, &name, "start", wait).await?,
        Vms::Stop { name } => vm(
            out,
            &api.call(Method::POST, &format!("/vms/{name}/stop"), None)
                .await?,
        ),
        Vms::Restart { name, wait } => boot(api, out, &name, "restart", wait).await?,
        Vms::Logs {
            name,
            follow,
            previous,
        } => {
            let res = api
                .send(
                    Method::GET,
                    &format!("/vms/{name}/logs?follow={follow}&previous={previous}"),
                    None,
                )
                .await?;
            let mut body = res.bytes_stream();
            let mut stdout = std::io::stdout();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| Failure(format!("reading the log: {e}")))?;
                if stdout
                    .write_all(&chunk)
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    break; // The reader went away (e.g. `| head`).
                }
            }
        }
    }
    Ok(())
}
