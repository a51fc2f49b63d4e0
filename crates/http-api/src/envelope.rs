//! Decoding and validating request envelopes: body size, CBOR, request id over the content map as
//! received, typed content fields read from that same map, expiry window, authentication.

use crate::{ApiError, AppState, HttpApiConfig};
use axum::body::Body;
use openic_crypto::envelope::{Authenticated, EnvelopeAuthentication, authenticate};
use openic_crypto::request_id::{decode_cbor_value, request_id};
use openic_interfaces::LabelPath;
use openic_types::{
    CanisterId, IngressEnvelope, Principal, RequestId, SignedIngress, SubnetId, Time,
};
use serde_cbor::Value;
use std::collections::BTreeMap;

/// Longest principal, in bytes.
const MAX_PRINCIPAL_BYTES: usize = 29;

/// Longest nonce, in bytes.
pub(crate) const MAX_NONCE_BYTES: usize = 32;

/// Longest method name, in bytes (the IC limits all exported names to 20 000 bytes together).
pub(crate) const MAX_METHOD_NAME_BYTES: usize = 20_000;

/// The kind of request an endpoint accepts (`content.request_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RequestKind {
    Call,
    Query,
    ReadState,
}

impl RequestKind {
    fn request_type(self) -> &'static str {
        match self {
            RequestKind::Call => "call",
            RequestKind::Query => "query",
            RequestKind::ReadState => "read_state",
        }
    }
}

/// The URL's effective id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EffectiveId {
    Canister(CanisterId),
    Subnet(SubnetId),
}

impl EffectiveId {
    /// Parses the `{id}` of a canister URL.
    pub(crate) fn canister(text: &str) -> Result<EffectiveId, ApiError> {
        Principal::from_text(text)
            .map(|p| EffectiveId::Canister(CanisterId::unchecked_from_principal(p)))
            .map_err(|e| {
                ApiError::BadRequest(format!(
                    "Invalid effective canister id `{text}` in the URL: {e}"
                ))
            })
    }

    /// Parses the `{id}` of a subnet URL; it must be this subnet.
    pub(crate) fn subnet(text: &str, ours: SubnetId) -> Result<EffectiveId, ApiError> {
        let principal = Principal::from_text(text).map_err(|e| {
            ApiError::BadRequest(format!("Invalid subnet id `{text}` in the URL: {e}"))
        })?;
        if principal != ours.0 {
            return Err(ApiError::BadRequest(format!(
                "Subnet {principal} is not served here; this node serves subnet {}",
                ours.0
            )));
        }
        Ok(EffectiveId::Subnet(ours))
    }

    /// The id as the `CanisterId` recorded in `SignedIngress`/`UserQuery`: the canister id, or
    /// the subnet's principal for subnet endpoints.
    pub(crate) fn as_canister_id(self) -> CanisterId {
        match self {
            EffectiveId::Canister(id) => id,
            EffectiveId::Subnet(subnet) => CanisterId::unchecked_from_principal(subnet.0),
        }
    }
}

/// A decoded, authenticated request.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) request_id: RequestId,
    pub(crate) sender: Principal,
    pub(crate) ingress_expiry: Time,
    pub(crate) content: BTreeMap<Value, Value>,
    pub(crate) authenticated: Authenticated,
    pub(crate) body_bytes: usize,
}

/// Reads the body, refusing more than `max_body_bytes` with 413 and a body that takes longer
/// than `body_read_timeout` with 408.
pub(crate) async fn read_body(body: Body, state: &AppState) -> Result<Vec<u8>, ApiError> {
    let limit = state.config.max_body_bytes;
    let timeout = state.config.body_read_timeout;
    let Ok(read) = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await else {
        return Err(ApiError::RequestTimeout(format!(
            "The request body did not arrive within {} ms; send it at once",
            timeout.as_millis()
        )));
    };
    match read {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(error) => {
            let too_large =
                std::iter::successors(Some(&error as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
                .any(|e| e.to_string().contains("length limit exceeded"));
            if too_large {
                Err(ApiError::PayloadTooLarge(format!(
                    "Request body is larger than the limit of {limit} bytes; the argument of a call or query may be at most {} bytes",
                    state.config.max_ingress_bytes
                )))
            } else {
                Err(ApiError::BadRequest(format!(
                    "Could not read the request body: {error}"
                )))
            }
        }
    }
}

fn field<'a>(map: &'a BTreeMap<Value, Value>, name: &str) -> Option<&'a Value> {
    map.get(&Value::Text(name.to_string()))
}

