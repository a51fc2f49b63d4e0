//! Storage reservation: the IC's resource reservation mechanism.
//!
//! While the subnet's canisters use more memory than `subnet_memory_threshold_bytes`, memory a
//! canister newly allocates (heap or stable growth in an execution, a larger install, a larger
//! `memory_allocation`) must pay its future storage ahead: cycles move from the canister's balance
//! to its *reserved* balance (`reserved_cycles` in `canister_status`), which storage fees draw on
//! first. The amount is the IC's: the storage fee of the new bytes above the threshold for a
//! period that grows linearly from 0 at the threshold to `max_storage_reservation_period_seconds`
//! at `subnet_memory_capacity_bytes` (the area under that line between the usage before and after
//! the allocation). A canister caps what it lets be reserved with `reserved_cycles_limit`
//! (0 refuses any growth that needs a reservation). Everything here reads only the state and
//! the configuration, so every replica reserves the same.

use crate::common::{charged_memory_bytes, storage_cost};
use crate::config::ExecutionConfig;
use openic_replicated_state::{CanisterState, ReplicatedState};
use openic_types::{Cycles, Time};

/// Why cycles could not be reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservationError {
    /// The balance does not hold the `requested` cycles.
    InsufficientCycles {
        /// Cycles to reserve.
        requested: Cycles,
        /// The balance.
        available: Cycles,
    },
    /// The reserved balance would become `requested`, past `limit`.
    LimitExceeded {
        /// The reserved balance the reservation would make.
        requested: Cycles,
        /// The canister's `reserved_cycles_limit`.
        limit: Cycles,
    },
}

/// Memory the subnet's canisters use together, as storage is charged for it (memory allocations
/// and snapshots included).
pub fn subnet_memory_usage(state: &ReplicatedState) -> u64 {
    state.canisters.iter().fold(0u64, |sum, (id, canister)| {
        sum.saturating_add(charged_memory_bytes(canister, state.snapshots.size_of(id)))
    })
}

/// Cycles reserved to pay ahead the storage of every byte the subnet uses above its threshold
/// when it uses `usage` bytes: the storage fee of `usage - threshold` bytes for half of the
/// reservation period at that usage (the area of the triangle under the period's line).
fn total_reservation(config: &ExecutionConfig, usage: u64) -> Cycles {
    let capacity = config.subnet_memory_capacity_bytes;
    let threshold = config.subnet_memory_threshold_bytes.min(capacity);
    let usage = usage.min(capacity);
    let span = capacity - threshold;
    if span == 0 {
        return Cycles::ZERO;
    }
    let above = usage.saturating_sub(threshold);
    let period_seconds = u128::from(config.max_storage_reservation_period_seconds)
        .saturating_mul(u128::from(above))
        / u128::from(span);
    let half_period_nanos = period_seconds.saturating_mul(u128::from(Time::NANOS_PER_SECOND)) / 2;
    storage_cost(
        config,
        above,
        u64::try_from(half_period_nanos).unwrap_or(u64::MAX),
    )
}

/// Cycles that `allocated` new bytes must reserve on a subnet that uses `usage` bytes.
pub fn storage_reservation_cycles(config: &ExecutionConfig, allocated: u64, usage: u64) -> Cycles {
    total_reservation(config, usage.saturating_add(allocated))
        .saturating_sub(total_reservation(config, usage))
}

/// Bytes newly allocated when a canister's charged memory goes from `before` to `after` bytes
/// under a memory allocation of `allocation` (0 = none): growth within the allocation was
/// reserved when the allocation was set.
pub fn allocated_bytes(before: u64, after: u64, allocation: u64) -> u64 {
    after.max(allocation).saturating_sub(before.max(allocation))
}

/// Whether `amount` can move from the balance to the reserved balance of a canister with these
/// balances and `reserved_cycles_limit` (the IC checks the balance first).
pub fn check_reserve(
    balance: Cycles,
    reserved: Cycles,
    limit: u128,
    amount: Cycles,
) -> Result<(), ReservationError> {
    if amount == Cycles::ZERO {
        return Ok(());
    }
    if amount > balance {
        return Err(ReservationError::InsufficientCycles {
            requested: amount,
            available: balance,
        });
    }
    let requested = reserved.saturating_add(amount);
    if requested > Cycles(limit) {
        return Err(ReservationError::LimitExceeded {
            requested,
            limit: Cycles(limit),
        });
    }
    Ok(())
}

/// Moves `amount` from the canister's balance to its reserved balance, within its
/// `reserved_cycles_limit`, or says why not (changing nothing).
pub fn reserve(canister: &mut CanisterState, amount: Cycles) -> Result<(), ReservationError> {
    let system_state = &mut canister.system_state;
    check_reserve(
        system_state.cycles_balance,
        system_state.reserved_balance,
        system_state.settings.reserved_cycles_limit,
        amount,
    )?;
    system_state.cycles_balance = system_state.cycles_balance.saturating_sub(amount);
    system_state.reserved_balance = system_state.reserved_balance.saturating_add(amount);
    Ok(())
}

