//! The HTTP API's routes (reference: `docs/http-api.md`).
//!
//! Payloads and replies are raw bodies (`application/octet-stream`), like
//! `covey call`'s standard input and output; everything else is JSON.
//! Failures are `{"error": {"kind", "message"}}` with a status code per
//! kind (see [`status_of`]). Streams are Server-Sent Events, one JSON
//! object per `data:` line.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::Stream;
use serde_json::json;

use super::guard::Guard;
use super::{MAX_CALL_TIMEOUT_MS, REQUEST_TIMEOUT};
use crate::control::StatusSource;
use crate::control::fleet::{self, Nodes};
use crate::control::ops::{self, LogFollow, Tap};
use crate::control::proto::{Failure, FailureKind, payload_too_large};
use crate::logring::LogQuery;
use crate::router::SYSTEM_SCRIPTS;

#[derive(Clone)]
struct AppState {
    source: Arc<StatusSource>,
    /// BLAKE3 of the bearer token, when one is required.
    token: Option<blake3::Hash>,
    /// What browsers can be made to send, refused.
    guard: Arc<Guard>,
}

type Params = Query<HashMap<String, String>>;

pub(super) fn router(source: Arc<StatusSource>, token: Option<String>, guard: Guard) -> Router {
    let max_body = source.router.max_payload();
    let state = AppState {
        source,
        token: token.map(|t| blake3::hash(t.as_bytes())),
        guard: Arc::new(guard),
    };
    Router::new()
        .route("/v1/events", get(events))
        .route("/v1/events/{name}", post(emit))
        .route("/v1/commands/{target}/{name}", post(send))
        .route("/v1/calls/{target}/{name}", post(call))
        .route("/v1/kv", get(kv_list))
        .route("/v1/kv/{*key}", get(kv_get).put(kv_put).delete(kv_delete))
        .route("/v1/status", get(status))
        .route("/v1/scripts", get(scripts))
        .route("/v1/nodes", get(nodes))
        .route("/v1/cluster/scripts", get(cluster_scripts))
        .route("/", get(dashboard))
        .route("/v1/logs", get(logs))
        .route("/metrics", get(metrics))
        .fallback(|| async { failure(Failure::new(FailureKind::NotFound, "no such route")) })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_browsers,
        ))
        .layer(middleware::from_fn(deadline))
        .with_state(state)
}

/// A failure as JSON, with its status code.
fn failure(f: Failure) -> Response {
    (status_of(f.kind), axum::Json(json!({ "error": f }))).into_response()
}

