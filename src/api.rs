//! HTTP API (axum): health, Prometheus metrics and the site status.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::planner::Plan;
use crate::status::Status;

/// The latest status and when the loop published it.
#[derive(Clone)]
pub struct Published {
    pub status: Arc<Status>,
    pub plan: Option<Arc<Plan>>,
    /// Whether the site has a planner at all.
    pub planner: bool,
    pub at: Instant,
}

#[derive(Clone)]
pub struct AppState {
    pub status: watch::Receiver<Option<Published>>,
    pub metrics: Arc<Metrics>,
    /// Longest silence of the control loop before `/healthz` fails.
    pub max_silence: Duration,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/plan", get(plan))
        .fallback(not_found)
        .with_state(state)
}

fn error(code: StatusCode, message: &str) -> Response {
    (code, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn healthz(State(s): State<AppState>) -> Response {
    match &*s.status.borrow() {
        Some(p) if p.at.elapsed() <= s.max_silence => (StatusCode::OK, "ok\n").into_response(),
        Some(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "control loop has stopped publishing",
        ),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "control loop has not completed a cycle yet",
        ),
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn status(State(s): State<AppState>) -> Response {
    let published = s.status.borrow().clone();
    match published {
        Some(p) => Json(p.status.as_ref()).into_response(),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no status yet: the first cycle is running",
        ),
    }
}

async fn plan(State(s): State<AppState>) -> Response {
    let published = s.status.borrow().clone();
    match published {
        Some(p) if !p.planner => error(
            StatusCode::NOT_FOUND,
            "this site has no planner: add a `planner:` section to the site file",
        ),
        Some(Published {
            plan: Some(plan), ..
        }) => Json(plan.as_ref()).into_response(),
        _ => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no plan yet: the planner has not produced one (see /api/v1/status)",
        ),
    }
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint; try /api/v1/status, /metrics or /healthz",
    )
}
