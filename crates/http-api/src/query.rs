//! `query` (v2 and v3, canister and subnet endpoints): runs the query on the latest certified state
//! and answers with the reply or reject, signed by the node key.
//!
//! Signature: Ed25519 over `"\x0Bic-response" · hash_of_map(R)` with `R = {status: "replied",
//! reply: {arg}, timestamp, request_id}` or `{status: "rejected", reject_code, reject_message,
//! error_code, timestamp, request_id}` (ic-transport-types `QueryResponse::signable`). Every
//! reject carries an `error_code`, so both sides always hash it.

use crate::cbor::{self, bytes, map, nat, text};
use crate::envelope::{self, EffectiveId, RequestKind};
use crate::{ApiError, SharedState};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use openic_crypto::NodeKey;
use openic_crypto::request_id::hash_of_map;
use openic_types::{QueryResult, RequestId, Time, UserError, UserQuery};
use serde_cbor::Value;

/// Domain separator of query response signatures.
pub(crate) const RESPONSE_DOMAIN_SEPARATOR: &[u8] = b"\x0Bic-response";

pub(crate) async fn canister(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    respond(try_handle(state.clone(), EffectiveId::canister(&id), body).await)
}

pub(crate) async fn subnet(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let effective_id = EffectiveId::subnet(&id, state.deps.subnet_id);
    respond(try_handle(state, effective_id, body).await)
}

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn try_handle(
    state: SharedState,
    effective_id: Result<EffectiveId, ApiError>,
    body: Body,
) -> Result<Response, ApiError> {
    let effective_id = effective_id?;
    let body = envelope::read_body(body, &state).await?;
    let request = envelope::decode(&body, RequestKind::Query, &state)?;
    let call = envelope::canister_call(&request, effective_id, &state.config)?;
    let query = UserQuery {
        request_id: request.request_id,
        sender: request.sender,
        canister_id: call.canister_id,
        effective_canister_id: effective_id.as_canister_id(),
        method_name: call.method_name,
        arg: call.arg,
    };
    let executor = state.deps.query_executor.clone();
    // Note [query lanes]: a method that recently ran long first waits for the expensive lane.
    let expensive = state
        .query_costs
        .is_expensive(&query.canister_id, &query.method_name);
    let lane = if expensive {
        Some(state.expensive_permit().await?)
    } else {
        None
    };
    let permit = state.execution_permit().await?;
    let (canister, method) = (query.canister_id, query.method_name.clone());
    let execute = move || {
        // CPU time, not elapsed time: a cheap query slowed down by busy cores stays cheap.
        let started = crate::query_costs::thread_cpu_time();
        let result = executor.query(query);
        let took = crate::query_costs::thread_cpu_time().saturating_sub(started);
        drop(permit);
        drop(lane);
        (result, took)
    };
    let crashed = |e: String| ApiError::Internal(format!("the query executor crashed: {e}"));
    let (result, took) = match (&state.expensive_threads, expensive) {
        (Some(threads), true) => threads.run(execute).await.map_err(crashed)?,
        _ => tokio::task::spawn_blocking(execute)
            .await
            .map_err(|e| crashed(e.to_string()))?,
    };
    state.query_costs.record(canister, method, took);
    let response = signed_response(
        &result,
        &request.request_id,
        state.now(),
        &state.deps.node_key,
    )?;
    Ok(cbor::response(StatusCode::OK, &response))
}

/// The `error_code` sent for a rejection. Rejections always carry one (clients hash it into the
/// signed response only when present, and some display it); when execution named none, a generic
/// code with the right first digit (the reject code) is used.
pub(crate) fn error_code_text(error: &UserError) -> String {
    match error.error_code {
        Some(code) => code.as_str().to_string(),
        None => format!("IC{:02}00", error.code.for_user().as_u64()),
    }
}

