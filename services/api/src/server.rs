//! The router, the listener and graceful shutdown. [`Api::bind`] binds first (port 0 works
//! for tests) and exposes the bound address; [`Api::run_until_stopped`] serves until the
//! token is cancelled, then stops taking requests, lets the ones in flight finish, and
//! flushes the producer. The bounds every request meets first are in [`crate::edge`].

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, patch, post};
use axum::{Json, Router};
use memos_kafka::CommandProducer;
use memos_redis::HotViews;
use memos_runtime::metrics as m;
use memos_runtime::{Config, telemetry};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::{self, Authenticator};
use crate::edge::{self, Edge};
use crate::error::ApiError;
use crate::limits::{self, Limiter};
use crate::{commands, memories, registry, tasks};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub producer: CommandProducer,
    pub pool: PgPool,
    pub hot: HotViews,
    pub auth: Authenticator,
}

/// Who may call a route. Every route of the router has one: the router is built from
/// [`v1_routes`], so a route cannot be added without a policy, and the route walk
/// (integration-tests `e2e::routes`) checks each policy against the running service as
/// anonymous, another agent, the owner, an auditor and a service (`docs/security.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// No credential needed: health, readiness and metrics.
    Open,
    /// A command for the namespace or agent it names (the body's `agent_id`, or the path):
    /// that agent (or one granted the namespace) and services granted it; auditors and
    /// operators write nothing.
    ActsForSubject,
    /// A command for no agent (delegating a task, templates, workflows): any agent or
    /// service, recorded as the actor.
    AnyWriter,
    /// Cancelling a task: whoever delegated it, or a service granted that agent.
    TaskIssuer,
    /// Reads what belongs to the agent named in the path, query or body (its inbox, working
    /// memory, tasks, searches as it): the agent, services granted it, auditors and
    /// operators; anyone else gets `403`.
    AgentOwned,
    /// Reads answered as the reader sees them: what it may not see is `404` (a memory, a
    /// command, a task or a workflow by id) or left out (listings).
    Visible,
    /// The shared registries (agents, tools, templates) and the orchestrator's figures:
    /// any principal.
    AnyPrincipal,
}

/// A route of the router and its policy.
#[derive(Debug, Clone, Serialize)]
pub struct Route {
    #[serde(serialize_with = "method_text")]
    pub method: Method,
    /// The path template, as the router matches it (`/v1/memories/{id}`).
    pub path: String,
    pub policy: Policy,
}

fn method_text<S: serde::Serializer>(method: &Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(method.as_str())
}

/// The `/v1` routes: method, path under `/v1`, policy and handler, one line each.
fn v1_routes() -> Vec<(Method, &'static str, Policy, MethodRouter<AppState>)> {
    use Policy::*;
    vec![
        (Method::POST, "/memories", ActsForSubject, post(memories::write)),
        (
            Method::POST,
            "/memories/search",
            AgentOwned,
            post(memories::search),
        ),
        (Method::GET, "/memories/{id}", Visible, get(memories::get)),
        (
            Method::PATCH,
            "/memories/{id}",
            ActsForSubject,
            patch(memories::update),
        ),
        (
            Method::POST,
            "/memories/{id}/forget",
            ActsForSubject,
            post(memories::forget),
        ),
        (
            Method::GET,
            "/memories/{id}/history",
            Visible,
            get(memories::history),
        ),
        (
            Method::GET,
            "/agents/{agent}/memories",
            Visible,
            get(memories::list),
        ),
        (
            Method::GET,
            "/agents/{agent}/recent",
            AgentOwned,
            get(memories::recent),
        ),
        (Method::POST, "/shares", ActsForSubject, post(registry::share)),
        (
            Method::POST,
            "/shares/revoke",
            ActsForSubject,
            post(registry::revoke),
        ),
        (
            Method::POST,
            "/tools",
            ActsForSubject,
            post(registry::register_tool),
        ),
        (Method::GET, "/tools", AnyPrincipal, get(registry::tools)),
        (Method::GET, "/commands/{id}", Visible, get(commands::status)),
        (
            Method::POST,
            "/agents",
            ActsForSubject,
            post(tasks::register_agent),
        ),
        (Method::GET, "/agents", AnyPrincipal, get(tasks::agents)),
        (
            Method::DELETE,
            "/agents/{agent}",
            ActsForSubject,
            delete(tasks::deregister_agent),
        ),
        (
            Method::POST,
            "/agents/{agent}/heartbeat",
            ActsForSubject,
            post(tasks::heartbeat),
        ),
        (
            Method::GET,
            "/agents/{agent}/inbox",
            AgentOwned,
            get(tasks::inbox),
        ),
        (Method::POST, "/tasks", AnyWriter, post(tasks::delegate)),
        (Method::GET, "/tasks", AgentOwned, get(tasks::list_tasks)),
        (Method::GET, "/tasks/{id}", Visible, get(tasks::task)),
        (
            Method::POST,
            "/tasks/{id}/start",
            ActsForSubject,
            post(tasks::start),
        ),
        (
            Method::POST,
            "/tasks/{id}/complete",
            ActsForSubject,
            post(tasks::complete),
        ),
        (
            Method::POST,
            "/tasks/{id}/fail",
            ActsForSubject,
            post(tasks::fail),
        ),
        (
            Method::POST,
            "/tasks/{id}/cancel",
            TaskIssuer,
            post(tasks::cancel),
        ),
        (
            Method::POST,
            "/workflow-templates",
            AnyWriter,
            post(tasks::define_template),
        ),
        (
            Method::GET,
            "/workflow-templates/{name}",
            AnyPrincipal,
            get(tasks::template),
        ),
        (Method::POST, "/workflows", AnyWriter, post(tasks::start_workflow)),
        (Method::GET, "/workflows/{id}", Visible, get(tasks::workflow)),
        (
            Method::GET,
            "/orchestrator/stats",
            AnyPrincipal,
            get(tasks::stats),
        ),
    ]
}

