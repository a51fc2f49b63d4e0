//! The management canister `aaaaa-aa`: canister lifecycle (create, install, upgrade, uninstall,
//! start, stop, delete), settings, cycles, chunked code, status and randomness.
//!
//! Entry points:
//! - [`execute_management_call`] runs one call (from a user's ingress or a canister's request)
//!   against the replicated state, deterministically.
//! - [`execute_management_query`] answers the methods that may be called as queries
//!   (`canister_status`, `fetch_canister_logs`, `canister_metadata`) on a state snapshot.
//! - [`check_management_ingress`] decides, before a user's call enters a block, whether users may
//!   call the method at all, whether the effective canister id matches the argument (interface
//!   digest §1.5), and whether the caller controls the target.
//!
//! Invariants:
//! - Arguments are decoded with the `ic-management-canister-types` 0.8.0 types, the exact types
//!   `ic-utils` 0.49.3 encodes with, under decoding quotas; malformed input is rejected (reject code
//!   5), never a panic. Candid subtyping applies: a `record` is accepted where `opt record` is
//!   expected, and unknown fields are ignored.
//! - A call either changes the state completely or not at all: every check runs before the first
//!   write, and installs run on working copies that are committed only when every hook succeeded.
//! - Nothing here reads a clock or an OS random source: time comes from the state's metadata and
//!   `raw_rand` from its random seed.

mod args;
mod chain_keys;
mod errors;
mod install;
mod lifecycle;
mod snapshots;
mod status;
#[cfg(test)]
mod test_utils;
#[cfg(test)]
mod wasmtime_tests;

#[cfg(test)]
use crate::common::EMPTY_CANDID_REPLY;
use crate::config::{ExecutionConfig, SubnetContext};
use candid::Principal;
use openic_embedders::Embedder;
use openic_replicated_state::{
    CanisterLogs, CanisterSnapshots, CanisterState, ChangeOrigin, ReplicatedState, StopContext,
};
use openic_types::{CanisterId, Cycles, UserError};
use std::collections::BTreeMap;
use std::sync::Arc;

pub use errors::ManagementError;
pub use lifecycle::RAW_RAND_LAG_HEIGHTS;

/// Uninstalls every installed canister whose balance (reserved cycles included) reached zero, as
/// the spec's "Canister out of cycles" transition does. Returns how many were uninstalled.
pub fn uninstall_out_of_cycles(state: &mut ReplicatedState) -> usize {
    let out_of_cycles: Vec<CanisterId> = state
        .canisters
        .iter()
        .filter(|(_, canister)| {
            canister.execution_state.is_some()
                // A paused execution's prepayment is out of the balance until it completes.
                && !state.paused_executions.contains_key(&canister.canister_id())
                && canister.system_state.cycles_balance == Cycles::ZERO
                && canister.system_state.reserved_balance == Cycles::ZERO
        })
        .map(|(id, _)| *id)
        .collect();
    for id in &out_of_cycles {
        tracing::info!(canister = %id.get(), "canister ran out of cycles; its code is uninstalled");
        install::uninstall(state, *id, install::Uninstall::OutOfCycles);
        Arc::make_mut(&mut state.snapshots).remove_all(id);
    }
    out_of_cycles.len()
}
pub(crate) use lifecycle::answer_raw_rand_requests;

/// Who called the management canister.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManagementCaller {
    /// A user, through an ingress message.
    User(Principal),
    /// A canister, through an inter-canister request.
    Canister(CanisterId),
}

impl ManagementCaller {
    /// The caller's principal (for controller checks and default controllers).
    pub fn principal(&self) -> Principal {
        match self {
            ManagementCaller::User(principal) => *principal,
            ManagementCaller::Canister(id) => id.get(),
        }
    }

    /// Whether the caller is a canister.
    pub fn is_canister(&self) -> bool {
        matches!(self, ManagementCaller::Canister(_))
    }
}

/// The result of a management call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManagementOutcome {
    /// The call succeeded with this Candid reply.
    Reply(Vec<u8>),
    /// The call failed.
    Reject(UserError),
    /// The call is answered later, and for a canister caller its `payment` refunded then (so the
    /// refund returned with `Deferred` is zero): `stop_canister` recorded its [`StopContext`] in
    /// the canister's `CanisterStatus::Stopping { stop_contexts }` and is answered when the
    /// canister becomes stopped; `raw_rand` was recorded in the state's `raw_rand_requests` and is
    /// answered [`RAW_RAND_LAG_HEIGHTS`] heights later.
    Deferred,
}

/// One call to the management canister.
#[derive(Clone, Debug)]
pub struct ManagementCall<'a> {
    /// Who called.
    pub caller: ManagementCaller,
    /// The method name.
    pub method: &'a str,
    /// The Candid argument.
    pub payload: &'a [u8],
    /// Cycles attached to the call (always zero for ingress).
    pub cycles: Cycles,
    /// How to answer this call later, should it be a `stop_canister` that has to wait or a
    /// `raw_rand`.
    pub stop_context: StopContext,
}

/// The methods of the management canister that openic implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    ProvisionalCreateCanisterWithCycles,
    CreateCanister,
    InstallCode,
    InstallChunkedCode,
    UploadChunk,
    StoredChunks,
    ClearChunkStore,
    UninstallCode,
    CanisterStatus,
    UpdateSettings,
    StartCanister,
    StopCanister,
    DeleteCanister,
    DepositCycles,
    ProvisionalTopUpCanister,
    RawRand,
    CanisterInfo,
    SubnetInfo,
    FetchCanisterLogs,
    CanisterMetadata,
    EcdsaPublicKey,
    SignWithEcdsa,
    SchnorrPublicKey,
    SignWithSchnorr,
    VetKdPublicKey,
    VetKdDeriveKey,
    TakeCanisterSnapshot,
    LoadCanisterSnapshot,
    ListCanisterSnapshots,
    DeleteCanisterSnapshot,
    ReadCanisterSnapshotMetadata,
    ReadCanisterSnapshotData,
    UploadCanisterSnapshotMetadata,
    UploadCanisterSnapshotData,
}

/// Methods of the IC's management canister that openic does not implement yet. Calling them gives
/// a rejection that names the method and says so, rather than "no such method".
const UNSUPPORTED_METHODS: &[&str] = &[
    "http_request",
    "node_metrics_history",
    "list_canisters",
    "canister_metrics",
    "bitcoin_get_balance",
    "bitcoin_get_utxos",
    "bitcoin_send_transaction",
    "bitcoin_get_current_fee_percentiles",
    "bitcoin_get_block_headers",
];

/// Of [`UNSUPPORTED_METHODS`], those that users may not call through ingress anyway.
const CANISTER_ONLY_UNSUPPORTED_METHODS: &[&str] = &[
    "http_request",
    "node_metrics_history",
    "bitcoin_get_balance",
    "bitcoin_get_utxos",
    "bitcoin_send_transaction",
    "bitcoin_get_current_fee_percentiles",
    "bitcoin_get_block_headers",
];

impl Method {
    fn parse(name: &str) -> Option<Method> {
        Some(match name {
            "provisional_create_canister_with_cycles" => {
                Method::ProvisionalCreateCanisterWithCycles
            }
            "create_canister" => Method::CreateCanister,
            "install_code" => Method::InstallCode,
            "install_chunked_code" => Method::InstallChunkedCode,
            "upload_chunk" => Method::UploadChunk,
            "stored_chunks" => Method::StoredChunks,
            "clear_chunk_store" => Method::ClearChunkStore,
            "uninstall_code" => Method::UninstallCode,
            "canister_status" => Method::CanisterStatus,
            "update_settings" => Method::UpdateSettings,
            "start_canister" => Method::StartCanister,
            "stop_canister" => Method::StopCanister,
            "delete_canister" => Method::DeleteCanister,
            "deposit_cycles" => Method::DepositCycles,
            "provisional_top_up_canister" => Method::ProvisionalTopUpCanister,
            "raw_rand" => Method::RawRand,
            "canister_info" => Method::CanisterInfo,
            "subnet_info" => Method::SubnetInfo,
            "fetch_canister_logs" => Method::FetchCanisterLogs,
            "canister_metadata" => Method::CanisterMetadata,
            "ecdsa_public_key" => Method::EcdsaPublicKey,
            "sign_with_ecdsa" => Method::SignWithEcdsa,
            "schnorr_public_key" => Method::SchnorrPublicKey,
            "sign_with_schnorr" => Method::SignWithSchnorr,
            "vetkd_public_key" => Method::VetKdPublicKey,
            "vetkd_derive_key" => Method::VetKdDeriveKey,
            "take_canister_snapshot" => Method::TakeCanisterSnapshot,
            "load_canister_snapshot" => Method::LoadCanisterSnapshot,
            "list_canister_snapshots" => Method::ListCanisterSnapshots,
            "delete_canister_snapshot" => Method::DeleteCanisterSnapshot,
            "read_canister_snapshot_metadata" => Method::ReadCanisterSnapshotMetadata,
            "read_canister_snapshot_data" => Method::ReadCanisterSnapshotData,
            "upload_canister_snapshot_metadata" => Method::UploadCanisterSnapshotMetadata,
            "upload_canister_snapshot_data" => Method::UploadCanisterSnapshotData,
            _ => return None,
        })
    }

