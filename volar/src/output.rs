//! Tables for people.

use serde_json::Value;

/// A field of a JSON object as a cell: `-` for null or absent.
pub fn cell(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Aligned columns under upper-case headers.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

/// Rows of `fields` from an array of objects.
pub fn rows(list: &Value, fields: &[&str]) -> Vec<Vec<String>> {
    list.as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| fields.iter().map(|f| cell(item, f)).collect())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_missing_values_show_a_dash() {
        let list = serde_json::json!([
            {"ip": "192.168.127.100", "vm": "web", "leased_at": "2026-11-28T05:00:00.000Z"},
            {"ip": "192.168.127.101", "vm": "database", "leased_at": null},
        ]);
        let out = table(
            &["ip", "vm", "leased_at"],
            &rows(&list, &["ip", "vm", "leased_at"]),
        );
        assert_eq!(
            out,
            "IP               VM        LEASED_AT\n\
             192.168.127.100  web       2026-11-28T05:00:00.000Z\n\
             192.168.127.101  database  -\n"
        );
    }
}
