//! Fakes of the components behind the HTTP interface, and request builders, for the unit tests.

use crate::{HttpApiConfig, HttpApiDeps, HttpMetrics, router};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use k256::ecdsa::signature::Signer as _;
use openic_crypto::NodeKey;
use openic_crypto::request_id::{request_id, text_map};
use openic_interfaces::{
    CertificationError, CertifiedStateReader, IngressInspector, IngressPool, IngressPoolError,
    IngressStatusMeta, LabelPath, MetadataVisibility, QueryExecutor,
};
use openic_types::{
    CanisterId, Height, IngressEnvelope, IngressStatus, Principal, QueryResult, RequestId,
    SignedIngress, SubnetId, Time, UserError, UserQuery,
};
use serde_cbor::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::ServiceExt as _;

/// The fixed wall-clock time of the tests.
pub(crate) const NOW: Time = Time(1_700_000_000_000_000_000);

/// A field of a CBOR map value (Null if absent).
pub(crate) fn field(value: &Value, name: &str) -> Value {
    match value {
        Value::Map(map) => map
            .get(&Value::Text(name.to_string()))
            .cloned()
            .unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

/// Certified state held in memory; certificates are a recognisable encoding of the paths.
pub(crate) struct FakeState {
    height: tokio::sync::watch::Sender<Height>,
    statuses: Mutex<BTreeMap<RequestId, IngressStatus>>,
    controllers: Mutex<BTreeMap<CanisterId, Vec<Principal>>>,
    metadata: Mutex<BTreeMap<(CanisterId, String), MetadataVisibility>>,
    refuse: AtomicBool,
    time: Mutex<Time>,
    /// Lookups of statuses (full or meta).
    status_lookups: AtomicUsize,
    /// Full statuses handed out (each a clone of the reply).
    status_clones: AtomicUsize,
    /// Applied right after the next meta lookup, with the height raised by one: simulates a
    /// certification landing between authorisation and certificate.
    certify_after_next_lookup: Mutex<Option<(RequestId, IngressStatus)>>,
}

impl FakeState {
    pub(crate) fn set_height(&self, height: Height) {
        self.height.send_replace(height);
    }
    pub(crate) fn set_time(&self, time: Time) {
        *self.time.lock().unwrap() = time;
    }
    /// (status lookups, full status clones) so far.
    pub(crate) fn status_reads(&self) -> (usize, usize) {
        (
            self.status_lookups.load(Ordering::SeqCst),
            self.status_clones.load(Ordering::SeqCst),
        )
    }
    pub(crate) fn certify_after_next_lookup(&self, id: RequestId, status: IngressStatus) {
        *self.certify_after_next_lookup.lock().unwrap() = Some((id, status));
    }
    pub(crate) fn set_status(&self, id: RequestId, status: IngressStatus) {
        self.statuses.lock().unwrap().insert(id, status);
    }
    pub(crate) fn set_canister(&self, id: CanisterId, controllers: Vec<Principal>) {
        self.controllers.lock().unwrap().insert(id, controllers);
    }
    pub(crate) fn set_metadata(&self, id: CanisterId, name: &str, visibility: MetadataVisibility) {
        self.metadata
            .lock()
            .unwrap()
            .insert((id, name.to_string()), visibility);
    }
    pub(crate) fn refuse_certificates(&self) {
        self.refuse.store(true, Ordering::SeqCst);
    }
    /// What `certificate_for_paths(paths)` returns.
    pub(crate) fn certificate_bytes(&self, paths: &[LabelPath]) -> Vec<u8> {
        let mut bytes = b"certificate:".to_vec();
        bytes.extend(serde_cbor::to_vec(&paths).unwrap());
        bytes
    }
}

impl CertifiedStateReader for FakeState {
    fn certified_height(&self) -> Height {
        *self.height.borrow()
    }
    fn certified_time(&self) -> Time {
        *self.time.lock().unwrap()
    }
    fn subscribe_certified_height(&self) -> tokio::sync::watch::Receiver<Height> {
        self.height.subscribe()
    }
    fn ingress_status(&self, request_id: &RequestId) -> Option<IngressStatus> {
        self.status_lookups.fetch_add(1, Ordering::SeqCst);
        self.status_clones.fetch_add(1, Ordering::SeqCst);
        self.statuses.lock().unwrap().get(request_id).cloned()
    }
    fn ingress_status_meta(&self, request_id: &RequestId) -> Option<IngressStatusMeta> {
        self.status_lookups.fetch_add(1, Ordering::SeqCst);
        let meta = self
            .statuses
            .lock()
            .unwrap()
            .get(request_id)
            .map(IngressStatusMeta::of);
        let pending = self.certify_after_next_lookup.lock().unwrap().take();
        if let Some((id, status)) = pending {
            self.set_status(id, status);
            let next = Height(self.certified_height().0 + 1);
            self.set_height(next);
        }
        meta
    }
    fn canister_controllers(&self, canister_id: &CanisterId) -> Option<Vec<Principal>> {
        self.controllers.lock().unwrap().get(canister_id).cloned()
    }
    fn metadata_visibility(
        &self,
        canister_id: &CanisterId,
        name: &str,
    ) -> Option<MetadataVisibility> {
        self.metadata
            .lock()
            .unwrap()
            .get(&(*canister_id, name.to_string()))
            .copied()
    }
    fn certificate_for_paths(&self, paths: &[LabelPath]) -> Result<Vec<u8>, CertificationError> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(CertificationError::NotYetCertified);
        }
        Ok(self.certificate_bytes(paths))
    }
    fn certificate_for_paths_at(
        &self,
        paths: &[LabelPath],
        height: Height,
    ) -> Result<Option<Vec<u8>>, CertificationError> {
        let certificate = self.certificate_for_paths(paths)?;
        Ok((self.certified_height() == height).then_some(certificate))
    }
    fn data_certificate(&self, _canister_id: &CanisterId) -> Result<Vec<u8>, CertificationError> {
        Err(CertificationError::NotYetCertified)
    }
}