    /// Methods only canisters may call (never through ingress).
    fn is_canister_only(self) -> bool {
        matches!(
            self,
            Method::CreateCanister
                | Method::DepositCycles
                | Method::RawRand
                | Method::CanisterInfo
                | Method::SubnetInfo
                | Method::EcdsaPublicKey
                | Method::SignWithEcdsa
                | Method::SchnorrPublicKey
                | Method::SignWithSchnorr
                | Method::VetKdPublicKey
                | Method::VetKdDeriveKey
        )
    }

    /// Methods that may only be called as queries.
    fn is_query_only(self) -> bool {
        matches!(self, Method::FetchCanisterLogs)
    }

    /// Methods whose caller must be a controller of the target canister.
    fn requires_controller(self) -> bool {
        matches!(
            self,
            Method::InstallCode
                | Method::InstallChunkedCode
                | Method::UploadChunk
                | Method::StoredChunks
                | Method::ClearChunkStore
                | Method::UninstallCode
                | Method::CanisterStatus
                | Method::UpdateSettings
                | Method::StartCanister
                | Method::StopCanister
                | Method::DeleteCanister
                | Method::TakeCanisterSnapshot
                | Method::LoadCanisterSnapshot
                | Method::DeleteCanisterSnapshot
                | Method::UploadCanisterSnapshotMetadata
                | Method::UploadCanisterSnapshotData
        )
    }
}

/// Everything a management method needs besides the state.
struct Context<'a> {
    embedder: &'a dyn Embedder,
    config: &'a ExecutionConfig,
    subnet: &'a SubnetContext,
    caller: ManagementCaller,
    method: &'a str,
    payload: &'a [u8],
    cycles: Cycles,
}

impl Context<'_> {
    /// Who made a change, for the canister history. `sender_canister_version` is what a canister
    /// caller said its version was.
    fn change_origin(&self, sender_canister_version: Option<u64>) -> ChangeOrigin {
        match self.caller {
            ManagementCaller::User(principal) => ChangeOrigin::User(principal),
            ManagementCaller::Canister(id) => ChangeOrigin::Canister(id, sender_canister_version),
        }
    }
}

/// What a method did: its outcome and how many of the attached cycles it kept.
struct Handled {
    outcome: ManagementOutcome,
    cycles_kept: Cycles,
}

impl Handled {
    fn reply(bytes: Vec<u8>) -> Handled {
        Handled {
            outcome: ManagementOutcome::Reply(bytes),
            cycles_kept: Cycles::ZERO,
        }
    }

    fn reply_keeping(bytes: Vec<u8>, cycles_kept: Cycles) -> Handled {
        Handled {
            outcome: ManagementOutcome::Reply(bytes),
            cycles_kept,
        }
    }
}

/// Executes one call to the management canister against `state`.
///
/// Returns the outcome and the attached cycles to refund to the caller: all of them on a
/// rejection, none after `create_canister` or `deposit_cycles` (which keep them), and none for
/// [`ManagementOutcome::Deferred`] (the stop context still holds the request and its payment).
/// Deterministic: the same state and call give the same result and state.
pub fn execute_management_call(
    embedder: &dyn Embedder,
    config: &ExecutionConfig,
    subnet: &SubnetContext,
    state: &mut ReplicatedState,
    call: ManagementCall<'_>,
) -> (ManagementOutcome, Cycles) {
    let context = Context {
        embedder,
        config,
        subnet,
        caller: call.caller,
        method: call.method,
        payload: call.payload,
        cycles: call.cycles,
    };
    match dispatch(&context, state, call.stop_context) {
        Ok(Handled {
            outcome: ManagementOutcome::Deferred,
            ..
        }) => (ManagementOutcome::Deferred, Cycles::ZERO),
        Ok(Handled {
            outcome,
            cycles_kept,
        }) => (outcome, call.cycles.saturating_sub(cycles_kept)),
        Err(error) => (ManagementOutcome::Reject(error), call.cycles),
    }
}

fn dispatch(
    context: &Context<'_>,
    state: &mut ReplicatedState,
    stop_context: StopContext,
) -> Result<Handled, UserError> {
    let Some(method) = Method::parse(context.method) else {
        return Err(errors::unknown_method(context.method));
    };
    if method.is_canister_only() && !context.caller.is_canister() {
        return Err(errors::canister_only(context.method));
    }
    if method.is_query_only() {
        return Err(errors::query_only(context.method));
    }
    match method {
        Method::ProvisionalCreateCanisterWithCycles => {
            lifecycle::provisional_create_canister_with_cycles(context, state)
        }
        Method::CreateCanister => lifecycle::create_canister(context, state),
        Method::InstallCode => install::install_code(context, state),
        Method::InstallChunkedCode => install::install_chunked_code(context, state),
        Method::UploadChunk => install::upload_chunk(context, state),
        Method::StoredChunks => install::stored_chunks(context, state),
        Method::ClearChunkStore => install::clear_chunk_store(context, state),
        Method::UninstallCode => install::uninstall_code(context, state),
        Method::CanisterStatus => {
            let args: args::CanisterIdRecord = args::decode(context.method, context.payload)?;
            let canister_id = CanisterId::unchecked_from_principal(args.canister_id);
            let canister = existing(state, &canister_id)?;
            status::check_status_caller(canister, &context.caller.principal())?;
            status::canister_status_reply(
                context.config,
                canister,
                state.log_bytes(&canister_id),
                state.snapshots.size_of(&canister_id),
            )
            .map(Handled::reply)
        }
        Method::UpdateSettings => lifecycle::update_settings(context, state),
        Method::StartCanister => lifecycle::start_canister(context, state),
        Method::StopCanister => lifecycle::stop_canister(context, state, stop_context),
        Method::DeleteCanister => lifecycle::delete_canister(context, state),
        Method::DepositCycles => lifecycle::deposit_cycles(context, state),
        Method::ProvisionalTopUpCanister => lifecycle::provisional_top_up_canister(context, state),
        Method::RawRand => lifecycle::raw_rand(state, stop_context),
        Method::CanisterInfo => status::canister_info(context, state),
        Method::SubnetInfo => status::subnet_info(context),
        Method::CanisterMetadata => status::canister_metadata(
            &state.canisters,
            context.caller.principal(),
            context.payload,
        )
        .map(Handled::reply),
        Method::FetchCanisterLogs => Err(errors::query_only(context.method)),
        Method::EcdsaPublicKey => chain_keys::public_key(context, false),
        Method::SchnorrPublicKey => chain_keys::public_key(context, true),
        Method::SignWithEcdsa => chain_keys::sign_with_ecdsa(context, state),
        Method::SignWithSchnorr => chain_keys::sign_with_schnorr(context, state),
        Method::VetKdPublicKey => chain_keys::vetkd_public_key(context),
        Method::VetKdDeriveKey => chain_keys::vetkd_derive_key(context, state),
        Method::TakeCanisterSnapshot => snapshots::take(context, state),
        Method::LoadCanisterSnapshot => snapshots::load(context, state),
        Method::ListCanisterSnapshots => snapshots::list(context, state),
        Method::DeleteCanisterSnapshot => snapshots::delete(context, state),
        Method::ReadCanisterSnapshotMetadata => snapshots::read_metadata(context, state),
        Method::ReadCanisterSnapshotData => snapshots::read_data(context, state),
        Method::UploadCanisterSnapshotMetadata => snapshots::upload_metadata(context, state),
        Method::UploadCanisterSnapshotData => snapshots::upload_data(context, state),
    }
}

/// Answers a query to the management canister on a snapshot of the canisters.
///
/// Supported: `canister_status` (controllers and the canister itself), `fetch_canister_logs`
/// (following the canister's `log_visibility`) and `canister_metadata` (public sections for
/// anyone, private ones for controllers; also callable as an update). `logs` are the snapshot's
/// canister logs.
pub fn execute_management_query(
    config: &ExecutionConfig,
    canisters: &BTreeMap<CanisterId, Arc<CanisterState>>,
    logs: &CanisterLogs,
    snapshots: &CanisterSnapshots,
    caller: Principal,
    method: &str,
    payload: &[u8],
) -> Result<Vec<u8>, UserError> {
    let log_bytes = |id: &Principal| {
        logs.get(&CanisterId::unchecked_from_principal(*id))
            .map_or(0, |log| log.bytes_used())
    };
    match Method::parse(method) {
        Some(Method::CanisterStatus) => {
            let args: args::CanisterIdRecord = args::decode(method, payload)?;
            let canister = existing_in(canisters, &args.canister_id)?;
            status::check_status_caller(canister, &caller)?;
            status::canister_status_reply(
                config,
                canister,
                log_bytes(&args.canister_id),
                snapshots.size_of(&CanisterId::unchecked_from_principal(args.canister_id)),
            )
        }
        Some(Method::FetchCanisterLogs) => {
            status::fetch_canister_logs(canisters, logs, caller, payload)
        }
        Some(Method::CanisterMetadata) => status::canister_metadata(canisters, caller, payload),
        Some(_) => Err(errors::not_a_query(method)),
        None => Err(errors::unknown_method(method)),
    }
}