fn malformed(message: String) -> ApiError {
    ApiError::BadRequest(format!("Malformed request: {message}"))
}

/// An optional byte-string field of a map.
pub(crate) fn optional_bytes<'a>(
    map: &'a BTreeMap<Value, Value>,
    name: &str,
) -> Result<Option<&'a [u8]>, ApiError> {
    match field(map, name) {
        None => Ok(None),
        Some(Value::Bytes(bytes)) => Ok(Some(bytes)),
        Some(_) => Err(malformed(format!("`{name}` must be a byte string"))),
    }
}

/// A required byte-string field of `content`.
pub(crate) fn required_bytes<'a>(
    map: &'a BTreeMap<Value, Value>,
    name: &str,
) -> Result<&'a [u8], ApiError> {
    optional_bytes(map, name)?
        .ok_or_else(|| malformed(format!("content field `{name}` is missing")))
}

/// A required text field of `content`.
pub(crate) fn required_text<'a>(
    map: &'a BTreeMap<Value, Value>,
    name: &str,
) -> Result<&'a str, ApiError> {
    match field(map, name) {
        Some(Value::Text(text)) => Ok(text),
        Some(_) => Err(malformed(format!("`{name}` must be text"))),
        None => Err(malformed(format!("content field `{name}` is missing"))),
    }
}

/// A required principal field of `content`.
pub(crate) fn required_principal(
    map: &BTreeMap<Value, Value>,
    name: &str,
) -> Result<Principal, ApiError> {
    let bytes = required_bytes(map, name)?;
    if bytes.len() > MAX_PRINCIPAL_BYTES {
        return Err(malformed(format!(
            "`{name}` is {} bytes; principals are at most {MAX_PRINCIPAL_BYTES} bytes",
            bytes.len()
        )));
    }
    Ok(Principal::from_slice(bytes))
}

/// Decodes and authenticates a request of `kind` from `body`, at the node's current time.
pub(crate) fn decode(
    body: &[u8],
    kind: RequestKind,
    state: &AppState,
) -> Result<Request, ApiError> {
    decode_at(body, kind, state.now(), &state.config)
}

