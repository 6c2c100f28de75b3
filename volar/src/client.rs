//! The REST API as volar calls it: JSON in and out, the API's error message on failure.

use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

/// A failed call, as the user should read it.
#[derive(Debug)]
pub struct Failure(pub String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

/// The gateway.
pub struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    /// A client of the API at `base` (e.g. `http://127.0.0.1:8080`, or `https://…`, trusting
    /// the system's CAs and those in `cacert`).
    pub fn new(base: &str, token: Option<String>, cacert: Option<&Path>) -> Result<Api, Failure> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut certs = Vec::new();
        if let Some(path) = cacert {
            let pem = std::fs::read(path)
                .map_err(|e| Failure(format!("--cacert {}: {e}", path.display())))?;
            certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                Failure(format!(
                    "--cacert {}: not PEM certificates: {e}",
                    path.display()
                ))
            })?;
        }
        // An API on this machine is reached directly, whatever http_proxy says.
        let host = reqwest::Url::parse(base)
            .ok()
            .and_then(|u| Some(u.host_str()?.to_string()));
        let local = host.is_some_and(|h| {
            let ip = h.trim_matches(['[', ']']).parse::<std::net::IpAddr>();
            h == "localhost" || ip.is_ok_and(|ip| ip.is_loopback())
        });
        let builder = || {
            let b = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
            if local { b.no_proxy() } else { b }
        };
        // Plain http needs no CAs (a fresh Debian has no system store); https trusts the
        // system's and --cacert's, or --cacert's alone where the system has none.
        let http = if !base.starts_with("https://") {
            builder().tls_certs_only([]).build()
        } else {
            builder()
                .tls_certs_merge(certs.clone())
                .build()
                .or_else(|e| match certs.is_empty() {
                    true => Err(e),
                    false => builder().tls_certs_only(certs).build(),
                })
        };
        let http = http.map_err(|e| {
            Failure(format!(
                "setting up HTTPS: {e}: install the system's CAs (package ca-certificates) or \
                 give the API's with --cacert"
            ))
        })?;
        Ok(Api {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    fn unreachable(&self, e: reqwest::Error) -> Failure {
        Failure(format!(
            "cannot reach the API at {} ({e}); is the gateway running? (set --api or VOLANT_API)",
            self.base
        ))
    }

    /// Sends a request; returns the response when it succeeded, else the API's message.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<reqwest::Response, Failure> {
        let mut r = self.request(method, path);
        if let Some(b) = body {
            r = r.json(b);
        }
        let res = r.send().await.map_err(|e| self.unreachable(e))?;
        if res.status().is_success() {
            return Ok(res);
        }
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.trim().to_string());
        Err(Failure(match status {
            StatusCode::UNAUTHORIZED => {
                format!("{message} (give an API key with --token or VOLANT_TOKEN)")
            }
            _ => message,
        }))
    }

    /// A JSON call; `Value::Null` for an empty answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let res = self.send(method, path, body).await?;
        let text = res
            .text()
            .await
            .map_err(|e| Failure(format!("reading the answer: {e}")))?;
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| Failure(format!("the API answered bad JSON: {e}")))
    }
}