/// The canister a management call is about (its `canister_id`, or `target_canister` of
/// `install_chunked_code`), if it names one.
pub(crate) fn management_target(method: &str, payload: &[u8]) -> Option<CanisterId> {
    let target = match Method::parse(method)? {
        Method::InstallChunkedCode => {
            args::decode::<args::ChunkedTarget>(method, payload)
                .ok()?
                .target_canister
        }
        _ => {
            args::decode::<args::CanisterIdOnly>(method, payload)
                .ok()?
                .canister_id
        }
    };
    Some(CanisterId::unchecked_from_principal(target))
}

/// Decides whether a user's update call to the management canister may enter a block.
///
/// Refuses methods users may not call (`create_canister`, `raw_rand`, `deposit_cycles`,
/// `canister_info`, HTTP outcalls, threshold keys, ...), query-only methods, unknown methods,
/// arguments that do not decode, an effective canister id that differs from the argument's
/// canister (`provisional_create_canister_with_cycles` accepts any; `install_chunked_code` uses
/// `target_canister`), targets that do not exist, and callers that do not control the target of a
/// controller-only method.
pub fn check_management_ingress(
    method: &str,
    payload: &[u8],
    effective_canister_id: &CanisterId,
    caller: &Principal,
    canisters: &BTreeMap<CanisterId, Arc<CanisterState>>,
) -> Result<(), UserError> {
    let parsed = match Method::parse(method) {
        Some(parsed) => parsed,
        None if CANISTER_ONLY_UNSUPPORTED_METHODS.contains(&method) => {
            return Err(errors::canister_only(method));
        }
        // Unknown, or known but not implemented (the message says which).
        None => return Err(errors::unknown_method(method)),
    };
    if parsed.is_canister_only() {
        return Err(errors::canister_only(method));
    }
    if parsed.is_query_only() {
        return Err(errors::query_only(method));
    }
    let target = match parsed {
        Method::ProvisionalCreateCanisterWithCycles => {
            // Any effective canister id is accepted; the argument must still decode.
            args::decode::<args::ProvisionalCreateArgs>(method, payload)?;
            return Ok(());
        }
        Method::InstallChunkedCode => {
            let args: args::ChunkedTarget = args::decode(method, payload)?;
            args.target_canister
        }
        _ => {
            let args: args::CanisterIdOnly = args::decode(method, payload)?;
            args.canister_id
        }
    };
    if target != effective_canister_id.get() {
        return Err(errors::effective_canister_id_mismatch(
            method,
            &target,
            effective_canister_id,
        ));
    }
    let canister = existing_in(canisters, &target)?;
    if parsed.requires_controller() && !canister.is_controller(caller) {
        return Err(errors::not_a_controller(canister, caller));
    }
    Ok(())
}

/// The canister `id`, or the "not found" rejection.
fn existing<'s>(
    state: &'s ReplicatedState,
    id: &CanisterId,
) -> Result<&'s CanisterState, UserError> {
    state
        .canister(id)
        .ok_or_else(|| crate::common::canister_not_found_error(id))
}

/// The canister `id` in a snapshot, or the "not found" rejection.
fn existing_in<'s>(
    canisters: &'s BTreeMap<CanisterId, Arc<CanisterState>>,
    id: &Principal,
) -> Result<&'s CanisterState, UserError> {
    let id = CanisterId::unchecked_from_principal(*id);
    canisters
        .get(&id)
        .map(|canister| &**canister)
        .ok_or_else(|| crate::common::canister_not_found_error(&id))
}

/// The canister `id` if `caller` controls it; otherwise the matching rejection.
fn controlled<'s>(
    state: &'s ReplicatedState,
    id: &CanisterId,
    caller: &Principal,
) -> Result<&'s CanisterState, UserError> {
    let canister = existing(state, id)?;
    if !canister.is_controller(caller) {
        return Err(errors::not_a_controller(canister, caller));
    }
    Ok(canister)
}

#[cfg(test)]
mod tests {
    use super::test_utils::{Harness, fake_module, user};
    use super::*;
    use candid::{CandidType, Decode, Encode, Nat};
    use ic_management_canister_types as mct;
    use openic_replicated_state::{
        CallContext, CallContextId, CallOrigin, CallbackId, CanisterMessage, CanisterStatus,
        ChangeDetails, Payload,
    };
    use openic_types::ids::FIRST_USER_CANISTER_INDEX;
    use openic_types::{ErrorCode, Height, IngressState, IngressStatus, RejectCode, RequestId};
    use sha2::{Digest, Sha256};

    fn id_record(id: CanisterId) -> Vec<u8> {
        Encode!(&mct::CanisterIdRecord {
            canister_id: id.get()
        })
        .unwrap()
    }

    fn install_args(
        id: CanisterId,
        mode: mct::CanisterInstallMode,
        wasm: Vec<u8>,
        arg: &[u8],
    ) -> Vec<u8> {
        Encode!(&mct::InstallCodeArgs {
            mode,
            canister_id: id.get(),
            wasm_module: wasm,
            arg: arg.to_vec(),
            sender_canister_version: None,
        })
        .unwrap()
    }

    fn upgrade(skip_pre_upgrade: Option<bool>, keep: bool) -> mct::CanisterInstallMode {
        mct::CanisterInstallMode::Upgrade(Some(mct::UpgradeFlags {
            skip_pre_upgrade,
            wasm_memory_persistence: keep.then_some(mct::WasmMemoryPersistence::Keep),
        }))
    }

    fn stable_bytes(h: &Harness, id: &CanisterId, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        h.canister(id)
            .execution_state
            .as_ref()
            .expect("installed")
            .stable_memory
            .read(offset, &mut out);
        out
    }

    fn heap_bytes(h: &Harness, id: &CanisterId, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        h.canister(id)
            .execution_state
            .as_ref()
            .expect("installed")
            .wasm_memory
            .read(offset, &mut out);
        out
    }

    fn status_of(h: &mut Harness, caller: Principal, id: CanisterId) -> mct::CanisterStatusResult {
        let reply = h.reply(
            ManagementCaller::User(caller),
            "canister_status",
            &id_record(id),
        );
        Decode!(&reply, mct::CanisterStatusResult).expect("decodes as the MCT 0.8.0 type")
    }

    #[test]
    fn provisional_create_allocates_ids_in_order_with_default_cycles() {
        let mut h = Harness::new();
        let alice = user(1);
        let first = h.create_canister(alice);
        let second = h.create_canister(alice);
        assert_eq!(first.to_string(), "bkyz2-fmaaa-aaaaa-qaaaq-cai");
        assert_eq!(second, CanisterId::from_u64(FIRST_USER_CANISTER_INDEX + 1));
        let canister = h.canister(&first);
        assert_eq!(
            canister.system_state.cycles_balance,
            h.config.default_provisional_cycles
        );
        assert!(canister.is_controller(&alice));
        assert_eq!(canister.system_state.controllers.len(), 1);
        assert_eq!(canister.system_state.total_num_changes, 1);
        assert!(canister.execution_state.is_none());
    }

    #[test]
    fn provisional_create_accepts_settings_as_plain_record_like_ic_utils() {
        // Exactly the shape ic-utils 0.49.3's CreateCanisterBuilder sends.
        #[derive(CandidType)]
        struct In {
            amount: Option<Nat>,
            settings: mct::CanisterSettings,
            specified_id: Option<Principal>,
        }
        let mut h = Harness::new();
        let (alice, bob) = (user(1), user(2));
        let payload = Encode!(&In {
            amount: Some(Nat::from(1_234u64)),
            settings: mct::CanisterSettings {
                controllers: Some(vec![alice, bob]),
                freezing_threshold: Some(Nat::from(99u64)),
                ..Default::default()
            },
            specified_id: None,
        })
        .unwrap();
        let reply = h.reply(
            ManagementCaller::User(alice),
            "provisional_create_canister_with_cycles",
            &payload,
        );
        let id = CanisterId::unchecked_from_principal(
            Decode!(&reply, mct::CanisterIdRecord).unwrap().canister_id,
        );
        let canister = h.canister(&id);
        assert_eq!(canister.system_state.cycles_balance, Cycles(1_234));
        assert!(canister.is_controller(&bob) && canister.is_controller(&alice));
        assert_eq!(
            canister.system_state.settings.freezing_threshold_seconds,
            99
        );
    }

