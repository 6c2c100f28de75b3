//! The OpenAPI document as served: what utoipa makes of the handlers' annotations, completed
//! with what those cannot say.

/// The plugin manifest's JSON Schema (draft 2020-12), served as it is.
pub const MANIFEST_SCHEMA: &str = include_str!("manifest.schema.json");

/// What each status means, for the answers whose annotations leave it undescribed.
fn meaning(status: &str) -> &'static str {
    match status {
        "200" => "Done.",
        "201" => "Made.",
        "204" => "Done; no body.",
        "400" => "The request is invalid: the error says which part and why. Nothing changed.",
        "401" => {
            "API keys are configured and the request has none or a wrong one \
             (`Authorization: Bearer KEY`)."
        }
        "404" => "It does not exist.",
        "409" => {
            "It exists already, or what it needs is taken or used up (a name, an address, a \
             port, a full pool)."
        }
        "412" => {
            "The state of things does not allow it now (a VM that is not running, a network \
             still in use, a plugin still in use): the error says what to do first."
        }
        "429" => "Over this client's request rate: retry after `Retry-After` seconds.",
        "502" => "The workload's end failed (its connection broke, or it answered no HTTP).",
        "503" => "A service behind the gateway cannot answer now; retry.",
        "504" => "The workload did not answer in time.",
        _ => "See the body.",
    }
}

/// How the events stream is framed.
const SSE_FRAMING: &str = "Server-sent events (`text/event-stream`, UTF-8), one per VM change: \
    `event: vm` and one `data:` line holding an Event as JSON (see the Event schema), then an \
    empty line. A failure of the stream is `event: error` with the message as `data:`, and the \
    stream ends. A comment line (`:`) is sent every 15 s of silence to keep the connection \
    open. Reconnect to resume: events are not replayed.";

