//! Why a management call was refused: one variant per reason, each with a message that says what
//! was wrong and what to do, mapped onto the IC's reject and error codes.

use candid::Principal;
use openic_replicated_state::CanisterState;
use openic_types::{CanisterId, Cycles, ErrorCode, RejectCode, UserError};

/// Why a call to the management canister was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManagementError {
    /// No method of this name exists.
    #[error(
        "Management canister has no method '{method}'; check the method name against the management canister's interface."
    )]
    UnknownMethod {
        /// The method asked for.
        method: String,
    },
    /// The IC has this method but openic does not implement it.
    #[error("The management canister method '{method}' is not supported by openic yet.")]
    Unsupported {
        /// The method asked for.
        method: String,
    },
    /// Only canisters may call this method; users cannot call it through ingress.
    #[error(
        "Only canisters can call the management canister method '{method}'; it cannot be called by users through ingress messages."
    )]
    CanisterOnly {
        /// The method.
        method: String,
    },
    /// The method can only be called as a query.
    #[error(
        "The management canister method '{method}' can only be called as a query; send it to the query endpoint."
    )]
    QueryOnly {
        /// The method.
        method: String,
    },
    /// The method cannot be called as a query.
    #[error(
        "The management canister method '{method}' cannot be called as a query; send it as an update call."
    )]
    NotAQuery {
        /// The method.
        method: String,
    },
    /// The argument did not decode.
    #[error(
        "Invalid argument for management canister method '{method}': {reason}. Encode the argument with Candid as the management canister's interface describes."
    )]
    InvalidArgument {
        /// The method.
        method: String,
        /// What the decoder said.
        reason: String,
    },
    /// The effective canister id of the request is not the canister the argument names.
    #[error(
        "The effective canister id {effective} of the request does not match the canister {argument} named in the argument of '{method}'; send the request to /api/…/canister/{argument}/call."
    )]
    EffectiveCanisterIdMismatch {
        /// The method.
        method: String,
        /// The canister in the argument.
        argument: Principal,
        /// The effective canister id.
        effective: Principal,
    },
    /// The caller does not control the canister.
    #[error(
        "Only the controllers of the canister {canister} can control it.\nCanister's controllers: {controllers}\nSender's ID: {caller}"
    )]
    NotAController {
        /// The canister.
        canister: Principal,
        /// Its controllers, space-separated.
        controllers: String,
        /// The caller.
        caller: Principal,
    },
    /// No such snapshot (the IC's text).
    #[error("Could not find the snapshot ID {snapshot} for canister {canister}.")]
    SnapshotNotFound {
        /// The snapshot id, in hex.
        snapshot: String,
        /// The canister.
        canister: Principal,
    },
    /// The snapshot is another canister's (the IC's text).
    #[error("The snapshot {snapshot} does not belong to canister {canister}.")]
    SnapshotNotOwned {
        /// The snapshot id, in hex.
        snapshot: String,
        /// The canister.
        canister: Principal,
    },
    /// The canister has no module to snapshot (the IC's text, colon included).
    #[error("Failed to create snapshot for empty canister {canister}:")]
    SnapshotOfEmptyCanister {
        /// The canister.
        canister: Principal,
    },
    /// The canister already has the most snapshots allowed (the IC's text and help).
    #[error(
        "Canister {canister} has reached the maximum number of snapshots allowed: {max}.\nConsider deleting an unnecessary snapshot of the specified canister before creating a new one. See documentation: canister-snapshot-limit-exceeded"
    )]
    TooManySnapshots {
        /// The canister.
        canister: Principal,
        /// The limit.
        max: usize,
    },
    /// The snapshot would be larger than openic keeps.
    #[error(
        "Canister {canister} would take a snapshot of {size} bytes; openic keeps snapshots of at most {max} bytes."
    )]
    SnapshotTooLarge {
        /// The canister.
        canister: Principal,
        /// The snapshot's size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The caller does not control the canister the snapshot was taken from (the IC's text).
    #[error(
        "Only a controller of the canister that snapshot {snapshot} belongs to can load it on canister {canister}. Sender: {caller}."
    )]
    NotSnapshotController {
        /// The snapshot id, in hex.
        snapshot: String,
        /// The canister to load it on.
        canister: Principal,
        /// The caller.
        caller: Principal,
    },
    /// The caller may not list the canister's snapshots.
    #[error(
        "Caller {caller} is not allowed to list the snapshots of canister {canister}; its snapshot_visibility does not include the caller."
    )]
    SnapshotsNotVisible {
        /// The canister.
        canister: Principal,
        /// The caller.
        caller: Principal,
    },
    /// Data uploaded to a snapshot taken from a canister (the IC's text).
    #[error("Only canister snapshots created by metadata upload can be mutated.")]
    SnapshotImmutable,
    /// A snapshot slice outside the data it reads (the IC's text).
    #[error(
        "Invalid subslice into wasm module / main memory / stable memory: offset: {offset}, size: {size}"
    )]
    InvalidSlice {
        /// The slice's offset.
        offset: u64,
        /// Its size.
        size: u64,
    },
    /// A snapshot slice larger than one reply carries (the IC's text).
    #[error("Requested slice too large: {requested} > {allowed}")]
    SliceTooLarge {
        /// The size asked for.
        requested: u64,
        /// The largest slice.
        allowed: u64,
    },
    /// `log_memory_limit` below the smallest log (0, no log, is allowed).
    #[error("The canister log memory limit {bytes} is too low. It must be at least {limit}.")]
    LogMemoryLimitTooLow {
        /// The setting asked for.
        bytes: u64,
        /// The smallest allowed.
        limit: u64,
    },
    /// `log_memory_limit` above the largest log.
    #[error("The canister log memory limit {bytes} is too high. It must be at most {limit}.")]
    LogMemoryLimitTooHigh {
        /// The setting asked for.
        bytes: u64,
        /// The largest allowed.
        limit: u64,
    },
    /// A setting is out of range.
    #[error("Invalid settings: {reason}")]
    InvalidSettings {
        /// What was wrong.
        reason: String,
    },
    /// `specified_id` is outside this subnet's canister ranges.
    #[error(
        "The specified_id {id} is not inside this subnet's canister ranges; choose an id inside them or leave specified_id out."
    )]
    SpecifiedIdOutsideRanges {
        /// The id asked for.
        id: Principal,
    },
    /// `specified_id` names an existing or deleted canister.
    #[error(
        "The specified_id {id} is already in use (by an existing or a deleted canister); canister ids are never reused, choose another id."
    )]
    SpecifiedIdInUse {
        /// The id asked for.
        id: Principal,
    },
    /// No free canister id is left in the user range.
    #[error("No free canister id is left on this subnet.")]
    CanisterIdsExhausted,
    /// Not enough cycles were attached to `create_canister`.
    #[error(
        "Creating a canister requires a fee of {fee} cycles that is deducted from the canister's initial balance, but only {attached} cycles were attached to the create_canister call; attach at least {fee} cycles."
    )]
    InsufficientCyclesForCreation {
        /// The creation fee.
        fee: Cycles,
        /// What was attached.
        attached: Cycles,
    },
    /// A cycles amount does not fit in 128 bits.
    #[error("The amount {amount} of cycles is too large; at most 2^128-1 cycles are supported.")]
    AmountTooLarge {
        /// The amount as sent.
        amount: String,
    },
    /// `install` on a canister that already has a module.
    #[error(
        "Canister {canister} cannot be installed because the canister is not empty. Try installing with mode='reinstall' or mode='upgrade' instead."
    )]
    AlreadyInstalled {
        /// The canister.
        canister: Principal,
    },
    /// `upgrade` of a canister without a module.
    #[error(
        "Canister {canister} has no wasm module to upgrade; install one with mode='install' first."
    )]
    UpgradeOfEmptyCanister {
        /// The canister.
        canister: Principal,
    },
    /// The module is larger than allowed.
    #[error(
        "The wasm module is {size} bytes, more than the maximum of {max} bytes; shrink it (for example with ic-wasm shrink or gzip)."
    )]
    ModuleTooLarge {
        /// Its size.
        size: usize,
        /// The maximum.
        max: usize,
    },
    /// The module failed validation or compilation.
    #[error("{0}")]
    InvalidWasm(String),
    /// The old module uses enhanced orthogonal persistence but the upgrade would discard the heap.
    #[error(
        "Missing upgrade option: Enhanced orthogonal persistence requires the `wasm_memory_persistence` upgrade option; upgrade with wasm_memory_persistence = opt variant {{ keep }} (or reinstall)."
    )]
    MissingMemoryPersistenceOption,
    /// `keep` was asked for but the new module does not support enhanced orthogonal persistence.
    #[error(
        "Invalid upgrade option: The `wasm_memory_persistence: opt keep` upgrade option requires that the new canister module supports enhanced orthogonal persistence; leave the option out or use `replace`."
    )]
    KeepWithoutEnhancedPersistence,
    /// A chunk is larger than allowed.
    #[error(
        "The chunk is {size} bytes, more than the maximum of {max} bytes; split the module into chunks of at most {max} bytes."
    )]
    ChunkTooLarge {
        /// Its size.
        size: usize,
        /// The maximum.
        max: usize,
    },
    /// The chunk store is full.
    #[error(
        "The wasm chunk store of canister {canister} already holds the maximum of {max} chunks; clear it with clear_chunk_store first."
    )]
    ChunkStoreFull {
        /// The canister.
        canister: Principal,
        /// The maximum number of chunks.
        max: usize,
    },
    /// A chunk listed for install_chunked_code is not in the store.
    #[error(
        "The chunk with hash {hash} is not in the wasm chunk store of canister {store}; upload it with upload_chunk first."
    )]
    ChunkNotFound {
        /// Hex of the hash.
        hash: String,
        /// The store canister.
        store: Principal,
    },
    /// More chunks were listed than a module can have.
    #[error("install_chunked_code lists {count} chunks, more than the maximum of {max}.")]
    TooManyChunks {
        /// Chunks listed.
        count: usize,
        /// The maximum.
        max: usize,
    },
    /// The concatenated chunks do not hash to `wasm_module_hash`.
    #[error(
        "Wasm module hash mismatch: the SHA-256 of the concatenated chunks is {actual}, but wasm_module_hash is {expected}; list the chunk hashes in module order."
    )]
    WasmHashMismatch {
        /// Hex of the hash given.
        expected: String,
        /// Hex of the hash computed.
        actual: String,
    },
    /// The store canister is not one the caller may read chunks from.
    #[error(
        "The caller {caller} may not use the chunk store of canister {store}: it must be a controller of the store canister or the store canister itself."
    )]
    ChunkStoreNotAccessible {
        /// The caller.
        caller: Principal,
        /// The store canister.
        store: Principal,
    },
    /// delete_canister on a canister that is not stopped.
    #[error("Canister {canister} must be stopped before it is deleted; call stop_canister first.")]
    NotStopped {
        /// The canister.
        canister: Principal,
    },
    /// A canister tried to delete itself.
    #[error("Canister {canister} cannot delete itself; ask another controller to delete it.")]
    DeleteSelf {
        /// The canister.
        canister: Principal,
    },
    /// Too many stop_canister calls are waiting for this canister.
    #[error(
        "Canister {canister} already has {max} stop_canister calls waiting; wait for them to finish."
    )]
    TooManyStopRequests {
        /// The canister.
        canister: Principal,
        /// The maximum.
        max: usize,
    },
    /// The caller may not read the canister's logs.
    #[error(
        "Caller {caller} is not allowed to read the logs of canister {canister}; its log_visibility does not include the caller."
    )]
    LogsNotVisible {
        /// The canister.
        canister: Principal,
        /// The caller.
        caller: Principal,
    },
    /// No such metadata section, or it is private and the caller is not a controller.
    #[error("Canister {canister} has no metadata section named '{name}' that the caller may read.")]
    MetadataNotFound {
        /// The canister.
        canister: Principal,
        /// The section name.
        name: String,
    },
    /// canister_status from someone who is neither a controller nor the canister.
    #[error(
        "Only the controllers of the canister {canister} or the canister itself can read its status.\nCanister's controllers: {controllers}\nSender's ID: {caller}"
    )]
    StatusNotVisible {
        /// The canister.
        canister: Principal,
        /// Its controllers, space-separated.
        controllers: String,
        /// The caller.
        caller: Principal,
    },
}