/// An ingress pool that records what it gets.
#[derive(Default)]
pub(crate) struct FakePool {
    submitted: Mutex<Vec<SignedIngress>>,
    envelopes: Mutex<Vec<IngressEnvelope>>,
    fail: Mutex<Option<IngressPoolError>>,
}

impl FakePool {
    pub(crate) fn submitted(&self) -> Vec<SignedIngress> {
        self.submitted.lock().unwrap().clone()
    }
    pub(crate) fn envelopes(&self) -> Vec<IngressEnvelope> {
        self.envelopes.lock().unwrap().clone()
    }
    pub(crate) fn fail_with(&self, error: IngressPoolError) {
        *self.fail.lock().unwrap() = Some(error);
    }
}

impl IngressPool for FakePool {
    fn submit(
        &self,
        message: SignedIngress,
        envelope: IngressEnvelope,
    ) -> Result<(), IngressPoolError> {
        if let Some(error) = self.fail.lock().unwrap().clone() {
            return Err(error);
        }
        self.submitted.lock().unwrap().push(message);
        self.envelopes.lock().unwrap().push(envelope);
        Ok(())
    }
}

/// An inspector that accepts everything unless told otherwise.
#[derive(Default)]
pub(crate) struct FakeInspector {
    reject: Mutex<Option<UserError>>,
}

impl FakeInspector {
    pub(crate) fn reject_with(&self, error: UserError) {
        *self.reject.lock().unwrap() = Some(error);
    }
}

