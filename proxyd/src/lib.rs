//! proxyd: the vsock data plane. The binary is `main.rs`; the library exists so that benchmarks
//! and fuzz targets can reach the rule engine and the request parsing directly.

pub mod egress;
pub mod grpc;
pub mod http;
pub mod hvsock;
pub mod ingress;
pub mod limit;
pub mod metrics;
pub mod networks;
pub mod resolve;
pub mod routes;
pub mod rules;
pub mod splice;
pub mod stats;
pub mod tls;
pub mod wire;