impl ManagementError {
    /// The IC error code of this refusal (its first digit is the reject code); `None` for a method
    /// the management canister does not have, which is refused with reject code 3 and no error
    /// code, as the IC refuses a call it cannot route.
    pub fn error_code(&self) -> Option<ErrorCode> {
        use ManagementError::*;
        Some(match self {
            UnknownMethod { .. } | Unsupported { .. } => return None,
            LogMemoryLimitTooLow { .. }
            | LogMemoryLimitTooHigh { .. }
            | SnapshotNotOwned { .. }
            | SnapshotOfEmptyCanister { .. }
            | TooManySnapshots { .. }
            | SnapshotTooLarge { .. }
            | NotSnapshotController { .. }
            | SnapshotImmutable => ErrorCode::CanisterRejectedMessage,
            SnapshotNotFound { .. } => ErrorCode::CanisterSnapshotNotFound,
            SnapshotsNotVisible { .. } => ErrorCode::CanisterInvalidController,
            CanisterOnly { .. } => ErrorCode::CanisterRejectedMessage,
            QueryOnly { .. } | NotAQuery { .. } => ErrorCode::CanisterContractViolation,
            InvalidArgument { .. }
            | EffectiveCanisterIdMismatch { .. }
            | SpecifiedIdOutsideRanges { .. }
            | SpecifiedIdInUse { .. }
            | AmountTooLarge { .. }
            | MissingMemoryPersistenceOption
            | KeepWithoutEnhancedPersistence
            | WasmHashMismatch { .. }
            | TooManyChunks { .. }
            | TooManyStopRequests { .. }
            | InvalidSlice { .. }
            | SliceTooLarge { .. } => ErrorCode::InvalidManagementPayload,
            // As the IC classifies them.
            InvalidSettings { .. } => ErrorCode::CanisterContractViolation,
            DeleteSelf { .. } => ErrorCode::CanisterInvalidController,
            NotAController { .. }
            | StatusNotVisible { .. }
            | LogsNotVisible { .. }
            | ChunkStoreNotAccessible { .. } => ErrorCode::CanisterInvalidController,
            CanisterIdsExhausted => ErrorCode::CanisterContractViolation,
            InsufficientCyclesForCreation { .. } => ErrorCode::CanisterOutOfCycles,
            AlreadyInstalled { .. } => ErrorCode::CanisterAlreadyInstalled,
            UpgradeOfEmptyCanister { .. } => ErrorCode::CanisterWasmModuleNotFound,
            ModuleTooLarge { .. } | InvalidWasm(_) => ErrorCode::CanisterInvalidWasm,
            ChunkTooLarge { .. } | ChunkStoreFull { .. } | ChunkNotFound { .. } => {
                ErrorCode::CanisterContractViolation
            }
            NotStopped { .. } => ErrorCode::CanisterNotStopped,
            MetadataNotFound { .. } => ErrorCode::CanisterContractViolation,
        })
    }
}

