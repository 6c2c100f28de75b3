//! kestrel's vsock side (vsock mode, where the guest has no network device): the ingress
//! listener on vsock that carries each connection to the workload's HTTP port, and the egress
//! forwarder on 127.0.0.1:3128 that carries each connection to the host's egress proxy (CID 2).
//! Both splice raw bytes, so WebSocket and anything else pass.

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_vsock::{VMADDR_CID_ANY, VMADDR_CID_HOST, VsockAddr, VsockListener, VsockStream};

/// Where the workload finds the egress proxy.
pub const EGRESS_LISTEN: (&str, u16) = ("127.0.0.1", 3128);

/// Listens on vsock `port` and carries each connection to `127.0.0.1:<http_port>`.
pub fn ingress(port: u32, http_port: u16) -> Result<(), String> {
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))
        .map_err(|e| format!("listening on vsock port {port}: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((mut guest_side, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if let Ok(workload) = TcpStream::connect(("127.0.0.1", http_port)).await {
                    let _ = workload.set_nodelay(true);
                    splice(&mut guest_side, workload).await;
                }
            });
        }
    });
    Ok(())
}

/// Listens on 127.0.0.1:3128 and carries each connection to the host's vsock `port`.
pub async fn egress(port: u32) -> Result<(), String> {
    let listener = TcpListener::bind(EGRESS_LISTEN)
        .await
        .map_err(|e| format!("listening on 127.0.0.1:3128: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((local, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = local.set_nodelay(true);
                if let Ok(mut host) =
                    VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, port)).await
                {
                    splice(&mut host, local).await;
                }
            });
        }
    });
    Ok(())
}

/// Carries bytes both ways between a vsock stream and a local TCP connection until either side
/// is done, then closes both. Not a half-close: the host's vsock backends (vhost-device-vsock)
/// drop a guest's one-way shutdown, so the host would never learn that the local side finished;
/// a full close reaches it.
async fn splice(vsock: &mut VsockStream, mut local: TcpStream) {
    let (mut vr, mut vw) = vsock.split();
    let (mut lr, mut lw) = local.split();
    let inbound = async {
        let _ = tokio::io::copy(&mut vr, &mut lw).await;
        let _ = lw.shutdown().await;
    };
    let outbound = async {
        let _ = tokio::io::copy(&mut lr, &mut vw).await;
    };
    tokio::select! {
        () = inbound => {}
        () = outbound => {}
    }
    let _ = VsockStream::shutdown(vsock, std::net::Shutdown::Both);
}