    #[test]
    fn specified_id_must_be_in_range_and_unused() {
        let mut h = Harness::new();
        let alice = ManagementCaller::User(user(1));
        let create = |id: CanisterId| {
            Encode!(&mct::ProvisionalCreateCanisterWithCyclesArgs {
                specified_id: Some(id.get()),
                ..Default::default()
            })
            .unwrap()
        };
        let ledger = CanisterId::from_u64(2);
        let reply = h.reply(
            alice,
            "provisional_create_canister_with_cycles",
            &create(ledger),
        );
        assert_eq!(
            Decode!(&reply, mct::CanisterIdRecord).unwrap().canister_id,
            ledger.get()
        );
        let again = h.reject(
            alice,
            "provisional_create_canister_with_cycles",
            &create(ledger),
        );
        assert!(
            again.message.contains("already in use"),
            "{}",
            again.message
        );
        let outside = h.reject(
            alice,
            "provisional_create_canister_with_cycles",
            &create(CanisterId::from_u64(0x4000_0000_0000_0000)),
        );
        assert!(
            outside.message.contains("canister ranges"),
            "{}",
            outside.message
        );
        assert_eq!(outside.code, RejectCode::CanisterReject);
        // A specified id in the user range is skipped by later allocation.
        let next = CanisterId::from_u64(FIRST_USER_CANISTER_INDEX);
        h.reply(
            alice,
            "provisional_create_canister_with_cycles",
            &create(next),
        );
        let allocated = h.create_canister(user(1));
        assert_eq!(
            allocated,
            CanisterId::from_u64(FIRST_USER_CANISTER_INDEX + 1)
        );
    }

    #[test]
    fn create_canister_is_for_canisters_and_charges_the_fee() {
        let mut h = Harness::new();
        let parent = h.create_canister(user(1));
        let payload = Encode!(&mct::CreateCanisterArgs::default()).unwrap();
        let error = h.reject(ManagementCaller::User(user(1)), "create_canister", &payload);
        assert!(
            error.message.contains("Only canisters"),
            "{}",
            error.message
        );

        let fee = h.config.canister_creation_fee;
        let (outcome, refund) = h.call_with_cycles(
            ManagementCaller::Canister(parent),
            "create_canister",
            &payload,
            Cycles(fee.get() - 1),
        );
        assert!(matches!(outcome, ManagementOutcome::Reject(ref e) if e.message.contains("fee")));
        assert_eq!(refund, Cycles(fee.get() - 1));

        let (outcome, refund) = h.call_with_cycles(
            ManagementCaller::Canister(parent),
            "create_canister",
            &payload,
            Cycles(fee.get() + 500),
        );
        let ManagementOutcome::Reply(reply) = outcome else {
            panic!("create_canister failed: {outcome:?}");
        };
        assert_eq!(refund, Cycles::ZERO);
        let child = CanisterId::unchecked_from_principal(
            Decode!(&reply, mct::CanisterIdRecord).unwrap().canister_id,
        );
        assert_eq!(h.canister(&child).system_state.cycles_balance, Cycles(500));
        assert!(h.canister(&child).is_controller(&parent.get()));
        assert_eq!(h.state.metadata.consumed_cycles_total, fee.get());
    }