/// The routes outside `/v1`, served without a credential.
const OPEN_ROUTES: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Every route of [`router`] with its policy: what the router is built from.
pub fn routes() -> Vec<Route> {
    let open = OPEN_ROUTES.iter().map(|path| Route {
        method: Method::GET,
        path: (*path).to_owned(),
        policy: Policy::Open,
    });
    open.chain(v1_routes().into_iter().map(|(method, path, policy, _)| Route {
        method,
        path: format!("/v1{path}"),
        policy,
    }))
    .collect()
}

pub fn router(state: AppState) -> Router {
    let edge = Edge::new(&state.config.http);
    let v1 = v1_routes()
        .into_iter()
        .fold(Router::new(), |router, (_, path, _, handler)| {
            router.route(path, handler)
        })
        // Innermost first: parameters, body, the principal's limits, token, time,
        // concurrency (see crate::edge, crate::limits).
        .route_layer(middleware::from_fn(edge::check_params))
        .route_layer(middleware::from_fn_with_state(edge.clone(), edge::read_body))
        .route_layer(middleware::from_fn_with_state(
            Limiter::new(state.config.http.limits),
            limits::limit,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.auth.clone(),
            auth::authenticate,
        ))
        .route_layer(middleware::from_fn_with_state(edge.clone(), edge::limit_time))
        .route_layer(middleware::from_fn_with_state(edge, edge::limit_concurrency));
    let app = Router::new().nest("/v1", v1);
    let app = if state.config.http.operations_bind.is_some() {
        app.route("/healthz", get(|| async { "ok" }))
    } else {
        with_probes(app)
    };
    app.fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn(observe))
        .layer(DefaultBodyLimit::max(state.config.http.max_body_bytes))
        .with_state(state)
}

/// `/healthz`, `/readyz` and `/metrics`: open to probes and scrapers.
fn with_probes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render_metrics))
}

/// The probes of the API on `http.operations_bind`, when it is set.
fn probes_router(state: AppState) -> Router {
    with_probes(Router::new())
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn(observe))
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

/// One dependency's answer to a readiness probe.
#[derive(Debug, Serialize)]
struct Check {
    ok: bool,
    /// How long the check took, in milliseconds.
    ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Kafka only: what the broker said about each command topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    topics: Option<serde_json::Value>,
}

/// Runs `check` within `bound`: a dependency that does not answer in time is down, so a
/// hung server costs the probe `bound`, never the client's own timeout.
async fn check<F>(bound: Duration, check: F) -> Check
where
    F: Future<Output = Result<Option<serde_json::Value>, String>>,
{
    let start = Instant::now();
    let outcome = match tokio::time::timeout(bound, check).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("no answer within {bound:?}")),
    };
    let ms = start.elapsed().as_millis() as u64;
    match outcome {
        Ok(topics) => Check {
            ok: true,
            ms,
            error: None,
            topics,
        },
        Err(error) => Check {
            ok: false,
            ms,
            error: Some(error),
            topics: None,
        },
    }
}