impl From<ManagementError> for UserError {
    fn from(error: ManagementError) -> UserError {
        match error.error_code() {
            Some(code) => UserError::new(code, error.to_string()),
            None => UserError {
                code: RejectCode::DestinationInvalid,
                message: error.to_string(),
                error_code: None,
            },
        }
    }
}

/// Controllers as a space-separated list (the form the DFINITY implementation prints).
fn controllers_text(canister: &CanisterState) -> String {
    canister
        .system_state
        .controllers
        .iter()
        .map(|c| c.to_text())
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) fn unknown_method(method: &str) -> UserError {
    if super::UNSUPPORTED_METHODS.contains(&method) {
        ManagementError::Unsupported {
            method: method.to_string(),
        }
        .into()
    } else {
        ManagementError::UnknownMethod {
            method: method.to_string(),
        }
        .into()
    }
}

pub(super) fn canister_only(method: &str) -> UserError {
    ManagementError::CanisterOnly {
        method: method.to_string(),
    }
    .into()
}

pub(super) fn query_only(method: &str) -> UserError {
    ManagementError::QueryOnly {
        method: method.to_string(),
    }
    .into()
}

pub(super) fn not_a_query(method: &str) -> UserError {
    if super::UNSUPPORTED_METHODS.contains(&method) {
        return unknown_method(method);
    }
    ManagementError::NotAQuery {
        method: method.to_string(),
    }
    .into()
}

