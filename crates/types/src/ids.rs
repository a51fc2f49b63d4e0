//! Identifier newtypes over [`Principal`].
//!
//! Canister ids use the Internet Computer's scheme `u64_be(n) · 0x01 · 0x01` (10 bytes), so the ids
//! openic allocates look and sort exactly like the ids clients already know.

use candid::Principal;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The principal of a canister (or of the management canister, `aaaaa-aa`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CanisterId(Principal);

impl CanisterId {
    /// The management canister `aaaaa-aa` (the empty principal).
    pub fn management() -> CanisterId {
        CanisterId(Principal::management_canister())
    }

    /// The canister id with index `n` in the IC scheme: `u64_be(n) · 0x01 · 0x01`.
    pub fn from_u64(n: u64) -> CanisterId {
        let mut bytes = [0u8; 10];
        bytes[..8].copy_from_slice(&n.to_be_bytes());
        bytes[8] = 0x01;
        bytes[9] = 0x01;
        CanisterId(Principal::from_slice(&bytes))
    }

    /// The index `n` if this id has the IC scheme's shape, else `None`.
    pub fn to_u64(&self) -> Option<u64> {
        let bytes = self.0.as_slice();
        if bytes.len() == 10 && bytes[8] == 0x01 && bytes[9] == 0x01 {
            let mut n = [0u8; 8];
            n.copy_from_slice(&bytes[..8]);
            Some(u64::from_be_bytes(n))
        } else {
            None
        }
    }

    /// Wraps any principal. Whether it names an existing canister is for the caller to check.
    pub fn unchecked_from_principal(principal: Principal) -> CanisterId {
        CanisterId(principal)
    }

    /// The underlying principal.
    pub fn get(&self) -> Principal {
        self.0
    }

    /// Whether this is the management canister.
    pub fn is_management(&self) -> bool {
        self.0 == Principal::management_canister()
    }
}

impl From<CanisterId> for Principal {
    fn from(id: CanisterId) -> Principal {
        id.0
    }
}

impl fmt::Display for CanisterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for CanisterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The principal of a subnet: self-authenticating over the DER of the subnet's threshold public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct SubnetId(pub Principal);

/// The principal of a node: self-authenticating over the DER of the node's Ed25519 key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct NodeId(pub Principal);

/// A user principal (self-authenticating, anonymous, or a canister acting as caller).
pub type UserId = Principal;

/// A closed interval of canister ids, as certified under `/subnet/<id>/canister_ranges`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct CanisterIdRange {
    /// Lowest id in the range.
    pub start: CanisterId,
    /// Highest id in the range (inclusive).
    pub end: CanisterId,
}

impl CanisterIdRange {
    /// Whether `id` lies in the range. Both bounds and `id` are compared as byte strings, which
    /// agrees with `Principal`'s order for ids of the same (10-byte) length.
    pub fn contains(&self, id: &CanisterId) -> bool {
        let bytes = id.get();
        let bytes = bytes.as_slice();
        let start = self.start.get();
        let end = self.end.get();
        bytes.len() == 10 && start.as_slice() <= bytes && bytes <= end.as_slice()
    }
}

/// Ids 0..=0xFFFF_FFFF are where the Internet Computer's well-known system canisters live (the
/// registry, governance, the ICP ledger `ryjl3-…`, the CMC `rkp4c-…`, the cycles ledger `um5iw-…`).
/// openic certifies this range so those ids can be created with `specified_id`, but never
/// allocates from it on its own.
pub const SYSTEM_CANISTER_RANGE: (u64, u64) = (0, 0x0000_0000_FFFF_FFFF);

/// User canisters are allocated from here on, in order, like the local developer tools do, so the
/// first canister is `bkyz2-fmaaa-aaaaa-qaaaq-cai`.
pub const USER_CANISTER_RANGE: (u64, u64) = (0x8000_0000_0010_0000, 0x8000_0000_FFFF_FFFF);

/// The first index handed out to user canisters.
pub const FIRST_USER_CANISTER_INDEX: u64 = 0x8000_0000_0010_0001;

/// The certified canister ranges of a single openic subnet.
pub fn subnet_canister_ranges() -> Vec<CanisterIdRange> {
    [SYSTEM_CANISTER_RANGE, USER_CANISTER_RANGE]
        .iter()
        .map(|&(start, end)| CanisterIdRange {
            start: CanisterId::from_u64(start),
            end: CanisterId::from_u64(end),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canister_id_scheme_matches_the_ic() {
        assert_eq!(
            CanisterId::from_u64(0).to_string(),
            "rwlgt-iiaaa-aaaaa-aaaaa-cai"
        );
        assert_eq!(
            CanisterId::from_u64(2).to_string(),
            "ryjl3-tyaaa-aaaaa-aaaba-cai"
        );
        assert_eq!(
            CanisterId::from_u64(FIRST_USER_CANISTER_INDEX).to_string(),
            "bkyz2-fmaaa-aaaaa-qaaaq-cai"
        );
        assert_eq!(CanisterId::from_u64(77).to_u64(), Some(77));
    }

    #[test]
    fn ranges_contain_well_known_and_user_ids() {
        let ranges = subnet_canister_ranges();
        let inside = |id: CanisterId| ranges.iter().any(|r| r.contains(&id));
        let cycles_ledger = CanisterId::unchecked_from_principal(
            Principal::from_text("um5iw-rqaaa-aaaaq-qaaba-cai").unwrap(),
        );
        assert!(inside(cycles_ledger));
        assert!(inside(CanisterId::from_u64(FIRST_USER_CANISTER_INDEX)));
        assert!(!inside(CanisterId::from_u64(0x4000_0000_0000_0000)));
        assert!(!inside(CanisterId::management()));
    }
}
