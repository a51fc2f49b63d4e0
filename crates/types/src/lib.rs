//! Plain data shared by every openic component: principals and canister ids, heights, times,
//! cycles, request ids, reject and error codes, and the messages that flow from the HTTP
//! interface through the ingress pool and blocks into execution.
//!
//! Invariants: nothing here does I/O or reads a clock; every type is `serde`-serialisable so that
//! blocks and checkpoints can be written by the state manager; numeric quantities are newtypes so a
//! height can never be passed where cycles are meant.

use serde::{Deserialize, Serialize};
use std::fmt;

pub use candid::Principal;

pub mod chain_keys;
pub mod ids;
pub mod messages;

pub use ids::{CanisterId, NodeId, SubnetId, UserId};
pub use messages::*;

/// A consensus height: the index of a finalized block. Height 0 is the genesis state, before any block.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Height(pub u64);

impl Height {
    /// The height after this one.
    pub fn increment(self) -> Height {
        Height(self.0 + 1)
    }
}

impl fmt::Display for Height {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A point in time, in nanoseconds since the Unix epoch (the unit of `ic0.time` and `ingress_expiry`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Time(pub u64);

impl Time {
    /// Nanoseconds in one second.
    pub const NANOS_PER_SECOND: u64 = 1_000_000_000;

    /// This time as nanoseconds since the epoch.
    pub fn as_nanos_since_unix_epoch(self) -> u64 {
        self.0
    }

    /// `self + nanos`, saturating.
    pub fn saturating_add_nanos(self, nanos: u64) -> Time {
        Time(self.0.saturating_add(nanos))
    }

    /// `self - nanos`, saturating at zero.
    pub fn saturating_sub_nanos(self, nanos: u64) -> Time {
        Time(self.0.saturating_sub(nanos))
    }
}

/// An amount of cycles. Balances never go negative: arithmetic that could underflow is checked.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Cycles(pub u128);

impl Cycles {
    /// No cycles.
    pub const ZERO: Cycles = Cycles(0);

    /// The amount as a plain number.
    pub fn get(self) -> u128 {
        self.0
    }

    /// `self + other`, saturating at `u128::MAX`.
    pub fn saturating_add(self, other: Cycles) -> Cycles {
        Cycles(self.0.saturating_add(other.0))
    }

    /// `self - other`, saturating at zero.
    pub fn saturating_sub(self, other: Cycles) -> Cycles {
        Cycles(self.0.saturating_sub(other.0))
    }

    /// `self - other`, or `None` if `other` is larger.
    pub fn checked_sub(self, other: Cycles) -> Option<Cycles> {
        self.0.checked_sub(other.0).map(Cycles)
    }
}

impl fmt::Display for Cycles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A count of executed wasm instructions (as metered by fuel).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct NumInstructions(pub u64);

/// The 32-byte representation-independent hash of a request's `content` map (see the interface
/// spec, "Request ids").
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId(pub [u8; 32]);

impl RequestId {
    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex::encode(self.0))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex::encode(self.0))
    }
}

/// Reject codes of the public interface. `SysUnknown` (6) exists only between canisters and is
/// never sent to an HTTP client (ic-transport-types 0.49 cannot decode it): see [`RejectCode::for_user`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum RejectCode {
    /// Fatal system error.
    SysFatal = 1,
    /// Transient system error (also: the target canister is frozen or out of cycles).
    SysTransient = 2,
    /// The destination does not exist.
    DestinationInvalid = 3,
    /// The canister rejected the message explicitly (`ic0.msg_reject`).
    CanisterReject = 4,
    /// The canister trapped, did not reply, or is stopped.
    CanisterError = 5,
    /// The outcome of a bounded-wait call is unknown (inter-canister only).
    SysUnknown = 6,
}

impl RejectCode {
    /// The numeric code.
    pub fn as_u64(self) -> u64 {
        self as u64
    }

