//! Any request line and any head: the ingress path split and the ingress head parsers never
//! panic; a forwarded head parses back as exactly one request and never carries proxy
//! credentials or a bare `Connection`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxyd::wire::{parse_answer, parse_request, split_path};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(req)) = parse_request(data, 1 << 20) {
        // The head proxyd writes is one complete, well-formed request and nothing more.
        let mut fields = [httparse::EMPTY_HEADER; 130];
        let mut again = httparse::Request::new(&mut fields);
        assert_eq!(
            again.parse(&req.head),
            Ok(httparse::Status::Complete(req.head.len()))
        );
        let lower = String::from_utf8_lossy(&req.head).to_ascii_lowercase();
        assert!(!lower.contains("\r\nproxy-authorization:"));
        assert!(req.upgrade || !lower.contains("\r\nconnection:"));
        assert!(req.len <= data.len());
        let _ = parse_answer(data, &req.asked());
    }
    let text = String::from_utf8_lossy(data);
    let (_, target) = text.split_once(' ').unwrap_or(("GET", &text));
    if let Some((vm, path)) = split_path(target) {
        assert!(!vm.contains('/'));
        assert!(path.starts_with('/'));
    }
});
