//! Read-only methods: `canister_status` (update and query), `canister_info`, `fetch_canister_logs`
//! and `canister_metadata`.
//!
//! Replies are built from the `ic-management-canister-types` 0.8.0 types, so they carry every field
//! `ic-utils` 0.49.3 decodes (a missing non-`opt` field would fail its decoding).

use super::args::{self, to_log_visibility, to_snapshot_visibility};
use super::errors::{self, ManagementError};
use super::{Context, Handled, existing, existing_in};
use crate::common::idle_cycles_per_second;
use crate::config::ExecutionConfig;
use candid::{Nat, Principal};
use ic_management_canister_types as mct;
use openic_replicated_state::{
    CanisterLogs, CanisterState, CanisterStatus, ChangeDetails, ChangeOrigin, GlobalValue,
    LogFilter, ReplicatedState, Visibility, WASM_PAGE_SIZE,
};
use openic_types::{CanisterId, ErrorCode, UserError};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Seconds in a day (for `idle_cycles_burned_per_day`).
const SECONDS_PER_DAY: u128 = 86_400;
/// Bytes a history entry is counted as, besides its controllers (for `canister_history_size`).
const HISTORY_ENTRY_BASE_BYTES: u64 = 64;
/// Bytes per principal in a history entry.
const PRINCIPAL_BYTES: u64 = 29;

/// Controllers and the canister itself may read its status.
pub(super) fn check_status_caller(
    canister: &CanisterState,
    caller: &Principal,
) -> Result<(), UserError> {
    if canister.is_controller(caller) || canister.canister_id().get() == *caller {
        Ok(())
    } else {
        Err(errors::status_not_visible(canister, caller))
    }
}

fn nat(value: impl Into<u128>) -> Nat {
    Nat::from(value.into())
}

fn memory_metrics(
    canister: &CanisterState,
    log_bytes: u64,
    snapshot_bytes: u64,
) -> mct::MemoryMetrics {
    let system_state = &canister.system_state;
    let (wasm_memory, stable_memory, globals, binary, custom_sections) =
        match &canister.execution_state {
            Some(execution_state) => (
                execution_state
                    .wasm_memory_size_pages
                    .saturating_mul(WASM_PAGE_SIZE),
                execution_state
                    .stable_memory_size_pages
                    .saturating_mul(WASM_PAGE_SIZE),
                execution_state
                    .globals
                    .iter()
                    .map(GlobalValue::size_bytes)
                    .sum::<u64>(),
                execution_state.wasm_binary.bytes.len() as u64,
                execution_state.module_info.custom_sections_size,
            ),
            None => (0, 0, 0, 0, 0),
        };
    let history: u64 = system_state
        .history
        .iter()
        .map(|change| {
            let principals = match &change.details {
                ChangeDetails::Creation { controllers }
                | ChangeDetails::ControllersChange { controllers } => controllers.len() as u64,
                ChangeDetails::CodeDeployment { .. }
                | ChangeDetails::CodeUninstall
                | ChangeDetails::LoadSnapshot { .. } => 0,
            };
            HISTORY_ENTRY_BASE_BYTES.saturating_add(principals.saturating_mul(PRINCIPAL_BYTES))
        })
        .sum();
    let chunk_store: u64 = system_state
        .wasm_chunk_store
        .values()
        .map(|chunk| chunk.len() as u64)
        .sum();
    mct::MemoryMetrics {
        wasm_memory_size: nat(wasm_memory),
        stable_memory_size: nat(stable_memory),
        global_memory_size: nat(globals),
        wasm_binary_size: nat(binary),
        custom_sections_size: nat(custom_sections),
        canister_history_size: nat(history),
        wasm_chunk_store_size: nat(chunk_store),
        snapshots_size: nat(snapshot_bytes),
        log_memory_store_size: nat(log_bytes),
    }
}

