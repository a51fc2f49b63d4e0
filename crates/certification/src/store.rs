//! The certified state store: keeps the state tree up to date after every block, signs its root,
//! and serves certificates, statuses and snapshots of the latest certified height to readers.

use crate::encoding::{
    SubnetMetrics, canister_range_shards, canister_state_bytes, canister_tree,
    encode_canister_ranges, encode_subnet_metrics, leb128, request_status_tree, same_canister_tree,
};
use crate::tree::{LabeledMap, Node, PathSet, TreeValue};
use ic_certification::hash_tree::Hash;
use ic_certification::{Certificate, HashTree};
use openic_crypto::SubnetSigningKey;
use openic_interfaces::{
    CanistersSnapshot, CertificationError, CertifiedStateReader, IngressStatusMeta, LabelPath,
    MetadataVisibility, StateSnapshotSource,
};
use openic_replicated_state::{CanisterLogs, CanisterSnapshots, CanisterState, ReplicatedState};
use openic_types::ids::CanisterIdRange;
use openic_types::{
    CanisterId, Height, IngressStatus, NodeId, Principal, RequestId, SubnetId, Time,
};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Domain separator of the signed state root (`"\x0Dic-state-root"`).
pub const STATE_ROOT_DOMAIN_SEPARATOR: &[u8] = openic_crypto::bls::STATE_ROOT_DOMAIN_SEPARATOR;

/// The message a subnet signs to certify a state: `STATE_ROOT_DOMAIN_SEPARATOR || root_hash`.
pub fn state_root_message(root_hash: &[u8; 32]) -> Vec<u8> {
    let mut message = STATE_ROOT_DOMAIN_SEPARATOR.to_vec();
    message.extend_from_slice(root_hash);
    message
}

/// At most this many paths in one certificate request.
pub const MAX_PATHS_PER_REQUEST: usize = 1_000;

/// At most this many labels in one path (the deepest real path, `/canister/<id>/metadata/<name>`,
/// has four).
pub const MAX_LABELS_PER_PATH: usize = 16;

/// At most this many bytes in one label (metadata section names are the longest labels).
pub const MAX_LABEL_BYTES: usize = 1_024;

/// Root-level subtrees that grow with use; requests must name an entry below them (the spec
/// allows no path that ends at them, and revealing one whole would make an unbounded certificate).
const UNBOUNDED_SUBTREES: [&[u8]; 2] = [b"canister", b"request_status"];

/// The identity of the subnet this node certifies for.
#[derive(Clone, Debug)]
pub struct SubnetInfo {
    /// `self_authenticating(root_key_der)`: with no delegation, the clients derive it this way.
    pub subnet_id: SubnetId,
    /// The subnet's BLS public key, DER-encoded (133 bytes): the root key of a one-subnet network.
    pub root_key_der: Vec<u8>,
    /// This node's id.
    pub node_id: NodeId,
    /// This node's Ed25519 public key, DER-encoded (44 bytes); clients check query signatures with it.
    pub node_public_key_der: Vec<u8>,
    /// The subnet's other replicas and their Ed25519 public keys (DER): `/subnet/<id>/node` lists
    /// every replica, so a client checks a query signature from any of them. Every replica must
    /// list the same members, or their state trees differ.
    pub peer_nodes: Vec<(NodeId, Vec<u8>)>,
    /// The canister id ranges the subnet hosts.
    pub canister_ranges: Vec<CanisterIdRange>,
}

/// An entry of `/request_status`: the status, served by [`CertifiedStateReader::ingress_status`].
/// Its subtree is hashed once on insert (the map caches the digest) and rebuilt on demand for
/// witnesses, so a reply is held once, not twice.
#[derive(Clone)]
struct RequestStatusEntry {
    status: Arc<IngressStatus>,
}

impl TreeValue for RequestStatusEntry {
    fn digest(&self) -> Hash {
        request_status_tree(&self.status).digest()
    }

    fn witness(&self, paths: &PathSet) -> HashTree {
        request_status_tree(&self.status).witness(paths)
    }
}

/// The top level of the state tree. The two large subtrees are held in their own types (the
/// request statuses are not `Node`s), so the root is assembled here rather than as a `Node::Map`.
#[derive(Clone)]
struct StateTree {
    canister: LabeledMap<Node>,
    canister_ranges: Node,
    request_status: LabeledMap<RequestStatusEntry>,
    subnet: Node,
    time: Node,
}

/// A root-level child of the state tree.
#[derive(Clone)]
enum RootChild<'a> {
    Node(&'a Node),
    Canisters(&'a LabeledMap<Node>),
    RequestStatuses(&'a LabeledMap<RequestStatusEntry>),
}

impl TreeValue for RootChild<'_> {
    fn digest(&self) -> Hash {
        match self {
            RootChild::Node(node) => node.digest(),
            RootChild::Canisters(map) => map.digest(),
            RootChild::RequestStatuses(map) => map.digest(),
        }
    }

    fn witness(&self, paths: &PathSet) -> HashTree {
        match self {
            RootChild::Node(node) => node.witness(paths),
            RootChild::Canisters(map) if paths.is_full() => map.full_witness(),
            RootChild::Canisters(map) => map.witness(paths.children()),
            RootChild::RequestStatuses(map) if paths.is_full() => map.full_witness(),
            RootChild::RequestStatuses(map) => map.witness(paths.children()),
        }
    }
}

impl StateTree {
    /// The root as a (five-entry) labeled map over borrowed children. Building it hashes five
    /// labels; the children's digests are cached.
    fn root(&self) -> LabeledMap<RootChild<'_>> {
        let mut root = LabeledMap::new();
        root.insert(b"canister", RootChild::Canisters(&self.canister));
        root.insert(b"canister_ranges", RootChild::Node(&self.canister_ranges));
        root.insert(
            b"request_status",
            RootChild::RequestStatuses(&self.request_status),
        );
        root.insert(b"subnet", RootChild::Node(&self.subnet));
        root.insert(b"time", RootChild::Node(&self.time));
        root.seal();
        root
    }
}

/// One certified height, as readers see it.
struct Published {
    height: Height,
    time: Time,
    tree: StateTree,
    signature: [u8; openic_crypto::bls::BLS_SIGNATURE_LENGTH],
    canisters: Arc<BTreeMap<CanisterId, Arc<CanisterState>>>,
    logs: Arc<CanisterLogs>,
    snapshots: Arc<CanisterSnapshots>,
    /// Data certificates already built at this height (every query of a canister gets the same
    /// one until the next height), at most [`MAX_CACHED_DATA_CERTIFICATES`].
    data_certificates: Mutex<BTreeMap<CanisterId, Vec<u8>>>,
}

/// Most data certificates kept per height; queries to further canisters build theirs each time.
const MAX_CACHED_DATA_CERTIFICATES: usize = 1_024;

/// Most heights prepared but not yet certified. A subnet's replicas sign each height and wait for
/// enough signature shares; when more wait, the oldest is dropped (see
/// [`CertifiedStateStore::prepare`]).
pub const MAX_PENDING_HEIGHTS: usize = 256;

