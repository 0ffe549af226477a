//! The HTTP edge: what bounds a request before any handler trusts it.
//!
//! Guarantee: every request gets an answer, or its connection is closed, within bounded time
//! and bounded concurrency, whatever the client sends:
//!
//! - headers must arrive within `http.header_read_timeout`, or the connection is closed
//!   ([`serve`], hyper's header timer);
//! - the body must arrive within `http.body_read_timeout` (`408 request_timeout`); one larger
//!   than `http.max_body_bytes` is `413` (read and discarded first when it is declared at most
//!   four times the limit, so the client reads the answer instead of a reset; refused before
//!   any byte is read beyond that) ([`read_body`]);
//! - the whole request within `http.request_timeout` (`503 timeout`) ([`limit_time`]);
//! - at most `http.max_concurrent_requests` `/v1` requests at once; beyond, `503 overloaded`
//!   with `Retry-After` at once, never a queue ([`limit_concurrency`]);
//! - no path or query parameter holds U+0000 or exceeds
//!   [`memos_schemas::validate::MAX_PARAM_BYTES`] (`400`, naming the parameter)
//!   ([`check_params`]).

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{RawPathParams, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use memos_runtime::config::HttpConfig;
use memos_schemas::validate;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// What the edge's middleware share.
#[derive(Clone)]
pub struct Edge {
    max_body_bytes: usize,
    body_read_timeout: Duration,
    request_timeout: Duration,
    permits: Arc<Semaphore>,
}

impl Edge {
    pub fn new(http: &HttpConfig) -> Edge {
        Edge {
            max_body_bytes: http.max_body_bytes,
            body_read_timeout: http.body_read_timeout,
            request_timeout: http.request_timeout,
            permits: Arc::new(Semaphore::new(http.max_concurrent_requests)),
        }
    }
}

/// Sheds load instead of queueing it: a request beyond the limit is answered at once.
pub async fn limit_concurrency(State(edge): State<Edge>, request: Request, next: Next) -> Response {
    let Ok(_permit) = edge.permits.clone().try_acquire_owned() else {
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many requests in flight (http.max_concurrent_requests); retry shortly",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    next.run(request).await
}

/// The whole request, body read included, within `http.request_timeout`.
pub async fn limit_time(State(edge): State<Edge>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(edge.request_timeout, next.run(request)).await {
        Ok(response) => response,
        // A command may have been appended before the deadline: a retry with the same
        // command id is answered as the same command.
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "the request took longer than {:?} (http.request_timeout); retry with the same command_id",
                edge.request_timeout
            ),
        )
        .into_response(),
    }
}

fn too_large() -> Response {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        "request body is too large",
    )
    .into_response()
}

/// Bodies declared up to this many times `http.max_body_bytes` are read (and discarded)
/// before their `413`: a client still writing its body when the server closes the
/// connection would see a reset instead of the answer. Larger declarations are refused at
/// once.
const DRAIN_FACTOR: usize = 4;

/// What reading a body came to.
enum Read {
    Complete(Bytes),
    /// Over `http.max_body_bytes`; read to its end (or past the drain bound).
    TooLarge,
    Failed(axum::Error),
}

/// Reads `body`, keeping at most `limit` bytes; past it, discards up to `drain` bytes more.
async fn read_within(mut body: Body, limit: usize, drain: usize) -> Read {
    use http_body_util::BodyExt;
    let mut kept = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => return Read::Failed(e),
        };
        let Ok(data) = frame.into_data() else { continue };
        total += data.len();
        if total > drain {
            return Read::TooLarge;
        }
        if total <= limit {
            kept.extend_from_slice(&data);
        }
    }
    if total > limit {
        Read::TooLarge
    } else {
        Read::Complete(Bytes::from(kept))
    }
}

/// Reads the whole body within `http.body_read_timeout` before the handler runs, so a client
/// that declares a body and sends it slowly (or never) gets `408` instead of holding a task,
/// and one over `http.max_body_bytes` gets `413`.
pub async fn read_body(State(edge): State<Edge>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let drain = edge.max_body_bytes.saturating_mul(DRAIN_FACTOR);
    if declared.is_some_and(|n| n > drain as u64) {
        return too_large();
    }
    let (parts, body) = request.into_parts();
    let read = read_within(body, edge.max_body_bytes, drain);
    let bytes = match tokio::time::timeout(edge.body_read_timeout, read).await {
        Ok(Read::Complete(bytes)) => bytes,
        Ok(Read::TooLarge) => return too_large(),
        Ok(Read::Failed(e)) => {
            return ApiError::bad_request(format!("cannot read the request body: {e}")).into_response();
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {:?} (http.body_read_timeout)",
                    edge.body_read_timeout
                ),
            )
            .into_response();
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

/// Refuses, before any handler reads a view, a path or query parameter PostgreSQL could not
/// take (U+0000) or that exceeds the parameter limit: `400` naming it.
pub async fn check_params(
    path: Result<RawPathParams, RawPathParamsRejection>,
    request: Request,
    next: Next,
) -> Response {
    // A path that does not decode is the handler's extractor's to refuse.
    if let Ok(path) = path {
        for (name, value) in &path {
            if let Err(e) = validate::check_param(name.to_owned(), value) {
                return ApiError::bad_param(e).into_response();
            }
        }
    }
    if let Some(query) = request.uri().query() {
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let field = || name.replace('\0', "\\0");
            if name.contains('\0') {
                return ApiError::bad_param(validate::ValidationError::new(
                    field(),
                    "parameter names must not contain U+0000 (NUL)",
                ))
                .into_response();
            }
            if let Err(e) = validate::check_param(field(), &value) {
                return ApiError::bad_param(e).into_response();
            }
        }
    }
    next.run(request).await
}

/// Serves `router` on `listener` until `shutdown`, with hyper's header read timer; then stops
/// accepting, lets each connection finish its request in flight, and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        while connections.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let mut connection = pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}
