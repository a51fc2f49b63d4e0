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
//! - At most [`HttpApiConfig::max_concurrent_executions`] queries and ingress inspections run at
//!   once; a request that cannot get a slot within [`HttpApiConfig::execution_permit_wait`] gets
//!   503. Request bodies must arrive within [`HttpApiConfig::body_read_timeout`] (else 408).
//! - `replica_health_status` is `healthy` only while the latest certified state is younger than
//!   [`HttpApiConfig::max_certified_age`] and [`HttpApiDeps::node_health`] reports no failure;
//!   calls are refused with 503 while the node reports that it stopped making blocks.
//! - [`serve`] bounds connections in number (overall and per client address) and in time; see
//!   its module for the shedding order and the timeouts.

mod call;
mod cbor;
mod envelope;
mod error;
mod metrics;
mod query;
mod query_costs;
mod read_state;
mod server;
mod status;
#[cfg(test)]
mod test_support;

use axum::Router;
use axum::http::Method;
use axum::routing::{get, post};
use openic_interfaces::{CertifiedStateReader, IngressInspector, IngressPool, QueryExecutor};
use openic_types::{SubnetId, Time};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_http::cors::{Any, CorsLayer};

pub use envelope::validate_ingress_envelope;
pub use error::ApiError;
pub use metrics::HttpMetrics;
pub use server::{
    ConnectionLimits, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_SEND_TIMEOUT, MAX_DEFAULT_CONNECTIONS,
    RESERVED_FILE_DESCRIPTORS, ResolvedLimits, ServerHandle, default_max_connections, serve,
};

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
    /// Most queries running at once; each occupies a blocking thread and up to a canister's
    /// memory. At least 1.
    pub max_concurrent_executions: usize,
    /// Most update calls being checked by `canister_inspect_message` at once: their own slots,
    /// so queries can never delay or refuse an update call's admission. At least 1.
    pub max_concurrent_inspections: usize,
    /// How long a query or call waits for a slot before it is answered 503 (which ic-agent
    /// retries).
    pub execution_permit_wait: Duration,
    /// Queries of a method that recently averaged at least this long are expensive: they may hold
    /// at most all but one of the `max_concurrent_executions` slots, so cheap queries always find
    /// one (Note [query lanes] in `query_costs`).
    pub expensive_query_from: Duration,
    /// How long the whole request body may take to arrive; slower requests get 408.
    pub body_read_timeout: Duration,
    /// The status endpoint reports `healthy` only while the latest certified state's `/time` is
    /// younger than this (the node certifies at least every idle block interval, about a second).
    pub max_certified_age: Duration,
    /// Caps and timeouts of the server's connections ([`serve`]).
    pub connections: ConnectionLimits,
}

/// The default [`HttpApiConfig::max_concurrent_executions`]: twice the available parallelism,
/// and at least 2.
pub fn default_max_concurrent_executions() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    cores.saturating_mul(2).max(2)
}

/// Default [`HttpApiConfig::expensive_query_from`].
pub const DEFAULT_EXPENSIVE_QUERY_FROM: Duration = Duration::from_millis(10);

/// Default [`HttpApiConfig::execution_permit_wait`].
pub const DEFAULT_EXECUTION_PERMIT_WAIT: Duration = Duration::from_secs(5);

/// Default [`HttpApiConfig::body_read_timeout`].
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Default [`HttpApiConfig::max_certified_age`].
pub const DEFAULT_MAX_CERTIFIED_AGE: Duration = Duration::from_secs(60);

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
            max_concurrent_executions: default_max_concurrent_executions(),
            max_concurrent_inspections: default_max_concurrent_executions(),
            execution_permit_wait: DEFAULT_EXECUTION_PERMIT_WAIT,
            expensive_query_from: DEFAULT_EXPENSIVE_QUERY_FROM,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            max_certified_age: DEFAULT_MAX_CERTIFIED_AGE,
            connections: ConnectionLimits::default(),
        }
    }
}

/// A source of wall-clock time (nanoseconds since the epoch), injected so tests control it.
pub type Clock = Arc<dyn Fn() -> Time + Send + Sync>;

/// Whether the node still makes blocks: `None` while it does, `Some(reason)` once it stopped
/// (e.g. the block log could not be written). Called on every status request and call.
pub type NodeHealth = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// A [`NodeHealth`] that never reports a failure (for tests, fuzzing, and embedders that have no
/// block maker to watch).
pub fn always_healthy() -> NodeHealth {
    Arc::new(|| None)
}

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
    /// Whether the node still makes blocks ([`always_healthy`] if nothing can stop it).
    pub node_health: NodeHealth,
}