    #[test]
    fn install_runs_init_and_records_everything() {
        let mut h = Harness::new();
        let alice = ManagementCaller::User(user(1));
        let id = h.create_canister(user(1));
        let wasm = fake_module("init;data=heap");
        h.reply(
            alice,
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Install,
                wasm.clone(),
                b"hello",
            ),
        );
        let canister = h.canister(&id);
        assert_eq!(canister.module_hash(), Some(Sha256::digest(&wasm).into()));
        assert_eq!(canister.system_state.certified_data, b"hello");
        assert_eq!(canister.system_state.global_timer_nanos, 7);
        assert_eq!(canister.system_state.canister_version, 1);
        assert_eq!(canister.system_state.total_num_changes, 2);
        assert!(matches!(
            canister.system_state.history.back().unwrap().details,
            ChangeDetails::CodeDeployment { mode: 0, .. }
        ));
        assert_eq!(stable_bytes(&h, &id, 0, 5), b"hello");
        assert_eq!(heap_bytes(&h, &id, 0, 5), b"hello");
    }

    #[test]
    fn install_errors_are_specific_and_leave_the_canister_alone() {
        let mut h = Harness::new();
        let alice = ManagementCaller::User(user(1));
        let id = h.create_canister(user(1));

        let error = h.reject(
            ManagementCaller::User(user(9)),
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Install,
                fake_module("init"),
                b"",
            ),
        );
        assert_eq!(error.error_code, Some(ErrorCode::CanisterInvalidController));
        assert!(error.message.starts_with(&format!(
            "Only the controllers of the canister {id} can control it."
        )));

        let error = h.reject(
            alice,
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Install,
                b"not wasm".to_vec(),
                b"",
            ),
        );
        assert_eq!(error.error_code, Some(ErrorCode::CanisterInvalidWasm));
        assert!(error.message.contains("wasm magic"), "{}", error.message);

        let error = h.reject(
            alice,
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Install,
                fake_module("init_trap"),
                b"",
            ),
        );
        assert_eq!(error.error_code, Some(ErrorCode::CanisterCalledTrap));
        assert!(error.message.contains("init refused"), "{}", error.message);
        assert!(h.canister(&id).execution_state.is_none());
        assert_eq!(h.canister(&id).system_state.canister_version, 0);

        let error = h.reject(
            alice,
            "install_code",
            &install_args(id, upgrade(None, false), fake_module("init"), b""),
        );
        assert_eq!(
            error.error_code,
            Some(ErrorCode::CanisterWasmModuleNotFound)
        );

        let error = h.reject(
            alice,
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Install,
                fake_module("spin;init"),
                b"",
            ),
        );
        assert_eq!(
            error.error_code,
            Some(ErrorCode::CanisterInstructionLimitExceeded)
        );
        assert!(error.message.contains("300000000000"), "{}", error.message);

        h.reply(
            alice,
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Install,
                fake_module("init"),
                b"x",
            ),
        );
        let error = h.reject(
            alice,
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Install,
                fake_module("init;v=2"),
                b"",
            ),
        );
        assert_eq!(error.error_code, Some(ErrorCode::CanisterAlreadyInstalled));
        assert!(error.message.contains("reinstall"), "{}", error.message);

        let error = h.reject(alice, "install_code", b"DIDL\x00\x00");
        assert_eq!(error.code, RejectCode::CanisterReject);
        assert!(error.message.contains("install_code"), "{}", error.message);
    }

    #[test]
    fn upgrade_keeps_stable_memory_and_replaces_the_heap() {
        let mut h = Harness::new();
        let alice = ManagementCaller::User(user(1));
        let id = h.create_canister(user(1));
        h.reply(
            alice,
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Install,
                fake_module("init;pre_upgrade;data=old"),
                b"state",
            ),
        );
        let new_module = fake_module("post_upgrade;pre_upgrade;data=NEW");
        h.reply(
            alice,
            "install_code",
            &install_args(id, upgrade(None, false), new_module.clone(), b"arg"),
        );
        let canister = h.canister(&id);
        assert_eq!(
            canister.module_hash(),
            Some(Sha256::digest(&new_module).into())
        );
        assert_eq!(
            canister.system_state.certified_data, b"state",
            "upgrade keeps certified data"
        );
        assert_eq!(
            canister.system_state.global_timer_nanos, 0,
            "upgrade clears the timer"
        );
        assert_eq!(canister.system_state.canister_version, 2);
        assert_eq!(stable_bytes(&h, &id, 0, 5), b"state");
        assert_eq!(stable_bytes(&h, &id, 100, 3), b"PRE");
        assert_eq!(
            heap_bytes(&h, &id, 0, 5),
            b"NEW\0\0",
            "heap comes from the new module"
        );
        assert_eq!(heap_bytes(&h, &id, 200, 3), b"arg");

        // A trapping post_upgrade rolls back pre_upgrade's changes too.
        let before = h.canister(&id).clone();
        let error = h.reject(
            alice,
            "install_code",
            &install_args(
                id,
                upgrade(None, false),
                fake_module("post_upgrade;v=3"),
                b"trap",
            ),
        );
        assert_eq!(error.error_code, Some(ErrorCode::CanisterCalledTrap));
        // Everything is as it was but the balance, which paid for the hooks that ran.
        let mut after = h.canister(&id).clone();
        assert!(after.system_state.cycles_balance < before.system_state.cycles_balance);
        after.system_state.cycles_balance = before.system_state.cycles_balance;
        assert_eq!(after, before);
    }

    #[test]
    fn skip_pre_upgrade_and_reinstall() {
        let mut h = Harness::new();
        let alice = ManagementCaller::User(user(1));
        let id = h.create_canister(user(1));
        h.reply(
            alice,
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Install,
                fake_module("init;pre_upgrade"),
                b"s",
            ),
        );
        h.reply(
            alice,
            "install_code",
            &install_args(
                id,
                upgrade(Some(true), false),
                fake_module("pre_upgrade;v=2"),
                b"",
            ),
        );
        assert_eq!(stable_bytes(&h, &id, 100, 3), b"\0\0\0");
        assert_eq!(stable_bytes(&h, &id, 0, 1), b"s");

        h.reply(
            alice,
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Reinstall,
                fake_module("v=4"),
                b"",
            ),
        );
        let canister = h.canister(&id);
        assert!(
            canister.system_state.certified_data.is_empty(),
            "reinstall clears certified data"
        );
        assert_eq!(
            canister
                .execution_state
                .as_ref()
                .unwrap()
                .stable_memory_size_pages,
            0
        );
        assert!(matches!(
            canister.system_state.history.back().unwrap().details,
            ChangeDetails::CodeDeployment { mode: 1, .. }
        ));
    }

    #[test]
    fn enhanced_orthogonal_persistence_needs_keep_and_keep_needs_it() {
        let mut h = Harness::new();
        let alice = ManagementCaller::User(user(1));
        let id = h.create_canister(user(1));
        h.reply(
            alice,
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Install,
                fake_module("init;eop"),
                b"heap",
            ),
        );
        let error = h.reject(
            alice,
            "install_code",
            &install_args(id, upgrade(None, false), fake_module("eop;v=2"), b""),
        );
        assert!(
            error.message.contains("wasm_memory_persistence"),
            "{}",
            error.message
        );
        let error = h.reject(
            alice,
            "install_code",
            &install_args(id, upgrade(None, true), fake_module("v=2"), b""),
        );
        assert!(
            error.message.contains("enhanced orthogonal persistence"),
            "{}",
            error.message
        );
        h.reply(
            alice,
            "install_code",
            &install_args(id, upgrade(None, true), fake_module("eop;v=2;data=zz"), b""),
        );
        assert_eq!(heap_bytes(&h, &id, 0, 4), b"heap", "keep retains the heap");
    }

    #[test]
    fn chunked_install_checks_hashes() {
        let mut h = Harness::new();
        let alice = ManagementCaller::User(user(1));
        let id = h.create_canister(user(1));
        let wasm = fake_module("init;data=chunked");
        let (first, second) = wasm.split_at(5);
        let mut hashes = Vec::new();
        for chunk in [first, second] {
            let payload = Encode!(&mct::UploadChunkArgs {
                canister_id: id.get(),
                chunk: chunk.to_vec(),
            })
            .unwrap();
            let reply = h.reply(alice, "upload_chunk", &payload);
            let hash = Decode!(&reply, mct::ChunkHash).unwrap();
            assert_eq!(hash.hash, Sha256::digest(chunk).to_vec());
            hashes.push(hash);
        }
        let stored = Decode!(
            &h.reply(alice, "stored_chunks", &id_record(id)),
            Vec<mct::ChunkHash>
        )
        .unwrap();
        assert_eq!(stored.len(), 2);

        let chunked = |hashes: Vec<mct::ChunkHash>, wasm_module_hash: Vec<u8>| {
            Encode!(&mct::InstallChunkedCodeArgs {
                mode: mct::CanisterInstallMode::Install,
                target_canister: id.get(),
                store_canister: None,
                chunk_hashes_list: hashes,
                wasm_module_hash,
                arg: b"c".to_vec(),
                sender_canister_version: None,
            })
            .unwrap()
        };
        let reversed: Vec<_> = hashes.iter().rev().cloned().collect();
        let error = h.reject(
            alice,
            "install_chunked_code",
            &chunked(reversed, Sha256::digest(&wasm).to_vec()),
        );
        assert!(error.message.contains("hash mismatch"), "{}", error.message);
        let missing = vec![mct::ChunkHash { hash: vec![0; 32] }];
        let error = h.reject(
            alice,
            "install_chunked_code",
            &chunked(missing, Sha256::digest(&wasm).to_vec()),
        );
        assert_eq!(error.error_code, Some(ErrorCode::CanisterContractViolation));
        assert!(h.canister(&id).execution_state.is_none());

        h.reply(
            alice,
            "install_chunked_code",
            &chunked(hashes, Sha256::digest(&wasm).to_vec()),
        );
        assert_eq!(
            h.canister(&id).module_hash(),
            Some(Sha256::digest(&wasm).into())
        );
        assert_eq!(heap_bytes(&h, &id, 0, 1), b"c");

        h.reply(alice, "clear_chunk_store", &id_record(id));
        assert!(h.canister(&id).system_state.wasm_chunk_store.is_empty());

        let too_big = Encode!(&mct::UploadChunkArgs {
            canister_id: id.get(),
            chunk: vec![0; 1024 * 1024 + 1],
        })
        .unwrap();
        let error = h.reject(alice, "upload_chunk", &too_big);
        assert!(
            error.message.contains("at most 1048576"),
            "{}",
            error.message
        );
    }

    #[test]
    fn uninstall_answers_open_calls_and_clears_the_module() {
        let mut h = Harness::new();
        let alice = ManagementCaller::User(user(1));
        let id = h.create_canister(user(1));
        let other = h.create_canister(user(1));
        h.reply(
            alice,
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Install,
                fake_module("init"),
                b"x",
            ),
        );
        let request_id = RequestId([42; 32]);
        h.state.ingress_history.set(
            request_id,
            IngressStatus {
                state: IngressState::Processing,
                sender: user(3),
                effective_canister_id: id,
                ingress_expiry: openic_types::Time(u64::MAX),
            },
        );
        {
            let manager = &mut h
                .state
                .canister_mut(&id)
                .unwrap()
                .system_state
                .call_context_manager;
            let context = |origin| CallContext {
                origin,
                responded: false,
                available_cycles: Cycles(10),
                instructions_executed: 0,
                method_name: "work".into(),
            };
            manager.call_contexts.insert(
                CallContextId(0),
                context(CallOrigin::Ingress {
                    sender: user(3),
                    request_id,
                }),
            );
            manager.call_contexts.insert(
                CallContextId(1),
                context(CallOrigin::Canister {
                    caller: other,
                    callback_id: CallbackId(5),
                    deadline: None,
                }),
            );
        }
        h.reply(alice, "uninstall_code", &id_record(id));
        let canister = h.canister(&id);
        assert!(canister.execution_state.is_none());
        assert!(canister.system_state.certified_data.is_empty());
        assert!(
            canister
                .system_state
                .call_context_manager
                .call_contexts
                .is_empty()
        );
        assert_eq!(canister.system_state.canister_version, 2);
        assert!(matches!(
            &h.state.ingress_history.get(&request_id).unwrap().state,
            IngressState::Rejected(error) if error.message.contains("uninstalled")
        ));
        let response = h.canister(&other).system_state.input_queue.back().cloned();
        let Some(CanisterMessage::Response(response)) = response else {
            panic!("the calling canister got no response");
        };
        assert_eq!(response.originator_reply_callback, CallbackId(5));
        assert_eq!(response.refund, Cycles(10));
        assert!(matches!(
            response.payload,
            Payload::Reject {
                code: RejectCode::CanisterReject,
                ..
            }
        ));
    }

    #[test]
    fn canister_status_round_trips_through_the_mct_type() {
        let mut h = Harness::new();
        let alice = ManagementCaller::User(user(1));
        let id = h.create_canister(user(1));
        h.reply(
            alice,
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Install,
                fake_module("init"),
                b"abc",
            ),
        );
        let status = status_of(&mut h, user(1), id);
        assert_eq!(status.status, mct::CanisterStatusType::Running);
        assert_eq!(status.version, 1);
        assert_eq!(status.settings.controllers, vec![user(1)]);
        assert_eq!(status.settings.freezing_threshold, Nat::from(2_592_000u64));
        assert_eq!(
            status.settings.log_visibility,
            mct::LogVisibility::Controllers
        );
        // The provisional balance less the install's execution fee: the base fee and the
        // instructions the fake embedder reports for `(start)` and `canister_init`.
        let paid = h.config.default_provisional_cycles.get()
            - u128::try_from(status.cycles.0.clone()).unwrap();
        assert!(
            paid > h.config.update_message_execution_fee.get() && paid < 10_000_000,
            "{paid}"
        );
        assert_eq!(
            status.module_hash,
            h.canister(&id).module_hash().map(|hash| hash.to_vec())
        );
        assert_eq!(
            status.memory_metrics.stable_memory_size,
            Nat::from(65_536u64)
        );
        assert!(status.memory_size > 65_536u64 * 2);
        assert!(!status.ready_for_migration);

        // The same through the query path, which ic-utils uses by default.
        let snapshot = h.state.canisters_snapshot();
        let reply = execute_management_query(
            &h.config,
            &snapshot,
            &h.state.canister_logs,
            &h.state.snapshots,
            user(1),
            "canister_status",
            &id_record(id),
        )
        .unwrap();
        assert_eq!(Decode!(&reply, mct::CanisterStatusResult).unwrap(), status);
        let error = execute_management_query(
            &h.config,
            &snapshot,
            &h.state.canister_logs,
            &h.state.snapshots,
            user(2),
            "canister_status",
            &id_record(id),
        )
        .unwrap_err();
        assert_eq!(error.error_code, Some(ErrorCode::CanisterInvalidController));
        // The canister itself may read its status.
        h.reply(
            ManagementCaller::Canister(id),
            "canister_status",
            &id_record(id),
        );
        let missing = h.reject(
            alice,
            "canister_status",
            &id_record(CanisterId::from_u64(77)),
        );
        assert_eq!(missing.code, RejectCode::DestinationInvalid);
    }

    #[test]
    fn update_settings_changes_only_given_fields() {
        let mut h = Harness::new();
        let alice = ManagementCaller::User(user(1));
        let id = h.create_canister(user(1));
        let update = |settings: mct::CanisterSettings| {
            Encode!(&mct::UpdateSettingsArgs {
                canister_id: id.get(),
                settings,
                sender_canister_version: None,
            })
            .unwrap()
        };
        h.reply(
            alice,
            "update_settings",
            &update(mct::CanisterSettings {
                wasm_memory_threshold: Some(Nat::from(5u64)),
                ..Default::default()
            }),
        );
        let settings = &h.canister(&id).system_state.settings;
        assert_eq!(settings.wasm_memory_threshold, 5);
        assert_eq!(settings.freezing_threshold_seconds, 2_592_000);
        assert!(h.canister(&id).is_controller(&user(1)));

        let error = h.reject(
            alice,
            "update_settings",
            &update(mct::CanisterSettings {
                controllers: Some((0..11).map(user).collect()),
                ..Default::default()
            }),
        );
        assert!(
            error.message.contains("at most 10 controllers"),
            "{}",
            error.message
        );

        h.reply(
            alice,
            "update_settings",
            &update(mct::CanisterSettings {
                controllers: Some(vec![user(2)]),
                ..Default::default()
            }),
        );
        assert!(!h.canister(&id).is_controller(&user(1)));
        assert!(matches!(
            h.canister(&id).system_state.history.back().unwrap().details,
            ChangeDetails::ControllersChange { .. }
        ));
        let error = h.reject(
            alice,
            "update_settings",
            &update(mct::CanisterSettings::default()),
        );
        assert_eq!(error.error_code, Some(ErrorCode::CanisterInvalidController));
    }

    #[test]
    fn stop_start_and_delete() {
        let mut h = Harness::new();
        let alice = ManagementCaller::User(user(1));
        let id = h.create_canister(user(1));
        let error = h.reject(alice, "delete_canister", &id_record(id));
        assert_eq!(error.error_code, Some(ErrorCode::CanisterNotStopped));

        assert_eq!(
            h.call(alice, "stop_canister", &id_record(id)),
            ManagementOutcome::Deferred
        );
        let CanisterStatus::Stopping { stop_contexts, .. } = &h.canister(&id).system_state.status
        else {
            panic!("not stopping");
        };
        assert_eq!(stop_contexts.len(), 1);
        let StopContext::Ingress { request_id, .. } = stop_contexts[0].clone() else {
            panic!("wrong stop context");
        };
        h.state.ingress_history.set(
            request_id,
            IngressStatus {
                state: IngressState::Processing,
                sender: user(1),
                effective_canister_id: id,
                ingress_expiry: openic_types::Time(u64::MAX),
            },
        );
        // Starting while stopping cancels the waiting stop call.
        h.reply(alice, "start_canister", &id_record(id));
        assert_eq!(h.canister(&id).system_state.status, CanisterStatus::Running);
        assert!(matches!(
            h.state.ingress_history.get(&request_id).unwrap().state,
            IngressState::Rejected(_)
        ));

        // The scheduler would complete the stop; emulate it.
        h.state.canister_mut(&id).unwrap().system_state.status = CanisterStatus::Stopped;
        h.reply(alice, "stop_canister", &id_record(id));
        let error = h.reject(
            ManagementCaller::User(user(5)),
            "delete_canister",
            &id_record(id),
        );
        assert_eq!(error.error_code, Some(ErrorCode::CanisterInvalidController));
        h.reply(alice, "delete_canister", &id_record(id));
        assert!(h.state.canister(&id).is_none());
        assert!(h.state.deleted_canisters.contains(&id));
        let error = h.reject(alice, "canister_status", &id_record(id));
        assert_eq!(error.code, RejectCode::DestinationInvalid);
        // Ids are never reused.
        h.state.metadata.next_user_canister_index = FIRST_USER_CANISTER_INDEX;
        assert_ne!(h.create_canister(user(1)), id);
    }

    #[test]
    fn cycles_methods() {
        let mut h = Harness::new();
        let id = h.create_canister(user(1));
        let other = h.create_canister(user(2));
        let error = h.reject(
            ManagementCaller::User(user(1)),
            "deposit_cycles",
            &id_record(id),
        );
        assert!(error.message.contains("Only canisters"));
        let before = h.canister(&id).system_state.cycles_balance;
        let (outcome, refund) = h.call_with_cycles(
            ManagementCaller::Canister(other),
            "deposit_cycles",
            &id_record(id),
            Cycles(1_000),
        );
        assert!(matches!(outcome, ManagementOutcome::Reply(_)));
        assert_eq!(refund, Cycles::ZERO);
        assert_eq!(
            h.canister(&id).system_state.cycles_balance,
            before.saturating_add(Cycles(1_000))
        );

        let top_up = Encode!(&mct::ProvisionalTopUpCanisterArgs {
            canister_id: id.get(),
            amount: Nat::from(5u64),
        })
        .unwrap();
        // Anyone may top up, and the cycles attached to a call that keeps none are refunded.
        let (outcome, refund) = h.call_with_cycles(
            ManagementCaller::Canister(other),
            "provisional_top_up_canister",
            &top_up,
            Cycles(3),
        );
        assert!(matches!(outcome, ManagementOutcome::Reply(_)));
        assert_eq!(refund, Cycles(3));
        assert_eq!(
            h.canister(&id).system_state.cycles_balance,
            before.saturating_add(Cycles(1_005))
        );
    }

    #[test]
    fn raw_rand_waits_for_later_randomness_and_is_for_canisters_only() {
        let mut h = Harness::new();
        let id = h.create_canister(user(1));
        let error = h.reject(ManagementCaller::User(user(1)), "raw_rand", b"DIDL\x00\x00");
        assert_eq!(error.code, RejectCode::CanisterReject);
        h.state.metadata.height = Height(10);
        for callback in [1, 2] {
            let (outcome, refund) = h.call_from_canister(
                id,
                "raw_rand",
                b"DIDL\x00\x00",
                Cycles(5),
                CallbackId(callback),
            );
            assert_eq!(outcome, ManagementOutcome::Deferred);
            assert_eq!(refund, Cycles::ZERO);
        }
        assert_eq!(h.state.raw_rand_requests.len(), 2);
        h.state.metadata.height = Height(11);
        assert!(lifecycle::answer_raw_rand_requests(&mut h.state).is_empty());
        h.state.metadata.height = Height(10 + RAW_RAND_LAG_HEIGHTS);
        let mut twin = h.state.clone();
        let answers = lifecycle::answer_raw_rand_requests(&mut h.state);
        assert!(h.state.raw_rand_requests.is_empty());
        let bytes: Vec<Vec<u8>> = answers
            .iter()
            .map(|answer| {
                assert_eq!(answer.originator, id);
                assert_eq!(answer.refund, Cycles(5));
                let Payload::Data(data) = &answer.payload else {
                    panic!("raw_rand rejected: {answer:?}");
                };
                Decode!(data, Vec<u8>).unwrap()
            })
            .collect();
        assert_eq!(
            answers
                .iter()
                .map(|a| a.originator_reply_callback)
                .collect::<Vec<_>>(),
            [CallbackId(1), CallbackId(2)]
        );
        assert_eq!(bytes[0].len(), 32);
        assert_ne!(bytes[0], bytes[1]);
        assert_eq!(lifecycle::answer_raw_rand_requests(&mut twin), answers);
    }

    #[test]
    fn canister_info_reports_history() {
        let mut h = Harness::new();
        let id = h.create_canister(user(1));
        let other = h.create_canister(user(2));
        h.reply(
            ManagementCaller::User(user(1)),
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Install,
                fake_module("v=1"),
                b"",
            ),
        );
        let payload = Encode!(&mct::CanisterInfoArgs {
            canister_id: id.get(),
            num_requested_changes: Some(1),
        })
        .unwrap();
        let error = h.reject(ManagementCaller::User(user(1)), "canister_info", &payload);
        assert_eq!(error.code, RejectCode::CanisterReject);
        let info = Decode!(
            &h.reply(ManagementCaller::Canister(other), "canister_info", &payload),
            mct::CanisterInfoResult
        )
        .unwrap();
        assert_eq!(info.total_num_changes, 2);
        assert_eq!(info.recent_changes.len(), 1);
        assert!(matches!(
            info.recent_changes[0].details,
            Some(mct::ChangeDetails::CodeDeployment(_))
        ));
        assert_eq!(info.controllers, vec![user(1)]);
        assert!(info.module_hash.is_some());
    }

    #[test]
    fn logs_are_query_only_and_follow_visibility() {
        let mut h = Harness::new();
        let id = h.create_canister(user(1));
        let payload = Encode!(&mct::FetchCanisterLogsArgs {
            canister_id: id.get(),
            filter: None,
        })
        .unwrap();
        let error = h.reject(
            ManagementCaller::User(user(1)),
            "fetch_canister_logs",
            &payload,
        );
        assert!(
            error.message.contains("only be called as a query"),
            "{}",
            error.message
        );
        let query = |h: &Harness, caller| {
            execute_management_query(
                &h.config,
                &h.state.canisters_snapshot(),
                &h.state.canister_logs,
                &h.state.snapshots,
                caller,
                "fetch_canister_logs",
                &payload,
            )
        };
        let logs = Decode!(&query(&h, user(1)).unwrap(), mct::FetchCanisterLogsResult).unwrap();
        assert!(logs.canister_log_records.is_empty());
        assert_eq!(
            query(&h, user(2)).unwrap_err().error_code,
            Some(ErrorCode::CanisterInvalidController)
        );
        h.state
            .canister_mut(&id)
            .unwrap()
            .system_state
            .settings
            .log_visibility = openic_replicated_state::Visibility::AllowedViewers(vec![user(2)]);
        assert!(query(&h, user(2)).is_ok());
        assert!(query(&h, user(3)).is_err());
    }

    #[test]
    fn snapshots_follow_the_ic_rules() {
        let mut h = Harness::new();
        let alice = ManagementCaller::User(user(1));
        let a = h.create_canister(user(1));
        let take = |id: CanisterId, replace: Option<Vec<u8>>| {
            Encode!(&mct::TakeCanisterSnapshotArgs {
                canister_id: id.get(),
                replace_snapshot: replace,
                uninstall_code: None,
                sender_canister_version: None,
            })
            .unwrap()
        };
        // An empty canister has nothing to snapshot.
        let error = h.reject(alice, "take_canister_snapshot", &take(a, None));
        assert_eq!(
            error.message,
            format!("Failed to create snapshot for empty canister {}:", a.get())
        );
        h.reply(
            alice,
            "install_code",
            &install_args(
                a,
                mct::CanisterInstallMode::Install,
                fake_module("v=1"),
                b"",
            ),
        );
        let mut ids = Vec::new();
        for _ in 0..openic_replicated_state::canister_snapshot::MAX_SNAPSHOTS_PER_CANISTER {
            let reply = h.reply(alice, "take_canister_snapshot", &take(a, None));
            ids.push(Decode!(&reply, mct::Snapshot).unwrap().id);
        }
        let error = h.reject(alice, "take_canister_snapshot", &take(a, None));
        assert!(
            error
                .message
                .contains("has reached the maximum number of snapshots allowed: 10."),
            "{}",
            error.message
        );
        assert_eq!(error.error_code, Some(ErrorCode::CanisterRejectedMessage));
        // Replacing keeps the count; the replaced id is gone.
        h.reply(
            alice,
            "take_canister_snapshot",
            &take(a, Some(ids[0].clone())),
        );
        assert_eq!(h.state.snapshots.count(&a), 10);
        assert!(h.state.snapshots.get(&ids[0]).is_none());

        // Another canister's snapshot cannot be replaced or deleted through this one.
        let b = h.create_canister(user(1));
        h.reply(
            alice,
            "install_code",
            &install_args(
                b,
                mct::CanisterInstallMode::Install,
                fake_module("v=2"),
                b"",
            ),
        );
        let error = h.reject(
            alice,
            "take_canister_snapshot",
            &take(b, Some(ids[1].clone())),
        );
        assert!(
            error.message.contains("does not belong to canister"),
            "{}",
            error.message
        );
        // But a controller of both may load it onto the other canister; the history says from where.
        h.reply(
            alice,
            "load_canister_snapshot",
            &Encode!(&mct::LoadCanisterSnapshotArgs {
                canister_id: b.get(),
                snapshot_id: ids[1].clone(),
                sender_canister_version: None,
            })
            .unwrap(),
        );
        let b_state = h.canister(&b).clone();
        assert_eq!(
            b_state.execution_state.as_ref().unwrap().wasm_binary.bytes,
            h.canister(&a)
                .execution_state
                .as_ref()
                .unwrap()
                .wasm_binary
                .bytes
        );
        assert!(matches!(
            b_state.system_state.history.back().unwrap().details,
            openic_replicated_state::ChangeDetails::LoadSnapshot {
                from_canister_id: Some(from), ..
            } if from == a
        ));
        // Someone who controls the target but not the snapshot's canister may not.
        let carol = ManagementCaller::User(user(3));
        let c = h.create_canister(user(3));
        let error = h.reject(
            carol,
            "load_canister_snapshot",
            &Encode!(&mct::LoadCanisterSnapshotArgs {
                canister_id: c.get(),
                snapshot_id: ids[1].clone(),
                sender_canister_version: None,
            })
            .unwrap(),
        );
        assert!(
            error.message.starts_with("Only a controller"),
            "{}",
            error.message
        );

        // Listing follows snapshot_visibility.
        let bob = ManagementCaller::User(user(2));
        assert!(
            h.reject(bob, "list_canister_snapshots", &id_record(a))
                .error_code
                .is_some()
        );
        h.state
            .canister_mut(&a)
            .unwrap()
            .system_state
            .settings
            .snapshot_visibility = openic_replicated_state::Visibility::Public;
        let listed = Decode!(
            &h.reply(bob, "list_canister_snapshots", &id_record(a)),
            Vec<mct::Snapshot>
        )
        .unwrap();
        assert_eq!(listed.len(), 10);

        // Deleting the canister deletes its snapshots.
        h.state.canister_mut(&a).unwrap().system_state.status =
            openic_replicated_state::CanisterStatus::Stopped;
        h.reply(alice, "delete_canister", &id_record(a));
        assert_eq!(h.state.snapshots.count(&a), 0);
    }

    #[test]
    fn install_needs_the_prepayment_and_pays_for_its_hooks() {
        let mut h = Harness::new();
        let id = h.create_canister(user(1));
        h.state
            .canister_mut(&id)
            .unwrap()
            .system_state
            .cycles_balance = Cycles(1_000_000);
        let error = h.reject(
            ManagementCaller::User(user(1)),
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Install,
                fake_module("v=1"),
                b"",
            ),
        );
        assert_eq!(error.error_code, Some(ErrorCode::CanisterOutOfCycles));
        assert!(
            error.message.starts_with(&format!(
                "Canister installation failed with `Canister {}",
                id.get()
            )),
            "{}",
            error.message
        );
        let canister = h.canister(&id);
        assert!(canister.execution_state.is_none());
        assert_eq!(
            canister.system_state.cycles_balance,
            Cycles(1_000_000),
            "nothing ran, nothing is charged"
        );

        // With enough for the prepayment, the install succeeds and the fee is burned, so the
        // subnet's consumed total grows by exactly what the canister paid.
        let enough = crate::common::execution_fee(&h.config, h.config.max_instructions_per_install)
            .saturating_add(Cycles(1_000_000_000_000));
        h.state
            .canister_mut(&id)
            .unwrap()
            .system_state
            .cycles_balance = enough;
        let consumed = h.state.metadata.consumed_cycles_total;
        h.reply(
            ManagementCaller::User(user(1)),
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Install,
                fake_module("v=1"),
                b"",
            ),
        );
        let paid = enough.get() - h.canister(&id).system_state.cycles_balance.get();
        assert!(
            paid >= h.config.update_message_execution_fee.get(),
            "{paid}"
        );
        assert_eq!(h.state.metadata.consumed_cycles_total - consumed, paid);
    }

    #[test]
    fn logs_filter_resize_and_are_purged_by_reinstall_and_uninstall() {
        let mut h = Harness::new();
        let id = h.create_canister(user(1));
        let install = |h: &mut Harness, mode| {
            h.reply(
                ManagementCaller::User(user(1)),
                "install_code",
                &install_args(id, mode, fake_module("v=1"), b""),
            );
        };
        install(&mut h, mct::CanisterInstallMode::Install);
        for i in 0..10u8 {
            h.state.metadata.time = openic_types::Time(1_000 + u64::from(i));
            h.state.append_log(id, [vec![b'0' + i]]);
        }
        let fetch = |h: &Harness, filter| {
            let payload = Encode!(&mct::FetchCanisterLogsArgs {
                canister_id: id.get(),
                filter,
            })
            .unwrap();
            let reply = execute_management_query(
                &h.config,
                &h.state.canisters_snapshot(),
                &h.state.canister_logs,
                &h.state.snapshots,
                user(1),
                "fetch_canister_logs",
                &payload,
            )
            .unwrap();
            Decode!(&reply, mct::FetchCanisterLogsResult)
                .unwrap()
                .canister_log_records
                .into_iter()
                .map(|r| (r.idx, r.timestamp_nanos, r.content))
                .collect::<Vec<_>>()
        };
        assert_eq!(fetch(&h, None).len(), 10);
        assert_eq!(
            fetch(&h, Some(mct::CanisterLogFilter::ByIdx { start: 2, end: 3 })),
            [(2, 1_002, b"2".to_vec()), (3, 1_003, b"3".to_vec())]
        );
        assert_eq!(
            fetch(
                &h,
                Some(mct::CanisterLogFilter::ByTimestampNanos {
                    start: 1_009,
                    end: u64::MAX
                })
            ),
            [(9, 1_009, b"9".to_vec())]
        );
        // canister_status counts the log's bytes.
        let status = Decode!(
            &h.reply(
                ManagementCaller::User(user(1)),
                "canister_status",
                &id_record(id)
            ),
            mct::CanisterStatusResult
        )
        .unwrap();
        assert_eq!(
            status.memory_metrics.log_memory_store_size,
            10u64 * (openic_replicated_state::canister_log::LOG_RECORD_OVERHEAD_BYTES + 1)
        );

        // A limit above the maximum is refused; a smaller one drops the oldest records.
        let settings = |limit: u64| {
            Encode!(&mct::UpdateSettingsArgs {
                canister_id: id.get(),
                settings: mct::CanisterSettings {
                    log_memory_limit: Some(Nat::from(limit)),
                    ..Default::default()
                },
                sender_canister_version: None,
            })
            .unwrap()
        };
        let error = h.reject(
            ManagementCaller::User(user(1)),
            "update_settings",
            &settings(openic_replicated_state::canister_log::MAX_LOG_MEMORY_LIMIT + 1),
        );
        assert_eq!(
            error.message,
            "The canister log memory limit 2097153 is too high. It must be at most 2097152."
        );
        assert_eq!(error.error_code, Some(ErrorCode::CanisterRejectedMessage));
        let error = h.reject(
            ManagementCaller::User(user(1)),
            "update_settings",
            &settings(1),
        );
        assert!(error.message.contains("is too low"), "{}", error.message);
        for i in 0..100u8 {
            h.state.append_log(id, [vec![i; 200]]);
        }
        h.reply(
            ManagementCaller::User(user(1)),
            "update_settings",
            &settings(openic_replicated_state::canister_log::MAX_LOG_MEMORY_LIMIT),
        );
        for i in 0..100u8 {
            h.state.append_log(id, [vec![i; 200]]);
        }
        assert_eq!(fetch(&h, None).len(), 4096 / 240 + 100);
        h.reply(
            ManagementCaller::User(user(1)),
            "update_settings",
            &settings(4096),
        );
        assert_eq!(fetch(&h, None).len(), 4096 / 240);
        assert_eq!(fetch(&h, None).last().unwrap().0, 209);

        // An upgrade keeps the log, a reinstall purges it, indexes keep counting.
        install(&mut h, mct::CanisterInstallMode::Upgrade(None));
        assert_eq!(fetch(&h, None).len(), 4096 / 240);
        install(&mut h, mct::CanisterInstallMode::Reinstall);
        assert!(fetch(&h, None).is_empty());
        h.state.append_log(id, [b"again".to_vec()]);
        assert_eq!(fetch(&h, None)[0].0, 210);
        h.reply(
            ManagementCaller::User(user(1)),
            "uninstall_code",
            &id_record(id),
        );
        assert!(fetch(&h, None).is_empty());
    }

    #[test]
    fn canister_metadata_query_hides_private_sections() {
        let mut h = Harness::new();
        let id = h.create_canister(user(1));
        h.reply(
            ManagementCaller::User(user(1)),
            "install_code",
            &install_args(
                id,
                mct::CanisterInstallMode::Install,
                fake_module("v=1"),
                b"",
            ),
        );
        let query = |caller, name: &str| {
            let payload = Encode!(&mct::CanisterMetadataArgs {
                canister_id: id.get(),
                name: name.into(),
            })
            .unwrap();
            execute_management_query(
                &h.config,
                &h.state.canisters_snapshot(),
                &h.state.canister_logs,
                &h.state.snapshots,
                caller,
                "canister_metadata",
                &payload,
            )
        };
        let public = Decode!(
            &query(user(5), "candid:service").unwrap(),
            mct::CanisterMetadataResult
        )
        .unwrap();
        assert_eq!(public.value, b"service : {}");
        assert!(query(user(5), "secret").is_err());
        assert!(query(user(1), "secret").is_ok());
        // Canisters may read metadata through an update call too.
        let payload = Encode!(&mct::CanisterMetadataArgs {
            canister_id: id.get(),
            name: "candid:service".into(),
        })
        .unwrap();
        let reply = h.reply(
            ManagementCaller::Canister(id),
            "canister_metadata",
            &payload,
        );
        let value = Decode!(&reply, mct::CanisterMetadataResult).unwrap().value;
        assert_eq!(value, b"service : {}");
    }

    #[test]
    fn unknown_and_unsupported_methods_name_the_method() {
        let mut h = Harness::new();
        let error = h.reject(
            ManagementCaller::User(user(1)),
            "frobnicate",
            b"DIDL\x00\x00",
        );
        assert_eq!(error.code, RejectCode::DestinationInvalid);
        assert!(error.message.contains("frobnicate"));
        let id = h.create_canister(user(1));
        let (outcome, refund) = h.call_with_cycles(
            ManagementCaller::Canister(id),
            "sign_with_ecdsa",
            b"DIDL\x00\x00",
            Cycles(77),
        );
        assert!(
            matches!(outcome, ManagementOutcome::Reject(ref e) if e.message.contains("sign_with_ecdsa"))
        );
        assert_eq!(
            refund,
            Cycles(77),
            "a rejection refunds every attached cycle"
        );
    }

    #[test]
    fn ingress_checks_follow_the_effective_canister_id_rules() {
        let mut h = Harness::new();
        let alice = user(1);
        let id = h.create_canister(alice);
        let other = h.create_canister(alice);
        let canisters = h.state.canisters_snapshot();
        let check = |method: &str, payload: &[u8], ecid: CanisterId, caller: Principal| {
            check_management_ingress(method, payload, &ecid, &caller, &canisters)
        };
        let create = Encode!(&mct::ProvisionalCreateCanisterWithCyclesArgs::default()).unwrap();
        assert!(
            check(
                "provisional_create_canister_with_cycles",
                &create,
                CanisterId::management(),
                user(7)
            )
            .is_ok()
        );
        assert!(
            check(
                "provisional_create_canister_with_cycles",
                &create,
                CanisterId::from_u64(3),
                user(7)
            )
            .is_ok()
        );

        assert!(check("canister_status", &id_record(id), id, alice).is_ok());
        let error = check("canister_status", &id_record(id), other, alice).unwrap_err();
        assert!(
            error.message.contains("does not match"),
            "{}",
            error.message
        );
        let error = check("canister_status", &id_record(id), id, user(9)).unwrap_err();
        assert_eq!(error.error_code, Some(ErrorCode::CanisterInvalidController));
        let install = install_args(
            id,
            mct::CanisterInstallMode::Install,
            vec![0; 2 * 1024 * 1024],
            b"",
        );
        assert!(check("install_code", &install, id, alice).is_ok());
        assert!(check("install_code", &install, other, alice).is_err());

        let chunked = Encode!(&mct::InstallChunkedCodeArgs {
            mode: mct::CanisterInstallMode::Install,
            target_canister: id.get(),
            store_canister: Some(other.get()),
            chunk_hashes_list: vec![],
            wasm_module_hash: vec![],
            arg: vec![],
            sender_canister_version: None,
        })
        .unwrap();
        assert!(check("install_chunked_code", &chunked, id, alice).is_ok());
        assert!(check("install_chunked_code", &chunked, other, alice).is_err());

        // Anyone may top up; the canister must exist.
        let top_up = Encode!(&mct::ProvisionalTopUpCanisterArgs {
            canister_id: id.get(),
            amount: Nat::from(1u8),
        })
        .unwrap();
        assert!(check("provisional_top_up_canister", &top_up, id, user(9)).is_ok());
        let missing = CanisterId::from_u64(5);
        assert_eq!(
            check("start_canister", &id_record(missing), missing, alice)
                .unwrap_err()
                .code,
            RejectCode::DestinationInvalid
        );

        for method in [
            "raw_rand",
            "deposit_cycles",
            "create_canister",
            "canister_info",
            "http_request",
            "sign_with_ecdsa",
        ] {
            let error = check(method, &id_record(id), id, alice).unwrap_err();
            assert_eq!(error.code, RejectCode::CanisterReject, "{method}");
            assert!(error.message.contains(method));
        }
        assert!(check("fetch_canister_logs", &id_record(id), id, alice).is_err());
        assert_eq!(
            check("no_such_method", &id_record(id), id, alice)
                .unwrap_err()
                .code,
            RejectCode::DestinationInvalid
        );
        assert!(check("canister_status", b"garbage", id, alice).is_err());
    }
}
