//! proxyd's egress tunnels, against the real binary: a VM's egress socket (a Unix socket, as
//! vhost-device-vsock connects it) on one side, an HTTPS server inside the test's own network
//! namespace on the other. Downloads arrive whole, also when the client sends its ClientHello
//! with the CONNECT; "idle" means nothing moved either way (a long download with a silent client
//! lives on); a tunnel where nothing moves is closed; a VM's byte budget paces its tunnel; the
//! bytes are counted. Needs root.

use std::time::{Duration, Instant};

use volant_services::api::proxy::v1::{EgressPolicy, GetStatsRequest};

mod common;
use common::{Netns, Proxyd, Tls, download, https_server};

const SERVER: &str = "203.0.113.20";
const NAME: &str = "files.example.test";

#[test]
fn tunnels_carry_whole_downloads_and_close_only_when_idle_both_ways() {
    let _ns = Netns::enter("tunnel", SERVER);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "proxyd:\n  idle_timeout_secs: 1\n  resolver:\n    static:\n      {NAME}: {SERVER}\n"
        );
        let tls = Tls::new(&[NAME]);
        https_server(SERVER, tls.server.clone()).await;
        let px = Proxyd::start(dir.path(), &yaml).await;
        // Two VMs: one with bytes to spare, one held to 4 MiB/s.
        let mut sockets = Vec::new();
        for (vm, cid, bytes_per_second) in [("vm", 3, 10 << 30), ("slow", 4, 4 << 20)] {
            let policy = EgressPolicy {
                allow_outbound: true,
                allowed_domains: vec![NAME.into()],
                bytes_per_second,
                ..Default::default()
            };
            let socket = px.run.join(format!("vsock-{cid}.sock"));
            sockets.push(px.register(vm, cid, &socket, policy).await.egress_socket);
        }
        let target = format!("{NAME}:443");
        let through = |egress: &String, ask: (usize, u64), pipelined: bool| {
            let (egress, target, client) = (egress.clone(), target.clone(), tls.client.clone());
            async move {
                let s = tokio::net::UnixStream::connect(&egress).await.unwrap();
                download(s, &target, NAME, client, ask, pipelined).await
            }
        };
        let tunnel = |ask, pipelined| through(&sockets[0], ask, pipelined);

        // Whole downloads, the ClientHello after the proxy's answer or with the CONNECT.
        for pipelined in [false, true] {
            let got = tunnel((24 << 20, 0), pipelined).await;
            assert_eq!(got.unwrap(), 24 << 20, "pipelined: {pipelined}");
        }

        // 2.4 s of download in 64 KiB chunks 400 ms apart while the client sends nothing: the
        // tunnel is never idle, though the client's direction is silent for longer than 1 s.
        let started = Instant::now();
        let got = tunnel((7 << 16, 400), false).await;
        assert_eq!(got.unwrap(), 7 << 16);
        assert!(started.elapsed() > Duration::from_secs(2));

        // Nothing moves for 1.5 s: the tunnel is closed before the rest of the answer comes.
        let got = tunnel((2 << 16, 1500), false).await;
        assert!(got.is_err(), "an idle tunnel is closed: {got:?}");

        // The slow VM's 12 MiB: 4 MiB of burst, then 4 MiB/s.
        let started = Instant::now();
        let got = through(&sockets[1], (12 << 20, 0), false).await;
        assert_eq!(got.unwrap(), 12 << 20);
        let took = started.elapsed();
        assert!(
            took > Duration::from_millis(1500) && took < Duration::from_secs(10),
            "{took:?}"
        );

        let stats = px
            .api()
            .get_stats(GetStatsRequest { vm: "vm".into() })
            .await
            .unwrap()
            .into_inner()
            .vms;
        let downloaded = (2 * (24 << 20) + (7 << 16) + (1 << 16)) as u64;
        assert!(
            stats[0].egress_bytes_in > downloaded,
            "{} bytes counted in, more than {downloaded} downloaded",
            stats[0].egress_bytes_in
        );
    });
}
