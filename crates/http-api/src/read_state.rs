//! `read_state` (v2 and v3, canister and subnet endpoints): checks that the sender may read every
//! requested path (interface spec "Request: Read state"), then answers `{certificate}` revealing
//! them plus `/time`.
//!
//! Readable paths: `/time`; `/api_boundary_nodes/…`; `/subnet`, `/subnet/<id>` and its
//! `public_key`, `type`, `node`, `node/<nid>`, `node/<nid>/public_key`, `canister_ranges`, and
//! `metrics` (subnet endpoint of the same subnet only); `/canister_ranges/<subnet>` (subnet
//! endpoints only, one subnet per request); `/request_status/<rid>[/field]` (one request id per
//! request, and only by its original sender through the same effective id unless the request is
//! unknown); `/canister/<ecid>/{module_hash, controllers, metadata/<name>}` (private metadata only
//! for controllers). `/canister/<cid>/certified_data` is only served in query data certificates.
//!
//! Authorisation and certificate come from the same certified height: the handler reads the
//! height, authorises, then asks for the certificate of that height only
//! ([`openic_interfaces::CertifiedStateReader::certificate_for_paths_at`]); if a certification
//! landed in between, it authorises again (at most [`MAX_AUTHORISATION_ATTEMPTS`] times). So a
//! request that was unknown when authorised cannot be answered with a later certificate that
//! reveals another sender's reply.

use crate::envelope::{self, EffectiveId, Request, RequestKind};
use crate::{ApiError, AppState, SharedState};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use openic_interfaces::{LabelPath, MetadataVisibility};
use openic_types::{CanisterId, Principal, RequestId};
use serde_cbor::Value;

/// How often a read_state request is authorised again when a new height was certified meanwhile
/// (heights come about once a second, so a second attempt almost always succeeds).
const MAX_AUTHORISATION_ATTEMPTS: usize = 4;