/// A height whose tree is built and hashed but whose root is not yet signed.
struct Pending {
    root_hash: [u8; 32],
    time: Time,
    tree: StateTree,
    canisters: Arc<BTreeMap<CanisterId, Arc<CanisterState>>>,
    logs: Arc<CanisterLogs>,
    snapshots: Arc<CanisterSnapshots>,
}

/// Why [`CertifiedStateStore::prepare`] or [`CertifiedStateStore::publish`] refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The height was never prepared, or was already published or superseded.
    #[error("height {0} is not waiting for certification")]
    NotPending(Height),
    /// Heights must be prepared in increasing order.
    #[error("height {prepared} was prepared after height {latest}; heights must increase")]
    NotIncreasing {
        /// The height just prepared.
        prepared: Height,
        /// The latest height prepared before it.
        latest: Height,
    },
}

/// What the block thread keeps between heights to update the tree incrementally.
#[derive(Default)]
struct Builder {
    /// `false` until the first certification (or after [`CertifiedStateStore::request_full_rebuild`]).
    initialized: bool,
    request_status: LabeledMap<RequestStatusEntry>,
    canister: LabeledMap<Node>,
    /// The canister states the `canister` subtree was built from.
    canister_sources: BTreeMap<CanisterId, Arc<CanisterState>>,
}

/// Builds, signs and serves the certified state tree of a one-subnet node.
///
/// Implements [`CertifiedStateReader`] and [`StateSnapshotSource`]; shared via `Arc` between the
/// block thread (which calls [`CertifiedStateStore::certify`]) and the HTTP threads.
///
/// Invariant: every reader call sees exactly one published height (tree, signature and canister
/// snapshot are swapped in together); `certify` holds the write lock only for that swap.
pub struct CertifiedStateStore {
    subnet: SubnetInfo,
    /// The whole subnet key, for a one-replica subnet that signs its own heights; `None` on a
    /// replica of a multi-replica subnet, whose heights are certified by threshold signatures.
    signing_key: Option<Arc<SubnetSigningKey>>,
    /// `/canister_ranges`, which never changes.
    canister_ranges_tree: Node,
    builder: Mutex<Builder>,
    /// Heights prepared and hashed, waiting for their signature, in increasing order.
    pending: Mutex<BTreeMap<Height, Pending>>,
    published: RwLock<Option<Arc<Published>>>,
    height_sender: tokio::sync::watch::Sender<Height>,
}

impl std::fmt::Debug for CertifiedStateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedStateStore")
            .field("subnet_id", &self.subnet.subnet_id)
            .field("certified_height", &self.certified_height())
            .finish()
    }
}

impl CertifiedStateStore {
    /// A store for a one-replica `subnet` that signs with the whole `signing_key`. Nothing is
    /// certified until the first [`CertifiedStateStore::certify`].
    pub fn new(subnet: SubnetInfo, signing_key: Arc<SubnetSigningKey>) -> Self {
        Self::build(subnet, Some(signing_key))
    }

    /// A store for a replica of a multi-replica subnet: it holds no subnet key. Each height is
    /// [`CertifiedStateStore::prepare`]d after execution and becomes visible to readers when
    /// [`CertifiedStateStore::publish`] brings the subnet's threshold signature of its root.
    pub fn new_threshold(subnet: SubnetInfo) -> Self {
        Self::build(subnet, None)
    }

    fn build(subnet: SubnetInfo, signing_key: Option<Arc<SubnetSigningKey>>) -> Self {
        let shards = canister_range_shards(&subnet.canister_ranges)
            .into_iter()
            .map(|(first, encoded)| (first.get().as_slice().to_vec(), Node::leaf(encoded)));
        let canister_ranges_tree =
            Node::map([(subnet.subnet_id.0.as_slice().to_vec(), Node::map(shards))]);
        let (height_sender, _) = tokio::sync::watch::channel(Height(0));
        CertifiedStateStore {
            subnet,
            signing_key,
            canister_ranges_tree,
            builder: Mutex::new(Builder::default()),
            pending: Mutex::new(BTreeMap::new()),
            published: RwLock::new(None),
            height_sender,
        }
    }

    /// The subnet this store certifies for.
    pub fn subnet(&self) -> &SubnetInfo {
        &self.subnet
    }

    /// Makes the next [`CertifiedStateStore::certify`] rebuild the whole tree from the state
    /// instead of applying changes (call after replacing the state, e.g. loading a checkpoint).
    pub fn request_full_rebuild(&self) {
        self.builder.lock().initialized = false;
        // Heights prepared from the replaced state will never be certified as they are.
        self.pending.lock().clear();
    }

    /// Called on the block thread of a one-replica subnet after each executed block:
    /// [`CertifiedStateStore::prepare`]s the height, signs its root with the whole subnet key and
    /// [`CertifiedStateStore::publish`]es it. Returns the root hash.
    ///
    /// Cost: that of `prepare` plus one BLS signature.
    ///
    /// # Panics
    /// On a store made with [`CertifiedStateStore::new_threshold`], which holds no key: such a
    /// replica's heights are certified by the subnet, not by itself.
    pub fn certify(&self, state: &mut ReplicatedState) -> [u8; 32] {
        let signing_key = Arc::clone(
            self.signing_key
                .as_ref()
                .expect("certify is only called on a one-replica subnet, which holds its key"),
        );
        // A one-replica subnet publishes every height it prepares, so nothing is ever pending
        // and heights increase: neither refusal of `prepare` can happen.
        let root_hash = match self.prepare(state) {
            Ok(root_hash) => root_hash,
            Err(error) => unreachable!("a one-replica subnet cannot fail to prepare: {error}"),
        };
        let signature = signing_key.sign(&state_root_message(&root_hash));
        if let Err(error) = self.publish(state.metadata.height, signature) {
            unreachable!("a height just prepared is pending: {error}");
        }
        root_hash
    }

