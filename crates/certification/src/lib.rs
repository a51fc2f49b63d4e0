//! The certified state tree of a one-subnet openic node: incremental hashing, witnesses and
//! BLS-signed certificates.
//!
//! After every executed block the node calls [`CertifiedStateStore::certify`], which updates the
//! state tree (`/time`, `/request_status`, `/canister`, `/subnet`, `/canister_ranges`, laid out as
//! in the interface specification), signs `"\x0Dic-state-root" · root_hash` with the subnet key,
//! and publishes the result; HTTP threads then read certificates, request statuses and canister
//! snapshots of that height through [`openic_interfaces::CertifiedStateReader`] and
//! [`openic_interfaces::StateSnapshotSource`].
//!
//! Invariants:
//! - Readers always see one published height: tree, signature and canister snapshot are swapped
//!   in together, and nothing is visible before the first certification.
//! - The root hash depends only on the state, never on the order of the updates that led to it
//!   (see the note "history independence" in [`tree`]), so incremental updates and a full
//!   rebuild after loading a checkpoint agree.
//! - Hashing per height is O(changes · log n): the request-status subtree (hundreds of
//!   thousands of entries under load) is a persistent map updated from the ingress history's
//!   change set, never rebuilt.
//! - A requested path that does not exist is proven absent (its neighbours' labels are revealed),
//!   never pruned: clients treat an unknown path as a fatal error.
//! - Certificates carry no delegation: the subnet key is the root key.

pub mod encoding;
mod store;
pub mod tree;

pub use store::{
    CertifiedStateStore, MAX_LABEL_BYTES, MAX_LABELS_PER_PATH, MAX_PATHS_PER_REQUEST,
    MAX_PENDING_HEIGHTS, PublishError, STATE_ROOT_DOMAIN_SEPARATOR, SubnetInfo, state_root_message,
};