pub(super) fn invalid_argument(method: &str, reason: impl std::fmt::Display) -> UserError {
    ManagementError::InvalidArgument {
        method: method.to_string(),
        reason: reason.to_string(),
    }
    .into()
}

pub(super) fn effective_canister_id_mismatch(
    method: &str,
    argument: &Principal,
    effective: &CanisterId,
) -> UserError {
    ManagementError::EffectiveCanisterIdMismatch {
        method: method.to_string(),
        argument: *argument,
        effective: effective.get(),
    }
    .into()
}

pub(super) fn not_a_controller(canister: &CanisterState, caller: &Principal) -> UserError {
    ManagementError::NotAController {
        canister: canister.canister_id().get(),
        controllers: controllers_text(canister),
        caller: *caller,
    }
    .into()
}

pub(super) fn status_not_visible(canister: &CanisterState, caller: &Principal) -> UserError {
    ManagementError::StatusNotVisible {
        canister: canister.canister_id().get(),
        controllers: controllers_text(canister),
        caller: *caller,
    }
    .into()
}

pub(super) fn invalid_settings(reason: impl Into<String>) -> UserError {
    ManagementError::InvalidSettings {
        reason: reason.into(),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use openic_types::RejectCode;

    #[test]
    fn refusals_carry_the_ic_codes() {
        let not_controller: UserError = ManagementError::NotAController {
            canister: Principal::anonymous(),
            controllers: String::new(),
            caller: Principal::anonymous(),
        }
        .into();
        assert_eq!(not_controller.code, RejectCode::CanisterError);
        assert_eq!(
            not_controller.error_code,
            Some(ErrorCode::CanisterInvalidController)
        );
        assert!(
            not_controller
                .message
                .starts_with("Only the controllers of the canister 2vxsx-fae can control it.")
        );
        let unknown = unknown_method("frobnicate");
        assert_eq!(unknown.code, RejectCode::DestinationInvalid);
        assert!(unknown.message.contains("frobnicate"));
        let unsupported = unknown_method("list_canisters");
        assert!(unsupported.message.contains("not supported"));
        let invalid = invalid_argument("install_code", "bad");
        assert_eq!(invalid.code, RejectCode::CanisterReject);
        assert_eq!(
            invalid.error_code,
            Some(ErrorCode::InvalidManagementPayload)
        );
    }
}
