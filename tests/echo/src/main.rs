//! A test workload, built static and packed into a guest image by `tests/run`. It serves, on the
//! port given as its argument (default 3000), with HTTP/1.1 keep-alive:
//!
//! - `GET /`: `echo from <host name>`;
//! - `GET /headers`: the request's header fields, one `name: value` line each, as received;
//! - `POST /sha1`: reads the body as it streams in and answers `<bytes> <sha1 hex>`;
//! - `GET /ws` with a WebSocket upgrade: echoes every message back;
//! - `GET /tunnel` with `Upgrade: tunnel`: answers 101 and splices the connection to the proxy
//!   named by `HTTP_PROXY` (kestrel's egress forwarder), so that a test on the host can speak to
//!   the egress proxy from inside the guest.
//!
//! On SIGTERM it says `volant-echo: SIGTERM, exiting` on its output (the guest's console) and
//! exits 0, so that a test can see a clean shutdown reach the workload.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

use base64::Engine as _;

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_head(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Head>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        if headers.len() > 100 {
            return Err(std::io::Error::other("too many headers"));
        }
    }
    Ok(Some(Head {
        method,
        path,
        headers,
    }))
}

fn respond(w: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        w,
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

fn serve(stream: TcpStream) -> std::io::Result<()> {
    let mut w = stream.try_clone()?;
    let mut r = BufReader::with_capacity(64 * 1024, stream);
    while let Some(head) = read_head(&mut r)? {
        let length: u64 = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match (head.method.as_str(), head.path.as_str()) {
            ("GET", "/") => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                respond(&mut w, "200 OK", &format!("echo from {}\n", host.trim()))?;
            }
            ("GET", "/headers") => {
                let lines: String = head
                    .headers
                    .iter()
                    .map(|(n, v)| format!("{}: {v}\n", n.to_ascii_lowercase()))
                    .collect();
                respond(&mut w, "200 OK", &lines)?;
            }
            ("POST", "/sha1") => {
                let mut digest = sha1_smol::Sha1::new();
                let mut left = length;
                let mut buf = vec![0u8; 64 * 1024];
                while left > 0 {
                    let n = r.read(&mut buf[..left.min(65536) as usize])?;
                    if n == 0 {
                        return Ok(());
                    }
                    digest.update(&buf[..n]);
                    left -= n as u64;
                }
                respond(&mut w, "200 OK", &format!("{length} {}", digest.digest()))?;
            }
            ("GET", "/ws") => {
                let key = head.header("sec-websocket-key").unwrap_or_default();
                let mut sha = sha1_smol::Sha1::new();
                sha.update(format!("{key}{WS_GUID}").as_bytes());
                let accept = base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes());
                write!(
                    w,
                    "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
                )?;
                w.flush()?;
                return websocket_echo(r, w);
            }
            ("GET", "/tunnel") => {
                let proxy = std::env::var("HTTP_PROXY").unwrap_or_default();
                let target = proxy.trim_start_matches("http://").trim_end_matches('/');
                let upstream = TcpStream::connect(target)?;
                write!(
                    w,
                    "HTTP/1.1 101 Switching Protocols\r\nupgrade: tunnel\r\nconnection: Upgrade\r\n\r\n"
                )?;
                w.flush()?;
                return splice(r, w, upstream);
            }
            _ => {
                std::io::copy(&mut (&mut r).take(length), &mut std::io::sink())?;
                respond(&mut w, "404 Not Found", "no such path\n")?;
            }
        }
    }
    Ok(())
}

fn websocket_echo(mut r: BufReader<TcpStream>, mut w: TcpStream) -> std::io::Result<()> {
    loop {
        let mut h = [0u8; 2];
        r.read_exact(&mut h)?;
        let opcode = h[0] & 0x0f;
        let masked = h[1] & 0x80 != 0;
        let mut len = u64::from(h[1] & 0x7f);
        if len == 126 {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            len = u16::from_be_bytes(b).into();
        } else if len == 127 {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            len = u64::from_be_bytes(b);
        }
        let mut mask = [0u8; 4];
        if masked {
            r.read_exact(&mut mask)?;
        }
        let mut payload = vec![0u8; len as usize];
        r.read_exact(&mut payload)?;
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => frame.push(n as u8),
            n if n < 65536 => {
                frame.push(126);
                frame.extend((n as u16).to_be_bytes());
            }
            n => {
                frame.push(127);
                frame.extend((n as u64).to_be_bytes());
            }
        }
        frame.extend(&payload);
        w.write_all(&frame)?;
        if opcode == 8 {
            return Ok(());
        }
    }
}

fn splice(
    mut r: BufReader<TcpStream>,
    mut w: TcpStream,
    upstream: TcpStream,
) -> std::io::Result<()> {
    let mut up_w = upstream.try_clone()?;
    let mut up_r = upstream;
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut up_r, &mut w);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut r, &mut up_w);
    let _ = up_w.shutdown(std::net::Shutdown::Write);
    let _ = back.join();
    Ok(())
}

extern "C" fn on_term(_: libc::c_int) {
    const SAID: &[u8] = b"volant-echo: SIGTERM, exiting\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(1, SAID.as_ptr().cast(), SAID.len());
        libc::_exit(0);
    }
}

fn main() {
    // SAFETY: installs a handler that only calls async-signal-safe functions.
    unsafe { libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t) };
    let port = std::env::args().nth(1).unwrap_or_else(|| "3000".into());
    let listener =
        TcpListener::bind(("0.0.0.0", port.parse::<u16>().expect("a port"))).expect("listening");
    for stream in listener.incoming().flatten() {
        let _ = stream.set_nodelay(true);
        std::thread::spawn(move || serve(stream));
    }
}