/// The OpenAPI document `doc`, completed where the handlers' annotations cannot say it: the
/// manifest's schema (the body of `POST /api/v1/plugins`, a plugin's `manifest`, its own path),
/// the error's `details`, the events stream's framing, the workload's own answers through the
/// proxy route, the names and protocols parameters take, the 401 and 429 every guarded route
/// may answer, and a description on every answer.
pub fn complete(doc: String) -> String {
    let mut doc: serde_json::Value = serde_json::from_str(&doc).expect("the document is JSON");
    let mut schema: serde_json::Value =
        serde_json::from_str(MANIFEST_SCHEMA).expect("the manifest's schema is JSON");
    if let Some(s) = schema.as_object_mut() {
        s.remove("$schema");
        s.remove("$id");
    }
    let manifest = serde_json::json!({ "$ref": "#/components/schemas/Manifest" });
    let schemas = &mut doc["components"]["schemas"];
    let vm_name = schemas["CreateVm"]["properties"]["name"].clone();
    let network_name = schemas["CreateNetwork"]["properties"]["name"].clone();
    schemas["Manifest"] = schema;
    schemas["Plugin"]["properties"]["manifest"] = manifest.clone();
    schemas["ErrorBody"]["properties"]["details"] = serde_json::json!({
        "type": "object",
        "description": "Machine-readable details: at least `code`, the gRPC status behind the \
                        answer; `service` when a service behind the gateway answered.",
        "properties": {
            "code": { "type": "string", "description": "The gRPC status code's name, e.g. `FAILED_PRECONDITION`." },
            "service": { "type": "string", "description": "The service that answered, e.g. `vmmd`." }
        },
        "required": ["code"],
        "additionalProperties": true
    });
    let paths = &mut doc["paths"];
    paths["/api/v1/plugins"]["post"]["requestBody"]["content"]["application/json"]["schema"] =
        manifest;
    paths["/api/v1/schemas/manifest.json"] = serde_json::json!({
        "get": {
            "tags": ["plugins"],
            "summary": "The plugin manifest's JSON Schema (draft 2020-12).",
            "operationId": "manifest_schema",
            "responses": { "200": {
                "description": "The schema.",
                "content": { "application/schema+json": { "schema": {
                    "type": "object",
                    "description": "A JSON Schema document (draft 2020-12).",
                    "additionalProperties": true
                } } }
            } }
        }
    });
    paths["/api/v1/events"]["get"]["responses"]["200"] = serde_json::json!({
        "description": SSE_FRAMING,
        "content": { "text/event-stream": { "schema": {
            "type": "object",
            "description": "One server-sent event.",
            "properties": {
                "event": { "type": "string", "enum": ["vm", "error"] },
                "data": {
                    "type": "string",
                    "description": "`vm`: an Event as JSON; `error`: the message.",
                    "contentMediaType": "application/json",
                    "contentSchema": { "$ref": "#/components/schemas/Event" }
                }
            },
            "required": ["event", "data"],
            "example": {
                "event": "vm",
                "data": "{\"name\":\"web\",\"status\":\"running\",\"previous\":\"booting\"}"
            }
        } } }
    });
    if let Some(ops) = paths["/api/v1/vms/{name}/proxy/{path}"].as_object_mut() {
        for op in ops.values_mut() {
            op["responses"]["default"] = serde_json::json!({
                "description": "The workload's own answer, any status (a 501 included) and \
                                any type, passed through as it is.",
                "content": { "*/*": { "schema": { "type": "string" } } }
            });
        }
    }
    unique_operation_ids(paths);
    let error = serde_json::json!({ "application/json": {
        "schema": { "$ref": "#/components/schemas/ErrorBody" }
    } });
    if let Some(paths) = paths.as_object_mut() {
        for (path, ops) in paths.iter_mut() {
            let open = path == "/api/v1/health";
            for op in ops.as_object_mut().into_iter().flat_map(|o| o.values_mut()) {
                let params = op.get_mut("parameters").and_then(|p| p.as_array_mut());
                for param in params.into_iter().flatten() {
                    let schema = match (param["in"].as_str(), param["name"].as_str()) {
                        (Some("path"), Some("name")) if path.starts_with("/api/v1/networks/") => {
                            network_name.clone()
                        }
                        (Some("path"), Some("name")) => vm_name.clone(),
                        (Some("query"), Some("network")) => network_name.clone(),
                        (Some("query"), Some("protocol")) => {
                            serde_json::json!({ "type": "string", "enum": ["tcp", "udp"] })
                        }
                        _ => continue,
                    };
                    param["schema"] = schema;
                }
                let Some(responses) = op.get_mut("responses").and_then(|r| r.as_object_mut())
                else {
                    continue;
                };
                let guarded: &[&str] = if open { &["429"] } else { &["401", "429"] };
                for status in guarded {
                    responses
                        .entry(status.to_string())
                        .or_insert_with(|| serde_json::json!({ "content": error.clone() }));
                }
                for (status, answer) in responses.iter_mut() {
                    if answer.get("description").is_none() {
                        answer["description"] = meaning(status).into();
                    }
                }
            }
        }
    }
    doc.to_string()
}

/// Makes every `operationId` unique, as OpenAPI wants (handlers of several tags share names):
/// one shared by several operations gets its tag in front (`vms_create`), and its method after
/// if that is still not enough (`vms_proxy_get`).
fn unique_operation_ids(paths: &mut serde_json::Value) {
    let ops = || paths.as_object().into_iter().flat_map(|p| p.values());
    let mut seen = std::collections::HashMap::<String, usize>::new();
    let mut tagged = std::collections::HashMap::<String, usize>::new();
    for op in ops().filter_map(|o| o.as_object()).flat_map(|o| o.values()) {
        let id = op["operationId"].as_str().unwrap_or_default();
        *seen.entry(id.to_string()).or_default() += 1;
        let tag = op["tags"][0].as_str().unwrap_or_default();
        *tagged.entry(format!("{tag}_{id}")).or_default() += 1;
    }
    for (method, op) in paths
        .as_object_mut()
        .into_iter()
        .flat_map(|p| p.values_mut())
        .filter_map(|o| o.as_object_mut())
        .flat_map(|o| o.iter_mut())
    {
        let id = op["operationId"].as_str().unwrap_or_default().to_string();
        if seen.get(&id).copied().unwrap_or(0) < 2 {
            continue;
        }
        let tag = op["tags"][0].as_str().unwrap_or_default();
        let mut unique = format!("{tag}_{id}");
        if tagged.get(&unique).copied().unwrap_or(0) > 1 {
            unique = format!("{unique}_{method}");
        }
        op["operationId"] = unique.into();
    }
}
