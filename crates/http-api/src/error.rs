//! Errors answered before a request reaches a canister, as HTTP status codes with a `text/plain`
//! body that says what was wrong.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use openic_interfaces::CertificationError;

/// A request the HTTP layer refuses (or cannot serve right now).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Malformed envelope, bad signature, expiry out of range, wrong effective id: 400.
    #[error("{0}")]
    BadRequest(String),
    /// The sender may not do this (delegation targets, read_state authorisation): 403.
    #[error("{0}")]
    Forbidden(String),
    /// The request body did not arrive in time: 408.
    #[error("{0}")]
    RequestTimeout(String),
    /// Body or argument over the size limit: 413.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The ingress pool is full (ic-agent retries 429): 429.
    #[error("{0}")]
    TooManyRequests(String),
    /// The node cannot serve this yet, e.g. no certified state (ic-agent retries 503): 503.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a crashed worker: 500.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<CertificationError> for ApiError {
    fn from(error: CertificationError) -> Self {
        match error {
            CertificationError::NotYetCertified => {
                ApiError::Unavailable(format!("{error}; retry in a few seconds"))
            }
            CertificationError::InvalidPath(_) => ApiError::BadRequest(error.to_string()),
        }
    }
}

/// The `Retry-After` of a 429 or 503, in seconds.
pub const RETRY_AFTER_SECONDS: &str = "1";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(%status, error = %self, "request failed");
        } else {
            tracing::debug!(%status, error = %self, "request refused");
        }
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.to_string(),
        )
            .into_response();
        // Busy, not broken: say when to come back (the body says what was busy).
        if matches!(
            self,
            ApiError::Unavailable(_) | ApiError::TooManyRequests(_)
        ) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}