/// Decodes and authenticates a request of `kind` from `body` as of time `now` (expiry window and
/// delegation expiry). Deterministic: depends only on its arguments.
fn decode_at(
    body: &[u8],
    kind: RequestKind,
    now: Time,
    config: &HttpApiConfig,
) -> Result<Request, ApiError> {
    let mut envelope = match decode_cbor_value(body) {
        Ok(Value::Map(map)) => map,
        Ok(_) => {
            return Err(malformed(
                "the body must be a CBOR map (the envelope)".into(),
            ));
        }
        Err(error) => {
            return Err(malformed(format!(
                "could not decode the body as a CBOR envelope: {error}"
            )));
        }
    };
    let Some(Value::Map(content)) = envelope.remove(&Value::Text("content".to_string())) else {
        return Err(malformed(
            "the envelope must have a `content` map".to_string(),
        ));
    };
    let request_id =
        request_id(&content).map_err(|e| malformed(format!("invalid content: {e}")))?;

    let request_type = required_text(&content, "request_type")?;
    if request_type != kind.request_type() {
        return Err(malformed(format!(
            "request_type is `{request_type}` but this endpoint accepts `{}`",
            kind.request_type()
        )));
    }
    let sender = required_principal(&content, "sender")?;
    let ingress_expiry = match field(&content, "ingress_expiry") {
        Some(Value::Integer(n)) => u64::try_from(*n).map(Time).map_err(|_| {
            malformed("`ingress_expiry` must be a nat below 2^64 (ns since the epoch)".into())
        })?,
        Some(_) => {
            return Err(malformed(
                "`ingress_expiry` must be a nat (ns since the epoch)".into(),
            ));
        }
        None => {
            return Err(malformed(
                "content field `ingress_expiry` is missing".into(),
            ));
        }
    };
    if let Some(nonce) = optional_bytes(&content, "nonce")?
        && nonce.len() > MAX_NONCE_BYTES
    {
        return Err(malformed(format!(
            "the nonce is {} bytes; at most {MAX_NONCE_BYTES} are allowed",
            nonce.len()
        )));
    }
    if field(&content, "sender_info").is_some() {
        return Err(ApiError::BadRequest(
            "sender_info is not supported by this replica (its canister signature cannot be verified here); send the request without it".into(),
        ));
    }

    // Anonymous queries and read_state carry no replay risk, and the JS agent's clock
    // re-synchronisation reads `/time` anonymously with its possibly wrong clock; the interface
    // spec lets the replica accept any expiry for them.
    let anonymous_read = sender == Principal::anonymous() && kind != RequestKind::Call;
    if !anonymous_read {
        check_expiry(ingress_expiry, now, config)?;
    }

    let authenticated = authenticate(
        EnvelopeAuthentication {
            sender,
            sender_pubkey: optional_bytes(&envelope, "sender_pubkey")?,
            sender_sig: optional_bytes(&envelope, "sender_sig")?,
            sender_delegation: field(&envelope, "sender_delegation"),
        },
        &request_id,
        now,
    )
    .map_err(|e| match e {
        openic_crypto::envelope::AuthenticationError::Signature(_)
        | openic_crypto::envelope::AuthenticationError::Delegation(_) => {
            ApiError::BadRequest(e.to_string())
        }
        other => ApiError::BadRequest(format!("Invalid signature: {other}")),
    })?;

    Ok(Request {
        request_id,
        sender,
        ingress_expiry,
        content,
        authenticated,
        body_bytes: body.len(),
    })
}

/// The prefix of the expiry error; the JS agent looks for it to re-synchronise its clock.
pub(crate) const EXPIRY_ERROR_PREFIX: &str =
    "Invalid request expiry: Specified ingress_expiry not within expected range: ";

fn check_expiry(expiry: Time, now: Time, config: &HttpApiConfig) -> Result<(), ApiError> {
    let window = config.max_ingress_ttl + config.permitted_drift;
    let max = now.saturating_add_nanos(u64::try_from(window.as_nanos()).unwrap_or(u64::MAX));
    if expiry < now || expiry > max {
        return Err(ApiError::BadRequest(format!(
            "{EXPIRY_ERROR_PREFIX}Minimum allowed expiry: {} ns, Maximum allowed expiry: {} ns, Provided expiry: {} ns (all in nanoseconds since the Unix epoch; set ingress_expiry to at most {} s after the replica's current time)",
            now.0,
            max.0,
            expiry.0,
            window.as_secs()
        )));
    }
    Ok(())
}

/// Checks an update call that another replica received, as this replica would have checked it
/// itself at time `now` (a proposed block's time): the body size, the envelope, the request id,
/// the sender's signature and delegations, the expiry window around `now`, the argument size, and
/// that the effective canister id fits the call. Returns the decoded message.
///
/// Deterministic: every replica that checks the same envelope at the same time gets the same
/// answer, so replicas can agree on whether a block is valid. What depends on the replica's own
/// state (`canister_inspect_message`, the pool) is not checked here.
pub fn validate_ingress_envelope(
    envelope: &IngressEnvelope,
    subnet_id: SubnetId,
    now: Time,
    config: &HttpApiConfig,
) -> Result<SignedIngress, ApiError> {
    if envelope.bytes.len() > config.max_body_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "the envelope is {} bytes; at most {} are allowed",
            envelope.bytes.len(),
            config.max_body_bytes
        )));
    }
    let effective_id = if envelope.effective_canister_id.get() == subnet_id.0 {
        EffectiveId::Subnet(subnet_id)
    } else {
        EffectiveId::Canister(envelope.effective_canister_id)
    };
    let request = decode_at(&envelope.bytes, RequestKind::Call, now, config)?;
    let call = canister_call(&request, effective_id, config)?;
    if !request.authenticated.allows_updates() {
        return Err(ApiError::Forbidden(
            "Invalid delegation: the sender's delegation only permits queries and read_state, not update calls".into(),
        ));
    }
    Ok(SignedIngress {
        request_id: request.request_id,
        sender: request.sender,
        canister_id: call.canister_id,
        effective_canister_id: effective_id.as_canister_id(),
        method_name: call.method_name,
        arg: call.arg,
        ingress_expiry: request.ingress_expiry,
        size_bytes: request.body_bytes as u64,
    })
}

