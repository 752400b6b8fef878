//! HTTP API (axum): health, Prometheus metrics and the site status.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::dr::{DrCommand, DrEvent};
use crate::dr_book::{BookError, DrBook};
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
    pub dr: Arc<std::sync::Mutex<DrBook>>,
    /// Bearer token for the DR endpoints; `None` turns them off.
    pub dr_token: Option<String>,
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
        .route("/api/v1/dr/events", get(dr_list).post(dr_post))
        .route("/api/v1/dr/events/{id}", delete(dr_delete))
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

/// Bearer-token check, in constant time: the refusal to send, if any.
fn refusal(s: &AppState, headers: &HeaderMap) -> Option<Response> {
    use subtle::ConstantTimeEq;
    let Some(token) = &s.dr_token else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "demand response over HTTP is off: set dr.token_env (or dr.token) in the site file",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        None
    } else {
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        Some(r)
    }
}

/// What an aggregator posts: an id, a window, a priority and exactly one command.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventRequest {
    pub id: String,
    pub start: chrono::DateTime<chrono::Utc>,
    pub end: chrono::DateTime<chrono::Utc>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub export_limit_w: Option<f64>,
    #[serde(default)]
    pub import_limit_w: Option<f64>,
    #[serde(default)]
    pub grid_target_w: Option<f64>,
    #[serde(default)]
    pub fleet_battery_w: Option<f64>,
    #[serde(default)]
    pub drm: Option<u8>,
    #[serde(default)]
    pub openadr_level: Option<u8>,
    #[serde(default)]
    pub ripple_pct: Option<f64>,
}

impl EventRequest {
    /// Into an event from `source`; the message says what is wrong otherwise.
    pub fn into_event(self, source: &str) -> Result<DrEvent, String> {
        let commands: Vec<DrCommand> = [
            self.export_limit_w.map(DrCommand::ExportLimitW),
            self.import_limit_w.map(DrCommand::ImportLimitW),
            self.grid_target_w.map(DrCommand::GridTargetW),
            self.fleet_battery_w.map(DrCommand::FleetBatteryW),
            self.drm.map(DrCommand::Drm),
            self.openadr_level.map(DrCommand::OpenadrLevel),
            self.ripple_pct.map(DrCommand::RipplePct),
        ]
        .into_iter()
        .flatten()
        .collect();
        let [command] = commands[..] else {
            return Err("give exactly one of export_limit_w, import_limit_w, grid_target_w, fleet_battery_w, drm, openadr_level, ripple_pct".into());
        };
        command.validate()?;
        Ok(DrEvent {
            id: self.id,
            start: self.start,
            end: self.end,
            priority: self.priority,
            command,
            source: source.into(),
        })
    }
}

fn book_error(e: BookError) -> Response {
    let code = match e {
        BookError::Invalid(_) => StatusCode::BAD_REQUEST,
        BookError::Duplicate(_) => StatusCode::CONFLICT,
        BookError::NotFound(_) => StatusCode::NOT_FOUND,
        BookError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(code, &e.to_string())
}

async fn dr_post(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = refusal(&s, &headers) {
        return r;
    }
    let request: EventRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad event JSON: {e}")),
    };
    let event = match request.into_event("http") {
        Ok(e) => e,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    let result = s.dr.lock().unwrap_or_else(|e| e.into_inner()).add(event);
    match result {
        Ok(entry) => (StatusCode::CREATED, Json(entry)).into_response(),
        Err(e) => book_error(e),
    }
}

async fn dr_list(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(r) = refusal(&s, &headers) {
        return r;
    }
    let list = s.dr.lock().unwrap_or_else(|e| e.into_inner()).list();
    Json(list).into_response()
}

async fn dr_delete(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = refusal(&s, &headers) {
        return r;
    }
    let result = s.dr.lock().unwrap_or_else(|e| e.into_inner()).cancel(&id);
    match result {
        Ok(()) => Json(serde_json::json!({ "cancelled": id })).into_response(),
        Err(e) => book_error(e),
    }
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint; try /api/v1/status, /metrics or /healthz",
    )
}