    /// Called on the block thread after each executed block: drains the ingress history's change
    /// set, updates the tree (a full rebuild on the first call), computes the root hash of
    /// `state.metadata.height` with `/time = state.metadata.time`, and keeps tree and canister
    /// snapshot until [`CertifiedStateStore::publish`] brings the signature. Returns the root
    /// hash, which each replica signs (`STATE_ROOT_DOMAIN_SEPARATOR || root`).
    ///
    /// Refuses (and changes nothing, not even the change set) when the height is not above the
    /// last prepared one. When [`MAX_PENDING_HEIGHTS`] heights already wait, the oldest is
    /// dropped: a replica catching up executes heights whose signature shares its peers sent long
    /// ago, and only the latest heights will be certified (a later certificate supersedes the
    /// earlier ones, so nothing a reader needs is lost).
    ///
    /// Cost: O(changes · log n) hashing for the request statuses, O(canisters) pointer comparisons
    /// plus re-hashing of changed canisters.
    pub fn prepare(&self, state: &mut ReplicatedState) -> Result<[u8; 32], PublishError> {
        {
            let mut pending = self.pending.lock();
            while pending.len() >= MAX_PENDING_HEIGHTS {
                pending.pop_first();
            }
            let latest = pending
                .keys()
                .next_back()
                .copied()
                .or_else(|| self.latest().map(|published| published.height));
            if let Some(latest) = latest
                && state.metadata.height <= latest
            {
                return Err(PublishError::NotIncreasing {
                    prepared: state.metadata.height,
                    latest,
                });
            }
        }
        let changes = state.ingress_history.take_changes();
        let mut builder = self.builder.lock();
        if builder.initialized {
            for id in changes {
                match state.ingress_history.get(&id) {
                    Some(status) => builder.request_status.insert(
                        id.as_bytes(),
                        RequestStatusEntry {
                            status: Arc::new(status.clone()),
                        },
                    ),
                    None => {
                        builder.request_status.remove(id.as_bytes());
                    }
                }
            }
        } else {
            let mut request_status = LabeledMap::new();
            for (id, status) in state.ingress_history.iter() {
                request_status.insert(
                    id.as_bytes(),
                    RequestStatusEntry {
                        status: Arc::new(status.clone()),
                    },
                );
            }
            builder.request_status = request_status;
            builder.canister = LabeledMap::new();
            builder.canister_sources.clear();
            builder.initialized = true;
        }
        builder.request_status.seal();
        update_canisters(&mut builder, &state.canisters);

        let metrics = SubnetMetrics {
            num_canisters: state.canisters.len() as u64,
            canister_state_bytes: state
                .canisters
                .values()
                .map(|canister| canister_state_bytes(canister))
                .fold(0u64, u64::saturating_add),
            consumed_cycles_total: state.metadata.consumed_cycles_total,
            update_transactions_total: state.metadata.update_transactions_total,
        };
        let tree = StateTree {
            canister: builder.canister.clone(),
            canister_ranges: self.canister_ranges_tree.clone(),
            request_status: builder.request_status.clone(),
            subnet: self.subnet_tree(&metrics),
            time: Node::leaf(leb128(state.metadata.time.as_nanos_since_unix_epoch())),
        };
        drop(builder);

        let root_hash = tree.root().digest();
        self.pending.lock().insert(
            state.metadata.height,
            Pending {
                root_hash,
                time: state.metadata.time,
                tree,
                canisters: Arc::new(state.canisters_snapshot()),
                logs: Arc::new(state.canister_logs.clone()),
                snapshots: Arc::clone(&state.snapshots),
            },
        );
        Ok(root_hash)
    }

    /// The root hash of a prepared height still waiting for its signature.
    pub fn pending_root(&self, height: Height) -> Option<[u8; 32]> {
        self.pending
            .lock()
            .get(&height)
            .map(|pending| pending.root_hash)
    }

    /// Makes prepared `height` the certified state readers see, with `signature` (48-byte BLS,
    /// G1) of its root under the subnet key, and notifies subscribers. Heights below it that
    /// still wait are dropped: a certificate for a later height supersedes them.
    ///
    /// Contract: `signature` has been verified against the subnet's root key over
    /// `STATE_ROOT_DOMAIN_SEPARATOR || pending_root(height)` (the certifier recovers and verifies
    /// every threshold signature). Verifying it again here would cost a pairing per height.
    pub fn publish(
        &self,
        height: Height,
        signature: [u8; openic_crypto::bls::BLS_SIGNATURE_LENGTH],
    ) -> Result<(), PublishError> {
        let pending = {
            let mut waiting = self.pending.lock();
            let Some(pending) = waiting.remove(&height) else {
                return Err(PublishError::NotPending(height));
            };
            // Superseded heights go, later ones keep waiting.
            let later = waiting.split_off(&height);
            *waiting = later;
            pending
        };
        let published = Arc::new(Published {
            height,
            time: pending.time,
            tree: pending.tree,
            signature,
            canisters: pending.canisters,
            logs: pending.logs,
            snapshots: pending.snapshots,
            data_certificates: Mutex::new(BTreeMap::new()),
        });
        // Swap under the lock; drop the previous height (its unshared nodes, maybe the last
        // reference to old canister states) after releasing it.
        let previous = self.published.write().replace(published);
        drop(previous);
        self.height_sender.send_replace(height);
        Ok(())
    }

    /// The latest canister snapshot together with the data certificate for `canister_id` of the
    /// same height (the two trait methods, called one after the other, may straddle a
    /// certification).
    pub fn snapshot_with_data_certificate(
        &self,
        canister_id: &CanisterId,
    ) -> Result<(CanistersSnapshot, Vec<u8>), CertificationError> {
        let set = path_set(&[data_certificate_path(canister_id)])?;
        let published = self.latest().ok_or(CertificationError::NotYetCertified)?;
        let snapshot = CanistersSnapshot {
            height: published.height,
            time: published.time,
            canisters: Arc::clone(&published.canisters),
            logs: Arc::clone(&published.logs),
            snapshots: Arc::clone(&published.snapshots),
        };
        Ok((snapshot, self.certificate(&published, &set)))
    }

    /// `/subnet/<id>`: `canister_ranges`, `metrics`, `node/<id>/public_key`, `public_key`, `type`.
    fn subnet_tree(&self, metrics: &SubnetMetrics) -> Node {
        let subnet = &self.subnet;
        let node = Node::map(
            std::iter::once((&subnet.node_id, &subnet.node_public_key_der))
                .chain(subnet.peer_nodes.iter().map(|(id, key)| (id, key)))
                .map(|(id, key)| {
                    (
                        id.0.as_slice().to_vec(),
                        Node::map([("public_key", Node::leaf(key.clone()))]),
                    )
                }),
        );
        let own = Node::map([
            (
                "canister_ranges",
                Node::leaf(encode_canister_ranges(&subnet.canister_ranges)),
            ),
            ("metrics", Node::leaf(encode_subnet_metrics(metrics))),
            ("node", node),
            ("public_key", Node::leaf(subnet.root_key_der.clone())),
            ("type", Node::leaf(b"application".to_vec())),
        ]);
        Node::map([(subnet.subnet_id.0.as_slice().to_vec(), own)])
    }

    fn latest(&self) -> Option<Arc<Published>> {
        self.published.read().clone()
    }

    /// The CBOR certificate of `published` revealing `paths` and `/time`.
    fn certificate(&self, published: &Published, paths: &PathSet) -> Vec<u8> {
        let tree = published.tree.root().witness(paths.children());
        let certificate = Certificate {
            tree,
            signature: published.signature.to_vec(),
            delegation: None,
        };
        let mut serializer = serde_cbor::Serializer::new(Vec::new());
        // Serialising a hash tree of byte strings into a Vec cannot fail.
        let _ = serializer.self_describe();
        let _ = certificate.serialize(&mut serializer);
        serializer.into_inner()
    }
}

/// Brings the `/canister` subtree in line with `canisters`, re-hashing only canisters whose
/// certified parts changed. A canister whose `Arc` is the one the subtree was built from is
/// unchanged: the builder holds a clone, so execution's copy-on-write gives a changed canister a
/// new `Arc`.
fn update_canisters(builder: &mut Builder, canisters: &BTreeMap<CanisterId, Arc<CanisterState>>) {
    let removed: Vec<CanisterId> = builder
        .canister_sources
        .keys()
        .filter(|id| !canisters.contains_key(id))
        .copied()
        .collect();
    for id in removed {
        builder.canister.remove(id.get().as_slice());
        builder.canister_sources.remove(&id);
    }
    for (id, canister) in canisters {
        let unchanged = builder
            .canister_sources
            .get(id)
            .is_some_and(|old| Arc::ptr_eq(old, canister) || same_canister_tree(old, canister));
        if !unchanged {
            builder
                .canister
                .insert(id.get().as_slice(), canister_tree(canister));
        }
        builder.canister_sources.insert(*id, Arc::clone(canister));
    }
    builder.canister.seal();
}

