//! The public IC HTTP interface, served with axum: `GET /api/v2/status`; `call` (v2 asynchronous,
//! v3 and v4 synchronous); `query` (v2, v3); `read_state` (v2, v3), on canister and subnet
//! endpoints. Bodies are CBOR (tag 55799 accepted with or without, always sent).
//!
//! Invariants:
//! - Nothing reaches the ingress pool or the query executor unless its envelope decoded, its request
//!   id was computed over the content map exactly as received, its signature and delegations
//!   verified, its sender matches its key, its expiry lies in the window, and its sizes are within
//!   the limits of [`HttpApiConfig`].
//! - Errors found here are answered with a 4xx/5xx `text/plain` body that names what was wrong. The
//!   status codes are chosen for the official clients: 429 and 503 make ic-agent retry, and v4 call
//!   never answers 404 (the JS agent would fall back to v2).
//! - Wall-clock time comes only from the injected clock ([`HttpApiDeps::clock`]).

mod call;
mod cbor;
mod envelope;
mod error;
mod metrics;
mod query;
mod read_state;
mod status;
#[cfg(test)]
mod test_support;

use axum::Router;
use axum::http::{Method, header};
use axum::routing::{get, post};
use openic_interfaces::{CertifiedStateReader, IngressInspector, IngressPool, QueryExecutor};
use openic_types::{SubnetId, Time};
use std::sync::Arc;
use std::time::Duration;
use tower_http::cors::{Any, CorsLayer};

pub use error::ApiError;
pub use metrics::HttpMetrics;

/// Limits and timeouts of the HTTP interface.
#[derive(Clone, Debug)]
pub struct HttpApiConfig {
    /// Largest `arg` of a call or query, in bytes (the IC's ingress limit is 2 MiB).
    pub max_ingress_bytes: usize,
    /// Largest HTTP request body, in bytes: the argument plus room for the envelope (keys,
    /// signatures, delegations). Larger bodies get 413.
    pub max_body_bytes: usize,
    /// How long a synchronous (v3/v4) call waits for a terminal status before answering 202.
    pub sync_call_timeout: Duration,
    /// Most paths in one `read_state` request.
    pub max_read_state_paths: usize,
    /// Most labels in one `read_state` path.
    pub max_path_labels: usize,
    /// Longest accepted time from now to `ingress_expiry` (before drift).
    pub max_ingress_ttl: Duration,
    /// Clock drift tolerated on top of `max_ingress_ttl`.
    pub permitted_drift: Duration,
}

/// Default largest argument: 2 MiB, the IC's ingress message limit.
pub const DEFAULT_MAX_INGRESS_BYTES: usize = 2 * 1024 * 1024;

/// Room for the envelope around the argument: 64 KiB is ample for keys, signatures and a full
/// delegation chain.
pub const ENVELOPE_OVERHEAD_BYTES: usize = 64 * 1024;

impl Default for HttpApiConfig {
    fn default() -> Self {
        HttpApiConfig {
            max_ingress_bytes: DEFAULT_MAX_INGRESS_BYTES,
            max_body_bytes: DEFAULT_MAX_INGRESS_BYTES + ENVELOPE_OVERHEAD_BYTES,
            sync_call_timeout: Duration::from_secs(10),
            max_read_state_paths: 1000,
            max_path_labels: 127,
            max_ingress_ttl: Duration::from_secs(5 * 60),
            permitted_drift: Duration::from_secs(30),
        }
    }
}

/// A source of wall-clock time (nanoseconds since the epoch), injected so tests control it.
pub type Clock = Arc<dyn Fn() -> Time + Send + Sync>;

/// The components the HTTP interface talks to.
#[derive(Clone)]
pub struct HttpApiDeps {
    /// Where accepted update calls go.
    pub ingress_pool: Arc<dyn IngressPool>,
    /// Runs the non-replicated checks (inspect_message, effective canister id of management
    /// calls, canister existence) before a call is accepted.
    pub inspector: Arc<dyn IngressInspector>,
    /// Runs queries.
    pub query_executor: Arc<dyn QueryExecutor>,
    /// Certified state: heights, statuses, certificates.
    pub certified_state: Arc<dyn CertifiedStateReader>,
    /// The node's key, which signs query responses.
    pub node_key: Arc<openic_crypto::NodeKey>,
    /// The root (subnet) public key, 133-byte DER, served by `/api/v2/status`.
    pub root_key_der: Vec<u8>,
    /// This subnet's id (subnet endpoints accept only it).
    pub subnet_id: SubnetId,
    /// Wall-clock time.
    pub clock: Clock,
    /// Request metrics.
    pub metrics: Arc<HttpMetrics>,
}

/// Shared state of every handler.
pub(crate) struct AppState {
    pub(crate) config: HttpApiConfig,
    pub(crate) deps: HttpApiDeps,
}

impl AppState {
    pub(crate) fn now(&self) -> Time {
        (self.deps.clock)()
    }
}

pub(crate) type SharedState = Arc<AppState>;

/// The router serving the whole interface (with CORS for browsers and request metrics).
pub fn router(config: HttpApiConfig, deps: HttpApiDeps) -> Router {
    let state: SharedState = Arc::new(AppState { config, deps });
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([header::CONTENT_TYPE]);
    Router::new()
        .route("/api/v2/status", get(status::status))
        .route("/api/v2/canister/{id}/call", post(call::canister_v2))
        .route("/api/v3/canister/{id}/call", post(call::canister_v3))
        .route("/api/v4/canister/{id}/call", post(call::canister_v4))
        .route("/api/v4/subnet/{id}/call", post(call::subnet_v4))
        .route("/api/v2/canister/{id}/query", post(query::canister))
        .route("/api/v3/canister/{id}/query", post(query::canister))
        .route("/api/v3/subnet/{id}/query", post(query::subnet))
        .route(
            "/api/v2/canister/{id}/read_state",
            post(read_state::canister),
        )
        .route(
            "/api/v3/canister/{id}/read_state",
            post(read_state::canister),
        )
        .route("/api/v2/subnet/{id}/read_state", post(read_state::subnet))
        .route("/api/v3/subnet/{id}/read_state", post(read_state::subnet))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(cors)
        .with_state(state)
}