/// Shared state of every handler.
pub(crate) struct AppState {
    pub(crate) config: HttpApiConfig,
    pub(crate) deps: HttpApiDeps,
    /// Slots for queries (`max_concurrent_executions`).
    pub(crate) executions: Arc<Semaphore>,
    /// The expensive lane: all but one of the query slots (Note [query lanes]).
    pub(crate) expensive_executions: Arc<Semaphore>,
    /// Recent costs of query methods, which decide the lane.
    pub(crate) query_costs: query_costs::QueryCosts,
    /// The lower-priority threads expensive queries run on (`None` if they could not be started:
    /// expensive queries then run on the blocking pool like cheap ones).
    pub(crate) expensive_threads: Option<query_costs::ExpensiveThreads>,
    /// Slots for update calls' `canister_inspect_message` (`max_concurrent_inspections`).
    pub(crate) inspections: Arc<Semaphore>,
}

impl AppState {
    pub(crate) fn now(&self) -> Time {
        (self.deps.clock)()
    }

    /// Why the node stopped making blocks, if it did.
    pub(crate) fn halted(&self) -> Option<String> {
        (self.deps.node_health)()
    }

    /// `Err(503)` if the node stopped making blocks (a call would never execute).
    pub(crate) fn check_making_blocks(&self) -> Result<(), ApiError> {
        match self.halted() {
            None => Ok(()),
            Some(reason) => Err(ApiError::Unavailable(format!(
                "the node stopped making blocks: {reason}; see its log"
            ))),
        }
    }

    /// A query slot, waiting at most `execution_permit_wait`. Move the permit into the blocking
    /// task so the slot stays taken until the execution ends, even if the client leaves.
    pub(crate) async fn execution_permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.permit(
            &self.executions,
            self.config.max_concurrent_executions,
            "queries are running",
        )
        .await
    }

    /// A place in the expensive lane (Note [query lanes]), taken before the query slot by queries
    /// of a method that recently ran long.
    pub(crate) async fn expensive_permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.permit(
            &self.expensive_executions,
            expensive_slots(self.config.max_concurrent_executions),
            "expensive queries are running (methods that recently took over \
             expensive_query_from)",
        )
        .await
    }

    /// A slot for an update call's `canister_inspect_message` (separate from the query slots).
    pub(crate) async fn inspection_permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.permit(
            &self.inspections,
            self.config.max_concurrent_inspections,
            "update calls are being checked by canister_inspect_message",
        )
        .await
    }

    async fn permit(
        &self,
        slots: &Arc<Semaphore>,
        max: usize,
        busy: &str,
    ) -> Result<OwnedSemaphorePermit, ApiError> {
        let wait = self.config.execution_permit_wait;
        match tokio::time::timeout(wait, slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_closed)) => Err(ApiError::Internal(
                "the execution limiter was closed; the node is shutting down".into(),
            )),
            Err(_elapsed) => Err(ApiError::Unavailable(format!(
                "too many {busy} (at most {max} at once, waited {} ms for a slot); retry after {} s",
                wait.as_millis(),
                error::RETRY_AFTER_SECONDS
            ))),
        }
    }
}

pub(crate) type SharedState = Arc<AppState>;

/// Slots of the expensive lane: all but one of `max_concurrent_executions` (at least one).
fn expensive_slots(max_concurrent_executions: usize) -> usize {
    max_concurrent_executions.saturating_sub(1).max(1)
}

/// The router serving the whole interface (with CORS for browsers and request metrics).
pub fn router(config: HttpApiConfig, deps: HttpApiDeps) -> Router {
    let executions = Arc::new(Semaphore::new(config.max_concurrent_executions.max(1)));
    let expensive_executions = Arc::new(Semaphore::new(expensive_slots(
        config.max_concurrent_executions,
    )));
    let inspections = Arc::new(Semaphore::new(config.max_concurrent_inspections.max(1)));
    let query_costs = query_costs::QueryCosts::new(config.expensive_query_from);
    let expensive_threads = match query_costs::ExpensiveThreads::start(expensive_slots(
        config.max_concurrent_executions,
    )) {
        Ok(threads) => Some(threads),
        Err(error) => {
            tracing::warn!(%error, "cannot start the expensive-query threads; expensive queries run at the default priority");
            None
        }
    };
    let state: SharedState = Arc::new(AppState {
        config,
        deps,
        executions,
        expensive_executions,
        query_costs,
        expensive_threads,
        inspections,
    });
    // Any request header: the JS agent adds `Authorization` when the URL carries credentials,
    // and browsers preflight every non-simple header. No response header needs exposing.
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers(Any);
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

#[cfg(test)]
mod tests {
    use crate::test_support::TestNode;
    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use tower::ServiceExt as _;

    #[tokio::test]
    async fn cors_preflight_allows_any_request_header() {
        let node = TestNode::new();
        let request = Request::builder()
            .method("OPTIONS")
            .uri("/api/v3/canister/ryjl3-tyaaa-aaaaa-aaaba-cai/query")
            .header(header::ORIGIN, "https://example.org")
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(
                header::ACCESS_CONTROL_REQUEST_HEADERS,
                "authorization,content-type,x-custom",
            )
            .body(Body::empty())
            .unwrap();
        let response = node.router().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_HEADERS], "*");
        assert!(!headers.contains_key(header::ACCESS_CONTROL_EXPOSE_HEADERS));
    }
}
