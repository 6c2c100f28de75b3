//! The gRPC API generated from `proto/`.

/// The encoded file descriptor set of every Volant proto, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/volant_descriptor.bin"));

/// `volant.ipam.v1`: address pools and leases (ipamd).
pub mod ipam {
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("volant.ipam.v1");
    }
}

/// `volant.net.v1`: bridges, NAT, TAPs and port forwards (netd).
pub mod net {
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("volant.net.v1");
    }
}

/// `volant.vmm.v1`: plugins, VMs and their lifecycle (vmmd).
pub mod vmm {
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("volant.vmm.v1");
    }
}

/// `volant.proxy.v1`: vsock ingress routes and egress policies (proxyd).
pub mod proxy {
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("volant.proxy.v1");
    }
}