/// The `canister_status` result with every field of the 0.8.0 type.
pub(super) fn canister_status_result(
    config: &ExecutionConfig,
    canister: &CanisterState,
    log_bytes: u64,
    snapshot_bytes: u64,
) -> mct::CanisterStatusResult {
    let system_state = &canister.system_state;
    let settings = &system_state.settings;
    let metrics = memory_metrics(canister, log_bytes, snapshot_bytes);
    let memory_size = [
        &metrics.wasm_memory_size,
        &metrics.stable_memory_size,
        &metrics.global_memory_size,
        &metrics.wasm_binary_size,
        &metrics.custom_sections_size,
        &metrics.canister_history_size,
        &metrics.wasm_chunk_store_size,
        &metrics.snapshots_size,
        &metrics.log_memory_store_size,
    ]
    .into_iter()
    .fold(Nat::from(0u8), |total, part| total + part.clone());
    let status = match system_state.status {
        CanisterStatus::Running => mct::CanisterStatusType::Running,
        CanisterStatus::Stopping { .. } => mct::CanisterStatusType::Stopping,
        CanisterStatus::Stopped => mct::CanisterStatusType::Stopped,
    };
    mct::CanisterStatusResult {
        status,
        ready_for_migration: system_state.status == CanisterStatus::Stopped
            && system_state.input_queue.is_empty(),
        version: system_state.canister_version,
        settings: mct::DefiniteCanisterSettings {
            controllers: system_state.controllers.iter().copied().collect(),
            compute_allocation: nat(settings.compute_allocation),
            memory_allocation: nat(settings.memory_allocation),
            freezing_threshold: nat(settings.freezing_threshold_seconds),
            reserved_cycles_limit: nat(settings.reserved_cycles_limit),
            log_visibility: to_log_visibility(&settings.log_visibility),
            log_memory_limit: nat(settings.log_memory_limit),
            snapshot_visibility: to_snapshot_visibility(&settings.snapshot_visibility),
            wasm_memory_limit: nat(settings.wasm_memory_limit),
            wasm_memory_threshold: nat(settings.wasm_memory_threshold),
            environment_variables: settings
                .environment_variables
                .iter()
                .map(|(name, value)| mct::EnvironmentVariable {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
        },
        module_hash: canister.module_hash().map(|hash| hash.to_vec()),
        memory_size,
        memory_metrics: metrics,
        cycles: nat(system_state.cycles_balance.get()),
        reserved_cycles: nat(system_state.reserved_balance.get()),
        idle_cycles_burned_per_day: nat(idle_cycles_per_second(config, canister)
            .get()
            .saturating_mul(SECONDS_PER_DAY)),
        query_stats: mct::QueryStats {
            num_calls_total: nat(0u64),
            num_instructions_total: nat(0u64),
            request_payload_bytes_total: nat(0u64),
            response_payload_bytes_total: nat(0u64),
        },
    }
}

/// The Candid-encoded `canister_status` reply; `log_bytes` is what the canister's log holds and
/// `snapshot_bytes` what its snapshots take.
pub(super) fn canister_status_reply(
    config: &ExecutionConfig,
    canister: &CanisterState,
    log_bytes: u64,
    snapshot_bytes: u64,
) -> Result<Vec<u8>, UserError> {
    args::encode(&canister_status_result(
        config,
        canister,
        log_bytes,
        snapshot_bytes,
    ))
}

fn change_to_mct(change: &openic_replicated_state::CanisterChange) -> mct::Change {
    let origin = match &change.origin {
        ChangeOrigin::User(user_id) => {
            mct::ChangeOrigin::FromUser(mct::FromUserRecord { user_id: *user_id })
        }
        ChangeOrigin::Canister(canister_id, canister_version) => {
            mct::ChangeOrigin::FromCanister(mct::FromCanisterRecord {
                canister_id: canister_id.get(),
                canister_version: *canister_version,
            })
        }
    };
    let details = match &change.details {
        ChangeDetails::Creation { controllers } => {
            mct::ChangeDetails::Creation(mct::CreationRecord {
                controllers: controllers.clone(),
                environment_variables_hash: None,
            })
        }
        ChangeDetails::CodeUninstall => mct::ChangeDetails::CodeUninstall,
        ChangeDetails::CodeDeployment { mode, module_hash } => {
            mct::ChangeDetails::CodeDeployment(mct::CodeDeploymentRecord {
                mode: match mode {
                    0 => mct::CodeDeploymentMode::Install,
                    1 => mct::CodeDeploymentMode::Reinstall,
                    _ => mct::CodeDeploymentMode::Upgrade,
                },
                module_hash: module_hash.to_vec(),
            })
        }
        ChangeDetails::ControllersChange { controllers } => {
            mct::ChangeDetails::ControllersChange(mct::ControllersChangeRecord {
                controllers: controllers.clone(),
            })
        }
        ChangeDetails::LoadSnapshot {
            from_canister_id,
            snapshot_id,
            canister_version,
            taken_at_timestamp,
        } => mct::ChangeDetails::LoadSnapshot(mct::LoadSnapshotRecord {
            from_canister_id: from_canister_id.map(|id| id.get()),
            snapshot_id: snapshot_id.clone(),
            canister_version: *canister_version,
            taken_at_timestamp: *taken_at_timestamp,
            source: mct::SnapshotSource::TakenFromCanister(candid::Reserved),
        }),
    };
    mct::Change {
        timestamp_nanos: change.timestamp_nanos,
        canister_version: change.canister_version,
        origin,
        details: Some(details),
    }
}

/// `canister_info` (canisters only): history, module hash and controllers of any canister.
pub(super) fn canister_info(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::CanisterInfoArgs = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    let canister = existing(state, &id)?;
    let history = &canister.system_state.history;
    let requested = usize::try_from(args.num_requested_changes.unwrap_or(0)).unwrap_or(usize::MAX);
    let skip = history.len().saturating_sub(requested);
    let result = mct::CanisterInfoResult {
        total_num_changes: canister.system_state.total_num_changes,
        recent_changes: history.iter().skip(skip).map(change_to_mct).collect(),
        module_hash: canister.module_hash().map(|hash| hash.to_vec()),
        controllers: canister.system_state.controllers.iter().copied().collect(),
    };
    args::encode(&result).map(Handled::reply)
}

/// The replica version `subnet_info` reports: this build of openic.
pub const REPLICA_VERSION: &str = concat!("openic-", env!("CARGO_PKG_VERSION"));

/// The registry version `subnet_info` reports. A subnet's configuration is its genesis file and
/// never changes while it runs (there is no registry canister yet), so there is one version.
pub const REGISTRY_VERSION: u64 = 1;

/// `subnet_info` (canisters only): the replica and registry versions of this subnet; another
/// subnet id is refused, as there is only this one.
pub(super) fn subnet_info(context: &Context<'_>) -> Result<Handled, UserError> {
    #[derive(candid::CandidType, serde::Deserialize)]
    struct SubnetInfoArgs {
        subnet_id: Principal,
    }
    #[derive(candid::CandidType, serde::Deserialize)]
    struct SubnetInfoResult {
        replica_version: String,
        registry_version: u64,
    }
    let args: SubnetInfoArgs = args::decode(context.method, context.payload)?;
    if args.subnet_id != context.subnet.subnet_id.0 {
        return Err(UserError::new(
            ErrorCode::InvalidManagementPayload,
            format!("Subnet {} does not exist.", args.subnet_id),
        ));
    }
    args::encode(&SubnetInfoResult {
        replica_version: REPLICA_VERSION.to_string(),
        registry_version: REGISTRY_VERSION,
    })
    .map(Handled::reply)
}

pub(super) fn may_view(
    visibility: &Visibility,
    canister: &CanisterState,
    caller: &Principal,
) -> bool {
    match visibility {
        Visibility::Public => true,
        Visibility::Controllers => canister.is_controller(caller),
        Visibility::AllowedViewers(viewers) => {
            canister.is_controller(caller) || viewers.contains(caller)
        }
    }
}

/// `fetch_canister_logs` (query only): the canister's log records, following its `log_visibility`
/// and the request's filter (see [`openic_replicated_state::canister_log`] for what a fetch
/// returns).
pub(super) fn fetch_canister_logs(
    canisters: &BTreeMap<CanisterId, Arc<CanisterState>>,
    logs: &CanisterLogs,
    caller: Principal,
    payload: &[u8],
) -> Result<Vec<u8>, UserError> {
    let args: mct::FetchCanisterLogsArgs = args::decode("fetch_canister_logs", payload)?;
    let canister = existing_in(canisters, &args.canister_id)?;
    if !may_view(
        &canister.system_state.settings.log_visibility,
        canister,
        &caller,
    ) {
        return Err(ManagementError::LogsNotVisible {
            canister: args.canister_id,
            caller,
        }
        .into());
    }
    let filter = args.filter.map(|filter| match filter {
        mct::CanisterLogFilter::ByIdx { start, end } => LogFilter::ByIdx { start, end },
        mct::CanisterLogFilter::ByTimestampNanos { start, end } => {
            LogFilter::ByTimestampNanos { start, end }
        }
    });
    let canister_log_records = logs
        .get(&CanisterId::unchecked_from_principal(args.canister_id))
        .map(|log| {
            log.fetch(filter)
                .into_iter()
                .map(|record| mct::CanisterLogRecord {
                    idx: record.idx,
                    timestamp_nanos: record.timestamp_nanos,
                    content: record.content.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    args::encode(&mct::FetchCanisterLogsResult {
        canister_log_records,
    })
}

/// `canister_metadata` (query only): an `icp:public` section for anyone, an `icp:private` one for
/// controllers.
pub(super) fn canister_metadata(
    canisters: &BTreeMap<CanisterId, Arc<CanisterState>>,
    caller: Principal,
    payload: &[u8],
) -> Result<Vec<u8>, UserError> {
    let args: mct::CanisterMetadataArgs = args::decode("canister_metadata", payload)?;
    let canister = existing_in(canisters, &args.canister_id)?;
    let not_found = || {
        UserError::from(ManagementError::MetadataNotFound {
            canister: args.canister_id,
            name: args.name.clone(),
        })
    };
    let info = &canister
        .execution_state
        .as_ref()
        .ok_or_else(not_found)?
        .module_info;
    let value = match info.public_metadata.get(&args.name) {
        Some(value) => value,
        None if canister.is_controller(&caller) => info
            .private_metadata
            .get(&args.name)
            .ok_or_else(not_found)?,
        None => return Err(not_found()),
    };
    args::encode(&mct::CanisterMetadataResult {
        value: value.clone(),
    })
}
