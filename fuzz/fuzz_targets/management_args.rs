//! Arbitrary Candid payloads to every management-canister method, through the ingress check
//! (`check_management_ingress`) and the query path (`execute_management_query`), with an empty
//! canister map. Both must answer `Ok` or a `UserError`, never panic.
//!
//! Input: byte 0 picks the method name, byte 1 the caller and effective canister id, the rest is
//! the payload (seeds: `fuzz/seeds/management_args`, Candid `DIDL` payloads).
#![no_main]

use libfuzzer_sys::fuzz_target;
use openic_execution::ExecutionConfig;
use openic_execution::management::{check_management_ingress, execute_management_query};
use openic_types::{CanisterId, Principal, Time};
use std::collections::BTreeMap;

/// Every method the management canister implements, some it names as unsupported, and one
/// unknown name.
const METHODS: &[&str] = &[
    "provisional_create_canister_with_cycles",
    "create_canister",
    "install_code",
    "install_chunked_code",
    "upload_chunk",
    "stored_chunks",
    "clear_chunk_store",
    "uninstall_code",
    "canister_status",
    "update_settings",
    "start_canister",
    "stop_canister",
    "delete_canister",
    "deposit_cycles",
    "provisional_top_up_canister",
    "raw_rand",
    "canister_info",
    "fetch_canister_logs",
    "canister_metadata",
    "http_request",
    "sign_with_ecdsa",
    "bitcoin_get_balance",
    "no_such_method",
];

fuzz_target!(|data: &[u8]| {
    let [method, who, payload @ ..] = data else {
        return;
    };
    let who = *who;
    let method = METHODS[usize::from(*method) % METHODS.len()];
    let caller = match who % 3 {
        0 => Principal::anonymous(),
        1 => Principal::self_authenticating([who; 32]),
        _ => CanisterId::from_u64(u64::from(who)).get(),
    };
    let effective = match who / 3 % 2 {
        0 => CanisterId::management(),
        _ => CanisterId::from_u64(u64::from(who)),
    };
    let canisters = BTreeMap::new();
    let _ = check_management_ingress(method, payload, &effective, &caller, &canisters);
    let _ = execute_management_query(
        &ExecutionConfig::default(),
        &canisters,
        Time(1_700_000_000_000_000_000),
        caller,
        method,
        payload,
    );
});