impl IngressInspector for FakeInspector {
    fn inspect(&self, _message: &SignedIngress) -> Result<(), UserError> {
        match self.reject.lock().unwrap().clone() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// A query executor with a canned answer.
pub(crate) struct FakeQueries {
    answer: Mutex<QueryResult>,
    seen: Mutex<Vec<UserQuery>>,
    /// How long each query blocks its thread.
    delay: Mutex<Duration>,
    /// How long queries of a given method compute (busy, using CPU time), instead of `delay`.
    delays: Mutex<std::collections::BTreeMap<String, Duration>>,
}

impl FakeQueries {
    pub(crate) fn take(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }
    pub(crate) fn take_for(&self, method: &str, delay: Duration) {
        self.delays
            .lock()
            .unwrap()
            .insert(method.to_string(), delay);
    }
    pub(crate) fn answer(&self, result: QueryResult) {
        *self.answer.lock().unwrap() = result;
    }
    pub(crate) fn seen(&self) -> Vec<UserQuery> {
        self.seen.lock().unwrap().clone()
    }
}

impl QueryExecutor for FakeQueries {
    fn query(&self, query: UserQuery) -> QueryResult {
        let busy = self.delays.lock().unwrap().get(&query.method_name).copied();
        self.seen.lock().unwrap().push(query);
        match busy {
            // A method's own delay is spent computing (it costs CPU time, as a real one would).
            Some(delay) => {
                let started = std::time::Instant::now();
                while started.elapsed() < delay {
                    std::hint::spin_loop();
                }
            }
            None => std::thread::sleep(*self.delay.lock().unwrap()),
        }
        self.answer.lock().unwrap().clone()
    }
}

/// A router over fakes.
pub(crate) struct TestNode {
    pub(crate) config: HttpApiConfig,
    pub(crate) state: Arc<FakeState>,
    pub(crate) pool: Arc<FakePool>,
    pub(crate) inspector: Arc<FakeInspector>,
    pub(crate) queries: Arc<FakeQueries>,
    pub(crate) node_key: Arc<NodeKey>,
    pub(crate) root_key: Vec<u8>,
    pub(crate) subnet_id: SubnetId,
    pub(crate) metrics: Arc<HttpMetrics>,
    now: Time,
    router: axum::Router,
    halted: Arc<Mutex<Option<String>>>,
}

impl TestNode {
    pub(crate) fn new() -> TestNode {
        TestNode::with_config(HttpApiConfig::default())
    }

    pub(crate) fn with_sync_timeout(timeout: Duration) -> TestNode {
        TestNode::with_config(HttpApiConfig {
            sync_call_timeout: timeout,
            ..HttpApiConfig::default()
        })
    }

    /// Reports through `node_health` that the node stopped making blocks.
    pub(crate) fn halt(&self, reason: &str) {
        *self.halted.lock().unwrap() = Some(reason.to_string());
    }

    pub(crate) fn with_config(config: HttpApiConfig) -> TestNode {
        TestNode::with_config_and_clock(config, NOW)
    }

    /// A node whose clock stands at `now`.
    pub(crate) fn with_clock(now: Time) -> TestNode {
        TestNode::with_config_and_clock(HttpApiConfig::default(), now)
    }

    fn with_config_and_clock(config: HttpApiConfig, now: Time) -> TestNode {
        let state = Arc::new(FakeState {
            height: tokio::sync::watch::channel(Height(0)).0,
            statuses: Mutex::default(),
            controllers: Mutex::default(),
            metadata: Mutex::default(),
            refuse: AtomicBool::new(false),
            time: Mutex::new(now),
            status_lookups: AtomicUsize::new(0),
            status_clones: AtomicUsize::new(0),
            certify_after_next_lookup: Mutex::default(),
        });
        let halted: Arc<Mutex<Option<String>>> = Arc::default();
        let health = halted.clone();
        let pool = Arc::new(FakePool::default());
        let inspector = Arc::new(FakeInspector::default());
        let queries = Arc::new(FakeQueries {
            answer: Mutex::new(QueryResult::Reply(b"DIDL\x00\x00".to_vec())),
            seen: Mutex::default(),
            delay: Mutex::default(),
            delays: Mutex::default(),
        });
        let node_key = Arc::new(NodeKey::from_secret_bytes(&[42; 32]).unwrap());
        let root_key = openic_crypto::SubnetSigningKey::generate()
            .public_key_der()
            .to_vec();
        let subnet_id = SubnetId(openic_crypto::self_authenticating_principal(&root_key));
        let metrics = Arc::new(HttpMetrics::unregistered());
        let deps = HttpApiDeps {
            ingress_pool: pool.clone(),
            inspector: inspector.clone(),
            query_executor: queries.clone(),
            certified_state: state.clone(),
            node_key: node_key.clone(),
            root_key_der: root_key.clone(),
            subnet_id,
            clock: Arc::new(move || now),
            metrics: metrics.clone(),
            node_health: Arc::new(move || health.lock().unwrap().clone()),
        };
        TestNode {
            router: router(config.clone(), deps),
            config,
            state,
            pool,
            inspector,
            queries,
            node_key,
            root_key,
            subnet_id,
            metrics,
            now,
            halted,
        }
    }

    pub(crate) fn router(&self) -> axum::Router {
        self.router.clone()
    }

    pub(crate) fn now(&self) -> Time {
        self.now
    }

    async fn send(&self, request: Request<Body>) -> (StatusCode, Vec<u8>) {
        let (status, _, body) = self.send_full(request).await;
        (status, body)
    }

    async fn send_full(
        &self,
        request: Request<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, headers, body.to_vec())
    }

    /// `post` with the response headers.
    pub(crate) async fn post_full(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        self.send_full(
            Request::post(path)
                .header("content-type", "application/cbor")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
    }

    pub(crate) async fn get(&self, path: &str) -> (StatusCode, Vec<u8>) {
        self.send(Request::get(path).body(Body::empty()).unwrap())
            .await
    }

    pub(crate) async fn post(&self, path: &str, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        self.send(
            Request::post(path)
                .header("content-type", "application/cbor")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
    }
}

/// A user: anonymous or holding a key in one of the supported schemes.
pub(crate) enum Sender {
    Anonymous,
    Ed25519(ic_ed25519::PrivateKey),
    Secp256k1(k256::ecdsa::SigningKey),
    P256(p256::ecdsa::SigningKey),
}

impl Sender {
    pub(crate) fn anonymous() -> Sender {
        Sender::Anonymous
    }
    pub(crate) fn ed25519(seed: u8) -> Sender {
        Sender::Ed25519(ic_ed25519::PrivateKey::generate_from_seed(&[seed; 32]))
    }
    pub(crate) fn secp256k1(seed: u8) -> Sender {
        Sender::Secp256k1(k256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap())
    }
    pub(crate) fn p256(seed: u8) -> Sender {
        Sender::P256(p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap())
    }

    fn der(&self) -> Option<Vec<u8>> {
        use openic_crypto::signatures::{ECDSA_P256_DER_PREFIX, ECDSA_SECP256K1_DER_PREFIX};
        match self {
            Sender::Anonymous => None,
            Sender::Ed25519(key) => Some(key.public_key().serialize_rfc8410_der()),
            Sender::Secp256k1(key) => {
                let mut der = ECDSA_SECP256K1_DER_PREFIX.to_vec();
                der.extend_from_slice(key.verifying_key().to_encoded_point(false).as_bytes());
                Some(der)
            }
            Sender::P256(key) => {
                let mut der = ECDSA_P256_DER_PREFIX.to_vec();
                der.extend_from_slice(key.verifying_key().to_encoded_point(false).as_bytes());
                Some(der)
            }
        }
    }

    fn sign(&self, message: &[u8]) -> Option<Vec<u8>> {
        match self {
            Sender::Anonymous => None,
            Sender::Ed25519(key) => Some(key.sign_message(message).to_vec()),
            Sender::Secp256k1(key) => {
                let signature: k256::ecdsa::Signature = key.sign(message);
                Some(signature.to_bytes().to_vec())
            }
            Sender::P256(key) => {
                let signature: p256::ecdsa::Signature = key.sign(message);
                Some(signature.to_bytes().to_vec())
            }
        }
    }

    pub(crate) fn principal(&self) -> Principal {
        match self.der() {
            Some(der) => openic_crypto::self_authenticating_principal(&der),
            None => Principal::anonymous(),
        }
    }

    fn envelope_with(
        &self,
        content: BTreeMap<Value, Value>,
        corrupt: bool,
    ) -> (Vec<u8>, RequestId) {
        let id = request_id(&content).unwrap();
        let mut envelope = text_map([("content", Value::Map(content))]);
        let mut message = b"\x0Aic-request".to_vec();
        message.extend_from_slice(&id.0);
        if let (Some(der), Some(mut signature)) = (self.der(), self.sign(&message)) {
            if corrupt {
                signature[5] ^= 0x40;
            }
            envelope.insert(Value::Text("sender_pubkey".into()), Value::Bytes(der));
            envelope.insert(Value::Text("sender_sig".into()), Value::Bytes(signature));
        }
        (crate::cbor::encode(&Value::Map(envelope)), id)
    }

    /// A signed envelope around `content`, and its request id.
    pub(crate) fn envelope(&self, content: BTreeMap<Value, Value>) -> (Vec<u8>, RequestId) {
        self.envelope_with(content, false)
    }

    /// An envelope whose signature does not verify.
    pub(crate) fn envelope_with_bad_signature(&self, content: BTreeMap<Value, Value>) -> Vec<u8> {
        self.envelope_with(content, true).0
    }
}

fn expiry(node: &TestNode) -> Value {
    Value::Integer(i128::from(node.now().0) + 180_000_000_000)
}

/// The content of a call like ic-agent sends it (with a 16-byte nonce).
pub(crate) fn call_content(
    node: &TestNode,
    sender: &Sender,
    canister: u64,
    method: &str,
) -> BTreeMap<Value, Value> {
    text_map([
        ("request_type", Value::Text("call".into())),
        (
            "sender",
            Value::Bytes(sender.principal().as_slice().to_vec()),
        ),
        ("ingress_expiry", expiry(node)),
        (
            "canister_id",
            Value::Bytes(CanisterId::from_u64(canister).get().as_slice().to_vec()),
        ),
        ("method_name", Value::Text(method.into())),
        ("arg", Value::Bytes(b"DIDL\x00\x00".to_vec())),
        ("nonce", Value::Bytes(vec![3; 16])),
    ])
}

/// The content of a query.
pub(crate) fn query_content(
    node: &TestNode,
    sender: &Sender,
    canister: u64,
    method: &str,
) -> BTreeMap<Value, Value> {
    let mut content = call_content(node, sender, canister, method);
    content.insert(
        Value::Text("request_type".into()),
        Value::Text("query".into()),
    );
    content.remove(&Value::Text("nonce".into()));
    content
}

/// The content of a read_state request.
pub(crate) fn read_state_content(
    node: &TestNode,
    sender: &Sender,
    paths: Vec<Vec<&[u8]>>,
) -> BTreeMap<Value, Value> {
    text_map([
        ("request_type", Value::Text("read_state".into())),
        (
            "sender",
            Value::Bytes(sender.principal().as_slice().to_vec()),
        ),
        ("ingress_expiry", expiry(node)),
        (
            "paths",
            Value::Array(
                paths
                    .into_iter()
                    .map(|path| {
                        Value::Array(path.into_iter().map(|l| Value::Bytes(l.to_vec())).collect())
                    })
                    .collect(),
            ),
        ),
    ])
}
