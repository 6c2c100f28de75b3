//! Validation of the names users give things.

/// Checks that `value` is a DNS label (RFC 1123): 1–63 characters of lower-case letters, digits
/// and hyphens, starting and ending with a letter or digit. `what` names the field in the error.
pub fn dns_label(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} is required"));
    }
    if value.len() > 63 {
        return Err(format!(
            "{what} {:?} is {} characters long; a DNS label has at most 63",
            truncated(value),
            value.len()
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "{what} {value:?} contains {c:?}; use lower-case letters, digits and '-' only"
        ));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(format!(
            "{what} {value:?} must start and end with a letter or digit"
        ));
    }
    Ok(())
}

fn truncated(value: &str) -> String {
    match value.char_indices().nth(20) {
        Some((i, _)) => format!("{}…", &value[..i]),
        None => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::dns_label;

    #[test]
    fn accepts_labels() {
        for ok in ["a", "web", "web-1", "0", "a".repeat(63).as_str()] {
            dns_label("name", ok).unwrap();
        }
    }

    #[test]
    fn refuses_non_labels_with_a_reason() {
        let cases = [
            ("", "required"),
            ("-web", "start and end"),
            ("web-", "start and end"),
            ("Web", "'W'"),
            ("web_1", "'_'"),
            ("a.b", "'.'"),
            ("wéb", "'é'"),
            (&"a".repeat(64), "at most 63"),
        ];
        for (bad, why) in cases {
            let err = dns_label("pool name", bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(err.starts_with("pool name"), "{err}");
        }
    }
}