    /// The code as shown to HTTP clients: `SysUnknown` becomes `SysTransient`.
    pub fn for_user(self) -> RejectCode {
        match self {
            RejectCode::SysUnknown => RejectCode::SysTransient,
            other => other,
        }
    }

    /// Parses a numeric code.
    pub fn from_u64(code: u64) -> Option<RejectCode> {
        Some(match code {
            1 => RejectCode::SysFatal,
            2 => RejectCode::SysTransient,
            3 => RejectCode::DestinationInvalid,
            4 => RejectCode::CanisterReject,
            5 => RejectCode::CanisterError,
            6 => RejectCode::SysUnknown,
            _ => return None,
        })
    }
}

/// The `IC%04d` error codes of the DFINITY implementation that clients show to users. The first
/// digit is the reject code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// IC0207: the canister is out of cycles.
    CanisterOutOfCycles,
    /// IC0202: the ingress message timed out.
    IngressMessageTimeout,
    /// IC0301: no such canister.
    CanisterNotFound,
    /// IC0305: no such canister snapshot.
    CanisterSnapshotNotFound,
    /// IC0406: the canister rejected the message (or refused it in inspect_message).
    CanisterRejectedMessage,
    /// IC0502: the canister trapped.
    CanisterTrapped,
    /// IC0503: the canister called `ic0.trap`.
    CanisterCalledTrap,
    /// IC0504: the canister violated the System API contract.
    CanisterContractViolation,
    /// IC0505: the wasm module is invalid.
    CanisterInvalidWasm,
    /// IC0506: the canister finished without replying.
    CanisterDidNotReply,
    /// IC0507: the canister ran out of memory.
    CanisterOutOfMemory,
    /// IC0508: the canister is stopped.
    CanisterStopped,
    /// IC0509: the canister is stopping.
    CanisterStopping,
    /// IC0510: the canister is not stopped (delete requires it).
    CanisterNotStopped,
    /// IC0512: the caller is not a controller.
    CanisterInvalidController,
    /// IC0514: the canister is not empty.
    CanisterNonEmpty,
    /// IC0522: the instruction limit was exceeded.
    CanisterInstructionLimitExceeded,
    /// IC0536: the canister exports no such method.
    CanisterMethodNotExported,
    /// IC0537: the canister has no wasm module.
    CanisterWasmModuleNotFound,
    /// IC0538: the canister already has a module installed.
    CanisterAlreadyInstalled,
    /// IC0539: the heap grew past the canister's `wasm_memory_limit`.
    CanisterWasmMemoryLimitExceeded,
    /// IC0408: an argument to the management canister that does not decode or is out of range.
    InvalidManagementPayload,
    /// IC0201: the canister's input queue is full (retry later).
    CanisterQueueFull,
    /// IC0601: a bounded-wait call's deadline expired.
    DeadlineExpired,
    /// IC0602: a bounded-wait call's response was dropped.
    ResponseDropped,
    /// IC0531: the canister cannot pay the cycles a larger memory allocation must reserve.
    InsufficientCyclesInMemoryAllocation,
    /// IC0532: the canister cannot pay the cycles its memory growth must reserve.
    InsufficientCyclesInMemoryGrow,
    /// IC0533: a larger memory allocation would reserve more than `reserved_cycles_limit`.
    ReservedCyclesLimitExceededInMemoryAllocation,
    /// IC0534: memory growth would reserve more than `reserved_cycles_limit`.
    ReservedCyclesLimitExceededInMemoryGrow,
    /// IC0540: `reserved_cycles_limit` below the cycles already reserved.
    ReservedCyclesLimitIsTooLow,
}