/// Kafka can take writes when both command topics exist and every partition has a leader,
/// as the producer's own client sees the cluster.
async fn kafka_writable(state: &AppState, bound: Duration) -> Result<Option<serde_json::Value>, String> {
    let topics = [
        state.config.topics.memory_commands.clone(),
        state.config.topics.task_commands.clone(),
    ];
    let probe = |topic: String| {
        let producer = state.producer.clone();
        tokio::task::spawn_blocking(move || producer.check_topic(&topic, bound))
    };
    let (memory, task) = tokio::join!(probe(topics[0].clone()), probe(topics[1].clone()));
    let answers = [memory, task];
    let mut report = serde_json::Map::new();
    let mut problems = Vec::new();
    for (topic, answer) in topics.iter().zip(answers) {
        let health = answer
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("metadata of {topic}: {e}"))?;
        if !health.writable() {
            problems.push(if health.partitions == 0 {
                format!("{topic} does not exist")
            } else {
                format!("{topic}: {} partition(s) without a leader", health.without_leader)
            });
        }
        report.insert(
            topic.clone(),
            serde_json::json!({ "partitions": health.partitions, "without_leader": health.without_leader }),
        );
    }
    if problems.is_empty() {
        Ok(Some(report.into()))
    } else {
        Err(problems.join("; "))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadyQuery {
    /// Comma-separated capabilities the caller needs (`writes`, `reads`, `all`); without it
    /// the answer is 503 only when the API can do neither.
    #[serde(default)]
    require: Option<String>,
}

/// Per-dependency readiness, every check at once and each within `http.readiness_timeout`.
/// Writes need Kafka; reads need PostgreSQL; Redis is a cache, so without it the API is
/// degraded but serves both. 200 while writes or reads are possible (`ready` or
/// `degraded`), 503 when neither is (`unavailable`) or when a `require`d one is not.
async fn ready(State(state): State<AppState>, query: Result<Query<ReadyQuery>, QueryRejection>) -> Response {
    let Query(query) = match query {
        Ok(query) => query,
        Err(e) => return ApiError::bad_request(e.body_text()).into_response(),
    };
    let (mut need_writes, mut need_reads) = (false, false);
    for need in query.require.iter().flat_map(|r| r.split(',')) {
        match need.trim() {
            "writes" => need_writes = true,
            "reads" => need_reads = true,
            "all" => (need_writes, need_reads) = (true, true),
            other => {
                return ApiError::bad_request(format!(
                    "require: unknown capability {other:?} (writes, reads, all)"
                ))
                .with_field("require")
                .into_response();
            }
        }
    }
    let bound = state.config.http.readiness_timeout;
    let (kafka, postgres, redis) = tokio::join!(
        check(bound, kafka_writable(&state, bound)),
        check(bound, async {
            sqlx::query("SELECT 1")
                .execute(&state.pool)
                .await
                .map(|_| None)
                .map_err(|e| e.to_string())
        }),
        check(bound, async {
            state.hot.ping().await.map(|_| None).map_err(|e| e.to_string())
        }),
    );
    let (writes, reads) = (kafka.ok, postgres.ok);
    let status = if writes && reads && redis.ok {
        "ready"
    } else if writes || reads {
        "degraded"
    } else {
        "unavailable"
    };
    let missing = (need_writes && !writes) || (need_reads && !reads);
    let served = (writes || reads) && !missing;
    let code = if served {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": status,
        "writes": writes,
        "reads": reads,
        "checks": { "kafka": kafka, "postgres": postgres, "redis": redis },
    });
    (code, Json(body)).into_response()
}

pub struct Api {
    listener: TcpListener,
    router: Router,
    /// `http.operations_bind`'s listener and its routes.
    probes: Option<(TcpListener, Router)>,
    producer: CommandProducer,
    header_read_timeout: Duration,
}

impl Api {
    pub async fn bind(state: AppState) -> std::io::Result<Api> {
        for topic in [
            &state.config.topics.memory_commands,
            &state.config.topics.task_commands,
        ] {
            for kind in ["too_large", "not_authorized", "unavailable"] {
                metrics::counter!(m::PRODUCER_ERRORS, "topic" => topic.clone(), "kind" => kind).increment(0);
            }
        }
        for reason in auth::DENIAL_REASONS {
            metrics::counter!(m::HTTP_DENIED, "reason" => *reason).increment(0);
        }
        for (role, limit) in limits::label_values() {
            metrics::counter!(m::HTTP_LIMITED, "role" => role, "limit" => limit).increment(0);
        }
        for (mode, plan) in crate::memories::SEARCH_LABELS {
            metrics::counter!(m::SEARCHES, "mode" => *mode, "plan" => *plan).increment(0);
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
        for reason in ["error", "timeout"] {
            metrics::counter!(m::CONFLICT_CHECKS_SKIPPED, "reason" => reason).increment(0);
        }
        let listener = TcpListener::bind(state.config.http.bind).await?;
        let probes = match state.config.http.operations_bind {
            Some(addr) => Some((TcpListener::bind(addr).await?, probes_router(state.clone()))),
            None => None,
        };
        let producer = state.producer.clone();
        let header_read_timeout = state.config.http.header_read_timeout;
        Ok(Api {
            listener,
            router: router(state),
            probes,
            producer,
            header_read_timeout,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// The address of `http.operations_bind`'s listener, when it is set.
    pub fn operations_addr(&self) -> Option<SocketAddr> {
        self.probes
            .as_ref()
            .map(|(listener, _)| listener.local_addr().expect("bound listener has an address"))
    }

    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let probes = self.probes.map(|(listener, router)| {
            tracing::info!(addr = %listener.local_addr().expect("bound"), "operations endpoint listening");
            tokio::spawn(
                axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                    .into_future(),
            )
        });
        tracing::info!(addr = %self.listener.local_addr()?, "api listening");
        edge::serve(self.listener, self.router, self.header_read_timeout, shutdown).await;
        if let Some(probes) = probes {
            probes
                .await
                .ok()
                .and_then(Result::err)
                .inspect(|e| tracing::warn!(error = %e, "operations endpoint"));
        }
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