/// `/canister/<id>/certified_data`.
fn data_certificate_path(canister_id: &CanisterId) -> LabelPath {
    vec![
        b"canister".to_vec(),
        canister_id.get().as_slice().to_vec(),
        b"certified_data".to_vec(),
    ]
}

/// Checks the limits on a request's paths and builds the path set (with `/time` added). Paths
/// into `/request_status/<id>` reveal the whole `<id>` subtree, so a client that asked for the
/// status also gets the reply or rejection it will look up next.
fn path_set(paths: &[LabelPath]) -> Result<PathSet, CertificationError> {
    if paths.len() > MAX_PATHS_PER_REQUEST {
        return Err(CertificationError::InvalidPath(format!(
            "{} paths requested; at most {MAX_PATHS_PER_REQUEST} are allowed per request",
            paths.len()
        )));
    }
    let mut set = PathSet::default();
    set.insert(&[b"time".to_vec()]);
    for path in paths {
        if path.len() > MAX_LABELS_PER_PATH {
            return Err(CertificationError::InvalidPath(format!(
                "a path has {} labels; at most {MAX_LABELS_PER_PATH} are allowed",
                path.len()
            )));
        }
        if let Some(label) = path.iter().find(|label| label.len() > MAX_LABEL_BYTES) {
            return Err(CertificationError::InvalidPath(format!(
                "a label has {} bytes; at most {MAX_LABEL_BYTES} are allowed",
                label.len()
            )));
        }
        if path.is_empty() || (path.len() == 1 && UNBOUNDED_SUBTREES.contains(&&*path[0])) {
            return Err(CertificationError::InvalidPath(format!(
                "the path /{} would reveal an unbounded subtree; name an entry below it",
                path.first()
                    .map(|label| String::from_utf8_lossy(label).into_owned())
                    .unwrap_or_default()
            )));
        }
        if path.len() > 2 && path[0] == b"request_status" {
            set.insert(&path[..2]);
        } else {
            set.insert(path);
        }
    }
    Ok(set)
}

impl CertifiedStateReader for CertifiedStateStore {
    fn certified_height(&self) -> Height {
        self.latest()
            .map_or(Height(0), |published| published.height)
    }

    fn certified_time(&self) -> Time {
        self.latest().map_or(Time(0), |published| published.time)
    }

    fn subscribe_certified_height(&self) -> tokio::sync::watch::Receiver<Height> {
        self.height_sender.subscribe()
    }

    fn ingress_status(&self, request_id: &RequestId) -> Option<IngressStatus> {
        let published = self.latest()?;
        let entry = published.tree.request_status.get(request_id.as_bytes())?;
        Some((*entry.status).clone())
    }

    fn ingress_status_meta(&self, request_id: &RequestId) -> Option<IngressStatusMeta> {
        let published = self.latest()?;
        let entry = published.tree.request_status.get(request_id.as_bytes())?;
        Some(IngressStatusMeta::of(&entry.status))
    }

    fn canister_controllers(&self, canister_id: &CanisterId) -> Option<Vec<Principal>> {
        let published = self.latest()?;
        let canister = published.canisters.get(canister_id)?;
        Some(canister.system_state.controllers.iter().copied().collect())
    }

    fn metadata_visibility(
        &self,
        canister_id: &CanisterId,
        name: &str,
    ) -> Option<MetadataVisibility> {
        let published = self.latest()?;
        let execution = published
            .canisters
            .get(canister_id)?
            .execution_state
            .as_ref()?;
        let info = &execution.module_info;
        if info.public_metadata.contains_key(name) {
            Some(MetadataVisibility::Public)
        } else if info.private_metadata.contains_key(name) {
            Some(MetadataVisibility::Private)
        } else {
            None
        }
    }

    fn certificate_for_paths(&self, paths: &[LabelPath]) -> Result<Vec<u8>, CertificationError> {
        let set = path_set(paths)?;
        let published = self.latest().ok_or(CertificationError::NotYetCertified)?;
        Ok(self.certificate(&published, &set))
    }

    fn certificate_for_paths_at(
        &self,
        paths: &[LabelPath],
        height: Height,
    ) -> Result<Option<Vec<u8>>, CertificationError> {
        let set = path_set(paths)?;
        let published = self.latest().ok_or(CertificationError::NotYetCertified)?;
        if published.height != height {
            return Ok(None);
        }
        Ok(Some(self.certificate(&published, &set)))
    }

    fn data_certificate(&self, canister_id: &CanisterId) -> Result<Vec<u8>, CertificationError> {
        let published = self.latest().ok_or(CertificationError::NotYetCertified)?;
        if let Some(cached) = published.data_certificates.lock().get(canister_id) {
            return Ok(cached.clone());
        }
        let set = path_set(&[data_certificate_path(canister_id)])?;
        let certificate = self.certificate(&published, &set);
        let mut cache = published.data_certificates.lock();
        if cache.len() < MAX_CACHED_DATA_CERTIFICATES {
            cache.insert(*canister_id, certificate.clone());
        }
        Ok(certificate)
    }
}

