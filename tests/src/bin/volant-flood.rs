//! Holds many connections, each with half a request head, from one client address: what the
//! connection caps of the gateway are tested against. `volant-flood FROM_IP TO_ADDR COUNT`
//! prints how many connected, then holds them until its standard input closes. Several can run
//! at once, each within its own open-file limit.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, from, to, count] = &args[..] else {
        eprintln!("usage: volant-flood FROM_IP TO_ADDR COUNT");
        std::process::exit(2);
    };
    let from: IpAddr = from.parse().expect("FROM_IP");
    let to: SocketAddr = to.parse().expect("TO_ADDR");
    let count: usize = count.parse().expect("COUNT");
    volant_services::daemon::raise_file_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let held = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..count {
            let s = tokio::net::TcpSocket::new_v4().expect("socket");
            s.bind(SocketAddr::new(from, 0)).expect("bind");
            let Ok(Ok(mut c)) = tokio::time::timeout(Duration::from_secs(2), s.connect(to)).await
            else {
                continue;
            };
            let half = b"GET /api/v1/vms HTTP/1.1\r\nhost: x\r\n";
            let _ = tokio::io::AsyncWriteExt::write_all(&mut c, half).await;
            held.push(c);
        }
        held
    });
    println!("{}", held.len());
    let _ = std::io::stdin().read(&mut [0u8; 1]);
}
