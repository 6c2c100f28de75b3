//! Any request line and any head: the egress target of a proxy request, the ingress path split
//! and the ingress head parsers never panic; whatever target comes out has a non-empty host and
//! a non-zero port, and a forwarded head never carries proxy credentials or a bare `Connection`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxyd::egress::target_of;
use proxyd::wire::{parse_answer, parse_request, split_path};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(req)) = parse_request(data, 1 << 20) {
        let head = String::from_utf8_lossy(&req.head).to_ascii_lowercase();
        assert!(head.ends_with("\r\n\r\n") && head.starts_with(|c: char| c.is_ascii_alphabetic()));
        assert!(!head.contains("\r\nproxy-authorization:"));
        assert!(req.upgrade || !head.contains("\r\nconnection:"));
        assert!(req.len <= data.len());
        let _ = parse_answer(data, &req);
    }
    let text = String::from_utf8_lossy(data);
    let (method, target) = text.split_once(' ').unwrap_or(("GET", &text));
    if let Some((vm, path)) = split_path(target) {
        assert!(!vm.contains('/'));
        assert!(path.starts_with('/'));
    }
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else { return };
    let Ok(uri) = target.parse::<http::Uri>() else { return };
    if let Ok((host, port)) = target_of(&method, &uri) {
        assert!(!host.is_empty());
        assert_ne!(port, 0);
    }
});
