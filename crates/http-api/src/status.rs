//! `GET /api/v2/status`: the replica's version, health and root key.

use crate::cbor::{bytes, map, nat, response, text};
use crate::{AppState, SharedState};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use openic_types::{Height, Time};

/// The interface spec version this replica implements.
pub(crate) const IC_API_VERSION: &str = "0.18.0";

/// `replica_health_status` values (the IC's `ReplicaHealthStatus`).
const HEALTHY: &str = "healthy";
const WAITING_FOR_CERTIFIED_STATE: &str = "waiting_for_certified_state";
const CERTIFIED_STATE_BEHIND: &str = "certified_state_behind";

/// The status map. No floats: ic-agent's status parser refuses them.
pub(crate) async fn status(State(state): State<SharedState>) -> Response {
    let reader = &state.deps.certified_state;
    let height = reader.certified_height();
    let health = health(&state, height, reader.certified_time());
    response(
        StatusCode::OK,
        &map([
            ("ic_api_version", text(IC_API_VERSION)),
            ("impl_version", text(env!("CARGO_PKG_VERSION"))),
            ("root_key", bytes(&state.deps.root_key_der)),
            ("replica_health_status", text(health)),
            ("certified_height", nat(height.0)),
        ]),
    )
}

/// `healthy` only while the node makes blocks and its certified state is fresh: a node whose
/// block maker stopped still answers reads from an ever older state, and tools that wait for
/// `healthy` must not mistake that for a working replica.
fn health(state: &AppState, height: Height, certified_time: Time) -> &'static str {
    if let Some(reason) = state.halted() {
        tracing::debug!(%reason, "status: the node stopped making blocks");
        return CERTIFIED_STATE_BEHIND;
    }
    if height.0 == 0 {
        return WAITING_FOR_CERTIFIED_STATE;
    }
    let age = state.now().0.saturating_sub(certified_time.0);
    if u128::from(age) < state.config.max_certified_age.as_nanos() {
        HEALTHY
    } else {
        CERTIFIED_STATE_BEHIND
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::TestNode;
    use axum::http::StatusCode;
    use openic_types::{Height, Time};
    use serde_cbor::Value;

    #[tokio::test]
    async fn status_has_the_fields_clients_read_and_no_floats() {
        let node = TestNode::new();
        let (status, body) = node.get("/api/v2/status").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..3], &[0xd9, 0xd9, 0xf7], "self-describe tag");
        let value: Value = serde_cbor::from_slice(&body).unwrap();
        let field = |name: &str| crate::test_support::field(&value, name);
        assert_eq!(field("root_key"), Value::Bytes(node.root_key.clone()));
        assert_eq!(node.root_key.len(), 133);
        assert_eq!(field("ic_api_version"), Value::Text("0.18.0".into()));
        assert_eq!(
            field("replica_health_status"),
            Value::Text("waiting_for_certified_state".into())
        );
        node.state.set_height(Height(3));
        let (_, body) = node.get("/api/v2/status").await;
        let value: Value = serde_cbor::from_slice(&body).unwrap();
        let field = |name: &str| crate::test_support::field(&value, name);
        assert_eq!(
            field("replica_health_status"),
            Value::Text("healthy".into())
        );
        assert_eq!(field("certified_height"), Value::Integer(3));
        let has_float = |v: &Value| matches!(v, Value::Float(_));
        let Value::Map(entries) = &value else {
            panic!("not a map")
        };
        assert!(!entries.values().any(has_float));
    }

    async fn health(node: &TestNode) -> Value {
        let (_, body) = node.get("/api/v2/status").await;
        let value: Value = serde_cbor::from_slice(&body).unwrap();
        crate::test_support::field(&value, "replica_health_status")
    }

    #[tokio::test]
    async fn stale_certified_state_or_a_halted_node_is_not_healthy() {
        let node = TestNode::new();
        node.state.set_height(Height(3));
        let now = node.now().0;
        node.state.set_time(Time(now - 59_000_000_000));
        assert_eq!(health(&node).await, Value::Text("healthy".into()));
        node.state.set_time(Time(now - 60_000_000_000));
        assert_eq!(
            health(&node).await,
            Value::Text("certified_state_behind".into())
        );
        node.state.set_time(Time(now));
        node.halt("the block log could not be written");
        assert_eq!(
            health(&node).await,
            Value::Text("certified_state_behind".into())
        );
    }
}
