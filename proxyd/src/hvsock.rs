//! The host side of hybrid vsock (Cloud Hypervisor's protocol, also spoken by
//! vhost-device-vsock): connect to the VM's Unix socket, write `CONNECT <port>\n`, read
//! `OK <n>\n`; then the stream is the guest's. Nothing may be sent before the `OK`.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Opens a stream to `port` in the guest behind `socket`, within `limit`.
pub async fn connect(socket: &Path, port: u32, limit: Duration) -> Result<UnixStream, String> {
    tokio::time::timeout(limit, handshake(socket, port))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the vsock handshake for port {port} did not finish within {limit:?}"
            ))
        })
}

async fn handshake(socket: &Path, port: u32) -> Result<UnixStream, String> {
    let mut s = volant_services::daemon::connect_unix(socket)
        .await
        .map_err(|e| format!("the VM's vsock socket {} refused: {e}", socket.display()))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| format!("writing the vsock handshake: {e}"))?;
    // Byte by byte: whatever follows the newline is the guest's.
    let mut line = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        let n = s
            .read(&mut b)
            .await
            .map_err(|e| format!("reading the vsock handshake: {e}"))?;
        if n == 0 {
            return Err(format!("nothing listens on vsock port {port} in the guest"));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 32 {
            return Err("the vsock handshake answer is not `OK <n>`".into());
        }
    }
    let text = String::from_utf8_lossy(&line);
    match text.strip_prefix("OK ") {
        Some(n) if n.trim().parse::<u32>().is_ok() => Ok(s),
        _ => Err(format!(
            "the vsock handshake answered {text:?} instead of `OK <n>`"
        )),
    }
}