pub(crate) async fn canister(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    try_handle(state.clone(), EffectiveId::canister(&id), body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn subnet(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let effective_id = EffectiveId::subnet(&id, state.deps.subnet_id);
    try_handle(state, effective_id, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn try_handle(
    state: SharedState,
    effective_id: Result<EffectiveId, ApiError>,
    body: Body,
) -> Result<Response, ApiError> {
    let effective_id = effective_id?;
    let body = envelope::read_body(body, &state).await?;
    let request = envelope::decode(&body, RequestKind::ReadState, &state)?;
    let paths = envelope::paths(&request, &state)?;
    let reader = &state.deps.certified_state;
    let mut certificate = None;
    for _ in 0..MAX_AUTHORISATION_ATTEMPTS {
        let height = reader.certified_height();
        authorize(&paths, &request, effective_id, &state)?;
        certificate = reader.certificate_for_paths_at(&paths, height)?;
        if certificate.is_some() {
            break;
        }
    }
    let Some(certificate) = certificate else {
        return Err(ApiError::Unavailable(format!(
            "the certified state changed {MAX_AUTHORISATION_ATTEMPTS} times while this read_state request was checked; retry"
        )));
    };
    Ok(crate::cbor::response(
        StatusCode::OK,
        &crate::cbor::map([("certificate", Value::Bytes(certificate))]),
    ))
}

/// A path for messages: `/label/label`, labels shown as text when printable, else hex.
fn show(path: &[Vec<u8>]) -> String {
    if path.is_empty() {
        return "/".into();
    }
    path.iter()
        .map(|label| match std::str::from_utf8(label) {
            Ok(text) if text.chars().all(|c| c.is_ascii_graphic()) => format!("/{text}"),
            _ => format!("/0x{}", hex_lower(label)),
        })
        .collect()
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn forbidden(path: &[Vec<u8>], why: &str) -> ApiError {
    ApiError::Forbidden(format!("Cannot read path {}: {why}", show(path)))
}

fn principal_label(path: &[Vec<u8>], index: usize) -> Result<Principal, ApiError> {
    let label = &path[index];
    if label.len() > 29 {
        return Err(ApiError::BadRequest(format!(
            "Path {}: label {index} is not a principal (more than 29 bytes)",
            show(path)
        )));
    }
    Ok(Principal::from_slice(label))
}

fn authorize(
    paths: &[LabelPath],
    request: &Request,
    effective_id: EffectiveId,
    state: &AppState,
) -> Result<(), ApiError> {
    let mut request_status_id: Option<&[u8]> = None;
    let mut ranges_subnet: Option<&[u8]> = None;
    for path in paths {
        let labels: Vec<&[u8]> = path.iter().map(Vec::as_slice).collect();
        match labels.as_slice() {
            [b"time"] => {}
            [b"api_boundary_nodes", ..] => {}
            [b"subnet"] | [b"subnet", _] => {}
            [
                b"subnet",
                _,
                b"public_key" | b"type" | b"node" | b"canister_ranges",
            ] => {}
            [b"subnet", _, b"node", _] | [b"subnet", _, b"node", _, b"public_key"] => {}
            [b"subnet", _, b"metrics"] => {
                let subnet = principal_label(path, 1)?;
                if effective_id != EffectiveId::Subnet(openic_types::SubnetId(subnet)) {
                    return Err(forbidden(
                        path,
                        "subnet metrics are readable only through the same subnet's read_state endpoint (/api/v3/subnet/<id>/read_state)",
                    ));
                }
            }
            [b"canister_ranges", subnet] | [b"canister_ranges", subnet, _] => {
                if !matches!(effective_id, EffectiveId::Subnet(_)) {
                    return Err(forbidden(
                        path,
                        "canister_ranges is readable only through subnet endpoints (/api/v3/subnet/<id>/read_state)",
                    ));
                }
                if ranges_subnet.is_some_and(|first| first != *subnet) {
                    return Err(ApiError::BadRequest(
                        "All canister_ranges paths of one read_state request must name the same subnet".into(),
                    ));
                }
                ranges_subnet = Some(subnet);
            }
            [b"request_status", id]
            | [
                b"request_status",
                id,
                b"status" | b"reply" | b"reject_code" | b"reject_message" | b"error_code",
            ] => {
                let Ok(id_bytes) = <[u8; 32]>::try_from(*id) else {
                    return Err(ApiError::BadRequest(format!(
                        "Path {}: a request id is 32 bytes, got {}",
                        show(path),
                        id.len()
                    )));
                };
                match request_status_id {
                    Some(first) if first != *id => {
                        return Err(ApiError::BadRequest(
                            "All request_status paths of one read_state request must name the same request id".into(),
                        ));
                    }
                    // Already authorised for an earlier path of this request.
                    Some(_) => {}
                    None => {
                        request_status_id = Some(id);
                        authorize_request_status(
                            path,
                            RequestId(id_bytes),
                            request,
                            effective_id,
                            state,
                        )?;
                    }
                }
            }
            [b"canister", canister, rest @ ..] => {
                let canister_id = CanisterId::unchecked_from_principal(principal_label(path, 1)?);
                match effective_id {
                    EffectiveId::Canister(ecid) if ecid.get().as_slice() == *canister => {}
                    _ => {
                        return Err(forbidden(
                            path,
                            "canister paths are readable only through that canister's own endpoint (/api/v3/canister/<same id>/read_state)",
                        ));
                    }
                }
                if !request.authenticated.allows_target(&canister_id.get()) {
                    return Err(forbidden(
                        path,
                        "the sender's delegation does not allow this canister",
                    ));
                }
                match rest {
                    [b"module_hash"] | [b"controllers"] => {}
                    [b"metadata", name] => {
                        authorize_metadata(path, canister_id, name, request, state)?
                    }
                    [b"certified_data"] => {
                        return Err(forbidden(
                            path,
                            "certified data is served only in the data certificate of a query to the canister",
                        ));
                    }
                    _ => {
                        return Err(forbidden(
                            path,
                            "this canister path does not exist or is not readable",
                        ));
                    }
                }
            }
            _ => {
                return Err(forbidden(
                    path,
                    "this path is not readable through read_state",
                ));
            }
        }
    }
    Ok(())
}

fn authorize_request_status(
    path: &[Vec<u8>],
    request_id: RequestId,
    request: &Request,
    effective_id: EffectiveId,
    state: &AppState,
) -> Result<(), ApiError> {
    // An unknown request is readable by anyone: the answer proves its absence.
    let Some(status) = state.deps.certified_state.ingress_status_meta(&request_id) else {
        return Ok(());
    };
    if status.sender != request.sender {
        return Err(forbidden(
            path,
            "the status of a request is readable only by the request's sender",
        ));
    }
    if status.effective_canister_id != effective_id.as_canister_id() {
        return Err(forbidden(
            path,
            &format!(
                "the request was sent to effective id {}; read its status through that endpoint",
                status.effective_canister_id
            ),
        ));
    }
    Ok(())
}

fn authorize_metadata(
    path: &[Vec<u8>],
    canister_id: CanisterId,
    name: &[u8],
    request: &Request,
    state: &AppState,
) -> Result<(), ApiError> {
    let Ok(name) = std::str::from_utf8(name) else {
        return Err(ApiError::BadRequest(format!(
            "Path {}: metadata names are UTF-8",
            show(path)
        )));
    };
    match state
        .deps
        .certified_state
        .metadata_visibility(&canister_id, name)
    {
        None | Some(MetadataVisibility::Public) => Ok(()),
        Some(MetadataVisibility::Private) => {
            let controllers = state
                .deps
                .certified_state
                .canister_controllers(&canister_id)
                .unwrap_or_default();
            if controllers.contains(&request.sender) {
                Ok(())
            } else {
                Err(forbidden(
                    path,
                    "this metadata section is private (icp:private); only the canister's controllers may read it",
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::{Sender, TestNode, read_state_content};
    use axum::http::StatusCode;
    use openic_interfaces::MetadataVisibility;
    use openic_types::{CanisterId, IngressState, IngressStatus, Principal, RequestId, Time};
    use serde_cbor::Value;

    const CANISTER: u64 = 11;

    fn url() -> String {
        format!(
            "/api/v3/canister/{}/read_state",
            CanisterId::from_u64(CANISTER)
        )
    }

    async fn read(
        node: &TestNode,
        sender: &Sender,
        url: &str,
        paths: Vec<Vec<&[u8]>>,
    ) -> (StatusCode, Vec<u8>) {
        let (body, _) = sender.envelope(read_state_content(node, sender, paths));
        node.post(url, body).await
    }

    #[tokio::test]
    async fn time_is_readable_for_any_canister_even_unknown_ones() {
        let node = TestNode::new();
        let ledger = "/api/v2/canister/ryjl3-tyaaa-aaaaa-aaaba-cai/read_state";
        let (status, body) = read(&node, &Sender::anonymous(), ledger, vec![vec![b"time"]]).await;
        assert_eq!(status, StatusCode::OK);
        let value: Value = serde_cbor::from_slice(&body).unwrap();
        assert_eq!(
            crate::test_support::field(&value, "certificate"),
            Value::Bytes(node.state.certificate_bytes(&[vec![b"time".to_vec()]]))
        );
        let (status, _) = read(&node, &Sender::ed25519(1), &url(), vec![vec![b"subnet"]]).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn request_status_is_readable_only_by_its_sender() {
        let node = TestNode::new();
        let owner = Sender::ed25519(2);
        let other = Sender::ed25519(3);
        let id = RequestId([7; 32]);
        node.state.set_status(
            id,
            IngressStatus {
                state: IngressState::Received,
                sender: owner.principal(),
                effective_canister_id: CanisterId::from_u64(CANISTER),
                ingress_expiry: Time(0),
            },
        );
        let path = vec![&b"request_status"[..], &id.0[..]];
        assert_eq!(
            read(&node, &owner, &url(), vec![path.clone()]).await.0,
            StatusCode::OK
        );
        let (status, text) = read(&node, &other, &url(), vec![path.clone()]).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(String::from_utf8_lossy(&text).contains("only by the request's sender"));
        // Through another canister's endpoint: refused too.
        let elsewhere = format!("/api/v3/canister/{}/read_state", CanisterId::from_u64(12));
        assert_eq!(
            read(&node, &owner, &elsewhere, vec![path]).await.0,
            StatusCode::FORBIDDEN
        );
        // Unknown ids are readable by anyone (the certificate proves absence).
        let unknown = vec![&b"request_status"[..], &[9u8; 32][..], &b"status"[..]];
        assert_eq!(
            read(&node, &other, &url(), vec![unknown]).await.0,
            StatusCode::OK
        );
        // Two different ids in one request: 400.
        let two = vec![
            vec![&b"request_status"[..], &[9u8; 32][..]],
            vec![&b"request_status"[..], &[8u8; 32][..]],
        ];
        assert_eq!(
            read(&node, &other, &url(), two).await.0,
            StatusCode::BAD_REQUEST
        );
    }

    #[tokio::test]
    async fn canister_paths_need_the_same_ecid_and_private_metadata_needs_a_controller() {
        let node = TestNode::new();
        let controller = Sender::ed25519(4);
        let stranger = Sender::anonymous();
        let canister = CanisterId::from_u64(CANISTER);
        let id_bytes = canister.get().as_slice().to_vec();
        node.state
            .set_canister(canister, vec![controller.principal()]);
        node.state
            .set_metadata(canister, "secret", MetadataVisibility::Private);
        node.state
            .set_metadata(canister, "candid:service", MetadataVisibility::Public);

        let module_hash = vec![&b"canister"[..], &id_bytes, &b"module_hash"[..]];
        assert_eq!(
            read(&node, &stranger, &url(), vec![module_hash.clone()])
                .await
                .0,
            StatusCode::OK
        );
        let elsewhere = format!("/api/v3/canister/{}/read_state", CanisterId::from_u64(12));
        assert_eq!(
            read(&node, &stranger, &elsewhere, vec![module_hash])
                .await
                .0,
            StatusCode::FORBIDDEN
        );
        let public = vec![
            &b"canister"[..],
            &id_bytes,
            &b"metadata"[..],
            &b"candid:service"[..],
        ];
        assert_eq!(
            read(&node, &stranger, &url(), vec![public]).await.0,
            StatusCode::OK
        );
        let private = vec![
            &b"canister"[..],
            &id_bytes,
            &b"metadata"[..],
            &b"secret"[..],
        ];
        assert_eq!(
            read(&node, &stranger, &url(), vec![private.clone()])
                .await
                .0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            read(&node, &controller, &url(), vec![private]).await.0,
            StatusCode::OK
        );
        let certified = vec![&b"canister"[..], &id_bytes, &b"certified_data"[..]];
        assert_eq!(
            read(&node, &stranger, &url(), vec![certified]).await.0,
            StatusCode::FORBIDDEN
        );
        let unknown = vec![&b"secrets"[..]];
        assert_eq!(
            read(&node, &stranger, &url(), vec![unknown]).await.0,
            StatusCode::FORBIDDEN
        );
    }

    #[tokio::test]
    async fn subnet_only_paths_and_limits() {
        let node = TestNode::new();
        let anonymous = Sender::anonymous();
        let subnet = node.subnet_id.0;
        let subnet_bytes = subnet.as_slice().to_vec();
        let ranges = vec![&b"canister_ranges"[..], &subnet_bytes];
        let metrics = vec![&b"subnet"[..], &subnet_bytes, &b"metrics"[..]];
        assert_eq!(
            read(&node, &anonymous, &url(), vec![ranges.clone()])
                .await
                .0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            read(&node, &anonymous, &url(), vec![metrics.clone()])
                .await
                .0,
            StatusCode::FORBIDDEN
        );
        let subnet_url = format!("/api/v3/subnet/{subnet}/read_state");
        assert_eq!(
            read(&node, &anonymous, &subnet_url, vec![ranges, metrics])
                .await
                .0,
            StatusCode::OK
        );
        let other_subnet = format!(
            "/api/v3/subnet/{}/read_state",
            Principal::from_slice(&[1; 29])
        );
        assert_eq!(
            read(&node, &anonymous, &other_subnet, vec![vec![b"time"]])
                .await
                .0,
            StatusCode::BAD_REQUEST
        );
        let too_many = vec![vec![&b"time"[..]]; node.config.max_read_state_paths + 1];
        assert_eq!(
            read(&node, &anonymous, &url(), too_many).await.0,
            StatusCode::BAD_REQUEST
        );
        let too_long = vec![vec![&b"subnet"[..]; node.config.max_path_labels + 1]];
        assert_eq!(
            read(&node, &anonymous, &url(), too_long).await.0,
            StatusCode::BAD_REQUEST
        );
    }

    #[tokio::test]
    async fn not_yet_certified_is_503() {
        let node = TestNode::new();
        node.state.refuse_certificates();
        let (status, _) = read(&node, &Sender::anonymous(), &url(), vec![vec![b"time"]]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn many_paths_of_one_request_id_are_authorised_with_one_cheap_lookup() {
        let node = TestNode::new();
        let owner = Sender::ed25519(5);
        let id = RequestId([6; 32]);
        node.state.set_status(
            id,
            IngressStatus {
                state: IngressState::Replied(vec![0; 100_000]),
                sender: owner.principal(),
                effective_canister_id: CanisterId::from_u64(CANISTER),
                ingress_expiry: Time(0),
            },
        );
        let paths = vec![vec![&b"request_status"[..], &id.0[..], &b"status"[..]]; 1000];
        let (status, _) = read(&node, &owner, &url(), paths).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(node.state.status_reads(), (1, 0), "(lookups, full clones)");
    }

    #[tokio::test]
    async fn authorisation_and_certificate_come_from_the_same_height() {
        let node = TestNode::new();
        node.state.set_height(openic_types::Height(1));
        let owner = Sender::ed25519(6);
        let snoop = Sender::ed25519(7);
        let id = RequestId([5; 32]);
        // Unknown (readable by anyone) while authorised; known, with another sender, by the time
        // the certificate is made.
        node.state.certify_after_next_lookup(
            id,
            IngressStatus {
                state: IngressState::Replied(b"secret".to_vec()),
                sender: owner.principal(),
                effective_canister_id: CanisterId::from_u64(CANISTER),
                ingress_expiry: Time(0),
            },
        );
        let path = vec![&b"request_status"[..], &id.0[..]];
        let (status, text) = read(&node, &snoop, &url(), vec![path]).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "{}",
            String::from_utf8_lossy(&text)
        );
        assert_eq!(
            node.state.status_reads().0,
            2,
            "authorised again at the new height"
        );
    }
}
