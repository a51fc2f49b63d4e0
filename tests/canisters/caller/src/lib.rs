//! `caller`: makes inter-canister calls (to a `counter` canister and to the management canister).

use candid::Principal;
use ic_cdk::call::Call;

/// Calls `counter.inc()` with an unbounded-wait (guaranteed response) call and returns its reply.
#[ic_cdk::update]
async fn call_inc(counter: Principal) -> u64 {
    match Call::unbounded_wait(counter, "inc").await {
        Ok(response) => response
            .candid::<u64>()
            .unwrap_or_else(|error| ic_cdk::trap(format!("call_inc: bad reply from inc: {error}"))),
        Err(error) => ic_cdk::trap(format!("call_inc: inc failed: {error}")),
    }
}

/// Calls `counter.inc()` with a bounded-wait (best-effort response) call and returns its reply.
#[ic_cdk::update]
async fn call_inc_bounded(counter: Principal) -> u64 {
    match Call::bounded_wait(counter, "inc").await {
        Ok(response) => response.candid::<u64>().unwrap_or_else(|error| {
            ic_cdk::trap(format!("call_inc_bounded: bad reply from inc: {error}"))
        }),
        Err(error) => ic_cdk::trap(format!("call_inc_bounded: inc failed: {error}")),
    }
}

/// Calls a method that does not exist on `target` and returns the reject message (traps if it was not rejected).
#[ic_cdk::update]
async fn call_missing(target: Principal) -> String {
    match Call::unbounded_wait(target, "no_such_method").await {
        Ok(_) => ic_cdk::trap("call_missing: the call to no_such_method was unexpectedly answered"),
        Err(ic_cdk::call::CallFailed::CallRejected(rejected)) => {
            format!(
                "{}: {}",
                rejected.raw_reject_code(),
                rejected.reject_message()
            )
        }
        Err(error) => ic_cdk::trap(format!(
            "call_missing: call was not rejected but failed: {error}"
        )),
    }
}

/// 32 random bytes from the management canister's `raw_rand`.
#[ic_cdk::update]
async fn raw_rand() -> Vec<u8> {
    match Call::unbounded_wait(Principal::management_canister(), "raw_rand").await {
        Ok(response) => response
            .candid::<Vec<u8>>()
            .unwrap_or_else(|error| ic_cdk::trap(format!("raw_rand: bad reply: {error}"))),
        Err(error) => ic_cdk::trap(format!("raw_rand: failed: {error}")),
    }
}
