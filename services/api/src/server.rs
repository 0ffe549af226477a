//! The router, the listener and graceful shutdown. [`Api::bind`] binds first (port 0 works
//! for tests) and exposes the bound address; [`Api::run_until_stopped`] serves until the
//! token is cancelled, then stops taking requests, lets the ones in flight finish, and
//! flushes the producer. The bounds every request meets first are in [`crate::edge`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use memos_kafka::CommandProducer;
use memos_redis::HotViews;
use memos_runtime::metrics as m;
use memos_runtime::{Config, telemetry};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::edge::{self, Edge};
use crate::error::ApiError;
use crate::{commands, memories, registry, tasks};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub producer: CommandProducer,
    pub pool: PgPool,
    pub hot: HotViews,
}

pub fn router(state: AppState) -> Router {
    let edge = Edge::new(&state.config.http);
    let v1 = Router::new()
        .route("/memories", post(memories::write))
        .route("/memories/search", post(memories::search))
        .route("/memories/{id}", get(memories::get).patch(memories::update))
        .route("/memories/{id}/forget", post(memories::forget))
        .route("/memories/{id}/history", get(memories::history))
        .route("/agents/{agent}/memories", get(memories::list))
        .route("/agents/{agent}/recent", get(memories::recent))
        .route("/shares", post(registry::share))
        .route("/shares/revoke", post(registry::revoke))
        .route("/tools", post(registry::register_tool).get(registry::tools))
        .route("/commands/{id}", get(commands::status))
        .route("/agents", post(tasks::register_agent).get(tasks::agents))
        .route("/agents/{agent}", delete(tasks::deregister_agent))
        .route("/agents/{agent}/heartbeat", post(tasks::heartbeat))
        .route("/agents/{agent}/inbox", get(tasks::inbox))
        .route("/tasks", post(tasks::delegate).get(tasks::list_tasks))
        .route("/tasks/{id}", get(tasks::task))
        .route("/tasks/{id}/start", post(tasks::start))
        .route("/tasks/{id}/complete", post(tasks::complete))
        .route("/tasks/{id}/fail", post(tasks::fail))
        .route("/tasks/{id}/cancel", post(tasks::cancel))
        .route("/workflow-templates", post(tasks::define_template))
        .route("/workflow-templates/{name}", get(tasks::template))
        .route("/workflows", post(tasks::start_workflow))
        .route("/workflows/{id}", get(tasks::workflow))
        .route("/orchestrator/stats", get(tasks::stats))
        // Innermost first: parameters, body, token, time, concurrency (see crate::edge).
        .route_layer(middleware::from_fn(edge::check_params))
        .route_layer(middleware::from_fn_with_state(edge.clone(), edge::read_body))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .route_layer(middleware::from_fn_with_state(edge.clone(), edge::limit_time))
        .route_layer(middleware::from_fn_with_state(edge, edge::limit_concurrency));
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render_metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn(observe))
        .layer(DefaultBodyLimit::max(state.config.http.max_body_bytes))
        .with_state(state)
}

/// The routes of a process without the API (the projector role): health and metrics.
pub fn operations_router() -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(render_metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn(observe))
}

/// Prometheus text exposition of this process's metrics.
pub async fn render_metrics() -> Response {
    match memos_runtime::metrics::handle() {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => ApiError::unavailable("metrics recorder not installed").into_response(),
    }
}

/// One span per request, continuing the caller's W3C trace; request count, latency and
/// in-flight gauge by route template (never the raw path, so ids do not become labels).
async fn observe(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let (traceparent, tracestate) = {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        (header("traceparent"), header("tracestate"))
    };
    let span = tracing::info_span!(
        "http",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    telemetry::set_remote_parent(&span, traceparent.as_deref(), tracestate.as_deref());
    let in_flight = metrics::gauge!(m::HTTP_IN_FLIGHT);
    in_flight.increment(1.0);
    let start = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    in_flight.decrement(1.0);
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    metrics::histogram!(m::HTTP_SECONDS, "method" => method.clone(), "route" => route.clone())
        .record(start.elapsed().as_secs_f64());
    metrics::counter!(m::HTTP_REQUESTS, "method" => method, "route" => route, "status" => status.to_string())
        .increment(1);
    response
}

/// The token of an `Authorization` value of the `Bearer` scheme; the scheme name is
/// case-insensitive (RFC 9110 section 11.1), and spaces may separate it from the token.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Compares in time that depends only on the lengths, so the answer's timing does not reveal
/// how much of a guessed token is right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// Checks the bearer token when one is configured.
async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.config.http.api_token {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.expose().as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// Per-dependency readiness: 200 when PostgreSQL and Redis answer, 503 otherwise.
async fn ready(State(state): State<AppState>) -> Response {
    let postgres = sqlx::query("SELECT 1")
        .execute(&state.pool)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let redis = state.hot.ping().await.map_err(|e| e.to_string());
    let status = |r: &Result<(), String>| match r {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("error: {e}"),
    };
    let code = if postgres.is_ok() && redis.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({ "postgres": status(&postgres), "redis": status(&redis) });
    (code, Json(body)).into_response()
}

pub struct Api {
    listener: TcpListener,
    router: Router,
    producer: CommandProducer,
    header_read_timeout: Duration,
}

impl Api {
    pub async fn bind(state: AppState) -> std::io::Result<Api> {
        for topic in [
            &state.config.topics.memory_commands,
            &state.config.topics.task_commands,
        ] {
            for kind in ["too_large", "unavailable"] {
                metrics::counter!(m::PRODUCER_ERRORS, "topic" => topic.clone(), "kind" => kind).increment(0);
            }
        }
        for op in [
            "get_memory",
            "list_memories",
            "may_read",
            "history",
            "search",
            "tools",
            "command_status",
            "agents",
            "agent",
            "inbox",
            "task",
            "task_lookup",
            "template",
            "workflow",
            "orchestrator_stats",
            "decided_commands",
            "tasks",
        ] {
            metrics::counter!(m::POSTGRES_ERRORS, "op" => op).increment(0);
        }
        for op in ["get_memory", "recent", "inbox"] {
            metrics::counter!(m::REDIS_ERRORS, "op" => op).increment(0);
        }
        let listener = TcpListener::bind(state.config.http.bind).await?;
        let producer = state.producer.clone();
        let header_read_timeout = state.config.http.header_read_timeout;
        Ok(Api {
            listener,
            router: router(state),
            producer,
            header_read_timeout,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> std::io::Result<()> {
        tracing::info!(addr = %self.local_addr(), "api listening");
        edge::serve(self.listener, self.router, self.header_read_timeout, shutdown).await;
        let producer = self.producer;
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10)))
            .await
            .ok()
            .and_then(Result::err)
            .inspect(|e| tracing::warn!(error = %e, "producer flush incomplete"));
        tracing::info!("api stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_exact() {
        for value in [
            "Bearer s3cret",
            "bearer s3cret",
            "BEARER s3cret",
            "bEaReR   s3cret",
        ] {
            assert_eq!(bearer_token(value), Some("s3cret"), "{value}");
        }
        for value in ["Basic s3cret", "Bearer", "Bearer ", "Bearers3cret", "s3cret"] {
            assert_eq!(bearer_token(value), None, "{value}");
        }
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