pub(super) fn status_of(kind: FailureKind) -> StatusCode {
    match kind {
        FailureKind::BadRequest => StatusCode::BAD_REQUEST,
        FailureKind::NoHandler | FailureKind::NotFound | FailureKind::UnknownNode => {
            StatusCode::NOT_FOUND
        }
        FailureKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        FailureKind::NodeDown => StatusCode::SERVICE_UNAVAILABLE,
        FailureKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        FailureKind::HandlerFailed => StatusCode::BAD_GATEWAY,
        FailureKind::Failed => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An operation's outcome: JSON, or the raw bytes when there are any.
fn answer(outcome: ops::Outcome, raw: bool) -> Response {
    match outcome {
        Ok((_, bytes)) if raw => {
            let octets = HeaderValue::from_static("application/octet-stream");
            ([(header::CONTENT_TYPE, octets)], bytes).into_response()
        }
        Ok((value, _)) => axum::Json(value).into_response(),
        Err(f) => failure(f),
    }
}

/// The body, or why it was refused (over the payload limit, unreadable).
fn body(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, Failure> {
    match body {
        Ok(b) => Ok(b),
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let max = state.source.router.max_payload() as u64;
            Err(payload_too_large(max))
        }
        Err(r) => Err(Failure::new(FailureKind::BadRequest, r.body_text())),
    }
}

/// Before anything else: a request a browser was made to send is refused
/// (see [`super::guard`]).
async fn refuse_browsers(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match state.guard.check(req.method(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(r) => {
            tracing::debug!(
                "HTTP API: {} {} refused: {}",
                req.method(),
                req.uri().path(),
                r.message
            );
            let body = json!({ "error": { "kind": r.kind, "message": r.message } });
            (r.status, axum::Json(body)).into_response()
        }
    }
}

async fn authorize(State(state): State<AppState>, req: Request, next: Next) -> Response {
    // The dashboard page itself holds no data: it asks for the token.
    if let Some(want) = state.token.as_ref().filter(|_| req.uri().path() != "/") {
        let given = (req.headers().get(header::AUTHORIZATION))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Hashes compare in constant time.
        if given.is_none_or(|t| blake3::hash(t.trim().as_bytes()) != *want) {
            let mut r = (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({ "error": { "kind": "unauthorized",
                    "message": "this API needs `Authorization: Bearer TOKEN` (`covey http token`)" } })),
            )
                .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

async fn deadline(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => failure(Failure::new(
            FailureKind::Timeout,
            "the request took too long",
        )),
    }
}

async fn emit(
    State(s): State<AppState>,
    Path(name): Path<String>,
    payload: Result<Bytes, BytesRejection>,
) -> Response {
    match body(&s, payload) {
        Ok(p) => answer(ops::emit(&s.source, &name, p), false),
        Err(f) => failure(f),
    }
}

async fn send(
    State(s): State<AppState>,
    Path((target, name)): Path<(String, String)>,
    payload: Result<Bytes, BytesRejection>,
) -> Response {
    match body(&s, payload) {
        Ok(p) => answer(ops::send(&s.source, &target, &name, p.into()), false),
        Err(f) => failure(f),
    }
}

async fn call(
    State(s): State<AppState>,
    Path((target, name)): Path<(String, String)>,
    Query(q): Params,
    payload: Result<Bytes, BytesRejection>,
) -> Response {
    let timeout_ms = match q.get("timeout_ms").map(|t| t.parse::<u64>()) {
        None => 5000,
        Some(Ok(t)) => t.min(MAX_CALL_TIMEOUT_MS),
        Some(Err(_)) => {
            return failure(Failure::new(
                FailureKind::BadRequest,
                "timeout_ms: not a number",
            ));
        }
    };
    match body(&s, payload) {
        Ok(p) => answer(
            ops::call(&s.source, &target, &name, p.into(), timeout_ms).await,
            true,
        ),
        Err(f) => failure(f),
    }
}

async fn kv_get(State(s): State<AppState>, Path(key): Path<String>) -> Response {
    let req = crate::control::proto::Request::KvGet { key };
    answer(ops::simple(&s.source, req), true)
}

async fn kv_put(
    State(s): State<AppState>,
    Path(key): Path<String>,
    value: Result<Bytes, BytesRejection>,
) -> Response {
    match body(&s, value) {
        Ok(v) => match s.source.kv.set(&key, &v) {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(e) => failure(ops::kv_failure(e)),
        },
        Err(f) => failure(f),
    }
}

async fn kv_delete(State(s): State<AppState>, Path(key): Path<String>) -> Response {
    let req = crate::control::proto::Request::KvDel { key };
    answer(ops::simple(&s.source, req), false)
}

async fn kv_list(State(s): State<AppState>, Query(q): Params) -> Response {
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    let req = crate::control::proto::Request::KvLs { prefix };
    answer(ops::simple(&s.source, req), false)
}

async fn status(State(s): State<AppState>) -> Response {
    axum::Json(s.source.report()).into_response()
}

/// `GET /`: the live dashboard (one embedded page; it reads the API).
async fn dashboard() -> Response {
    let html = HeaderValue::from_static("text/html; charset=utf-8");
    let page = include_str!("dashboard.html");
    ([(header::CONTENT_TYPE, html)], page).into_response()
}

/// Every node's scripts: this node's, and each peer that is up asked over
/// the cluster link (a `covey.node.scripts` system call, 2 s each, all at
/// once); a peer that does not answer is listed with its error.
async fn cluster_scripts(State(s): State<AppState>) -> Response {
    axum::Json(fleet::ask(&s.source, &Nodes::All, SYSTEM_SCRIPTS, b"").await).into_response()
}

async fn nodes(State(s): State<AppState>) -> Response {
    answer(
        ops::simple(&s.source, crate::control::proto::Request::Nodes),
        false,
    )
}

async fn scripts(State(s): State<AppState>) -> Response {
    let list = s.source.supervisor.list().await;
    axum::Json(json!({ "node": s.source.router.node_name(), "scripts": list })).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    let text = super::metrics::render(&s.source, &s.guard).await;
    let kind = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
    ([(header::CONTENT_TYPE, kind)], text).into_response()
}

/// An SSE response from a stream of JSON-able items.
fn sse<T: serde::Serialize>(
    items: impl Stream<Item = T> + Send + 'static,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    use futures_util::StreamExt;
    let events = items
        .map(|item| Ok(Event::default().data(serde_json::to_string(&item).unwrap_or_default())));
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// `GET /v1/events?pattern=`: events as they happen.
async fn events(State(s): State<AppState>, Query(q): Params) -> Response {
    let pattern = q.get("pattern").map_or("*", |p| p.as_str());
    sse(Tap::events(s.source.router.clone(), pattern).into_stream()).into_response()
}

/// `GET /v1/logs?script=&since=&tail=&follow=`: the kept lines, then new
/// ones (unless `follow=false`).
async fn logs(Query(q): Params) -> Response {
    let since_ms = match q.get("since").map(|s| crate::control::cli::parse_age(s)) {
        None => None,
        Some(Ok(age)) => Some(crate::clock::now_ms().saturating_sub(age)),
        Some(Err(e)) => return failure(Failure::new(FailureKind::BadRequest, format!("{e:#}"))),
    };
    let tail = match q.get("tail").map(|t| t.parse::<u64>()) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return failure(Failure::new(FailureKind::BadRequest, "tail: not a number"));
        }
    };
    let follow = q.get("follow").is_none_or(|f| f != "false");
    let query = LogQuery {
        script: q.get("script").cloned(),
        since_ms,
    };
    let (kept, new) = LogFollow::start(query, tail);
    use futures_util::StreamExt;
    let kept = futures_util::stream::iter(kept);
    let new = new
        .into_stream()
        .take_while(move |_| std::future::ready(follow));
    sse(kept.chain(new)).into_response()
}
