//! API errors: a status, a stable machine-readable code, a message for people, and the
//! offending field when there is one.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use memos_schemas::memory::ValidationError;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// An internal failure: logged in full, answered without details.
    pub fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(error = %error, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{context}; see the server log"),
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self)).into_response()
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        let (status, code) = if e.is_too_large() {
            (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
        } else {
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid")
        };
        ApiError::new(status, code, e.message).with_field(e.field)
    }
}

impl ApiError {
    /// A read parameter (path, query, search body) that breaks a rule of
    /// `memos_schemas::validate`: `400`, naming the parameter.
    pub fn bad_param(e: ValidationError) -> Self {
        ApiError::bad_request(e.message).with_field(e.field)
    }
}

/// The body field a deserialization error is about (`expires_at`, `steps[2].timeout_ms`), when
/// it is about one; `.` is the whole body.
fn field_of(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(e) = e.downcast_ref::<serde_path_to_error::Error<serde_json::Error>>() {
            let path = e.path().to_string();
            return (path != ".").then_some(path);
        }
        cause = e.source();
    }
    None
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => {
                let field = field_of(&e);
                let error = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.body_text());
                match field {
                    Some(field) => error.with_field(field),
                    None => error,
                }
            }
            JsonRejection::JsonSyntaxError(e) => {
                ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.body_text())
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected Content-Type: application/json",
            ),
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "request body is too large",
            ),
            other => ApiError::new(other.status(), "bad_request", other.body_text()),
        }
    }
}
