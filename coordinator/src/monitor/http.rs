//! The monitor's HTTP server (axum): `GET /metrics` (OpenMetrics text for Prometheus),
//! `GET /` (the dashboard: one self-contained page, no CDN, with the state inline so it draws
//! at once) and `GET /api/state` (the state it polls). Read-only: every other method and path is
//! refused.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use super::Monitor;

/// The dashboard page; `/*STATE*/null` is replaced by the state when it is served.
const PAGE: &str = include_str!("dashboard.html");
const STATE_MARK: &str = "/*STATE*/null";

/// Binds `addr` (`HOST:PORT`), naming it in the error.
pub async fn bind(addr: &str) -> Result<TcpListener> {
    let parsed: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .with_context(|| {
            format!(
                "metrics_addr `{addr}` is not HOST:PORT (for example 127.0.0.1:9090), nor `off`"
            )
        })?;
    TcpListener::bind(parsed).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            ": the port is in use; choose another --metrics-addr (port 0 picks a free one), or `off`"
        } else {
            ""
        };
        anyhow::anyhow!("cannot serve the dashboard and metrics on {addr}: {e}{hint}")
    })
}

/// Serves `monitor` on `listener` until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    monitor: Arc<Monitor>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/api/state", get(state))
        .with_state(monitor);
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
}

/// A response that is never cached.
fn fresh(content_type: &'static str, body: String) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

async fn metrics(State(m): State<Arc<Monitor>>) -> Response {
    fresh(
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        m.metrics_text(),
    )
}

async fn state(State(m): State<Arc<Monitor>>) -> Response {
    fresh("application/json", state_json(&m))
}

async fn page(State(m): State<Arc<Monitor>>) -> Response {
    // Inside a <script>, `<` is written as \u003c so that no value can close the element.
    let inline = state_json(&m).replace('<', "\\u003c");
    let mut r = fresh(
        "text/html; charset=utf-8",
        PAGE.replacen(STATE_MARK, &inline, 1),
    );
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
        ),
    );
    r
}

fn state_json(m: &Monitor) -> String {
    serde_json::to_string(&m.snapshot()).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_one_place_for_the_state() {
        assert_eq!(PAGE.matches(STATE_MARK).count(), 1);
        // Nothing is loaded from elsewhere (the SVG namespace is a name, not a fetch).
        for outside in ["<script src", "<link", "@import", "url(", "https://"] {
            assert!(!PAGE.contains(outside), "{outside}");
        }
    }

    #[tokio::test]
    async fn a_port_in_use_is_named_with_what_to_do() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let e = bind(&addr).await.unwrap_err().to_string();
        assert!(
            e.contains(&addr) && e.contains("in use") && e.contains("off"),
            "{e}"
        );
        let e = bind("nonsense").await.unwrap_err().to_string();
        assert!(e.contains("`nonsense`") && e.contains("HOST:PORT"), "{e}");
    }
}
