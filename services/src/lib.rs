//! Shared plumbing of the Volant services, written once: the generated gRPC API, configuration,
//! daemon flags, serving and dialling, telemetry and graceful shutdown.

pub mod addr;
pub mod api;
pub mod authority;
pub mod config;
pub mod daemon;
pub mod dial;
pub mod durability;
pub mod hop;
pub mod metrics;
pub mod mtls;
pub mod store;
pub mod telemetry;
pub mod timeouts;
pub mod validate;

pub use addr::Addr;
pub use daemon::{Daemon, DaemonArgs, Services};
pub use dial::{Channel, dial, dial_with};
