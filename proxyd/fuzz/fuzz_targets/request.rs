//! Any request line: the egress target of a proxy request and the ingress path split never
//! panic, and whatever target comes out has a non-empty host and a non-zero port.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxyd::egress::target_of;
use proxyd::ingress::split_path;

fuzz_target!(|data: &[u8]| {
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
