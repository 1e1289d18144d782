//! Asynchronous jobs over HTTP (`core::jobs`): `POST /v1/models/{model}/explain` with `Prefer: respond-async` or
//! `?async=true` answers 202 with `Location: /v1/jobs/{id}`; `GET /v1/jobs/{id}` gives the job (its answer once
//! done, the same JSON as the synchronous request's), `GET /v1/jobs/{id}/events` streams it as server-sent events
//! until it ends, `DELETE /v1/jobs/{id}` cancels it. Unknown ids and another key's jobs are 404, expired ones 410,
//! cancelling a finished job 409, too many jobs 429 (running) or 503 (kept), both with Retry-After.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::{presented_key, upload, v1, AppState};
use crate::core::jobs::{JobState, Lookup, Refusal, Snapshot};
use crate::core::pipeline::{Endpoint, ImageInput, Run};

/// Whether an explain request asks for a job: `?async=true` (or `1`; `false` and `0` say no), or a `Prefer` header
/// with `respond-async` (RFC 7240).
pub fn wants_async(req: &Request) -> Result<bool, ApiError> {
    if let Some(q) = req.uri().query() {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q).map_err(|e| ApiError::bad_request(format!("malformed query string: {e}")))?;
        if let Some((_, v)) = pairs.iter().find(|(k, _)| k == "async") {
            return match v.to_ascii_lowercase().as_str() {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                other => Err(ApiError::bad_request(format!("async must be true or false, not `{other}`"))),
            };
        }
    }
    Ok(req
        .headers()
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("respond-async"))))
}

/// The owner of the request's jobs: its API key where keys are configured.
fn owner(state: &AppState, headers: &HeaderMap) -> u64 {
    let key = if state.api_keys.0.is_empty() { None } else { presented_key(headers) };
    state.jobs.owner(key)
}

fn location(id: &str) -> String {
    format!("/v1/jobs/{id}")
}

/// A job as JSON: its state, progress, times, and the answer (or the problem) once finished.
pub fn job_json(s: &Snapshot) -> Value {
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    let mut v = json!({
        "id": s.id,
        "model": s.model,
        "state": s.state.as_str(),
        "progress": {
            "done": s.done.min(s.planned),
            "planned": s.planned,
            "fraction": if s.planned > 0 { round((s.done.min(s.planned)) as f64 / s.planned as f64) } else { 0.0 },
        },
        "elapsed_seconds": round(s.elapsed.as_secs_f64()),
        "estimate_seconds": s.estimate_seconds.map(round),
        "remaining_seconds": s.remaining_seconds.map(round),
        "location": location(&s.id),
    });
    match s.outcome.as_deref() {
        Some(Ok(answer)) => v["result"] = serde_json::to_value(v1::encode(answer)).unwrap_or(Value::Null),
        Some(Err(e)) => v["error"] = ApiError::from(e).problem(),
        None => {}
    }
    v
}

/// Starts an explain request as a job: assessed like a synchronous one (its options, cost and estimate, against
/// `jobs.timeout_ms`) before it is accepted, so a bad request is refused at once.
pub async fn submit(state: AppState, model: String, req: Request) -> Result<Response, ApiError> {
    let owner = owner(&state, req.headers());
    let up = tokio::time::timeout(state.body_timeout, upload::parse(req, state.body_limit)).await.map_err(|_| upload::body_timeout(state.body_timeout))??;
    let timeout = state.jobs.limits.timeout;
    let assessment = state.service.assess(&model, Endpoint::Explain, &up.options, timeout)?;
    let service = state.service.clone();
    let name = model.clone();
    let started = state.jobs.start(owner, &model, assessment, move |progress| async move {
        let run = Run { timeout: Some(timeout), progress: Some(progress), background: true };
        service.handle_run(&name, Endpoint::Explain, ImageInput::Encoded(up.image), up.references, up.options, run).await
    });
    let snap = started.map_err(|r| {
        let mut e = match r {
            Refusal::TooManyRunning(n) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too-many-jobs", format!("{n} jobs are queued or running (jobs.max_running); retry shortly")),
            Refusal::Full(n) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "jobs-full", format!("{n} jobs are kept and none has finished (jobs.max_kept); retry shortly")),
        };
        e.retry_after = Some(5);
        e
    })?;
    let mut res = (StatusCode::ACCEPTED, Json(job_json(&snap))).into_response();
    if let Ok(v) = HeaderValue::from_str(&location(&snap.id)) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res.headers_mut().insert("preference-applied", HeaderValue::from_static("respond-async"));
    Ok(res)
}

fn unknown(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "unknown-job", format!("no job `{id}` (job ids are per replica and per API key)"))
}

fn expired(id: &str, state: &AppState) -> ApiError {
    ApiError::new(StatusCode::GONE, "job-expired", format!("job `{id}` finished more than {} ms ago and its result was dropped (jobs.ttl_ms)", state.jobs.limits.ttl.as_millis()))
}

fn found(state: &AppState, lookup: Lookup, id: &str) -> Result<Snapshot, ApiError> {
    match lookup {
        Lookup::Found(s) => Ok(s),
        Lookup::Expired => Err(expired(id, state)),
        Lookup::Unknown => Err(unknown(id)),
    }
}

pub async fn get_job(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let owner = owner(&state, &headers);
    let snap = found(&state, state.jobs.get(owner, &id), &id)?;
    Ok(Json(job_json(&snap)))
}

pub async fn cancel_job(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let owner = owner(&state, &headers);
    let snap = found(&state, state.jobs.get(owner, &id), &id)?;
    if snap.state.finished() {
        return Err(ApiError::new(StatusCode::CONFLICT, "job-finished", format!("job `{id}` has already ended ({}): nothing to cancel", snap.state.as_str())));
    }
    let snap = found(&state, state.jobs.cancel(owner, &id), &id)?;
    Ok(Json(job_json(&snap)))
}

/// The job's events: `progress` whenever the progress or state changes (polled every 200 ms), then one event named
/// after the final state (`done`, `failed`, `cancelled`) with the whole job, answer included; the stream then ends.
/// A client that goes away drops the stream (and its count, `Jobs::streams`); the job carries on.
pub async fn job_events(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    let owner = owner(&state, &headers);
    found(&state, state.jobs.get(owner, &id), &id)?;
    struct Cursor {
        state: AppState,
        guard: crate::core::jobs::StreamGuard,
        owner: u64,
        id: String,
        last: Option<(JobState, u64)>,
        ended: bool,
    }
    let cursor = Cursor { guard: state.jobs.stream_guard(), state, owner, id, last: None, ended: false };
    let stream = futures_util::stream::unfold(cursor, |mut c| async move {
        if c.ended {
            return None;
        }
        loop {
            let snap = match c.state.jobs.get(c.owner, &c.id) {
                Lookup::Found(s) => s,
                Lookup::Expired | Lookup::Unknown => return None,
            };
            let now = (snap.state, snap.done);
            if c.last != Some(now) {
                c.last = Some(now);
                let name = if snap.state.finished() { snap.state.as_str() } else { "progress" };
                c.ended = snap.state.finished();
                let event = Event::default().event(name).data(job_json(&snap).to_string());
                let _ = &c.guard;
                return Some((Ok::<Event, Infallible>(event), c));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}
