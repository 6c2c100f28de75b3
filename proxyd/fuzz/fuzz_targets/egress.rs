//! Any head on a VM's egress socket: the egress parser never panics; what it accepts names a
//! host and a port from 1 to 65535 that render and parse back the same, a CONNECT carries no
//! body, and the head proxyd sends upstream parses back as exactly one request with one `Host`
//! field, no proxy credentials and no hop-by-hop field but its own `connection: close`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxyd::egress::{Kind, authority, parse};
use proxyd::rules::normalise;
use proxyd::wire::Framing;

fuzz_target!(|data: &[u8]| {
    let Ok(Some(ask)) = parse(data) else { return };
    assert!(ask.len <= data.len());
    assert!(!ask.host.is_empty());
    assert_ne!(ask.port, 0);
    assert_eq!(
        authority(&format!("{}:{}", ask.host, ask.port), None),
        Ok((ask.host.clone(), ask.port))
    );
    if ask.kind == Kind::Connect {
        assert_eq!(ask.framing, Framing::None);
        return;
    }
    assert!(ask.path.starts_with('/'));
    let Ok(host) = normalise(&ask.host) else { return };
    let head = ask.upstream_head(&host);
    let mut fields = [httparse::EMPTY_HEADER; 130];
    let mut again = httparse::Request::new(&mut fields);
    assert_eq!(
        again.parse(&head),
        Ok(httparse::Status::Complete(head.len()))
    );
    let named = |n: &str| again.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(n)).count();
    assert_eq!(named("host"), 1);
    for hop in ["proxy-authorization", "proxy-connection", "keep-alive", "te", "upgrade"] {
        assert_eq!(named(hop), 0, "{hop}");
    }
    assert_eq!(named("connection"), 1);
});