impl StateSnapshotSource for CertifiedStateStore {
    fn latest_snapshot(&self) -> CanistersSnapshot {
        match self.latest() {
            Some(published) => CanistersSnapshot {
                height: published.height,
                time: published.time,
                canisters: Arc::clone(&published.canisters),
                logs: Arc::clone(&published.logs),
                snapshots: Arc::clone(&published.snapshots),
            },
            None => CanistersSnapshot {
                height: Height(0),
                time: Time(0),
                canisters: Arc::new(BTreeMap::new()),
                logs: Arc::new(BTreeMap::new()),
                snapshots: Arc::default(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ic_certification::{LookupResult, SubtreeLookupResult};
    use openic_crypto::{NodeKey, self_authenticating_principal};
    use openic_replicated_state::{ExecutionState, ModuleInfo, PageMap, SystemState, WasmBinary};
    use openic_types::ids::{FIRST_USER_CANISTER_INDEX, subnet_canister_ranges};
    use openic_types::{Cycles, ErrorCode, IngressState, RejectCode, UserError};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeSet;

    struct Fixture {
        store: CertifiedStateStore,
        state: ReplicatedState,
        root_key: Vec<u8>,
        subnet_id: Principal,
        node_id: Principal,
        node_key_der: Vec<u8>,
    }

    fn fixture() -> Fixture {
        let signing_key = Arc::new(SubnetSigningKey::generate());
        let node_key = NodeKey::generate();
        let root_key = signing_key.public_key_der().to_vec();
        let subnet_id = self_authenticating_principal(&root_key);
        let subnet = SubnetInfo {
            subnet_id: SubnetId(subnet_id),
            root_key_der: root_key.clone(),
            node_id: NodeId(node_key.node_id()),
            node_public_key_der: node_key.public_key_der().to_vec(),
            peer_nodes: Vec::new(),
            canister_ranges: subnet_canister_ranges(),
        };
        let mut state =
            ReplicatedState::new(SubnetId(subnet_id), FIRST_USER_CANISTER_INDEX, [7; 32]);
        state.metadata.height = Height(5);
        state.metadata.time = Time(1_700_000_000_000_000_000);
        Fixture {
            store: CertifiedStateStore::new(subnet, signing_key),
            state,
            root_key,
            subnet_id,
            node_id: node_key.node_id(),
            node_key_der: node_key.public_key_der().to_vec(),
        }
    }

    /// A replica of a multi-replica subnet: heights wait after `prepare` until `publish` brings
    /// their signature; a later height supersedes earlier ones; every replica is listed.
    #[test]
    fn threshold_store_publishes_only_signed_heights() {
        let fixture = fixture();
        // Stands in for the subnet's threshold key: the store only sees the recovered signature.
        let signing_key = SubnetSigningKey::generate();
        let peer = NodeKey::generate();
        let subnet = SubnetInfo {
            peer_nodes: vec![(NodeId(peer.node_id()), peer.public_key_der().to_vec())],
            root_key_der: signing_key.public_key_der().to_vec(),
            ..fixture.store.subnet().clone()
        };
        let store = CertifiedStateStore::new_threshold(subnet);
        let mut state = fixture.state.clone();
        let mut roots = Vec::new();
        for height in 6..=8 {
            state.metadata.height = Height(height);
            state.metadata.time = Time(state.metadata.time.0 + 1);
            roots.push(store.prepare(&mut state).unwrap());
        }
        assert_eq!(store.certified_height(), Height(0));
        assert!(matches!(
            store.certificate_for_paths(&[]),
            Err(CertificationError::NotYetCertified)
        ));
        assert_eq!(store.pending_root(Height(7)), Some(roots[1]));
        // Heights only increase.
        assert!(matches!(
            store.prepare(&mut state),
            Err(PublishError::NotIncreasing { .. })
        ));

        let signature = signing_key.sign(&state_root_message(&roots[1]));
        store.publish(Height(7), signature).unwrap();
        assert_eq!(store.certified_height(), Height(7));
        assert_eq!(store.pending_root(Height(6)), None, "superseded");
        assert_eq!(store.pending_root(Height(8)), Some(roots[2]));
        assert_eq!(
            store.publish(Height(6), signature),
            Err(PublishError::NotPending(Height(6)))
        );

        let bytes = store
            .certificate_for_paths(&[vec![b"subnet".to_vec()]])
            .unwrap();
        let certificate: Certificate = serde_cbor::from_slice(&bytes).unwrap();
        assert_eq!(certificate.tree.digest(), roots[1]);
        assert!(openic_crypto::bls::verify(
            signing_key.public_key_der(),
            &state_root_message(&roots[1]),
            &certificate.signature
        ));
        for node in [fixture.node_id, peer.node_id()] {
            assert!(matches!(
                certificate.tree.lookup_path([
                    b"subnet".as_ref(),
                    fixture.subnet_id.as_slice(),
                    b"node",
                    node.as_slice(),
                    b"public_key"
                ]),
                LookupResult::Found(_)
            ));
        }
    }

    /// Decodes a certificate as ic-agent does and checks its signature and `/time`.
    fn verified(fixture: &Fixture, bytes: &[u8]) -> Certificate {
        assert_eq!(&bytes[..3], &[0xd9, 0xd9, 0xf7], "self-describe tag");
        let certificate: Certificate = serde_cbor::from_slice(bytes).unwrap();
        assert!(certificate.delegation.is_none());
        let mut message = STATE_ROOT_DOMAIN_SEPARATOR.to_vec();
        message.extend_from_slice(&certificate.tree.digest());
        assert!(openic_crypto::bls::verify(
            &fixture.root_key,
            &message,
            &certificate.signature
        ));
        let LookupResult::Found(mut time) = certificate.tree.lookup_path([b"time"]) else {
            panic!("/time must be revealed")
        };
        assert_eq!(
            leb128::read::unsigned(&mut time).unwrap(),
            fixture.state.metadata.time.as_nanos_since_unix_epoch()
        );
        certificate
    }

    fn status(state: IngressState) -> IngressStatus {
        IngressStatus {
            state,
            sender: Principal::anonymous(),
            effective_canister_id: CanisterId::from_u64(FIRST_USER_CANISTER_INDEX),
            ingress_expiry: Time(1_700_000_300_000_000_000),
        }
    }

    /// What ic-agent's `lookup_request_status` concludes from a certificate.
    #[derive(Debug, PartialEq, Eq)]
    enum AgentStatus {
        Unknown,
        Received,
        Processing,
        Done,
        Replied(Vec<u8>),
        Rejected(u64, String, Option<String>),
    }

    fn agent_request_status(certificate: &Certificate, id: &RequestId) -> AgentStatus {
        let path = |leaf: &str| vec![b"request_status".to_vec(), id.0.to_vec(), leaf.into()];
        let found = |leaf: &str| match certificate.tree.lookup_path(path(leaf)) {
            LookupResult::Found(value) => value.to_vec(),
            other => panic!("{leaf}: {other:?}"),
        };
        match certificate.tree.lookup_path(path("status")) {
            LookupResult::Absent => AgentStatus::Unknown,
            LookupResult::Found(b"received") => AgentStatus::Received,
            LookupResult::Found(b"processing") => AgentStatus::Processing,
            LookupResult::Found(b"done") => AgentStatus::Done,
            LookupResult::Found(b"replied") => AgentStatus::Replied(found("reply")),
            LookupResult::Found(b"rejected") => {
                let code = leb128::read::unsigned(&mut found("reject_code").as_slice()).unwrap();
                let message = String::from_utf8(found("reject_message")).unwrap();
                let error_code = match certificate.tree.lookup_path(path("error_code")) {
                    LookupResult::Found(value) => Some(String::from_utf8(value.to_vec()).unwrap()),
                    LookupResult::Absent => None,
                    other => panic!("error_code: {other:?}"),
                };
                AgentStatus::Rejected(code, message, error_code)
            }
            other => panic!("status lookup gave {other:?}, which ic-agent treats as an error"),
        }
    }

    fn canister(index: u64, installed: bool) -> CanisterState {
        let id = CanisterId::from_u64(index);
        let controllers: BTreeSet<Principal> =
            [Principal::anonymous(), Principal::from_slice(&[9; 29])].into();
        let mut system_state = SystemState::new(id, controllers, Cycles(1_000), Time(0));
        system_state.certified_data = vec![index as u8; 32];
        let execution_state = installed.then(|| {
            let mut info = ModuleInfo::default();
            info.public_metadata
                .insert("candid:service".into(), b"service : {}".to_vec());
            info.private_metadata
                .insert("secret".into(), b"hidden".to_vec());
            ExecutionState {
                wasm_binary: Arc::new(WasmBinary {
                    bytes: b"\0asm\x01\0\0\0".to_vec(),
                    module_hash: [index as u8; 32],
                }),
                module_info: Arc::new(info),
                wasm_memory: PageMap::new(),
                wasm_memory_size_pages: 1,
                stable_memory: PageMap::new(),
                stable_memory_size_pages: 0,
                globals: vec![],
            }
        });
        CanisterState {
            system_state,
            execution_state,
        }
    }

    #[test]
    fn nothing_is_served_before_the_first_certification() {
        let fixture = fixture();
        assert_eq!(fixture.store.certified_height(), Height(0));
        assert_eq!(
            fixture.store.certificate_for_paths(&[]),
            Err(CertificationError::NotYetCertified)
        );
        assert!(fixture.store.latest_snapshot().canisters.is_empty());
    }

    #[test]
    fn request_statuses_read_like_ic_agent_reads_them() {
        let mut fixture = fixture();
        let ids: Vec<RequestId> = (0..6u8).map(|i| RequestId([i * 40 + 1; 32])).collect();
        let history = &mut fixture.state.ingress_history;
        history.set(ids[0], status(IngressState::Replied(b"DIDL\0\0".to_vec())));
        history.set(
            ids[1],
            status(IngressState::Rejected(UserError::new(
                ErrorCode::CanisterCalledTrap,
                "trapped: oops",
            ))),
        );
        history.set(
            ids[2],
            status(IngressState::Rejected(UserError {
                code: RejectCode::CanisterReject,
                message: "no".into(),
                error_code: None,
            })),
        );
        history.set(ids[3], status(IngressState::Processing));
        history.set(ids[4], status(IngressState::Done));
        let root_hash = fixture.store.certify(&mut fixture.state);
        let expected = [
            AgentStatus::Replied(b"DIDL\0\0".to_vec()),
            AgentStatus::Rejected(5, "trapped: oops".into(), Some("IC0503".into())),
            AgentStatus::Rejected(4, "no".into(), None),
            AgentStatus::Processing,
            AgentStatus::Done,
            AgentStatus::Unknown,
        ];
        for (id, expected) in ids.iter().zip(expected) {
            let bytes = fixture
                .store
                .certificate_for_paths(&[vec![b"request_status".to_vec(), id.0.to_vec()]])
                .unwrap();
            let certificate = verified(&fixture, &bytes);
            assert_eq!(certificate.tree.digest(), root_hash);
            assert_eq!(agent_request_status(&certificate, id), expected);
            // Asking for `status` alone also reveals what the agent reads next.
            let bytes = fixture
                .store
                .certificate_for_paths(&[vec![
                    b"request_status".to_vec(),
                    id.0.to_vec(),
                    b"status".to_vec(),
                ]])
                .unwrap();
            let certificate = verified(&fixture, &bytes);
            assert_eq!(agent_request_status(&certificate, id), expected);
        }
        assert_eq!(
            fixture.store.ingress_status(&ids[3]).map(|s| s.state),
            Some(IngressState::Processing)
        );
        assert_eq!(fixture.store.ingress_status(&ids[5]), None);

        // A change is picked up incrementally; a pruned entry becomes provably absent.
        fixture
            .state
            .ingress_history
            .set(ids[3], status(IngressState::Replied(vec![1])));
        fixture.state.ingress_history.prune_expired(Time(u64::MAX));
        fixture.state.metadata.height = Height(6);
        fixture.store.certify(&mut fixture.state);
        let bytes = fixture
            .store
            .certificate_for_paths(&[vec![b"request_status".to_vec(), ids[3].0.to_vec()]])
            .unwrap();
        let certificate = verified(&fixture, &bytes);
        assert_eq!(
            agent_request_status(&certificate, &ids[3]),
            AgentStatus::Unknown
        );
        assert_eq!(fixture.store.certified_height(), Height(6));
    }

    #[test]
    fn time_meta_and_height_pinned_certificates_follow_the_published_height() {
        let mut fixture = fixture();
        let id = RequestId([3; 32]);
        assert_eq!(fixture.store.certified_time(), Time(0));
        assert_eq!(fixture.store.ingress_status_meta(&id), None);
        assert_eq!(
            fixture
                .store
                .certificate_for_paths_at(&[vec![b"time".to_vec()]], Height(5)),
            Err(CertificationError::NotYetCertified)
        );
        fixture
            .state
            .ingress_history
            .set(id, status(IngressState::Processing));
        fixture.store.certify(&mut fixture.state);
        assert_eq!(fixture.store.certified_time(), fixture.state.metadata.time);
        let meta = fixture.store.ingress_status_meta(&id).unwrap();
        assert_eq!(meta.sender, Principal::anonymous());
        assert_eq!(
            meta.effective_canister_id,
            CanisterId::from_u64(FIRST_USER_CANISTER_INDEX)
        );
        assert!(!meta.is_terminal);
        let paths = [vec![b"request_status".to_vec(), id.0.to_vec()]];
        let at_five = fixture
            .store
            .certificate_for_paths_at(&paths, Height(5))
            .unwrap()
            .expect("height 5 is the published one");
        assert_eq!(
            at_five,
            fixture.store.certificate_for_paths(&paths).unwrap()
        );

        fixture
            .state
            .ingress_history
            .set(id, status(IngressState::Replied(vec![7; 1000])));
        fixture.state.metadata.height = Height(6);
        fixture.state.metadata.time = Time(fixture.state.metadata.time.0 + 1_000_000_000);
        fixture.store.certify(&mut fixture.state);
        assert!(fixture.store.ingress_status_meta(&id).unwrap().is_terminal);
        assert_eq!(fixture.store.certified_time(), fixture.state.metadata.time);
        // Asking for the height a caller authorised against, after it moved: no certificate.
        assert_eq!(
            fixture.store.certificate_for_paths_at(&paths, Height(5)),
            Ok(None)
        );
        assert!(
            fixture
                .store
                .certificate_for_paths_at(&paths, Height(6))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn subnet_paths_read_like_fetch_subnet_by_canister() {
        let mut fixture = fixture();
        fixture
            .state
            .put_canister(canister(FIRST_USER_CANISTER_INDEX, true));
        fixture.state.metadata.update_transactions_total = 12;
        fixture.store.certify(&mut fixture.state);
        let bytes = fixture
            .store
            .certificate_for_paths(&[vec![b"subnet".to_vec()]])
            .unwrap();
        let certificate = verified(&fixture, &bytes);
        let subnet = fixture.subnet_id.as_slice();
        let SubtreeLookupResult::Found(subnet_tree) = certificate
            .tree
            .lookup_subtree([b"subnet".as_ref(), subnet])
        else {
            panic!("/subnet/<id> must be revealed")
        };
        assert_eq!(
            subnet_tree.lookup_path([b"public_key"]),
            LookupResult::Found(&fixture.root_key[..])
        );
        assert_eq!(
            subnet_tree.lookup_path([b"type"]),
            LookupResult::Found(b"application")
        );
        let SubtreeLookupResult::Found(nodes) = subnet_tree.lookup_subtree([b"node"]) else {
            panic!("/subnet/<id>/node must be revealed")
        };
        let paths = nodes.list_paths();
        assert_eq!(paths.len(), 1);
        assert_eq!(paths[0][0].as_bytes(), fixture.node_id.as_slice());
        assert_eq!(paths[0][1].as_bytes(), b"public_key");
        assert_eq!(
            nodes.lookup_path([fixture.node_id.as_slice(), b"public_key"]),
            LookupResult::Found(&fixture.node_key_der[..])
        );
        let LookupResult::Found(ranges) = subnet_tree.lookup_path([b"canister_ranges"]) else {
            panic!("ranges must be revealed")
        };
        let ranges: Vec<(Principal, Principal)> = serde_cbor::from_slice(ranges).unwrap();
        let first = CanisterId::from_u64(FIRST_USER_CANISTER_INDEX).get();
        assert!(ranges.iter().any(|(low, high)| {
            low.as_slice() <= first.as_slice() && first.as_slice() <= high.as_slice()
        }));
        let LookupResult::Found(metrics) = subnet_tree.lookup_path([b"metrics"]) else {
            panic!("metrics must be revealed")
        };
        let metrics: ic_transport_types::SubnetMetrics = serde_cbor::from_slice(metrics).unwrap();
        assert_eq!(metrics.num_canisters, 1);
        assert_eq!(metrics.update_transactions_total, 12);
        assert_eq!(metrics.canister_state_bytes, 65_536 + 8);

        // The sharded form, as `check_delegation` and `fetch_subnet_by_id` read it.
        let bytes = fixture
            .store
            .certificate_for_paths(&[vec![b"canister_ranges".to_vec(), subnet.to_vec()]])
            .unwrap();
        let certificate = verified(&fixture, &bytes);
        let SubtreeLookupResult::Found(shards) = certificate
            .tree
            .lookup_subtree([b"canister_ranges".as_ref(), subnet])
        else {
            panic!("/canister_ranges/<id> must be revealed")
        };
        let shard_paths = shards.list_paths();
        assert_eq!(shard_paths.len(), 1);
        let label = shard_paths[0][0].as_bytes();
        assert_eq!(label, CanisterId::from_u64(0).get().as_slice());
        let LookupResult::Found(shard) = shards.lookup_path([label]) else {
            panic!("the shard must be revealed")
        };
        let shard: Vec<(Principal, Principal)> = serde_cbor::from_slice(shard).unwrap();
        assert_eq!(shard, ranges);
        // Another subnet is provably absent.
        assert_eq!(
            certificate
                .tree
                .lookup_path([b"subnet".as_ref(), &[1, 2, 3], b"public_key"]),
            LookupResult::Unknown
        );
        assert_eq!(
            certificate
                .tree
                .lookup_path([b"canister_ranges".as_ref(), &[1, 2, 3]]),
            LookupResult::Absent
        );
    }

    #[test]
    fn canister_paths_module_hash_controllers_and_metadata() {
        let mut fixture = fixture();
        let installed = CanisterId::from_u64(FIRST_USER_CANISTER_INDEX);
        let empty = CanisterId::from_u64(FIRST_USER_CANISTER_INDEX + 1);
        let missing = CanisterId::from_u64(FIRST_USER_CANISTER_INDEX + 2);
        fixture
            .state
            .put_canister(canister(FIRST_USER_CANISTER_INDEX, true));
        fixture
            .state
            .put_canister(canister(FIRST_USER_CANISTER_INDEX + 1, false));
        fixture.store.certify(&mut fixture.state);
        let path = |id: CanisterId, rest: &[&str]| {
            let mut path = vec![b"canister".to_vec(), id.get().as_slice().to_vec()];
            path.extend(rest.iter().map(|label| label.as_bytes().to_vec()));
            path
        };
        let paths = vec![
            path(installed, &["module_hash"]),
            path(installed, &["controllers"]),
            path(installed, &["metadata", "candid:service"]),
            path(installed, &["metadata", "secret"]),
            path(installed, &["metadata", "absent"]),
            path(empty, &["module_hash"]),
            path(empty, &["controllers"]),
            path(missing, &["module_hash"]),
        ];
        let bytes = fixture.store.certificate_for_paths(&paths).unwrap();
        let certificate = verified(&fixture, &bytes);
        let lookup = |path: &Vec<Vec<u8>>| certificate.tree.lookup_path(path.clone());
        assert_eq!(lookup(&paths[0]), LookupResult::Found(&[1u8; 32][..]));
        let LookupResult::Found(controllers) = lookup(&paths[1]) else {
            panic!("controllers must be revealed")
        };
        assert_eq!(&controllers[..3], &[0xd9, 0xd9, 0xf7]);
        let controllers: Vec<Principal> = serde_cbor::from_slice(controllers).unwrap();
        assert_eq!(
            controllers,
            vec![Principal::anonymous(), Principal::from_slice(&[9; 29])]
        );
        assert_eq!(lookup(&paths[2]), LookupResult::Found(b"service : {}"));
        assert_eq!(lookup(&paths[3]), LookupResult::Found(b"hidden"));
        assert_eq!(lookup(&paths[4]), LookupResult::Absent);
        assert_eq!(lookup(&paths[5]), LookupResult::Absent);
        assert!(matches!(lookup(&paths[6]), LookupResult::Found(_)));
        assert_eq!(lookup(&paths[7]), LookupResult::Absent);

        let store = &fixture.store;
        assert_eq!(
            store.metadata_visibility(&installed, "candid:service"),
            Some(MetadataVisibility::Public)
        );
        assert_eq!(
            store.metadata_visibility(&installed, "secret"),
            Some(MetadataVisibility::Private)
        );
        assert_eq!(store.metadata_visibility(&installed, "absent"), None);
        assert_eq!(store.metadata_visibility(&empty, "secret"), None);
        assert_eq!(store.canister_controllers(&empty).map(|c| c.len()), Some(2));
        assert_eq!(store.canister_controllers(&missing), None);
        assert_eq!(store.latest_snapshot().canisters.len(), 2);
    }

    #[test]
    fn data_certificates_reveal_certified_data_and_time() {
        let mut fixture = fixture();
        let installed = CanisterId::from_u64(FIRST_USER_CANISTER_INDEX);
        fixture
            .state
            .put_canister(canister(FIRST_USER_CANISTER_INDEX, true));
        fixture.store.certify(&mut fixture.state);
        let bytes = fixture.store.data_certificate(&installed).unwrap();
        let certificate = verified(&fixture, &bytes);
        assert_eq!(
            certificate.tree.lookup_path([
                b"canister".as_ref(),
                installed.get().as_slice(),
                b"certified_data"
            ]),
            LookupResult::Found(&[1u8; 32][..])
        );
        let (snapshot, bytes) = fixture
            .store
            .snapshot_with_data_certificate(&installed)
            .unwrap();
        assert_eq!(snapshot.height, Height(5));
        assert!(snapshot.canisters.contains_key(&installed));
        verified(&fixture, &bytes);
        let other = CanisterId::from_u64(3);
        let bytes = fixture.store.data_certificate(&other).unwrap();
        let certificate = verified(&fixture, &bytes);
        assert_eq!(
            certificate.tree.lookup_path([
                b"canister".as_ref(),
                other.get().as_slice(),
                b"certified_data"
            ]),
            LookupResult::Absent
        );
    }

    #[test]
    fn malformed_requests_are_refused_with_reasons() {
        let mut fixture = fixture();
        fixture.store.certify(&mut fixture.state);
        let too_many = vec![vec![b"time".to_vec()]; MAX_PATHS_PER_REQUEST + 1];
        assert!(matches!(
            fixture.store.certificate_for_paths(&too_many),
            Err(CertificationError::InvalidPath(_))
        ));
        let too_deep = vec![vec![b"a".to_vec(); MAX_LABELS_PER_PATH + 1]];
        assert!(matches!(
            fixture.store.certificate_for_paths(&too_deep),
            Err(CertificationError::InvalidPath(_))
        ));
        let too_long = vec![vec![vec![0u8; MAX_LABEL_BYTES + 1]]];
        assert!(matches!(
            fixture.store.certificate_for_paths(&too_long),
            Err(CertificationError::InvalidPath(_))
        ));
        // Anything else, even nonsense, is answered (absent paths proven absent).
        let bytes = fixture
            .store
            .certificate_for_paths(&[vec![b"zzz".to_vec(), vec![]]])
            .unwrap();
        verified(&fixture, &bytes);
        for unbounded in [
            vec![],
            vec![b"request_status".to_vec()],
            vec![b"canister".to_vec()],
        ] {
            assert!(matches!(
                fixture.store.certificate_for_paths(&[unbounded]),
                Err(CertificationError::InvalidPath(_))
            ));
        }
    }

    #[test]
    fn subscribers_are_told_of_new_heights() {
        let mut fixture = fixture();
        let mut receiver = fixture.store.subscribe_certified_height();
        fixture.store.certify(&mut fixture.state);
        assert!(receiver.has_changed().unwrap());
        assert_eq!(*receiver.borrow_and_update(), Height(5));
        let snapshot = fixture.store.latest_snapshot();
        assert_eq!(snapshot.height, Height(5));
        assert_eq!(snapshot.time, fixture.state.metadata.time);
    }

    /// Random inserts, updates and prunes of statuses and canisters: the incrementally updated
    /// tree always has the root hash of a tree rebuilt from scratch.
    #[test]
    #[allow(
        clippy::disallowed_methods,
        reason = "a fresh seed per run (printed) widens coverage; the test itself is seeded"
    )]
    fn incremental_certification_matches_a_full_rebuild() {
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        let mut fixture = fixture();
        for height in 1..40u64 {
            for _ in 0..rng.gen_range(0..30) {
                let id = RequestId([rng.gen_range(0..50u8); 32]);
                let state = match rng.gen_range(0..4) {
                    0 => IngressState::Received,
                    1 => IngressState::Processing,
                    2 => IngressState::Replied(vec![rng.r#gen(); rng.gen_range(0..3)]),
                    _ => IngressState::Rejected(UserError::new(ErrorCode::CanisterTrapped, "x")),
                };
                let mut entry = status(state);
                entry.ingress_expiry = Time(rng.gen_range(0..100));
                fixture.state.ingress_history.set(id, entry);
            }
            if rng.gen_bool(0.3) {
                fixture
                    .state
                    .ingress_history
                    .prune_expired(Time(rng.gen_range(0..100)));
            }
            for _ in 0..rng.gen_range(0..3) {
                let index = FIRST_USER_CANISTER_INDEX + rng.gen_range(0..8);
                let id = CanisterId::from_u64(index);
                match rng.gen_range(0..3) {
                    0 => fixture
                        .state
                        .put_canister(canister(index, rng.gen_bool(0.5))),
                    1 => {
                        if let Some(canister) = fixture.state.canister_mut(&id) {
                            canister.system_state.certified_data = vec![rng.r#gen(); 4];
                        }
                    }
                    _ => {
                        fixture.state.canisters.remove(&id);
                    }
                }
            }
            fixture.state.metadata.height = Height(height);
            fixture.state.metadata.time = Time(height * 1_000);
            let mut copy = fixture.state.clone();
            let incremental = fixture.store.certify(&mut fixture.state);
            let fresh = CertifiedStateStore::new(
                fixture.store.subnet.clone(),
                Arc::clone(fixture.store.signing_key.as_ref().unwrap()),
            );
            assert_eq!(
                incremental,
                fresh.certify(&mut copy),
                "seed {seed} height {height}"
            );
        }
    }
}

/// The certificates checked by ic-agent itself: `Agent::verify` (signature, no delegation,
/// freshness of `/time`) and its public `lookup_value`.
#[cfg(test)]
mod agent_tests {
    use super::*;
    use openic_crypto::{NodeKey, self_authenticating_principal};
    use openic_types::ids::{FIRST_USER_CANISTER_INDEX, subnet_canister_ranges};
    use openic_types::{IngressState, UserId};

    #[test]
    #[allow(
        clippy::disallowed_methods,
        clippy::disallowed_types,
        reason = "ic-agent checks certificate freshness against the wall clock"
    )]
    fn ic_agent_verifies_our_certificates() {
        let signing_key = Arc::new(SubnetSigningKey::generate());
        let node_key = NodeKey::generate();
        let root_key = signing_key.public_key_der().to_vec();
        let subnet_id = self_authenticating_principal(&root_key);
        let store = CertifiedStateStore::new(
            SubnetInfo {
                subnet_id: SubnetId(subnet_id),
                root_key_der: root_key.clone(),
                node_id: NodeId(node_key.node_id()),
                node_public_key_der: node_key.public_key_der().to_vec(),
                peer_nodes: Vec::new(),
                canister_ranges: subnet_canister_ranges(),
            },
            signing_key,
        );
        let mut state =
            ReplicatedState::new(SubnetId(subnet_id), FIRST_USER_CANISTER_INDEX, [0; 32]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        state.metadata.height = Height(1);
        state.metadata.time = Time(now);
        let id = RequestId([3; 32]);
        state.ingress_history.set(
            id,
            IngressStatus {
                state: IngressState::Replied(b"DIDL\0\0".to_vec()),
                sender: UserId::anonymous(),
                effective_canister_id: CanisterId::from_u64(FIRST_USER_CANISTER_INDEX),
                ingress_expiry: Time(now + 1),
            },
        );
        store.certify(&mut state);

        let agent = ic_agent::Agent::builder()
            .with_url("http://127.0.0.1:1")
            .build()
            .unwrap();
        agent.set_root_key(root_key.clone());
        let canister = CanisterId::from_u64(FIRST_USER_CANISTER_INDEX).get();
        let bytes = store
            .certificate_for_paths(&[vec![b"request_status".to_vec(), id.0.to_vec()]])
            .unwrap();
        let certificate: ic_agent::Certificate = serde_cbor::from_slice(&bytes).unwrap();
        agent.verify(&certificate, canister).unwrap();
        let status =
            ic_agent::lookup_value(&certificate, [b"request_status".as_ref(), &id.0, b"status"])
                .unwrap();
        assert_eq!(status, b"replied");
        let absent = ic_agent::lookup_value(
            &certificate,
            [b"request_status".as_ref(), &[4; 32], b"status"],
        );
        assert!(matches!(
            absent,
            Err(ic_agent::AgentError::LookupPathAbsent(_))
        ));

        let bytes = store
            .certificate_for_paths(&[vec![b"subnet".to_vec()]])
            .unwrap();
        let certificate: ic_agent::Certificate = serde_cbor::from_slice(&bytes).unwrap();
        agent.verify(&certificate, canister).unwrap();
        let key = ic_agent::lookup_value(
            &certificate,
            [b"subnet".as_ref(), subnet_id.as_slice(), b"public_key"],
        )
        .unwrap();
        assert_eq!(key, &root_key[..]);

        // A certificate for another state does not verify.
        let mut forged = certificate.clone();
        forged.tree = ic_certification::labeled("time", ic_certification::leaf(vec![1]));
        assert!(agent.verify(&forged, canister).is_err());
    }
}