/// The call/query fields: target canister, method, argument.
#[derive(Debug)]
pub(crate) struct CanisterCall {
    pub(crate) canister_id: CanisterId,
    pub(crate) method_name: String,
    pub(crate) arg: Vec<u8>,
}

/// Reads and checks the canister, method and argument of a call or query to `effective_id`.
pub(crate) fn canister_call(
    request: &Request,
    effective_id: EffectiveId,
    config: &HttpApiConfig,
) -> Result<CanisterCall, ApiError> {
    let canister_id =
        CanisterId::unchecked_from_principal(required_principal(&request.content, "canister_id")?);
    let method_name = required_text(&request.content, "method_name")?;
    if method_name.len() > MAX_METHOD_NAME_BYTES {
        return Err(malformed(format!(
            "the method name is {} bytes; at most {MAX_METHOD_NAME_BYTES} are allowed",
            method_name.len()
        )));
    }
    let arg = required_bytes(&request.content, "arg")?;
    if arg.len() > config.max_ingress_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "The argument is {} bytes; at most {} bytes are allowed. Split large data (e.g. upload wasm modules in chunks)",
            arg.len(),
            config.max_ingress_bytes
        )));
    }
    // Calls to the management canister name the real target inside the Candid argument; the
    // ingress inspector / query executor checks the effective id for those.
    if !canister_id.is_management() {
        match effective_id {
            EffectiveId::Canister(ecid) if ecid == canister_id => {}
            EffectiveId::Canister(ecid) => {
                return Err(ApiError::BadRequest(format!(
                    "Specified CanisterId {canister_id} does not match effective canister id in URL {ecid}"
                )));
            }
            EffectiveId::Subnet(subnet) => {
                return Err(ApiError::BadRequest(format!(
                    "Subnet endpoints (subnet {}) only accept calls to the management canister aaaaa-aa, not to {canister_id}",
                    subnet.0
                )));
            }
        }
    }
    if !request.authenticated.allows_target(&canister_id.get()) {
        return Err(ApiError::Forbidden(format!(
            "Invalid delegation: the sender's delegation does not allow requests to canister {canister_id}"
        )));
    }
    Ok(CanisterCall {
        canister_id,
        method_name: method_name.to_string(),
        arg: arg.to_vec(),
    })
}