impl ErrorCode {
    /// The `IC%04d` text of the code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::CanisterOutOfCycles => "IC0207",
            ErrorCode::IngressMessageTimeout => "IC0202",
            ErrorCode::CanisterNotFound => "IC0301",
            ErrorCode::CanisterSnapshotNotFound => "IC0305",
            ErrorCode::CanisterRejectedMessage => "IC0406",
            ErrorCode::CanisterTrapped => "IC0502",
            ErrorCode::CanisterCalledTrap => "IC0503",
            ErrorCode::CanisterContractViolation => "IC0504",
            ErrorCode::CanisterInvalidWasm => "IC0505",
            ErrorCode::CanisterDidNotReply => "IC0506",
            ErrorCode::CanisterOutOfMemory => "IC0507",
            ErrorCode::CanisterStopped => "IC0508",
            ErrorCode::CanisterStopping => "IC0509",
            ErrorCode::CanisterNotStopped => "IC0510",
            ErrorCode::CanisterInvalidController => "IC0512",
            ErrorCode::CanisterNonEmpty => "IC0514",
            ErrorCode::CanisterInstructionLimitExceeded => "IC0522",
            ErrorCode::CanisterMethodNotExported => "IC0536",
            ErrorCode::CanisterWasmModuleNotFound => "IC0537",
            ErrorCode::CanisterAlreadyInstalled => "IC0538",
            ErrorCode::CanisterWasmMemoryLimitExceeded => "IC0539",
            ErrorCode::InvalidManagementPayload => "IC0408",
            ErrorCode::CanisterQueueFull => "IC0201",
            ErrorCode::DeadlineExpired => "IC0601",
            ErrorCode::ResponseDropped => "IC0602",
            ErrorCode::InsufficientCyclesInMemoryAllocation => "IC0531",
            ErrorCode::InsufficientCyclesInMemoryGrow => "IC0532",
            ErrorCode::ReservedCyclesLimitExceededInMemoryAllocation => "IC0533",
            ErrorCode::ReservedCyclesLimitExceededInMemoryGrow => "IC0534",
            ErrorCode::ReservedCyclesLimitIsTooLow => "IC0540",
        }
    }

    /// The reject code implied by the first digit.
    pub fn reject_code(self) -> RejectCode {
        let first = self.as_str().as_bytes()[3] - b'0';
        RejectCode::from_u64(u64::from(first)).unwrap_or(RejectCode::SysFatal)
    }
}

/// A rejection as the user sees it: code, message and optional error code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserError {
    /// The reject code.
    pub code: RejectCode,
    /// Human-readable explanation of what went wrong and, where possible, what to do.
    pub message: String,
    /// The `IC%04d` code, if one applies.
    pub error_code: Option<ErrorCode>,
}

impl UserError {
    /// A new error whose reject code follows from `error_code`.
    pub fn new(error_code: ErrorCode, message: impl Into<String>) -> UserError {
        UserError {
            code: error_code.reject_code(),
            message: message.into(),
            error_code: Some(error_code),
        }
    }
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reject code {}: {}", self.code.as_u64(), self.message)?;
        if let Some(code) = self.error_code {
            write!(f, " ({})", code.as_str())?;
        }
        Ok(())
    }
}

impl std::error::Error for UserError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_first_digit_is_reject_code() {
        assert_eq!(
            ErrorCode::CanisterNotFound.reject_code(),
            RejectCode::DestinationInvalid
        );
        assert_eq!(
            ErrorCode::CanisterCalledTrap.reject_code(),
            RejectCode::CanisterError
        );
        assert_eq!(
            ErrorCode::CanisterOutOfCycles.reject_code(),
            RejectCode::SysTransient
        );
        assert_eq!(
            ErrorCode::CanisterRejectedMessage.reject_code(),
            RejectCode::CanisterReject
        );
    }

    #[test]
    fn sys_unknown_is_never_shown_to_users() {
        assert_eq!(RejectCode::SysUnknown.for_user(), RejectCode::SysTransient);
        assert_eq!(
            RejectCode::CanisterError.for_user(),
            RejectCode::CanisterError
        );
    }
}
