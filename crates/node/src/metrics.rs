//! Node-level Prometheus metrics and the `/metrics` endpoint.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Metrics of the block thread.
pub struct NodeMetrics {
    /// Latest executed (and certified) height.
    pub height: Gauge,
    /// Number of canisters.
    pub canisters: Gauge,
    /// Ingress messages put into blocks.
    pub ingress_inducted: Counter,
    /// Messages executed.
    pub messages_executed: Counter,
    /// Instructions executed.
    pub instructions_executed: Counter,
    /// Time to append a block to the log (durably), in seconds.
    pub block_log_append_duration_seconds: Histogram,
    /// Time to execute a block, in seconds.
    pub block_execution_duration_seconds: Histogram,
    /// Time to certify a state, in seconds.
    pub certification_duration_seconds: Histogram,
    /// Time to write a checkpoint, in seconds.
    pub checkpoint_duration_seconds: Histogram,
    /// States that should be impossible but were survived (each has a matching error log line).
    pub critical_errors: Counter,
    /// Latest height whose state readers see (certified by the subnet's key).
    pub certified_height: Gauge,
    /// 1 while this replica's state differs from the one its subnet certified (it then serves no
    /// certified answers), else 0.
    pub state_diverged: Gauge,
    /// Certification shares from peers refused as invalid (bad signature, unknown signer,
    /// equivocation, malformed).
    pub certification_shares_refused: Counter,
    /// Height of the latest catch-up checkpoint the subnet signed that this replica serves.
    pub catch_up_height: Gauge,
    /// States installed by state sync.
    pub state_syncs: Counter,
    /// State-sync fetches that failed (each is retried or given up with a log line).
    pub state_sync_failures: Counter,
    /// Chunk bytes received by state sync.
    pub state_sync_bytes: Counter,
}

impl NodeMetrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let seconds = || Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let metrics = NodeMetrics {
            height: Gauge::default(),
            canisters: Gauge::default(),
            ingress_inducted: Counter::default(),
            messages_executed: Counter::default(),
            instructions_executed: Counter::default(),
            block_log_append_duration_seconds: seconds(),
            block_execution_duration_seconds: seconds(),
            certification_duration_seconds: seconds(),
            checkpoint_duration_seconds: seconds(),
            critical_errors: Counter::default(),
            certified_height: Gauge::default(),
            state_diverged: Gauge::default(),
            certification_shares_refused: Counter::default(),
            catch_up_height: Gauge::default(),
            state_syncs: Counter::default(),
            state_sync_failures: Counter::default(),
            state_sync_bytes: Counter::default(),
        };
        registry.register(
            "height",
            "Latest executed and certified height",
            metrics.height.clone(),
        );
        registry.register(
            "canisters",
            "Number of canisters on the subnet",
            metrics.canisters.clone(),
        );
        registry.register(
            "ingress_inducted",
            "Ingress messages put into blocks",
            metrics.ingress_inducted.clone(),
        );
        registry.register(
            "messages_executed",
            "Messages executed (ingress, calls, responses, tasks)",
            metrics.messages_executed.clone(),
        );
        registry.register(
            "instructions_executed",
            "Wasm instructions executed",
            metrics.instructions_executed.clone(),
        );
        registry.register(
            "block_log_append_duration_seconds",
            "Time to append a block durably",
            metrics.block_log_append_duration_seconds.clone(),
        );
        registry.register(
            "block_execution_duration_seconds",
            "Time to execute a block",
            metrics.block_execution_duration_seconds.clone(),
        );
        registry.register(
            "certification_duration_seconds",
            "Time to hash and sign a state",
            metrics.certification_duration_seconds.clone(),
        );
        registry.register(
            "checkpoint_duration_seconds",
            "Time to write a checkpoint",
            metrics.checkpoint_duration_seconds.clone(),
        );
        registry.register(
            "critical_errors",
            "Impossible but survived states; see the error log",
            metrics.critical_errors.clone(),
        );
        registry.register(
            "certified_height",
            "Latest height certified by the subnet's key and served to readers",
            metrics.certified_height.clone(),
        );
        registry.register(
            "state_diverged",
            "1 while this replica's state differs from the subnet's certified state",
            metrics.state_diverged.clone(),
        );
        registry.register(
            "certification_shares_refused",
            "Invalid certification shares received from peers",
            metrics.certification_shares_refused.clone(),
        );
        registry.register(
            "catch_up_height",
            "Latest catch-up checkpoint signed by the subnet and served to peers",
            metrics.catch_up_height.clone(),
        );
        registry.register(
            "state_syncs",
            "States fetched from peers and installed by state sync",
            metrics.state_syncs.clone(),
        );
        registry.register(
            "state_sync_failures",
            "State-sync fetches that failed",
            metrics.state_sync_failures.clone(),
        );
        registry.register(
            "state_sync_bytes",
            "Chunk bytes received by state sync",
            metrics.state_sync_bytes.clone(),
        );
        metrics
    }
}

/// `GET /metrics` in the Prometheus text format.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .with_state(registry)
}

async fn serve_metrics(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("could not encode metrics: {error}"),
        ),
    }
}
