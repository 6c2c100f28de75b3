//! netd: the owner of everything Volant changes in the host's network. The binary is `main.rs`;
//! the library exists so that benchmarks can measure the raw kernel operations netd performs.

pub mod control;
pub mod desired;
pub mod firewall;
pub mod grpc;
pub mod guard;
pub mod kernel;
pub mod links;
pub mod metrics;
pub mod naming;
pub mod tap;
