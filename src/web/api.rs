//! HTTP API (axum): health, Prometheus metrics and the site status.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::dr::book::{BookError, SharedBook};
use crate::dr::wire::EventRequest;
use crate::planner::Plan;
use crate::web::metrics::Metrics;
use crate::web::status::Status;

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
    pub dr: SharedBook,
    /// Bearer token for the DR endpoints; `None` turns them off.
    pub dr_token: Option<String>,
    pub metrics: Arc<Metrics>,
    /// The wiring check, asked for and read at `/api/v1/commission`.
    pub commission: crate::runtime::commissioning::CommissionSlot,
    /// Export excursions, for `/api/v1/excursions`.
    pub excursions: crate::runtime::compliance::ExcursionLog,
    /// Longest silence of the control loop before `/healthz` fails.
    pub max_silence: Duration,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/plan", get(plan))
        .route("/api/v1/excursions", get(excursions))
        .route(
            "/api/v1/commission",
            get(commission_state).post(commission_start),
        )
        .route("/api/v1/dr/events", get(dr_list).post(dr_post))
        .route("/api/v1/dr/events/{id}", delete(dr_delete))
        .fallback(not_found)
        .with_state(state)
}

fn error(code: StatusCode, message: &str) -> Response {
    (code, Json(serde_json::json!({ "error": message }))).into_response()
}

/// The live site page: one self-contained file (no build step, nothing fetched from outside),
/// read-only; it polls the status API twice a second.
const PAGE: &str = include_str!("page.html");

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
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

fn book_error(e: BookError) -> Response {
    let code = match e {
        BookError::Invalid(_) => StatusCode::BAD_REQUEST,
        BookError::Duplicate(_) => StatusCode::CONFLICT,
        BookError::NotFound(_) => StatusCode::NOT_FOUND,
        // Not on disk means not accepted: the client may try again later.
        BookError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        BookError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
        BookError::Forbidden(_) => StatusCode::FORBIDDEN,
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
    let result = s.dr.submit(event).await;
    match result {
        Ok(entry) => (StatusCode::CREATED, Json(entry)).into_response(),
        Err(e) => book_error(e),
    }
}

async fn dr_list(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(r) = refusal(&s, &headers) {
        return r;
    }
    let list = s.dr.lock().list();
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
    let result = s.dr.cancel(&id, "http").await;
    match result {
        Ok(()) => Json(serde_json::json!({ "cancelled": id })).into_response(),
        Err(e) => book_error(e),
    }
}

/// The wiring check: under way, refused, or its findings.
async fn commission_state(State(s): State<AppState>) -> Response {
    Json(s.commission.state()).into_response()
}

/// Start the wiring check (with the site's bearer token: it moves the batteries).
async fn commission_start(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(r) = refusal(&s, &headers) {
        return r;
    }
    if s.commission.request() {
        (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "requested": true })),
        )
            .into_response()
    } else {
        error(StatusCode::CONFLICT, "a wiring check is under way already")
    }
}

/// `from` and `to` of `/api/v1/excursions`, RFC 3339; absent: from the start, up to now and
/// beyond.
#[derive(serde::Deserialize)]
struct Period {
    from: Option<String>,
    to: Option<String>,
}

/// A time of the query, or why it is not one.
fn instant(v: Option<&str>, what: &str, absent: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    match v {
        None | Some("") => Ok(absent),
        Some(s) => DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| {
                format!("`{what}` must be an RFC 3339 time such as 2026-06-21T00:00:00Z, not `{s}`")
            }),
    }
}

/// Export excursions that started in `[from, to)`: JSON, or CSV with `Accept: text/csv`.
async fn excursions(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Period>,
) -> Response {
    let (from, to) = match (
        instant(q.from.as_deref(), "from", DateTime::<Utc>::MIN_UTC),
        instant(q.to.as_deref(), "to", DateTime::<Utc>::MAX_UTC),
    ) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(why), _) | (_, Err(why)) => return error(StatusCode::BAD_REQUEST, &why),
    };
    let list = match s.excursions.between(from, to).await {
        Ok(l) => l,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e),
    };
    let csv = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/csv"));
    if csv {
        (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            crate::compliance::to_csv(&list),
        )
            .into_response()
    } else {
        Json(list).into_response()
    }
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint; try /api/v1/status, /metrics or /healthz",
    )
}
