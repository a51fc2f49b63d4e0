//! Request metrics: counts by endpoint and HTTP status, and latency by endpoint; connection
//! metrics: open connections, and the connections the server closed, by reason.

use crate::SharedState;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Instant;

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route pattern, e.g. `/api/v4/canister/{id}/call` (bounded cardinality).
    pub endpoint: String,
    /// The HTTP status code.
    pub status: u16,
}

/// Labels of the closed-connection counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// Why it closed: `client_or_done` (the client closed it, or an error ended it), or the
    /// server's reason (`header_timeout`, `send_timeout`, `shed_idle_per_ip`, `shed_idle_full`,
    /// `refused_per_ip`, `refused_full`, `shutdown`).
    pub reason: String,
}

/// Labels of the latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// The route pattern.
    pub endpoint: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~33 s: covers queries and synchronous calls up to their timeout.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Metrics of the HTTP interface.
#[derive(Debug)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    latency_seconds: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    connections_open: Gauge,
    connections_accepted: Counter,
    connections_closed: Family<CloseLabels, Counter>,
}

impl HttpMetrics {
    /// Creates the metrics and registers them in `registry` (names get the registry's prefix).
    pub fn register(registry: &mut Registry) -> HttpMetrics {
        let metrics = HttpMetrics::unregistered();
        registry.register(
            "http_requests",
            "HTTP requests served, by endpoint and status code",
            metrics.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by endpoint",
            metrics.latency_seconds.clone(),
        );
        registry.register(
            "http_connections_open",
            "HTTP connections open now",
            metrics.connections_open.clone(),
        );
        registry.register(
            "http_connections_accepted",
            "HTTP connections admitted",
            metrics.connections_accepted.clone(),
        );
        registry.register(
            "http_connections_closed",
            "HTTP connections closed or refused, by reason",
            metrics.connections_closed.clone(),
        );
        metrics
    }

    /// Metrics that are not exported anywhere (tests, tools).
    pub fn unregistered() -> HttpMetrics {
        HttpMetrics {
            requests: Family::default(),
            latency_seconds: Family::new_with_constructor(latency_histogram),
            connections_open: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_closed: Family::default(),
        }
    }

    /// Requests counted so far for `endpoint` with `status`.
    pub fn request_count(&self, endpoint: &str, status: u16) -> u64 {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_string(),
                status,
            })
            .get()
    }

    /// Connections closed or refused for `reason` so far.
    pub fn connections_closed(&self, reason: &str) -> u64 {
        self.connections_closed
            .get_or_create(&CloseLabels {
                reason: reason.to_string(),
            })
            .get()
    }

    /// Connections open now.
    pub fn connections_open(&self) -> i64 {
        self.connections_open.get()
    }

    pub(crate) fn connection_opened(&self, open: usize) {
        self.connections_accepted.inc();
        self.connections_open
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    pub(crate) fn connection_closed(&self, reason: &str, open: usize) {
        self.connections_closed
            .get_or_create(&CloseLabels {
                reason: reason.to_string(),
            })
            .inc();
        self.connections_open
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    fn observe(&self, endpoint: String, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.clone(),
                status,
            })
            .inc();
        self.latency_seconds
            .get_or_create(&EndpointLabels { endpoint })
            .observe(seconds);
    }
}

/// Middleware recording every routed request.
pub(crate) async fn track(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let seconds = started.elapsed().as_secs_f64();
    tracing::debug!(%endpoint, status, seconds, "http request");
    state.deps.metrics.observe(endpoint, status, seconds);
    response
}
