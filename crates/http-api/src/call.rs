//! `call`: v2 (asynchronous: 202 once accepted) and v3/v4 (synchronous: wait for a terminal status
//! and answer with a certificate, or 202 on timeout so the client polls `read_state`).

use crate::cbor::{self, map, nat, text};
use crate::envelope::{self, EffectiveId};
use crate::{ApiError, SharedState};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use openic_interfaces::IngressPoolError;
use openic_types::{IngressEnvelope, RequestId, UserError};
use serde_cbor::Value;

/// Which generation of the call endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallVersion {
    /// Asynchronous.
    V2,
    /// Synchronous (deprecated, used by older JS agents).
    V3,
    /// Synchronous (current).
    V4,
}

pub(crate) async fn canister_v2(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    handle(state, EffectiveId::canister(&id), body, CallVersion::V2).await
}

pub(crate) async fn canister_v3(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    handle(state, EffectiveId::canister(&id), body, CallVersion::V3).await
}

pub(crate) async fn canister_v4(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    handle(state, EffectiveId::canister(&id), body, CallVersion::V4).await
}

pub(crate) async fn subnet_v4(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let effective_id = EffectiveId::subnet(&id, state.deps.subnet_id);
    handle(state, effective_id, body, CallVersion::V4).await
}

async fn handle(
    state: SharedState,
    effective_id: Result<EffectiveId, ApiError>,
    body: Body,
    version: CallVersion,
) -> Response {
    match try_handle(state, effective_id, body, version).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn try_handle(
    state: SharedState,
    effective_id: Result<EffectiveId, ApiError>,
    body: Body,
    version: CallVersion,
) -> Result<Response, ApiError> {
    let effective_id = effective_id?;
    state.check_making_blocks()?;
    let envelope = IngressEnvelope {
        effective_canister_id: effective_id.as_canister_id(),
        bytes: envelope::read_body(body, &state).await?.into(),
    };
    let ingress = envelope::validate_ingress_envelope(
        &envelope,
        state.deps.subnet_id,
        state.now(),
        &state.config,
    )?;

    // A request the certified state already knows is a re-submission (a client retry, or a
    // replay of a captured request): it ran or will run once, so answer like a duplicate without
    // running `canister_inspect_message` again (which would cost an execution slot, and could now
    // refuse a request that was accepted).
    if let Some(known) = state
        .deps
        .certified_state
        .ingress_status_meta(&ingress.request_id)
    {
        if known.effective_canister_id != ingress.effective_canister_id {
            return Err(ApiError::BadRequest(format!(
                "request {} was already submitted through effective canister id {}; read its status there",
                ingress.request_id, known.effective_canister_id
            )));
        }
        tracing::debug!(request_id = %ingress.request_id, "call re-submitted; answering from its status");
        return answer_accepted(&state, version, ingress.request_id).await;
    }

    let inspector = state.deps.inspector.clone();
    // Its own slots: queries never delay or refuse an update call's admission.
    let permit = state.inspection_permit().await?;
    let (ingress, inspected) = tokio::task::spawn_blocking(move || {
        let result = inspector.inspect(&ingress);
        drop(permit);
        (ingress, result)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the ingress inspector crashed: {e}")))?;
    if let Err(rejection) = inspected {
        tracing::debug!(request_id = %ingress.request_id, %rejection, "call refused before replication");
        return Ok(non_replicated_rejection(version, &rejection));
    }

    let request_id = ingress.request_id;
    match state.deps.ingress_pool.submit(ingress, envelope) {
        // A duplicate is the same signed request sent again (e.g. a client retry): it runs once,
        // and the sender gets the outcome of that one run.
        Ok(()) | Err(IngressPoolError::Duplicate(_)) => {}
        Err(full @ IngressPoolError::Full { .. }) => {
            return Err(ApiError::TooManyRequests(full.to_string()));
        }
    }
    answer_accepted(&state, version, request_id).await
}

/// The answer to an accepted call: 202 at once for v2; for v3/v4 the certificate of its terminal
/// status (or 202 on timeout).
async fn answer_accepted(
    state: &SharedState,
    version: CallVersion,
    request_id: RequestId,
) -> Result<Response, ApiError> {
    match version {
        CallVersion::V2 => Ok(StatusCode::ACCEPTED.into_response()),
        CallVersion::V3 | CallVersion::V4 => wait_for_certificate(state, request_id).await,
    }
}

/// The body of a rejection found before the call entered the pool.
fn non_replicated_rejection(version: CallVersion, rejection: &UserError) -> Response {
    let code = nat(rejection.code.for_user().as_u64());
    let message = text(&rejection.message);
    let error_code = text(&crate::query::error_code_text(rejection));
    let body = match version {
        CallVersion::V2 => map([
            ("reject_code", code),
            ("reject_message", message),
            ("error_code", error_code),
        ]),
        CallVersion::V3 | CallVersion::V4 => map([
            ("status", text("non_replicated_rejection")),
            ("reject_code", code),
            ("reject_message", message),
            ("error_code", error_code),
        ]),
    };
    cbor::response(StatusCode::OK, &body)
}

/// Waits until `request_id` is terminal in the certified state, then answers with a certificate
/// of its status; answers 202 (empty) when `sync_call_timeout` passes first.
async fn wait_for_certificate(
    state: &SharedState,
    request_id: RequestId,
) -> Result<Response, ApiError> {
    let reader = state.deps.certified_state.clone();
    let mut heights = reader.subscribe_certified_height();
    let deadline = tokio::time::Instant::now() + state.config.sync_call_timeout;
    loop {
        // Mark the current height seen before looking, so a certification between the look and
        // the wait still wakes us.
        heights.borrow_and_update();
        let terminal = reader
            .ingress_status_meta(&request_id)
            .is_some_and(|meta| meta.is_terminal);
        if terminal {
            let path = vec![b"request_status".to_vec(), request_id.0.to_vec()];
            let certificate = reader.certificate_for_paths(&[path])?;
            return Ok(cbor::response(
                StatusCode::OK,
                &map([
                    ("status", text("replied")),
                    ("certificate", Value::Bytes(certificate)),
                ]),
            ));
        }
        match tokio::time::timeout_at(deadline, heights.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_closed)) => {
                // No more certifications will come (shutting down): let the client poll.
                tracing::debug!(%request_id, "certification stopped while a call waited");
                return Ok(StatusCode::ACCEPTED.into_response());
            }
            Err(_elapsed) => return Ok(StatusCode::ACCEPTED.into_response()),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::{Sender, TestNode, call_content, field};
    use axum::http::StatusCode;
    use openic_interfaces::IngressPoolError;
    use openic_types::{
        CanisterId, ErrorCode, Height, IngressEnvelope, IngressState, IngressStatus, Time,
        UserError,
    };
    use serde_cbor::Value;
    use std::time::Duration;

    const CANISTER: u64 = 7;

    fn url(version: &str) -> String {
        format!(
            "/api/{version}/canister/{}/call",
            CanisterId::from_u64(CANISTER)
        )
    }

    #[tokio::test]
    async fn sync_call_waits_for_the_terminal_status_and_returns_a_certificate() {
        let node = TestNode::new();
        let sender = Sender::ed25519(1);
        let content = call_content(&node, &sender, CANISTER, "inc");
        let (body, request_id) = sender.envelope(content);
        let state = node.state.clone();
        let reply_later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            state.set_status(
                request_id,
                IngressStatus {
                    state: IngressState::Replied(b"DIDL\x00\x00".to_vec()),
                    sender: sender.principal(),
                    effective_canister_id: CanisterId::from_u64(CANISTER),
                    ingress_expiry: openic_types::Time(0),
                },
            );
            state.set_height(Height(2));
        });
        let (status, body) = node.post(&url("v4"), body).await;
        reply_later.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let value: Value = serde_cbor::from_slice(&body).unwrap();
        assert_eq!(field(&value, "status"), Value::Text("replied".into()));
        let certificate = field(&value, "certificate");
        let expected = node
            .state
            .certificate_bytes(&[vec![b"request_status".to_vec(), request_id.0.to_vec()]]);
        assert_eq!(certificate, Value::Bytes(expected));
        assert!(matches!(
            serde_cbor::from_slice(&body).unwrap(),
            ic_transport_types::TransportCallResponse::Replied { .. }
        ));
        assert_eq!(node.pool.submitted().len(), 1);
        assert_eq!(node.pool.submitted()[0].request_id, request_id);
    }

    #[tokio::test]
    async fn sync_call_answers_202_with_an_empty_body_on_timeout() {
        let node = TestNode::with_sync_timeout(Duration::from_millis(100));
        let sender = Sender::ed25519(2);
        let (body, _) = sender.envelope(call_content(&node, &sender, CANISTER, "slow"));
        let (status, body) = node.post(&url("v3"), body).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert!(body.is_empty());
    }

    #[tokio::test]
    async fn v2_call_answers_202_at_once() {
        let node = TestNode::new();
        let sender = Sender::anonymous();
        let (body, _) = sender.envelope(call_content(&node, &sender, CANISTER, "inc"));
        let (status, body) = node.post(&url("v2"), body).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert!(body.is_empty());
        assert_eq!(node.pool.submitted().len(), 1);
    }

    #[tokio::test]
    async fn inspect_rejection_is_a_non_replicated_rejection() {
        let node = TestNode::new();
        node.inspector.reject_with(UserError::new(
            ErrorCode::CanisterRejectedMessage,
            "inspect_message refused",
        ));
        let sender = Sender::ed25519(3);
        let (body, _) = sender.envelope(call_content(&node, &sender, CANISTER, "inc"));
        let (status, response) = node.post(&url("v4"), body.clone()).await;
        assert_eq!(status, StatusCode::OK);
        let value: Value = serde_cbor::from_slice(&response).unwrap();
        assert_eq!(
            field(&value, "status"),
            Value::Text("non_replicated_rejection".into())
        );
        assert_eq!(field(&value, "reject_code"), Value::Integer(4));
        assert_eq!(field(&value, "error_code"), Value::Text("IC0406".into()));
        match serde_cbor::from_slice(&response).unwrap() {
            ic_transport_types::TransportCallResponse::NonReplicatedRejection(reject) => {
                assert_eq!(reject.reject_message, "inspect_message refused");
            }
            other => panic!("ic-transport-types reads {other:?}"),
        }
        // v2 has no status key.
        let (status, response) = node.post(&url("v2"), body).await;
        assert_eq!(status, StatusCode::OK);
        let value: Value = serde_cbor::from_slice(&response).unwrap();
        let Value::Map(entries) = &value else {
            panic!()
        };
        assert!(!entries.contains_key(&Value::Text("status".into())));
        assert_eq!(field(&value, "reject_code"), Value::Integer(4));
        assert!(node.pool.submitted().is_empty());
    }

    #[tokio::test]
    async fn full_pool_is_429_and_duplicates_are_accepted() {
        let node = TestNode::new();
        let sender = Sender::ed25519(4);
        let (body, request_id) = sender.envelope(call_content(&node, &sender, CANISTER, "inc"));
        node.pool.fail_with(IngressPoolError::Full {
            messages: 10,
            bytes: 100,
        });
        let (status, _) = node.post(&url("v2"), body.clone()).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        node.pool.fail_with(IngressPoolError::Duplicate(request_id));
        let (status, _) = node.post(&url("v2"), body).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }

    /// The envelope a replica forwards to its peers is the body as received: a peer that checks
    /// it at the same time gets the same message, and refuses it once it has expired or when a
    /// byte was changed.
    #[tokio::test]
    async fn forwarded_envelopes_validate_the_same_on_peers() {
        let node = TestNode::new();
        let sender = Sender::ed25519(7);
        let (body, request_id) = sender.envelope(call_content(&node, &sender, CANISTER, "inc"));
        let (status, _) = node.post(&url("v2"), body.clone()).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let [envelope] = node.pool.envelopes().try_into().unwrap();
        assert_eq!(&*envelope.bytes, &body[..]);
        let subnet_id = node.subnet_id;
        let at_peer =
            crate::validate_ingress_envelope(&envelope, subnet_id, node.now(), &node.config)
                .unwrap();
        assert_eq!(at_peer, node.pool.submitted()[0]);
        assert_eq!(at_peer.request_id, request_id);

        let later = Time(at_peer.ingress_expiry.0 + 1);
        let expired = crate::validate_ingress_envelope(&envelope, subnet_id, later, &node.config)
            .unwrap_err();
        assert!(
            expired.to_string().contains("Invalid request expiry"),
            "{expired}"
        );

        let mut tampered = body.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let tampered = IngressEnvelope {
            effective_canister_id: envelope.effective_canister_id,
            bytes: tampered.into(),
        };
        assert!(
            crate::validate_ingress_envelope(&tampered, subnet_id, node.now(), &node.config)
                .is_err()
        );
    }

    #[tokio::test]
    async fn bad_signature_is_400() {
        let node = TestNode::new();
        let sender = Sender::ed25519(5);
        let content = call_content(&node, &sender, CANISTER, "inc");
        let body = sender.envelope_with_bad_signature(content);
        let (status, body) = node.post(&url("v4"), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            String::from_utf8_lossy(&body).starts_with("Invalid signature: "),
            "{}",
            String::from_utf8_lossy(&body)
        );
        assert!(node.pool.submitted().is_empty());
    }

    #[tokio::test]
    async fn expiry_out_of_range_has_the_text_the_js_agent_looks_for() {
        let node = TestNode::new();
        let sender = Sender::ed25519(6);
        for expiry in [
            node.now().0 - 1,
            node.now().0 + Duration::from_secs(331).as_nanos() as u64,
        ] {
            let mut content = call_content(&node, &sender, CANISTER, "inc");
            content.insert(
                Value::Text("ingress_expiry".into()),
                Value::Integer(i128::from(expiry)),
            );
            let (body, _) = sender.envelope(content);
            let (status, body) = node.post(&url("v4"), body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            let text = String::from_utf8(body).unwrap();
            assert!(
                text.starts_with(
                    "Invalid request expiry: Specified ingress_expiry not within expected range: "
                ),
                "{text}"
            );
        }
        // The edge of the window (5 min 30 s) is accepted.
        let mut content = call_content(&node, &sender, CANISTER, "inc");
        content.insert(
            Value::Text("ingress_expiry".into()),
            Value::Integer(i128::from(node.now().0) + 330_000_000_000),
        );
        let (body, _) = sender.envelope(content);
        assert_eq!(node.post(&url("v2"), body).await.0, StatusCode::ACCEPTED);
    }

    #[tokio::test]
    async fn oversized_bodies_and_arguments_are_413() {
        let node = TestNode::new();
        let sender = Sender::anonymous();
        let mut content = call_content(&node, &sender, CANISTER, "inc");
        content.insert(
            Value::Text("arg".into()),
            Value::Bytes(vec![0; node.config.max_body_bytes + 1]),
        );
        let (body, _) = sender.envelope(content);
        let (status, text) = node.post(&url("v4"), body).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(String::from_utf8_lossy(&text).contains("larger than the limit"));
        let mut content = call_content(&node, &sender, CANISTER, "inc");
        content.insert(
            Value::Text("arg".into()),
            Value::Bytes(vec![0; node.config.max_ingress_bytes + 1]),
        );
        let (body, _) = sender.envelope(content);
        let (status, text) = node.post(&url("v4"), body).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(String::from_utf8_lossy(&text).contains("argument"));
    }

    #[tokio::test]
    async fn effective_canister_id_must_match_except_for_the_management_canister() {
        let node = TestNode::new();
        let sender = Sender::anonymous();
        let (body, _) = sender.envelope(call_content(&node, &sender, CANISTER, "inc"));
        let wrong = format!("/api/v4/canister/{}/call", CanisterId::from_u64(8));
        let (status, text) = node.post(&wrong, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&text).contains("does not match effective canister id"));

        let mut content = call_content(
            &node,
            &sender,
            CANISTER,
            "provisional_create_canister_with_cycles",
        );
        content.insert(Value::Text("canister_id".into()), Value::Bytes(vec![]));
        let (body, _) = sender.envelope(content);
        let (status, _) = node.post(&url("v2"), body).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let submitted = node.pool.submitted();
        assert!(submitted[0].canister_id.is_management());
        assert_eq!(
            submitted[0].effective_canister_id,
            CanisterId::from_u64(CANISTER)
        );
    }

    #[tokio::test]
    async fn wrong_request_type_and_garbage_are_400() {
        let node = TestNode::new();
        let (status, text) = node.post(&url("v4"), b"not cbor".to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&text).starts_with("Malformed request"));
        let sender = Sender::anonymous();
        let mut content = call_content(&node, &sender, CANISTER, "inc");
        content.insert(
            Value::Text("request_type".into()),
            Value::Text("query".into()),
        );
        let (body, _) = sender.envelope(content);
        let (status, text) = node.post(&url("v4"), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&text).contains("request_type"));
    }

    /// Signs and encodes a call exactly like ic-agent (`BasicIdentity` + `Envelope::encode_bytes`).
    fn ic_agent_envelope(
        key: &ic_ed25519::PrivateKey,
        delegation: Option<(
            &ic_ed25519::PrivateKey,
            ic_transport_types::DelegationPermissions,
        )>,
        expiry: u64,
    ) -> (Vec<u8>, ic_transport_types::RequestId) {
        use ic_transport_types::{Delegation, Envelope, EnvelopeContent, SignedDelegation};
        let der = key.public_key().serialize_rfc8410_der();
        let content = EnvelopeContent::Call {
            nonce: Some(vec![1; 16]),
            ingress_expiry: expiry,
            sender: candid::Principal::self_authenticating(&der),
            canister_id: CanisterId::from_u64(CANISTER).get(),
            method_name: "inc".into(),
            arg: b"DIDL\x00\x00".to_vec(),
            sender_info: None,
        };
        let request_id = content.to_request_id();
        let mut message = b"\x0Aic-request".to_vec();
        message.extend_from_slice(request_id.as_slice());
        let (signer, chain) = match delegation {
            None => (key, None),
            Some((delegate, permissions)) => {
                let delegation = Delegation {
                    pubkey: delegate.public_key().serialize_rfc8410_der(),
                    expiration: expiry,
                    targets: None,
                    permissions: Some(permissions),
                };
                let signature = key.sign_message(&delegation.signable()).to_vec();
                (
                    delegate,
                    Some(vec![SignedDelegation {
                        delegation,
                        signature,
                    }]),
                )
            }
        };
        let envelope = Envelope {
            content: std::borrow::Cow::Owned(content),
            sender_pubkey: Some(der),
            sender_sig: Some(signer.sign_message(&message).to_vec()),
            sender_delegation: chain,
        };
        (envelope.encode_bytes(), request_id)
    }

    #[tokio::test]
    async fn envelopes_made_by_ic_transport_types_are_accepted_with_the_same_request_id() {
        let node = TestNode::with_sync_timeout(Duration::from_millis(10));
        let key = ic_ed25519::PrivateKey::generate_from_seed(&[21; 32]);
        let delegate = ic_ed25519::PrivateKey::generate_from_seed(&[22; 32]);
        let expiry = node.now().0 + 120_000_000_000;
        let (body, request_id) = ic_agent_envelope(&key, None, expiry);
        let (status, _) = node.post(&url("v4"), body).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let (body, delegated_id) = ic_agent_envelope(
            &key,
            Some((&delegate, ic_transport_types::DelegationPermissions::All)),
            expiry,
        );
        assert_eq!(node.post(&url("v4"), body).await.0, StatusCode::ACCEPTED);
        let submitted = node.pool.submitted();
        assert_eq!(submitted[0].request_id.0, *request_id);
        assert_eq!(submitted[1].request_id.0, *delegated_id);
        assert_eq!(submitted[0].method_name, "inc");

        let (body, _) = ic_agent_envelope(
            &key,
            Some((
                &delegate,
                ic_transport_types::DelegationPermissions::Queries,
            )),
            expiry,
        );
        let (status, text) = node.post(&url("v4"), body).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(String::from_utf8_lossy(&text).contains("only permits queries"));
        assert_eq!(node.pool.submitted().len(), 2);
    }

    #[tokio::test]
    async fn cors_preflight_is_answered_for_browsers() {
        let node = TestNode::new();
        let request = axum::http::Request::builder()
            .method("OPTIONS")
            .uri(url("v4"))
            .header("origin", "http://localhost:5173")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = tower::ServiceExt::oneshot(node.router(), request)
            .await
            .unwrap();
        assert!(response.status().is_success());
        let headers = response.headers();
        assert_eq!(headers["access-control-allow-origin"], "*");
        assert!(
            headers["access-control-allow-methods"]
                .to_str()
                .unwrap()
                .contains("POST")
        );
    }

    #[tokio::test]
    async fn requests_are_counted_by_endpoint_and_status() {
        let node = TestNode::new();
        let sender = Sender::anonymous();
        let (body, _) = sender.envelope(call_content(&node, &sender, CANISTER, "inc"));
        node.post(&url("v2"), body).await;
        node.post(&url("v2"), b"junk".to_vec()).await;
        let endpoint = "/api/v2/canister/{id}/call";
        assert_eq!(node.metrics.request_count(endpoint, 202), 1);
        assert_eq!(node.metrics.request_count(endpoint, 400), 1);
    }

    #[tokio::test]
    async fn resubmitted_known_request_skips_inspection_and_answers_like_a_duplicate() {
        let node = TestNode::new();
        let sender = Sender::ed25519(8);
        let (body, request_id) = sender.envelope(call_content(&node, &sender, CANISTER, "inc"));
        node.state.set_status(
            request_id,
            IngressStatus {
                state: IngressState::Replied(b"DIDL\x00\x00".to_vec()),
                sender: sender.principal(),
                effective_canister_id: CanisterId::from_u64(CANISTER),
                ingress_expiry: openic_types::Time(0),
            },
        );
        node.state.set_height(Height(4));
        // The inspector would now refuse it (e.g. the canister changed its mind): not asked.
        node.inspector.reject_with(UserError::new(
            ErrorCode::CanisterRejectedMessage,
            "inspect_message refused",
        ));
        let (status, response) = node.post(&url("v2"), body.clone()).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert!(response.is_empty());
        let (status, response) = node.post(&url("v4"), body.clone()).await;
        assert_eq!(status, StatusCode::OK);
        let value: Value = serde_cbor::from_slice(&response).unwrap();
        assert_eq!(field(&value, "status"), Value::Text("replied".into()));
        assert_eq!(
            field(&value, "certificate"),
            Value::Bytes(
                node.state
                    .certificate_bytes(&[vec![b"request_status".to_vec(), request_id.0.to_vec()]])
            )
        );
        assert!(node.pool.submitted().is_empty(), "not submitted again");
        // A management-canister call (whose effective id is free in the URL) known under one
        // effective id and re-sent through another: refused, with where to look.
        let mut content = call_content(&node, &sender, CANISTER, "start_canister");
        content.insert(Value::Text("canister_id".into()), Value::Bytes(vec![]));
        let (body, management_id) = sender.envelope(content);
        node.state.set_status(
            management_id,
            IngressStatus {
                state: IngressState::Processing,
                sender: sender.principal(),
                effective_canister_id: CanisterId::from_u64(CANISTER),
                ingress_expiry: openic_types::Time(0),
            },
        );
        let elsewhere = format!(
            "/api/v2/canister/{}/call",
            CanisterId::from_u64(CANISTER + 1)
        );
        let (status, text) = node.post(&elsewhere, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&text).contains("already submitted through"));
    }

    #[tokio::test]
    async fn calls_are_503_once_the_node_stopped_making_blocks() {
        let node = TestNode::new();
        node.halt("the block log could not be written: disk full");
        let sender = Sender::ed25519(9);
        let (body, _) = sender.envelope(call_content(&node, &sender, CANISTER, "inc"));
        for version in ["v2", "v3", "v4"] {
            let (status, text) = node.post(&url(version), body.clone()).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(
                String::from_utf8_lossy(&text),
                "the node stopped making blocks: the block log could not be written: disk full; see its log"
            );
        }
        assert!(node.pool.submitted().is_empty());
    }

    #[tokio::test]
    async fn a_body_that_does_not_arrive_in_time_is_408() {
        use std::io::{Read as _, Write as _};
        let node = TestNode::with_config(crate::HttpApiConfig {
            body_read_timeout: Duration::from_millis(200),
            ..crate::HttpApiConfig::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(axum::serve(listener, node.router()).into_future());
        let head = format!(
            "POST {} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/cbor\r\ncontent-length: 1000\r\n\r\n",
            url("v2")
        );
        // A client that sends the head and ten of the thousand body bytes, then stalls.
        let answer = tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(address).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(&[0xd9; 10]).unwrap();
            let mut answer = Vec::new();
            let mut buffer = [0u8; 1024];
            while let Ok(n) = stream.read(&mut buffer) {
                answer.extend_from_slice(&buffer[..n]);
                if n == 0 || String::from_utf8_lossy(&answer).contains("send it at once") {
                    break;
                }
            }
            answer
        })
        .await
        .unwrap();
        server.abort();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("did not arrive within 200 ms"), "{answer}");
    }
}
