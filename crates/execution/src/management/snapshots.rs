//! Canister snapshots: `take_canister_snapshot`, `load_canister_snapshot`,
//! `list_canister_snapshots` and `delete_canister_snapshot`, with the IC's rules and refusals.
//!
//! As the spec says, a canister need not be stopped: stopping it first (so no callback is
//! outstanding) is the controllers' choice, as `dfx` and `icp` make it. A snapshot's bytes count
//! in the canister's memory (`snapshots_size` in `canister_status`) and pay storage.

use super::args;
use super::errors::ManagementError;
use super::install::{Uninstall, uninstall};
use super::lifecycle::record_change;
use super::{Context, Handled, controlled, existing, status};
use ic_management_canister_types as mct;
use openic_replicated_state::canister_snapshot::{
    CanisterSnapshot, MAX_SNAPSHOTS_PER_CANISTER, parse_snapshot_id,
};
use openic_replicated_state::{ChangeDetails, ReplicatedState};
use openic_types::{CanisterId, UserError};
use std::sync::Arc;

/// Largest snapshot openic keeps: snapshots are written whole into each checkpoint's state file
/// (not yet as incremental page files, as canisters' memories are), so their size is bounded.
pub(super) const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn snapshot_record(snapshot: &CanisterSnapshot) -> mct::Snapshot {
    mct::Snapshot {
        id: snapshot.id(),
        taken_at_timestamp: snapshot.taken_at_timestamp,
        total_size: snapshot.size(),
    }
}

/// The snapshot `id` of `canister`: the IC's refusals when it does not exist or is another
/// canister's.
fn own_snapshot(
    state: &ReplicatedState,
    canister: CanisterId,
    id: &[u8],
) -> Result<Arc<CanisterSnapshot>, UserError> {
    match parse_snapshot_id(id) {
        Some((owner, _)) if owner != canister => Err(ManagementError::SnapshotNotOwned {
            snapshot: hex(id),
            canister: canister.get(),
        }
        .into()),
        _ => state.snapshots.get(id).cloned().ok_or_else(|| {
            ManagementError::SnapshotNotFound {
                snapshot: hex(id),
                canister: canister.get(),
            }
            .into()
        }),
    }
}

/// `take_canister_snapshot`: a controller saves the canister's module, memories, globals,
/// certified data, timer and chunk store, optionally replacing one of its snapshots and then
/// uninstalling its code.
pub(super) fn take(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::TakeCanisterSnapshotArgs = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    let canister = controlled(state, &id, &context.caller.principal())?;
    let replaced = match &args.replace_snapshot {
        Some(old) => Some(own_snapshot(state, id, old)?),
        None => None,
    };
    if replaced.is_none() && state.snapshots.count(&id) >= MAX_SNAPSHOTS_PER_CANISTER {
        return Err(ManagementError::TooManySnapshots {
            canister: id.get(),
            max: MAX_SNAPSHOTS_PER_CANISTER,
        }
        .into());
    }
    let Some(execution_state) = canister.execution_state.clone() else {
        return Err(ManagementError::SnapshotOfEmptyCanister { canister: id.get() }.into());
    };
    let system_state = &canister.system_state;
    let snapshot = CanisterSnapshot {
        canister_id: id,
        local_id: state.snapshots.next_local_id(),
        taken_at_timestamp: state.metadata.time.as_nanos_since_unix_epoch(),
        canister_version: system_state.canister_version,
        execution_state,
        certified_data: system_state.certified_data.clone(),
        global_timer_nanos: system_state.global_timer_nanos,
        low_wasm_memory_hook_pending: system_state.low_wasm_memory_hook_pending,
        wasm_chunk_store: system_state.wasm_chunk_store.clone(),
    };
    if snapshot.size() > MAX_SNAPSHOT_BYTES {
        return Err(ManagementError::SnapshotTooLarge {
            canister: id.get(),
            size: snapshot.size(),
            max: MAX_SNAPSHOT_BYTES,
        }
        .into());
    }
    let reply = snapshot_record(&snapshot);
    let snapshots = Arc::make_mut(&mut state.snapshots);
    if let Some(old) = replaced {
        snapshots.remove(&old.id());
    }
    snapshots.insert(snapshot);
    if args.uninstall_code == Some(true) {
        let time = state.metadata.time;
        let origin = context.change_origin(args.sender_canister_version);
        uninstall(state, id, Uninstall::Requested { time, origin });
    }
    args::encode(&reply).map(Handled::reply)
}

/// `load_canister_snapshot`: a controller of the canister and of the snapshot's canister (on
/// this subnet) restores the snapshot's module, memories, globals, certified data and chunk store.
pub(super) fn load(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::LoadCanisterSnapshotArgs = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    let caller = context.caller.principal();
    controlled(state, &id, &caller)?;
    let not_found = || {
        UserError::from(ManagementError::SnapshotNotFound {
            snapshot: hex(&args.snapshot_id),
            canister: id.get(),
        })
    };
    let (source, _) = parse_snapshot_id(&args.snapshot_id).ok_or_else(not_found)?;
    let snapshot = state
        .snapshots
        .get(&args.snapshot_id)
        .cloned()
        .ok_or_else(not_found)?;
    let source_canister = existing(state, &source).map_err(|_| not_found())?;
    if !source_canister.is_controller(&caller) {
        return Err(ManagementError::NotSnapshotController {
            snapshot: hex(&args.snapshot_id),
            canister: id.get(),
            caller,
        }
        .into());
    }
    let time = state.metadata.time;
    let origin = context.change_origin(args.sender_canister_version);
    let Some(canister) = state.canister_mut(&id) else {
        return Err(crate::common::canister_not_found_error(&id));
    };
    canister.execution_state = Some(snapshot.execution_state.clone());
    let system_state = &mut canister.system_state;
    system_state.certified_data = snapshot.certified_data.clone();
    system_state.wasm_chunk_store = snapshot.wasm_chunk_store.clone();
    system_state.canister_version = system_state.canister_version.saturating_add(1);
    record_change(
        system_state,
        time,
        origin,
        ChangeDetails::LoadSnapshot {
            from_canister_id: (source != id).then_some(source),
            snapshot_id: args.snapshot_id.clone(),
            canister_version: snapshot.canister_version,
            taken_at_timestamp: snapshot.taken_at_timestamp,
        },
    );
    Ok(Handled::reply(crate::common::EMPTY_CANDID_REPLY.to_vec()))
}

/// `list_canister_snapshots`: the canister's snapshots, oldest first, for whoever its
/// `snapshot_visibility` lets see them.
pub(super) fn list(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::ListCanisterSnapshotsArgs = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    let canister = existing(state, &id)?;
    let caller = context.caller.principal();
    if !status::may_view(
        &canister.system_state.settings.snapshot_visibility,
        canister,
        &caller,
    ) {
        return Err(ManagementError::SnapshotsNotVisible {
            canister: id.get(),
            caller,
        }
        .into());
    }
    let list: Vec<mct::Snapshot> = state
        .snapshots
        .of(&id)
        .map(|snapshot| snapshot_record(snapshot))
        .collect();
    args::encode(&list).map(Handled::reply)
}

/// `delete_canister_snapshot`: a controller deletes one of the canister's snapshots.
pub(super) fn delete(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::DeleteCanisterSnapshotArgs = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    controlled(state, &id, &context.caller.principal())?;
    let snapshot = own_snapshot(state, id, &args.snapshot_id)?;
    Arc::make_mut(&mut state.snapshots).remove(&snapshot.id());
    Ok(Handled::reply(crate::common::EMPTY_CANDID_REPLY.to_vec()))
}
