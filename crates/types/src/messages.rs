//! Messages: validated ingress, blocks, ingress status, and user queries.

use crate::{CanisterId, Height, RequestId, Time, UserError, UserId};
use serde::{Deserialize, Serialize};

/// An update call from a user that passed validation (envelope, signature, delegations, expiry,
/// size). Only validated messages enter the ingress pool and blocks, so execution and replay never
/// check signatures again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedIngress {
    /// Hash of the request's content map, as received.
    pub request_id: RequestId,
    /// The caller.
    pub sender: UserId,
    /// The target canister (the management canister for `aaaaa-aa`).
    pub canister_id: CanisterId,
    /// The effective canister id the request was sent to (the URL's id), used to authorise
    /// `read_state` of its status.
    pub effective_canister_id: CanisterId,
    /// Method to call.
    pub method_name: String,
    /// Argument bytes (usually Candid).
    #[serde(with = "serde_bytes")]
    pub arg: Vec<u8>,
    /// The message must not start executing after this time.
    pub ingress_expiry: Time,
    /// Size of the HTTP body that carried it, for ingress-byte fees.
    pub size_bytes: u64,
}

/// An update call as the client sent it: the CBOR envelope bytes and the effective canister id of
/// the URL it was sent to. Replicas of a subnet forward this, not the decoded [`SignedIngress`],
/// so each replica checks the sender's signature itself instead of trusting the one that received
/// the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressEnvelope {
    /// The effective canister id of the URL (`/api/v*/canister/<id>/call`), or the subnet's
    /// principal for subnet endpoints.
    pub effective_canister_id: CanisterId,
    /// The request body, exactly as received.
    pub bytes: std::sync::Arc<[u8]>,
}

/// A finalized block: the unit that is persisted before it is executed and replayed after a crash.
///
/// Invariant: executing the same blocks in order from the same state gives the same state, so a
/// block holds everything execution may not take from its environment (the time, the ingress).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// Height of this block; heights increase by one.
    pub height: Height,
    /// The block's time: strictly increasing across blocks, and what `ic0.time` returns.
    pub time: Time,
    /// Ingress messages to induct, in order.
    pub ingress: Vec<SignedIngress>,
    /// Randomness for this block's execution (`raw_rand`, the state's seed), unknown to anyone
    /// when the block's contents were fixed: on a multi-replica subnet, the subnet's random beacon
    /// revealed after the block was proposed. All zero on a one-replica subnet, whose state seed
    /// alone feeds `raw_rand`.
    #[serde(default)]
    pub randomness: [u8; 32],
}

/// The status of an update call in the ingress history, as certified under `/request_status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IngressState {
    /// Inducted, not yet started.
    Received,
    /// Started; waiting for inter-canister calls to return.
    Processing,
    /// Replied with these bytes.
    Replied(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Rejected.
    Rejected(UserError),
    /// The reply or reject was pruned; only the fact that it finished is kept.
    Done,
}

impl IngressState {
    /// Whether the call has finished (replied, rejected, or done).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            IngressState::Replied(_) | IngressState::Rejected(_) | IngressState::Done
        )
    }

    /// The `status` text certified in the state tree.
    pub fn status_text(&self) -> &'static str {
        match self {
            IngressState::Received => "received",
            IngressState::Processing => "processing",
            IngressState::Replied(_) => "replied",
            IngressState::Rejected(_) => "rejected",
            IngressState::Done => "done",
        }
    }
}

/// An entry of the ingress history: the state plus who may read it and until when it is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressStatus {
    /// Current state.
    pub state: IngressState,
    /// The original sender; only it may read the status.
    pub sender: UserId,
    /// The effective canister id the request was sent to.
    pub effective_canister_id: CanisterId,
    /// The request's expiry: the status is kept (for replay protection) at least until then.
    pub ingress_expiry: Time,
}

/// A query call from a user that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserQuery {
    /// Request id of the query's content (signed into the response).
    pub request_id: RequestId,
    /// The caller.
    pub sender: UserId,
    /// Target canister.
    pub canister_id: CanisterId,
    /// The effective canister id of the URL.
    pub effective_canister_id: CanisterId,
    /// Method to call.
    pub method_name: String,
    /// Argument bytes.
    pub arg: Vec<u8>,
}

/// The outcome of a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryResult {
    /// The canister replied with these bytes.
    Reply(Vec<u8>),
    /// The query was rejected.
    Reject(UserError),
}
