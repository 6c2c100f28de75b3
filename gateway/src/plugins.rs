//! `/api/v1/plugins`: plugin manifests.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use volant_services::api::vmm::v1 as vmm;

use crate::error::{ApiError, Body, By, ErrorBody, Path};
use crate::model::{List, Plugin};
use crate::peers::{Peers, READ, WRITE, req};

/// The installed plugins.
#[utoipa::path(get, path = "/api/v1/plugins", tag = "plugins",
    responses((status = 200, body = Vec<Plugin>), (status = 503, body = ErrorBody)))]
pub async fn list(State(p): State<Peers>) -> Result<List<Plugin>, ApiError> {
    let plugins = p
        .vmm
        .clone()
        .list_plugins(req(vmm::ListPluginsRequest {}, READ))
        .await
        .by("vmmd")?
        .into_inner()
        .plugins;
    Ok(List(plugins.into_iter().map(Plugin::from).collect()))
}

/// Installs a plugin from its manifest (the body); installing it again replaces it (200).
#[utoipa::path(post, path = "/api/v1/plugins", tag = "plugins",
    request_body(content = Object, description = "the plugin manifest: its JSON Schema is GET /api/v1/schemas/manifest.json"),
    responses((status = 503, body = ErrorBody), (status = 201, body = Plugin), (status = 200, body = Plugin), (status = 400, body = ErrorBody)))]
pub async fn install(
    State(p): State<Peers>,
    Body(manifest): Body<serde_json::Value>,
) -> Result<(StatusCode, Json<Plugin>), ApiError> {
    let r = vmm::InstallPluginRequest {
        manifest_json: manifest.to_string(),
    };
    let installed = p
        .vmm
        .clone()
        .install_plugin(req(r, WRITE))
        .await
        .by("vmmd")?
        .into_inner();
    let status = if installed.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let plugin = installed
        .plugin
        .map(Plugin::from)
        .ok_or_else(|| ApiError::from(tonic::Status::internal("vmmd answered without a plugin")))?;
    Ok((status, Json(plugin)))
}

/// One plugin.
#[utoipa::path(get, path = "/api/v1/plugins/{name}", tag = "plugins",
    params(("name" = String, Path, description = "plugin name")),
    responses((status = 503, body = ErrorBody), (status = 200, body = Plugin), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(p): State<Peers>,
    Path(name): Path<String>,
) -> Result<Json<Plugin>, ApiError> {
    let plugin = p
        .vmm
        .clone()
        .get_plugin(req(vmm::GetPluginRequest { name }, READ))
        .await
        .by("vmmd")?
        .into_inner()
        .plugin
        .map(Plugin::from)
        .ok_or_else(|| ApiError::from(tonic::Status::internal("vmmd answered without a plugin")))?;
    Ok(Json(plugin))
}

/// Removes a plugin no VM was created from.
#[utoipa::path(delete, path = "/api/v1/plugins/{name}", tag = "plugins",
    params(("name" = String, Path, description = "plugin name")),
    responses((status = 503, body = ErrorBody), (status = 204), (status = 400, body = ErrorBody), (status = 412, body = ErrorBody)))]
pub async fn remove(
    State(p): State<Peers>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    p.vmm
        .clone()
        .remove_plugin(req(vmm::RemovePluginRequest { name }, WRITE))
        .await
        .by("vmmd")?;
    Ok(StatusCode::NO_CONTENT)
}
