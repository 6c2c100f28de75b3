//! Any allowlist and any host: building and deciding never panic, a decision agrees with a
//! second normalisation of the same host (normalisation is idempotent), and a host is allowed
//! by a list made of exactly itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxyd::rules::{Allowlist, Host, normalise};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\n');
    let host = parts.next().unwrap_or_default();
    let entries: Vec<&str> = parts.collect();
    let list = Allowlist::new(&entries);
    let Ok(h) = normalise(host) else { return };
    let again = normalise(&h.to_string()).expect("a normalised host normalises");
    assert_eq!(h, again);
    if let Ok(list) = list {
        assert_eq!(list.allows(&h), list.allows(&again));
    }
    let own = match &h {
        Host::Name(n) => n.clone(),
        Host::Ip(ip) => ip.to_string(),
    };
    let mine = Allowlist::new(&[own]).expect("a normalised host is a valid entry");
    assert!(mine.allows(&h));
});
