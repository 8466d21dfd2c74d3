//! The admin HTTP endpoint, apart from gRPC: `/metrics` in the Prometheus
//! text format, and `/healthz` and `/readyz` that mirror gRPC health for
//! plain-HTTP probes (200 while SERVING, 503 otherwise: before the server is
//! ready and from the moment shutdown begins).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// The content type of the scrape: the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves the admin endpoint on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, serving: Arc<AtomicBool>) {
    let health = move || {
        let serving = serving.clone();
        async move {
            if serving.load(Ordering::Acquire) {
                (StatusCode::OK, "SERVING\n")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n")
            }
        }
    };
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], metrics.encode()) }
            }),
        )
        .route("/healthz", get(health.clone()))
        .route("/readyz", get(health));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin HTTP endpoint failed");
    }
}