/// Reads `content.paths` of a read_state request, within the configured limits.
pub(crate) fn paths(request: &Request, state: &AppState) -> Result<Vec<LabelPath>, ApiError> {
    let Some(Value::Array(paths)) = field(&request.content, "paths") else {
        return Err(malformed(
            "content field `paths` must be an array of paths".into(),
        ));
    };
    if paths.len() > state.config.max_read_state_paths {
        return Err(ApiError::BadRequest(format!(
            "read_state asks for {} paths; at most {} are allowed",
            paths.len(),
            state.config.max_read_state_paths
        )));
    }
    paths
        .iter()
        .map(|path| {
            let Value::Array(labels) = path else {
                return Err(malformed("every path must be an array of labels".into()));
            };
            if labels.len() > state.config.max_path_labels {
                return Err(ApiError::BadRequest(format!(
                    "a read_state path has {} labels; at most {} are allowed",
                    labels.len(),
                    state.config.max_path_labels
                )));
            }
            labels
                .iter()
                .map(|label| match label {
                    Value::Bytes(bytes) => Ok(bytes.clone()),
                    _ => Err(malformed("every path label must be a byte string".into())),
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::test_support::TestNode;
    use axum::http::StatusCode;
    use openic_crypto::request_id::text_map;
    use openic_types::{Principal, Time};
    use serde_cbor::Value;

    #[tokio::test]
    async fn spec_example_request_gets_the_spec_request_id() {
        let expiry: u64 = 1_685_570_400_000_000_000;
        let node = TestNode::with_clock(Time(expiry - 60_000_000_000));
        let canister = vec![0, 0, 0, 0, 0, 0, 0x04, 0xD2];
        let content = text_map([
            ("request_type", Value::Text("call".into())),
            ("sender", Value::Bytes(vec![0x04])),
            ("ingress_expiry", Value::Integer(i128::from(expiry))),
            ("canister_id", Value::Bytes(canister.clone())),
            ("method_name", Value::Text("hello".into())),
            ("arg", Value::Bytes(b"DIDL\x00\xFD*".to_vec())),
        ]);
        let body = crate::cbor::encode(&Value::Map(text_map([("content", Value::Map(content))])));
        let url = format!("/api/v2/canister/{}/call", Principal::from_slice(&canister));
        let (status, text) = node.post(&url, body).await;
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "{}",
            String::from_utf8_lossy(&text)
        );
        assert_eq!(
            format!("{}", node.pool.submitted()[0].request_id),
            "0x1d1091364d6bb8a6c16b203ee75467d59ead468f523eb058880ae8ec80e2b101"
        );
    }

    #[tokio::test]
    async fn duplicate_content_keys_and_long_nonces_are_refused() {
        let node = TestNode::new();
        // {"content": {"request_type": "call", "request_type": "call"}}
        let mut body = vec![0xa1, 0x67];
        body.extend_from_slice(b"content");
        body.push(0xa2);
        for _ in 0..2 {
            body.push(0x6c);
            body.extend_from_slice(b"request_type");
            body.push(0x64);
            body.extend_from_slice(b"call");
        }
        let url = "/api/v4/canister/rwlgt-iiaaa-aaaaa-aaaaa-cai/call";
        let (status, text) = node.post(url, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&text).contains("duplicate map key `request_type`"));

        let sender = crate::test_support::Sender::anonymous();
        let mut content = crate::test_support::call_content(&node, &sender, 0, "inc");
        content.insert(Value::Text("nonce".into()), Value::Bytes(vec![0; 33]));
        let (body, _) = sender.envelope(content);
        let (status, text) = node.post(url, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&text).contains("nonce"));
    }

    #[tokio::test]
    async fn mutated_and_truncated_envelopes_never_crash_the_handler() {
        let node = TestNode::new();
        let sender = crate::test_support::Sender::ed25519(30);
        let content = crate::test_support::call_content(&node, &sender, 0, "inc");
        let (valid, _) = sender.envelope(content);
        let url = "/api/v2/canister/rwlgt-iiaaa-aaaaa-aaaaa-cai/call";
        let mut bodies: Vec<Vec<u8>> = (0..valid.len()).map(|n| valid[..n].to_vec()).collect();
        for position in 0..valid.len() {
            let mut mutated = valid.clone();
            mutated[position] ^= 0xff;
            bodies.push(mutated);
        }
        for body in bodies {
            let (status, _) = node.post(url, body).await;
            assert!(
                status == StatusCode::ACCEPTED || status.is_client_error(),
                "unexpected {status}"
            );
        }
    }

    #[tokio::test]
    async fn oversized_cbor_containers_are_refused_before_hashing() {
        let node = TestNode::new();
        let sender = crate::test_support::Sender::anonymous();
        let mut content = crate::test_support::call_content(&node, &sender, 7, "inc");
        content.insert(
            Value::Text("padding".into()),
            Value::Array(vec![Value::Integer(0); 10_001]),
        );
        let (body, _) = sender.envelope(content);
        let url = format!(
            "/api/v2/canister/{}/call",
            openic_types::CanisterId::from_u64(7)
        );
        let (status, text) = node.post(&url, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            String::from_utf8_lossy(&text),
            "Malformed request: could not decode the body as a CBOR envelope: a CBOR array or map has more than 10000 elements; IC requests never need that many"
        );
        assert!(node.pool.submitted().is_empty());
    }
}
