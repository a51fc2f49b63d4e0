//! The whole HTTP interface in-process: `openic_http_api::router` over fakes that return fixed
//! data, driven with `tower::ServiceExt::oneshot`, with the fuzz input as the body of a POST to
//! one of the call, query and read_state endpoints. Any status is fine; a panic is not.
//!
//! Input: byte 0 picks the endpoint, byte 1 the id in its path (the management canister, a
//! canister, this subnet, or a malformed id); the rest is the body (seeds:
//! `fuzz/seeds/http_envelope`, CBOR envelopes of anonymous requests that pass validation).
#![no_main]

use axum::body::Body;
use axum::http::{Request, header};
use libfuzzer_sys::fuzz_target;
use openic_crypto::NodeKey;
use openic_http_api::{HttpApiConfig, HttpApiDeps, HttpMetrics, always_healthy, router};
use openic_interfaces::{
    CertificationError, CertifiedStateReader, IngressInspector, IngressPool, IngressPoolError,
    LabelPath, MetadataVisibility, QueryExecutor,
};
use openic_types::{
    CanisterId, Height, IngressStatus, Principal, QueryResult, RequestId, SignedIngress, SubnetId,
    Time, UserError, UserQuery,
};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tower::ServiceExt as _;

/// The fixed wall-clock time; seeds carry an `ingress_expiry` a minute after it.
const NOW: Time = Time(1_700_000_000_000_000_000);

/// The POST endpoints, with `{id}` where the path takes a canister or subnet id.
const ENDPOINTS: &[&str] = &[
    "/api/v2/canister/{id}/call",
    "/api/v3/canister/{id}/call",
    "/api/v4/canister/{id}/call",
    "/api/v4/subnet/{id}/call",
    "/api/v2/canister/{id}/query",
    "/api/v3/canister/{id}/query",
    "/api/v3/subnet/{id}/query",
    "/api/v2/canister/{id}/read_state",
    "/api/v3/canister/{id}/read_state",
    "/api/v2/subnet/{id}/read_state",
    "/api/v3/subnet/{id}/read_state",
];

/// Certified state at height 1 in which every canister exists, is controlled by the anonymous
/// principal and has public metadata, no request has a status, and certificates are fixed bytes.
struct FixedState(tokio::sync::watch::Sender<Height>);

impl CertifiedStateReader for FixedState {
    fn certified_height(&self) -> Height {
        *self.0.borrow()
    }
    fn certified_time(&self) -> Time {
        NOW
    }
    fn subscribe_certified_height(&self) -> tokio::sync::watch::Receiver<Height> {
        self.0.subscribe()
    }
    fn ingress_status(&self, _request_id: &RequestId) -> Option<IngressStatus> {
        None
    }
    fn canister_controllers(&self, _canister_id: &CanisterId) -> Option<Vec<Principal>> {
        Some(vec![Principal::anonymous()])
    }
    fn metadata_visibility(&self, _id: &CanisterId, _name: &str) -> Option<MetadataVisibility> {
        Some(MetadataVisibility::Public)
    }
    fn certificate_for_paths(&self, paths: &[LabelPath]) -> Result<Vec<u8>, CertificationError> {
        Ok(format!("certificate of {} paths", paths.len()).into_bytes())
    }
    fn certificate_for_paths_at(
        &self,
        paths: &[LabelPath],
        height: Height,
    ) -> Result<Option<Vec<u8>>, CertificationError> {
        if height != self.certified_height() {
            return Ok(None);
        }
        self.certificate_for_paths(paths).map(Some)
    }
    fn data_certificate(&self, _canister_id: &CanisterId) -> Result<Vec<u8>, CertificationError> {
        Ok(b"data certificate".to_vec())
    }
}

/// Accepts every message and forgets it.
struct AcceptAll;

impl IngressPool for AcceptAll {
    fn submit(&self, _message: SignedIngress) -> Result<(), IngressPoolError> {
        Ok(())
    }
}

impl IngressInspector for AcceptAll {
    fn inspect(&self, _message: &SignedIngress) -> Result<(), UserError> {
        Ok(())
    }
}

/// Replies to every query with an empty Candid message.
struct FixedReply;

impl QueryExecutor for FixedReply {
    fn query(&self, _query: UserQuery) -> QueryResult {
        QueryResult::Reply(b"DIDL\x00\x00".to_vec())
    }
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    subnet_id: SubnetId,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let root_key_der = openic_crypto::SubnetSigningKey::from_secret_bytes(&[7; 32])
            .expect("fixed subnet key")
            .public_key_der()
            .to_vec();
        let subnet_id = SubnetId(openic_crypto::self_authenticating_principal(&root_key_der));
        let deps = HttpApiDeps {
            ingress_pool: Arc::new(AcceptAll),
            inspector: Arc::new(AcceptAll),
            query_executor: Arc::new(FixedReply),
            certified_state: Arc::new(FixedState(tokio::sync::watch::channel(Height(1)).0)),
            node_key: Arc::new(NodeKey::from_secret_bytes(&[42; 32]).expect("fixed node key")),
            root_key_der,
            subnet_id,
            clock: Arc::new(|| NOW),
            metrics: Arc::new(HttpMetrics::unregistered()),
            node_health: always_healthy(),
        };
        let config = HttpApiConfig {
            // Synchronous calls never see a status here: do not wait for one.
            sync_call_timeout: Duration::from_millis(1),
            ..HttpApiConfig::default()
        };
        Harness {
            runtime,
            router: router(config, deps),
            subnet_id,
        }
    })
}

/// `OPENIC_FUZZ_VERBOSE=1` prints each answer (to check that seeds get past validation).
fn verbose() -> bool {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("OPENIC_FUZZ_VERBOSE").is_some())
}

fuzz_target!(|data: &[u8]| {
    let [endpoint, id, body @ ..] = data else {
        return;
    };
    let harness = harness();
    let id = match id % 4 {
        0 => CanisterId::management().get().to_text(),
        1 => CanisterId::from_u64(0).get().to_text(),
        2 => harness.subnet_id.0.to_text(),
        _ => "not-a-principal".to_string(),
    };
    let path: String = ENDPOINTS[usize::from(*endpoint) % ENDPOINTS.len()].replace("{id}", &id);
    let request = Request::post(&path)
        .header(header::CONTENT_TYPE, "application/cbor")
        .body(Body::from(body.to_vec()))
        .expect("a well-formed request");
    let response = harness
        .runtime
        .block_on(harness.router.clone().oneshot(request))
        .expect("the router is infallible");
    let status = response.status();
    // Read the whole answer, as a client would.
    let body = harness
        .runtime
        .block_on(axum::body::to_bytes(response.into_body(), usize::MAX));
    if verbose() {
        let shown = body.map(|b| String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned());
        eprintln!("POST {path}: {status} {shown:?}");
    }
});
