//! `timer`: counts fired one-shot timers (ic-cdk-timers, which runs on the canister global timer; no heartbeat).

use std::cell::Cell;
use std::time::Duration;

/// Delay of the timer set by `init`.
const INIT_TIMER_DELAY: Duration = Duration::from_secs(1);

thread_local! {
    static FIRED: Cell<u64> = const { Cell::new(0) };
}

fn schedule_after(delay: Duration) {
    ic_cdk_timers::set_timer(delay, async {
        FIRED.with(|fired| fired.set(fired.get() + 1));
    });
}

/// Sets a one-shot timer of `INIT_TIMER_DELAY`.
#[ic_cdk::init]
fn init() {
    schedule_after(INIT_TIMER_DELAY);
}

/// Sets another one-shot timer, `seconds` from now.
#[ic_cdk::update]
fn schedule(seconds: u64) {
    schedule_after(Duration::from_secs(seconds));
}

/// How many timers have fired.
#[ic_cdk::query]
fn fired() -> u64 {
    FIRED.with(Cell::get)
}