/// The fields of the response that are signed, without `timestamp` and `request_id`.
fn response_fields(result: &QueryResult) -> Vec<(&'static str, Value)> {
    match result {
        QueryResult::Reply(arg) => vec![
            ("status", text("replied")),
            ("reply", map([("arg", bytes(arg))])),
        ],
        QueryResult::Reject(error) => vec![
            ("status", text("rejected")),
            ("reject_code", nat(error.code.for_user().as_u64())),
            ("reject_message", text(&error.message)),
            ("error_code", text(&error_code_text(error))),
        ],
    }
}

/// The bytes the node signs for `result` at `timestamp`.
pub(crate) fn signable(
    result: &QueryResult,
    request_id: &RequestId,
    timestamp: Time,
) -> Result<Vec<u8>, ApiError> {
    let mut signed: std::collections::BTreeMap<Value, Value> = response_fields(result)
        .into_iter()
        .map(|(k, v)| (Value::Text(k.to_string()), v))
        .collect();
    signed.insert(Value::Text("timestamp".into()), nat(timestamp.0));
    signed.insert(
        Value::Text("request_id".into()),
        bytes(request_id.as_bytes()),
    );
    let hash = hash_of_map(&signed)
        .map_err(|e| ApiError::Internal(format!("cannot hash the query response: {e}")))?;
    let mut message = RESPONSE_DOMAIN_SEPARATOR.to_vec();
    message.extend_from_slice(&hash);
    Ok(message)
}

/// The full response body: the result plus one node signature.
fn signed_response(
    result: &QueryResult,
    request_id: &RequestId,
    timestamp: Time,
    node_key: &NodeKey,
) -> Result<Value, ApiError> {
    let signature = node_key.sign(&signable(result, request_id, timestamp)?);
    let node_signature = map([
        ("timestamp", nat(timestamp.0)),
        ("signature", bytes(&signature)),
        ("identity", bytes(node_key.node_id().as_slice())),
    ]);
    let mut response: std::collections::BTreeMap<Value, Value> = response_fields(result)
        .into_iter()
        .map(|(k, v)| (Value::Text(k.to_string()), v))
        .collect();
    response.insert(
        Value::Text("signatures".into()),
        Value::Array(vec![node_signature]),
    );
    Ok(Value::Map(response))
}

#[cfg(test)]
mod tests {
    use crate::test_support::{Sender, TestNode, query_content};
    use axum::http::StatusCode;
    use ic_transport_types::QueryResponse;
    use openic_types::{CanisterId, ErrorCode, QueryResult, RejectCode, UserError};

    const CANISTER: u64 = 9;

    fn url() -> String {
        format!("/api/v3/canister/{}/query", CanisterId::from_u64(CANISTER))
    }

    /// Verifies the response exactly as ic-agent does (`query_inner`).
    fn verify_like_ic_agent(node: &TestNode, body: &[u8], request_id: [u8; 32]) -> QueryResponse {
        let response: QueryResponse = serde_cbor::from_slice(body).unwrap();
        assert_eq!(response.signatures().len(), 1);
        let signature = &response.signatures()[0];
        assert_eq!(signature.identity, node.node_key.node_id());
        assert_eq!(signature.timestamp, node.now().0);
        let signable = response.signable(
            ic_transport_types::RequestId::new(&request_id),
            signature.timestamp,
        );
        let der = node.node_key.public_key_der();
        let key = ic_ed25519::PublicKey::deserialize_raw(&der[12..]).unwrap();
        key.verify_signature(&signable, &signature.signature)
            .expect("the node signature verifies like ic-agent checks it");
        response
    }