/// The execution error for a failed reservation of `bytes` new bytes; `reveal` says whether the
/// caller may learn how many cycles are missing (a controller).
pub fn memory_grow_error(
    error: ReservationError,
    bytes: u64,
    reveal: bool,
) -> openic_embedders::ExecutionError {
    match error {
        ReservationError::InsufficientCycles {
            requested,
            available,
        } => openic_embedders::ExecutionError::InsufficientCyclesInMemoryGrow {
            bytes,
            missing: reveal.then(|| requested.saturating_sub(available).get()),
        },
        ReservationError::LimitExceeded { requested, limit } => {
            openic_embedders::ExecutionError::ReservedCyclesLimitExceededInMemoryGrow {
                bytes,
                requested: requested.get(),
                limit: limit.get(),
            }
        }
    }
}

/// Reserves for a canister whose charged memory grew from `before` to `after` bytes on a subnet
/// that used `subnet_usage` bytes before the growth.
pub fn reserve_for_growth(
    config: &ExecutionConfig,
    canister: &mut CanisterState,
    subnet_usage: u64,
    before: u64,
    after: u64,
) -> Result<(), ReservationError> {
    let allocated = allocated_bytes(
        before,
        after,
        canister.system_state.settings.memory_allocation,
    );
    if allocated == 0 {
        return Ok(());
    }
    reserve(
        canister,
        storage_reservation_cycles(config, allocated, subnet_usage),
    )
}

/// The management canister's refusal of an operation on behalf of a controller (a snapshot)
/// whose `bytes` new bytes could not reserve: the IC's memory-grow errors, without the
/// execution-error framing.
pub fn management_grow_error(error: ReservationError, bytes: u64) -> openic_types::UserError {
    use openic_types::{ErrorCode, UserError};
    match error {
        ReservationError::InsufficientCycles {
            requested,
            available,
        } => UserError::new(
            ErrorCode::InsufficientCyclesInMemoryGrow,
            format!(
                "Canister cannot grow memory by {bytes} bytes due to insufficient cycles. At least {} additional cycles are required.",
                requested.saturating_sub(available).get()
            ),
        ),
        ReservationError::LimitExceeded { requested, limit } => UserError::new(
            ErrorCode::ReservedCyclesLimitExceededInMemoryGrow,
            format!(
                "Canister cannot grow memory by {bytes} bytes due to its reserved cycles limit. The current limit ({}) would be exceeded by {}.",
                limit.get(),
                requested.saturating_sub(limit).get()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn config(usage_threshold: u64, capacity: u64) -> ExecutionConfig {
        ExecutionConfig {
            subnet_memory_threshold_bytes: usage_threshold,
            subnet_memory_capacity_bytes: capacity,
            ..ExecutionConfig::default()
        }
    }

    #[test]
    fn below_the_threshold_nothing_is_reserved() {
        let config = config(100 * GIB, 200 * GIB);
        assert_eq!(
            storage_reservation_cycles(&config, 10 * GIB, 50 * GIB),
            Cycles::ZERO
        );
        assert_eq!(
            storage_reservation_cycles(&config, 50 * GIB, 50 * GIB),
            Cycles::ZERO,
            "ending exactly at the threshold"
        );
    }

    #[test]
    fn only_the_part_above_the_threshold_pays_the_area_under_the_period() {
        // The IC's own example: 40 GB at (usage 90 GB, threshold 100 GB, capacity 200 GB) reserve
        // the storage of 30 GB for (130 - 100) / (200 - 100) / 2 of the period.
        let gb = 1_000_000_000u64;
        let config = config(100 * gb, 200 * gb);
        let period = u128::from(config.max_storage_reservation_period_seconds);
        let fee = config.storage_fee_per_gib_second.get();
        let expected = period * fee * 30 * u128::from(gb) * 30 / 100 / 2 / u128::from(GIB);
        let got = storage_reservation_cycles(&config, 40 * gb, 90 * gb).get();
        assert!(
            got.abs_diff(expected) <= 1,
            "reserved {got}, the IC reserves {expected}"
        );
        // Past the capacity nothing more is counted.
        assert_eq!(
            storage_reservation_cycles(&config, 500 * gb, 90 * gb),
            storage_reservation_cycles(&config, 110 * gb, 90 * gb)
        );
    }

    #[test]
    fn growth_within_the_memory_allocation_is_not_allocated_again() {
        assert_eq!(allocated_bytes(10, 50, 0), 40);
        assert_eq!(allocated_bytes(10, 50, 100), 0);
        assert_eq!(allocated_bytes(10, 150, 100), 50);
        assert_eq!(allocated_bytes(50, 10, 0), 0);
    }
}
