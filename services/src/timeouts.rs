//! The timeouts of two services that depend on each other, in one place with their relation.

use std::time::Duration;

/// How long proxyd's ingress waits for the next request head on a connection, kept ones
/// included; then it closes the connection.
pub const INGRESS_HEAD: Duration = Duration::from_secs(30);

/// How long the gateway reuses a kept connection to proxyd's ingress: well below
/// [`INGRESS_HEAD`], so that proxyd never closes a connection the gateway is sending on.
pub const GATEWAY_KEEP: Duration = Duration::from_secs(INGRESS_HEAD.as_secs() / 3);

const _: () = assert!(GATEWAY_KEEP.as_secs() * 2 <= INGRESS_HEAD.as_secs());
