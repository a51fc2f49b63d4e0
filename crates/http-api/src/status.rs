//! `GET /api/v2/status`: the replica's version, health and root key.

use crate::SharedState;
use crate::cbor::{bytes, map, nat, response, text};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

/// The interface spec version this replica implements.
pub(crate) const IC_API_VERSION: &str = "0.18.0";

/// The status map. No floats: ic-agent's status parser refuses them.
pub(crate) async fn status(State(state): State<SharedState>) -> Response {
    let height = state.deps.certified_state.certified_height();
    let health = if height.0 > 0 {
        "healthy"
    } else {
        "waiting_for_certified_state"
    };
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

#[cfg(test)]
mod tests {
    use crate::test_support::TestNode;
    use axum::http::StatusCode;
    use openic_types::Height;
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
}
