//! The command line, as `docs/api.md` summarises it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Volant's command-line client: it speaks the REST API of the gateway.
#[derive(Parser)]
#[command(name = "volar", version, propagate_version = true)]
pub struct Cli {
    /// The gateway's URL.
    #[arg(
        long,
        global = true,
        env = "VOLANT_API",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api: String,
    /// An API key, sent as `Authorization: Bearer <token>`.
    #[arg(long, global = true, env = "VOLANT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A PEM file of CA certificates to trust for an `https://` API, besides the system's.
    #[arg(long, global = true, env = "VOLANT_CACERT")]
    pub cacert: Option<std::path::PathBuf>,
    /// Output: tables for people, JSON for scripts.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// The API's JSON.
    Json,
}

/// The commands.
#[derive(Subcommand)]
pub enum Command {
    /// Ensure the default network (bridge, address pool, forwarding, NAT).
    Setup(Setup),
    /// VMs.
    #[command(subcommand)]
    Vms(Vms),
    /// Plugins (VM templates).
    #[command(subcommand)]
    Plugins(Plugins),
    /// Networks (bridges with address pools).
    #[command(subcommand)]
    Networks(Networks),
    /// Port forwards from the host to VMs.
    #[command(subcommand)]
    Ports(Ports),
    /// Inspect Volant's internals.
    #[command(subcommand)]
    Debug(Debug),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page, or write one per command into a directory.
    Man {
        /// Where to write volar.1 and volar-<command>.1.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// `volar setup`.
#[derive(Args)]
pub struct Setup {
    /// The bridge's name.
    #[arg(long, default_value = "volant0")]
    pub bridge: String,
    /// Its subnet.
    #[arg(long, default_value = "192.168.127.0/24")]
    pub subnet: String,
    /// Its address [default: the first address of the subnet].
    #[arg(long)]
    pub gateway: Option<String>,
    /// The leasable range, START-END [default for 192.168.127.0/24: .100-.254].
    #[arg(long)]
    pub range: Option<String>,
    /// Do not masquerade outgoing traffic.
    #[arg(long)]
    pub no_nat: bool,
    /// Instead: install the daemons built beside volar and their systemd units, enable
    /// volant.target and start it.
    #[arg(long)]
    pub install_systemd: bool,
    /// With --install-systemd: install under this root instead, enable without starting.
    #[arg(long, default_value = "/", requires = "install_systemd")]
    pub root: std::path::PathBuf,
}

/// Whether and how long a command that boots a guest waits for it.
#[derive(Args)]
pub struct Wait {
    /// Return once the VM runs, without waiting for its guest.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for the guest, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

/// `volar vms …`.
#[derive(Subcommand)]
pub enum Vms {
    /// Create a VM and wait until its guest is ready.
    Create {
        /// A DNS label.
        name: String,
        /// The plugin.
        #[arg(long)]
        plugin: String,
        /// vCPUs [default: the plugin's].
        #[arg(long)]
        cpu: Option<u32>,
        /// Memory in MiB [default: the plugin's].
        #[arg(long)]
        memory: Option<u32>,
        /// bridge, bridge=<network> or vsock [default: the plugin's].
        #[arg(long)]
        network: Option<String>,
        /// A fixed address inside the network's range.
        #[arg(long)]
        ip: Option<String>,
        /// Extra kernel command line.
        #[arg(long)]
        kernel_cmdline: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// List the VMs.
    List,
    /// Show one VM.
    Get {
        /// The VM.
        name: String,
    },
    /// Delete a VM and everything it holds.
    Delete {
        /// The VM.
        name: String,
        /// Remove whatever is left even when a step fails.
        #[arg(long)]
        force: bool,
    },
    /// Start a stopped VM and wait until its guest is ready.
    Start {
        /// The VM.
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Shut a VM down cleanly.
    Stop {
        /// The VM.
        name: String,
    },
    /// Stop and start a VM, and wait until its guest is ready again.
    Restart {
        /// The VM.
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Print a VM's serial console (this boot's).
    Logs {
        /// The VM.
        name: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// The previous boot's console instead.
        #[arg(short, long, conflicts_with = "follow")]
        previous: bool,
    },
}

/// `volar plugins …`.
#[derive(Subcommand)]
pub enum Plugins {
    /// Install (or replace) a plugin from its manifest.
    Install {
        /// The manifest (JSON).
        #[arg(long)]
        manifest: PathBuf,
    },
    /// List the plugins.
    List,
    /// Show a plugin and its manifest.
    Show {
        /// The plugin.
        name: String,
    },
    /// Remove a plugin no VM uses.
    Remove {
        /// The plugin.
        name: String,
    },
}

/// `volar networks …`.
#[derive(Subcommand)]
pub enum Networks {
    /// List the networks.
    List,
    /// Create a network.
    Create {
        /// The bridge's name.
        name: String,
        /// Its subnet (CIDR).
        #[arg(long)]
        subnet: String,
        /// Its address [default: the first address of the subnet].
        #[arg(long)]
        gateway: Option<String>,
        /// The leasable range, START-END [default: .100-.254 in a /24 whose gateway lies below
        /// .100, as for the default network; else every address after the gateway].
        #[arg(long)]
        range: Option<String>,
        /// Do not masquerade outgoing traffic.
        #[arg(long)]
        no_nat: bool,
    },
    /// Delete a network.
    Delete {
        /// The network.
        name: String,
        /// Also when VMs use it.
        #[arg(long)]
        force: bool,
    },
}

/// `volar ports …`.
#[derive(Subcommand)]
pub enum Ports {
    /// Forward a host port to a VM.
    Add {
        /// The VM.
        vm: String,
        /// The host's port.
        #[arg(long)]
        host_port: u32,
        /// The VM's port.
        #[arg(long)]
        guest_port: u32,
        /// tcp or udp.
        #[arg(long, default_value = "tcp")]
        protocol: String,
    },
    /// List a VM's port forwards.
    List {
        /// The VM.
        vm: String,
    },
    /// Remove a port forward.
    Remove {
        /// The VM.
        vm: String,
        /// The host's port.
        host_port: u32,
        /// tcp or udp.
        #[arg(long, default_value = "tcp")]
        protocol: String,
    },
}

/// `volar debug …`.
#[derive(Subcommand)]
pub enum Debug {
    /// The lease table.
    Ipam {
        /// Only this network.
        #[arg(long)]
        network: Option<String>,
    },
}
