//! The guest boot contract shared by vmmd (which writes the kernel command line) and kestrel
//! (which reads it from `/proc/cmdline`): the line split into parameters exactly as the kernel
//! does (`next_arg` in `kernel/params.c`), quotes included, so that what one side checks is what
//! the other side sees. The `volant.*` parameters are vmmd's alone: text from a request or a
//! plugin that names one, in any spelling the kernel accepts, is refused, and so is text that
//! would change how the rest of the line is split (an odd number of double quotes, `--`).
//! The workload (entrypoint, env, workdir) is not on the line: it is the file of [`workload`].

pub mod workload;

pub use workload::{WORKLOAD_FILE, Workload};

/// How long kestrel gives the workload after SIGTERM (a stop) before it kills it.
pub const WORKLOAD_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a clean stop of a guest may take: the workload's grace, then kestrel's kill, sync
/// and power-off. vmmd waits this long by default before it stops the hypervisor, so that a
/// workload using its whole grace still ends cleanly.
pub const CLEAN_STOP: std::time::Duration =
    std::time::Duration::from_secs(WORKLOAD_GRACE.as_secs() + 5);

/// The prefix of the parameters vmmd sets.
pub const PREFIX: &str = "volant.";

/// One parameter: its name and, after `=`, its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    /// The name, as the kernel sees it.
    pub name: String,
    /// The value, without the quotes around it; `None` without `=`.
    pub value: Option<String>,
}

fn space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// Splits a command line into parameters as the kernel does: a parameter ends at white space
/// outside double quotes; a leading quote, and a quote right after `=`, open a quoted part whose
/// closing quote at the end of the parameter is dropped; other quotes stay where they are.
pub fn params(line: &str) -> Vec<Param> {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        while i < chars.len() && space(chars[i]) {
            i += 1;
        }
        if i >= chars.len() {
            return out;
        }
        let quoted = chars[i] == '"';
        let start = if quoted { i + 1 } else { i };
        let (mut in_quote, mut equals, mut end) = (quoted, None, start);
        while end < chars.len() && (in_quote || !space(chars[end])) {
            if equals.is_none() && chars[end] == '=' {
                equals = Some(end);
            }
            if chars[end] == '"' {
                in_quote = !in_quote;
            }
            end += 1;
        }
        let mut last = end;
        let (name, value) = match equals {
            None => {
                if quoted && last > start && chars[last - 1] == '"' {
                    last -= 1;
                }
                (chars[start..last].iter().collect(), None)
            }
            Some(eq) => {
                let mut v = eq + 1;
                if v < last && chars[v] == '"' {
                    v += 1;
                    if last > v && chars[last - 1] == '"' {
                        last -= 1;
                    }
                } else if quoted && last > v && chars[last - 1] == '"' {
                    last -= 1;
                }
                (
                    chars[start..eq].iter().collect(),
                    Some(chars[v..last].iter().collect()),
                )
            }
        };
        out.push(Param { name, value });
        i = end;
    }
}

/// Checks text a request or a plugin adds to the kernel command line: printable ASCII, quotes
/// that close, no `--` (what follows it goes to init, not to the kernel), and no `volant.*`
/// parameter however it is spelt. The error names what is wrong.
pub fn check_user_text(text: &str) -> Result<(), String> {
    if let Some(c) = text.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        return Err(format!(
            "{c:?} is not allowed: use printable ASCII and spaces"
        ));
    }
    if text.matches('"').count() % 2 == 1 {
        return Err("a double quote is not closed".into());
    }
    for p in params(text) {
        if p.name == "--" {
            return Err("\"--\" is not allowed: what follows it would go to init".into());
        }
        if p.name.to_ascii_lowercase().contains(PREFIX) {
            return Err(format!("{:?}: volant.* parameters are set by vmmd", p.name));
        }
    }
    Ok(())
}

/// The `volant.*` parameters of a whole command line, each at most once: a name seen twice is
/// an error (vmmd writes each once, and refuses them in any other text).
pub fn volant_params(line: &str) -> Result<Vec<(String, String)>, String> {
    let mut seen: Vec<(String, String)> = Vec::new();
    for p in params(line) {
        let Some(key) = p.name.strip_prefix(PREFIX) else {
            if p.name.to_ascii_lowercase().contains(PREFIX) {
                return Err(format!("{:?}: a disguised volant.* parameter", p.name));
            }
            continue;
        };
        if seen.iter().any(|(k, _)| k == key) {
            return Err(format!("{PREFIX}{key} is given more than once"));
        }
        seen.push((key.to_string(), p.value.unwrap_or_default()));
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, value: Option<&str>) -> Param {
        Param {
            name: name.into(),
            value: value.map(str::to_string),
        }
    }

    #[test]
    fn the_kernels_splitting() {
        assert_eq!(
            params(r#"console=ttyS0 quiet "a=b c" d="e f" g=h"i j" "k" x"#),
            [
                p("console", Some("ttyS0")),
                p("quiet", None),
                p("a", Some("b c")),
                p("d", Some("e f")),
                p("g", Some(r#"h"i j""#)),
                p("k", None),
                p("x", None),
            ]
        );
        assert_eq!(params("  \t "), []);
        assert_eq!(params(r#""unclosed rest"#), [p("unclosed rest", None)]);
    }

    #[test]
    fn user_text_cannot_speak_for_vmmd() {
        for bad in [
            "volant.ip=192.168.127.200/24",
            r#""volant.name=pwned""#,
            r#"quiet "volant.ip=192.168.127.200/24" "volant.workload=e30""#,
            "VOLANT.ip=1",
            r#"a="b"#,
            "x -- volant.ip=1",
            "a=\tb",
            "ä",
            "x.volant.ip=1",
        ] {
            assert!(check_user_text(bad).is_err(), "{bad:?} accepted");
        }
        for ok in ["", "console=ttyS0 quiet", r#"a="b c" d"#, "volantx=1"] {
            assert_eq!(check_user_text(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn vmmds_parameters_are_each_given_once() {
        let line = r#"console=ttyS0 "quoted=x y" volant.mode=bridge volant.ip=10.0.0.2/24"#;
        assert_eq!(
            volant_params(line).unwrap(),
            [
                ("mode".to_string(), "bridge".to_string()),
                ("ip".to_string(), "10.0.0.2/24".to_string())
            ]
        );
        assert!(volant_params("volant.ip=1 volant.ip=2").is_err());
        assert!(volant_params(r#""volant.ip=1" volant.ip=2"#).is_err());
        assert!(volant_params("x.volant.ip=1").is_err());
    }
}