    #[tokio::test]
    async fn replied_query_is_signed_like_ic_agent_expects() {
        let node = TestNode::new();
        node.queries
            .answer(QueryResult::Reply(b"DIDL\x00\x01\x71\x02hi".to_vec()));
        let sender = Sender::secp256k1(1);
        let (body, request_id) = sender.envelope(query_content(&node, &sender, CANISTER, "greet"));
        let (status, body) = node.post(&url(), body).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        match verify_like_ic_agent(&node, &body, request_id.0) {
            QueryResponse::Replied { reply, .. } => {
                assert_eq!(reply.arg, b"DIDL\x00\x01\x71\x02hi".to_vec())
            }
            other => panic!("unexpected {other:?}"),
        }
        let seen = node.queries.seen();
        assert_eq!(seen[0].method_name, "greet");
        assert_eq!(seen[0].sender, sender.principal());
        assert_eq!(seen[0].request_id, request_id);
    }

    #[tokio::test]
    async fn rejected_query_is_signed_and_never_shows_code_6() {
        let node = TestNode::new();
        node.queries.answer(QueryResult::Reject(UserError {
            code: RejectCode::SysUnknown,
            message: "timed out".into(),
            error_code: None,
        }));
        let sender = Sender::p256(2);
        let (body, request_id) = sender.envelope(query_content(&node, &sender, CANISTER, "x"));
        let (status, body) = node.post(&url(), body).await;
        assert_eq!(status, StatusCode::OK);
        match verify_like_ic_agent(&node, &body, request_id.0) {
            QueryResponse::Rejected { reject, .. } => {
                assert_eq!(reject.reject_code as u8, 2);
                assert_eq!(reject.error_code.as_deref(), Some("IC0200"));
            }
            other => panic!("unexpected {other:?}"),
        }
        node.queries.answer(QueryResult::Reject(UserError::new(
            ErrorCode::CanisterCalledTrap,
            "boom",
        )));
        let (body, request_id) = sender.envelope(query_content(&node, &sender, CANISTER, "y"));
        let (_, body) = node.post(&url(), body).await;
        match verify_like_ic_agent(&node, &body, request_id.0) {
            QueryResponse::Rejected { reject, .. } => {
                assert_eq!(reject.error_code.as_deref(), Some("IC0503"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn anonymous_query_with_any_expiry_and_management_queries_pass() {
        let node = TestNode::new();
        let sender = crate::test_support::Sender::anonymous();
        let mut content = query_content(&node, &sender, CANISTER, "greet");
        content.insert(
            serde_cbor::Value::Text("ingress_expiry".into()),
            serde_cbor::Value::Integer(1),
        );
        let (body, _) = sender.envelope(content);
        assert_eq!(node.post(&url(), body).await.0, StatusCode::OK);
        let mut content = query_content(&node, &sender, CANISTER, "canister_status");
        content.insert(
            serde_cbor::Value::Text("canister_id".into()),
            serde_cbor::Value::Bytes(vec![]),
        );
        let (body, _) = sender.envelope(content);
        assert_eq!(node.post(&url(), body).await.0, StatusCode::OK);
        let seen = node.queries.seen();
        assert!(seen[1].canister_id.is_management());
        assert_eq!(
            seen[1].effective_canister_id,
            CanisterId::from_u64(CANISTER)
        );
    }

    #[tokio::test]
    async fn queries_beyond_the_execution_limit_wait_then_get_503() {
        let node = TestNode::with_config(crate::HttpApiConfig {
            max_concurrent_executions: 1,
            execution_permit_wait: std::time::Duration::from_millis(50),
            ..crate::HttpApiConfig::default()
        });
        node.queries.take(std::time::Duration::from_millis(600));
        let sender = crate::test_support::Sender::anonymous();
        let (first, _) = sender.envelope(query_content(&node, &sender, CANISTER, "slow"));
        let (second, _) = sender.envelope(query_content(&node, &sender, CANISTER, "other"));
        let url = url();
        let slow = node.post(&url, first);
        let crowded = async {
            // Let the first query take the only slot.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            node.post(&url, second).await
        };
        let ((slow_status, _), (status, text)) = tokio::join!(slow, crowded);
        assert_eq!(slow_status, StatusCode::OK);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            String::from_utf8_lossy(&text).starts_with("too many queries are running"),
            "{}",
            String::from_utf8_lossy(&text)
        );
        assert_eq!(node.queries.seen().len(), 1);
        // Once the slot is free, queries run again.
        node.queries.take(std::time::Duration::ZERO);
        let (again, _) = sender.envelope(query_content(&node, &sender, CANISTER, "again"));
        assert_eq!(node.post(&url, again).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn busy_query_slots_never_hold_up_an_update_call() {
        let node = TestNode::with_config(crate::HttpApiConfig {
            max_concurrent_executions: 1,
            execution_permit_wait: std::time::Duration::from_millis(50),
            ..crate::HttpApiConfig::default()
        });
        node.queries.take(std::time::Duration::from_millis(600));
        let sender = crate::test_support::Sender::anonymous();
        let (query, _) = sender.envelope(query_content(&node, &sender, CANISTER, "slow"));
        let (crowded, _) = sender.envelope(query_content(&node, &sender, CANISTER, "other"));
        let (call, _) = sender.envelope(crate::test_support::call_content(
            &node, &sender, CANISTER, "inc",
        ));
        let call_url = format!("/api/v2/canister/{}/call", CanisterId::from_u64(CANISTER));
        let query_url = url();
        let slow = node.post(&query_url, query);
        let others = async {
            // The slow query holds the only query slot.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let started = std::time::Instant::now();
            let call = node.post(&call_url, call).await;
            let call_took = started.elapsed();
            let refused = node.post_full(&query_url, crowded).await;
            (call, call_took, refused)
        };
        let ((slow_status, _), ((call_status, _), call_took, refused)) = tokio::join!(slow, others);
        assert_eq!(slow_status, StatusCode::OK);
        assert_eq!(
            call_status,
            StatusCode::ACCEPTED,
            "the update call is admitted"
        );
        assert!(
            call_took < std::time::Duration::from_millis(300),
            "without waiting for the query slot: {call_took:?}"
        );
        // The refused query says what was busy and when to retry.
        let (status, headers, text) = refused;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            String::from_utf8_lossy(&text).starts_with("too many queries are running"),
            "{}",
            String::from_utf8_lossy(&text)
        );
        assert_eq!(
            headers.get(axum::http::header::RETRY_AFTER).unwrap(),
            crate::error::RETRY_AFTER_SECONDS
        );
    }

    #[tokio::test]
    async fn cheap_queries_find_a_slot_while_expensive_ones_loop() {
        let node = TestNode::with_config(crate::HttpApiConfig {
            max_concurrent_executions: 2,
            ..crate::HttpApiConfig::default()
        });
        let slow = std::time::Duration::from_millis(400);
        node.queries.take_for("scan", slow);
        let sender = crate::test_support::Sender::anonymous();
        let envelope = |method: &str| {
            sender
                .envelope(query_content(&node, &sender, CANISTER, method))
                .0
        };
        let url = url();
        // The node learns that `scan` is expensive.
        assert_eq!(node.post(&url, envelope("scan")).await.0, StatusCode::OK);
        // Two scans at once: the second waits for the expensive lane (one of the two slots), not
        // for the other slot, which a cheap query gets at once.
        let scans = async {
            tokio::join!(
                node.post(&url, envelope("scan")),
                node.post(&url, envelope("scan"))
            )
        };
        let cheap = async {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let started = std::time::Instant::now();
            let (status, _) = node.post(&url, envelope("get")).await;
            (status, started.elapsed())
        };
        let (((first, _), (second, _)), (status, took)) = tokio::join!(scans, cheap);
        assert_eq!(
            (first, second, status),
            (StatusCode::OK, StatusCode::OK, StatusCode::OK)
        );
        assert!(
            took < std::time::Duration::from_millis(200),
            "the cheap query did not wait for a scan to finish: {took:?}"
        );
    }
}
