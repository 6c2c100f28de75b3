//! Serial console logs: read from the start, and followed as the file grows.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

/// How often a followed log is checked for new output.
const POLL: Duration = Duration::from_millis(100);

/// Streams the log at `path` into `tx` in chunks: everything there is, then, when `follow`, what
/// is appended until `gone` says the VM no longer exists or the receiver hangs up.
pub async fn stream(
    path: PathBuf,
    follow: bool,
    tx: mpsc::Sender<Vec<u8>>,
    gone: impl Fn() -> bool,
) -> Result<(), String> {
    let mut offset = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::fs::File::open(&path).await {
            Ok(mut f) => {
                // A log that shrank was recreated: start over.
                if f.metadata().await.map(|m| m.len()).unwrap_or(0) < offset {
                    offset = 0;
                }
                f.seek(std::io::SeekFrom::Start(offset))
                    .await
                    .map_err(|e| e.to_string())?;
                loop {
                    let n = f.read(&mut buf).await.map_err(|e| e.to_string())?;
                    if n == 0 {
                        break;
                    }
                    offset += n as u64;
                    if tx.send(buf[..n].to_vec()).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
        if !follow || gone() || tx.is_closed() {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}
