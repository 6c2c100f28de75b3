//! Checks answers against the OpenAPI document the gateway serves: the path template, method and
//! status must be documented, and a JSON body must match the documented schema.

use serde_json::{Value, json};

use crate::recorder::Exchange;

fn matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    // A final `{path}` is the rest of the path (some routers write it `{path...}`).
    if t.last() == Some(&"{path}") && p.len() >= t.len() - 1 {
        let n = t.len() - 1;
        return matches(&t[..n].join("/"), &p[..n].join("/"));
    }
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| (t.starts_with('{') && t.ends_with('}') && !p.is_empty()) || t == p)
}

/// Checks one exchange; the error says what does not match.
pub fn check(doc: &Value, x: &Exchange) -> Result<(), String> {
    let paths = doc["paths"]
        .as_object()
        .ok_or("the document has no paths")?;
    let error_body = json!({ "$ref": "#/components/schemas/ErrorBody" });
    let Some((template, item)) = paths
        .iter()
        .filter(|(t, _)| matches(t, &x.path))
        // A literal segment beats a template ("/vms/{name}/start" over "/vms/{name}/{x}").
        .min_by_key(|(t, _)| t.matches('{').count())
    else {
        // An undocumented path may only be refused, with the documented error shape.
        return match x.status {
            404 => validate(doc, &error_body, x, "unknown path"),
            s => Err(format!(
                "{} {}: undocumented path answered {s}",
                x.method, x.path
            )),
        };
    };
    let op = &item[x.method.to_lowercase()];
    if op.is_null() {
        return match x.status {
            405 => validate(doc, &error_body, x, template),
            s => Err(format!(
                "{} {template}: undocumented method answered {s}",
                x.method
            )),
        };
    }
    let response = &op["responses"][x.status.to_string()];
    if response.is_null() {
        return Err(format!(
            "{} {template}: status {} not documented",
            x.method, x.status
        ));
    }
    let Some(content) = response["content"].as_object() else {
        return if x.body.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} {template} {}: a body where none is documented",
                x.method, x.status
            ))
        };
    };
    if content.contains_key("*/*") {
        // Documented as anything (the proxy route answers whatever the workload does).
        return Ok(());
    }
    if !x.content_type.starts_with("application/json") {
        return match content
            .keys()
            .any(|k| x.content_type.starts_with(k.as_str()))
        {
            true => Ok(()),
            false => Err(format!(
                "{} {template}: undocumented content type {}",
                x.method, x.content_type
            )),
        };
    }
    let schema = &content
        .get("application/json")
        .ok_or_else(|| format!("{} {template} {}: JSON not documented", x.method, x.status))?["schema"];
    validate(doc, schema, x, template)
}

/// Checks the exchange's JSON body against `schema`, whose references point into `doc`.
fn validate(doc: &Value, schema: &Value, x: &Exchange, template: &str) -> Result<(), String> {
    let body: Value = serde_json::from_slice(&x.body)
        .map_err(|e| format!("{} {template}: bad JSON: {e}", x.method))?;
    // References point into the document: validate against the schema with the document's
    // components beside it.
    let mut rooted = json!({ "components": doc["components"] });
    for (k, v) in schema.as_object().into_iter().flatten() {
        rooted[k] = v.clone();
    }
    let validator = jsonschema::validator_for(&rooted).map_err(|e| format!("schema: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(&body)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} {template} {}: {}",
            x.method,
            x.status,
            errors.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_whole_segments() {
        assert!(matches("/api/v1/vms/{name}", "/api/v1/vms/web"));
        assert!(!matches("/api/v1/vms/{name}", "/api/v1/vms/web/start"));
        assert!(!matches("/api/v1/vms/{name}", "/api/v1/vms/"));
        let proxy = "/api/v1/vms/{name}/proxy/{path}";
        assert!(matches(proxy, "/api/v1/vms/web/proxy/"));
        assert!(matches(proxy, "/api/v1/vms/web/proxy/a/b/c"));
        assert!(!matches(proxy, "/api/v1/vms/web/other/a"));
        assert!(matches(
            "/api/v1/vms/{name}/ports/{host_port}",
            "/api/v1/vms/a/ports/80"
        ));
    }

    #[test]
    fn a_body_that_breaks_its_schema_is_caught() {
        let doc = json!({
            "paths": { "/x": { "get": { "responses": { "200": { "content": { "application/json": {
                "schema": { "$ref": "#/components/schemas/T" } } } } } } } },
            "components": { "schemas": { "T": { "type": "object", "required": ["a"],
                "properties": { "a": { "type": "string" } } } } }
        });
        let x = |body: &str, status| Exchange {
            method: "GET".into(),
            path: "/x".into(),
            status,
            content_type: "application/json".into(),
            body: bytes::Bytes::from(body.to_string()),
        };
        assert!(check(&doc, &x(r#"{"a":"ok"}"#, 200)).is_ok());
        assert!(
            check(&doc, &x(r#"{"a":1}"#, 200))
                .unwrap_err()
                .contains("/a")
        );
        assert!(check(&doc, &x(r#"{}"#, 200)).is_err());
        assert!(
            check(&doc, &x(r#"{"a":"ok"}"#, 404))
                .unwrap_err()
                .contains("not documented")
        );
    }
}
