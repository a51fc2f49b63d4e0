//! `counter`: the workhorse test canister.
//!
//! It exercises plain updates and queries, certified data, traps (state must roll back), canister logs
//! (`init`, `post_upgrade`, `print` and `print_query` print with `ic0.debug_print`), the upgrade hooks
//! (the counter is carried across an upgrade in stable memory) and raw 64-bit stable memory.
//!
//! For the memories benchmark (tests/benches/memories.rs) it also grows its heap on request
//! (`grow_heap`), runs a compute kernel shared with the benchmark (`compute`,
//! `compute_instructions`, see `compute.rs`) and spins until the instruction limit (`spin`).
//!
//! Stable memory layout (both regions are written with the raw `stable64_*` API):
//! - bytes `[0, 8)`: the counter, written by `pre_upgrade` and read back by `post_upgrade`;
//! - bytes `[STABLE_VALUE_OFFSET, +8)`: the value of `stable_write`, placed across a 4 KiB page boundary on the
//!   fourth 64 KiB Wasm page so that it also tests multi-page growth and page-boundary reads and writes.

use candid::Principal;
use std::cell::{Cell, RefCell};

mod compute;

/// Where the counter is saved across upgrades.
const STABLE_COUNTER_OFFSET: u64 = 0;
/// Where `stable_write` puts its value: 3 Wasm pages + 4 KiB - 4 bytes, so the 8 bytes straddle a 4 KiB page.
const STABLE_VALUE_OFFSET: u64 = 3 * 65536 + 4096 - 4;
/// One Wasm page.
const WASM_PAGE_BYTES: u64 = 65536;

thread_local! {
    static COUNTER: Cell<u64> = const { Cell::new(0) };
    /// The blocks `grow_heap` allocated: kept for the canister's lifetime (an upgrade drops them).
    static HEAP_BLOCKS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Grows stable memory so that `[offset, offset + 8)` is inside it; traps if the system refuses.
fn ensure_stable_bytes(offset: u64) {
    let pages_needed = (offset + 8).div_ceil(WASM_PAGE_BYTES);
    let pages_now = ic_cdk::api::stable_size();
    if pages_now < pages_needed && ic_cdk::api::stable_grow(pages_needed - pages_now) == u64::MAX {
        ic_cdk::trap("stable_grow failed");
    }
}

fn stable_write_u64(offset: u64, value: u64) {
    ensure_stable_bytes(offset);
    ic_cdk::api::stable_write(offset, &value.to_le_bytes());
}

fn stable_read_u64(offset: u64) -> u64 {
    if ic_cdk::api::stable_size() * WASM_PAGE_BYTES < offset + 8 {
        return 0;
    }
    let mut bytes = [0u8; 8];
    ic_cdk::api::stable_read(offset, &mut bytes);
    u64::from_le_bytes(bytes)
}

/// Starts the counter at `start` (default 0).
#[ic_cdk::init]
fn init(start: Option<u64>) {
    COUNTER.with(|counter| counter.set(start.unwrap_or(0)));
    ic_cdk::api::debug_print(format!("init: counter at {}", start.unwrap_or(0)));
}

#[ic_cdk::pre_upgrade]
fn pre_upgrade() {
    stable_write_u64(STABLE_COUNTER_OFFSET, COUNTER.with(Cell::get));
}

#[ic_cdk::post_upgrade]
fn post_upgrade() {
    COUNTER.with(|counter| counter.set(stable_read_u64(STABLE_COUNTER_OFFSET)));
    ic_cdk::api::debug_print(format!(
        "post_upgrade: counter at {}",
        COUNTER.with(Cell::get)
    ));
}

/// Prints `message` with `ic0.debug_print`, for the canister's log.
#[ic_cdk::update]
fn print(message: String) {
    ic_cdk::api::debug_print(message);
}

/// Prints `message` from a query: logged only when the query runs replicated.
#[ic_cdk::query]
fn print_query(message: String) {
    ic_cdk::api::debug_print(message);
}

/// Increments the counter and returns the new value.
#[ic_cdk::update]
fn inc() -> u64 {
    COUNTER.with(|counter| {
        counter.set(counter.get() + 1);
        counter.get()
    })
}

/// The current counter value.
#[ic_cdk::query]
fn get() -> u64 {
    COUNTER.with(Cell::get)
}

/// Sets the canister's certified data (at most 32 bytes, else the system traps).
#[ic_cdk::update]
fn set_certified(data: Vec<u8>) {
    ic_cdk::api::certified_data_set(data);
}

/// The data certificate the system hands to queries (None when called as an update).
#[ic_cdk::query]
fn get_data_certificate() -> Option<Vec<u8>> {
    ic_cdk::api::data_certificate()
}

/// Changes the counter, then traps: the change must be rolled back.
#[ic_cdk::update]
fn trap_after_write() {
    COUNTER.with(|counter| counter.set(counter.get() + 1000));
    ic_cdk::trap("trap_after_write: deliberate trap after changing state");
}

/// Writes `value` to stable memory with the raw 64-bit API (growing it as needed).
#[ic_cdk::update]
fn stable_write(value: u64) {
    stable_write_u64(STABLE_VALUE_OFFSET, value);
}

/// Reads back what `stable_write` wrote (0 if stable memory is too small).
#[ic_cdk::query]
fn stable_read() -> u64 {
    stable_read_u64(STABLE_VALUE_OFFSET)
}

/// The caller of this query.
#[ic_cdk::query]
fn whoami() -> Principal {
    ic_cdk::api::msg_caller()
}

/// Bytes `fill_stable` writes per MiB it is asked for.
const MIB: u64 = 1024 * 1024;
/// Stable memory from this offset on is `fill_stable`'s (clear of the counter and `stable_write`).
const FILL_OFFSET: u64 = MIB;

/// The 8-byte word `fill_stable` writes at byte `offset`: distinct in every 4 KiB page, never zero.
fn fill_word(offset: u64) -> u64 {
    (offset / 4096).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (offset % 4096) ^ 0x5555_5555_5555_5555
}

/// Fills `mib` MiB of stable memory from MiB `first_mib` of the fill region (growing it as needed)
/// with a pattern that differs in every page, for benchmarks that need a large state. Returns the
/// stable memory size in bytes.
#[ic_cdk::update]
fn fill_stable(first_mib: u64, mib: u64) -> u64 {
    let end = FILL_OFFSET + (first_mib + mib) * MIB;
    ensure_stable_bytes(end - 8);
    let mut buffer = vec![0u8; MIB as usize];
    for index in first_mib..first_mib + mib {
        let base = FILL_OFFSET + index * MIB;
        for (at, word) in buffer.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&fill_word(base + at as u64 * 8).to_le_bytes());
        }
        ic_cdk::api::stable_write(base, &buffer);
    }
    ic_cdk::api::stable_size() * WASM_PAGE_BYTES
}

/// Checks `mib` MiB of the fill region from MiB `first_mib` against the pattern `fill_stable`
/// writes; returns how many 8-byte words differ.
#[ic_cdk::query]
fn check_stable(first_mib: u64, mib: u64) -> u64 {
    let mut wrong = 0;
    let mut buffer = vec![0u8; MIB as usize];
    for index in first_mib..first_mib + mib {
        let base = FILL_OFFSET + index * MIB;
        if ic_cdk::api::stable_size() * WASM_PAGE_BYTES < base + MIB {
            wrong += MIB / 8;
            continue;
        }
        ic_cdk::api::stable_read(base, &mut buffer);
        for (at, word) in buffer.chunks_exact(8).enumerate() {
            let found = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
            if found != fill_word(base + at as u64 * 8) {
                wrong += 1;
            }
        }
    }
    wrong
}

/// Allocates `mib` MiB on the heap and writes every byte of it, for the tests of the node's memory
/// budget: from a query nothing persists, so each call touches the memory afresh. Returns the
/// number of bytes written that read back as written (`mib` MiB).
#[ic_cdk::query]
fn touch_heap(mib: u64) -> u64 {
    let mut block = vec![0u8; (mib * MIB) as usize];
    for (at, byte) in block.iter_mut().enumerate().step_by(4096) {
        *byte = (at / 4096) as u8 | 1;
    }
    let block = std::hint::black_box(block);
    block
        .iter()
        .enumerate()
        .step_by(4096)
        .filter(|(at, byte)| **byte == (at / 4096) as u8 | 1)
        .count() as u64
        * 4096
}

/// Bytes of one `grow_heap` block: just under 1 MiB, so that the block and the allocator's header
/// fit in 16 Wasm pages however the allocator places it (the heap grows by about 1 MiB per block).
const HEAP_BLOCK_BYTES: usize = (MIB - 4096) as usize;
/// A wasm32 heap's largest size (65,536 Wasm pages).
const WASM32_HEAP_BYTES_MAX: u64 = 1 << 32;
/// Room `grow_heap` leaves below 4 GiB: a block is only added while the heap plus the block plus
/// this margin stay within 4 GiB, so no address the allocator computes (a segment's end, the
/// header after its top chunk) wraps past the end of the 32-bit address space.
const HEAP_TOP_MARGIN_BYTES: u64 = 2 * WASM_PAGE_BYTES;

/// The heap (Wasm memory 0) size in bytes.
fn heap_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        core::arch::wasm32::memory_size(0) as u64 * WASM_PAGE_BYTES
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}

/// Allocates up to `mib` more blocks of just under 1 MiB ([`HEAP_BLOCK_BYTES`]) on the heap, kept
/// until the canister is upgraded or reinstalled, and writes a non-zero byte into every 4 KiB page
/// of each, so the heap holds that much state. Stops early, without trapping, when the allocator
/// finds no more memory or the heap would come within [`HEAP_TOP_MARGIN_BYTES`] of 4 GiB. Returns
/// the heap size in bytes afterwards (`memory_size` × 64 KiB; `grow_heap(0)` only reports it).
#[ic_cdk::update]
fn grow_heap(mib: u64) -> u64 {
    HEAP_BLOCKS.with(|blocks| {
        let mut blocks = blocks.borrow_mut();
        for _ in 0..mib {
            if heap_bytes() + HEAP_BLOCK_BYTES as u64 + HEAP_TOP_MARGIN_BYTES
                > WASM32_HEAP_BYTES_MAX
            {
                break;
            }
            let mut block = Vec::new();
            if block.try_reserve_exact(HEAP_BLOCK_BYTES).is_err() {
                break;
            }
            block.resize(HEAP_BLOCK_BYTES, 0);
            let first_page = blocks.len() * HEAP_BLOCK_BYTES.div_ceil(4096);
            for (page, byte) in block.iter_mut().step_by(4096).enumerate() {
                *byte = (first_page + page) as u8 | 1;
            }
            blocks.push(block);
        }
    });
    heap_bytes()
}

/// Runs the shared compute kernel (`compute.rs`: `rounds` chained SHA-256 compressions) and returns
/// its result, which the benchmark compares with the same kernel run natively.
#[ic_cdk::update]
fn compute(rounds: u64) -> u64 {
    compute::compute(std::hint::black_box(rounds))
}

/// The instructions `compute(rounds)` executes (its result is discarded): for choosing a number of
/// rounds that stays below the update instruction limit.
#[ic_cdk::query]
fn compute_instructions(rounds: u64) -> u64 {
    let before = ic_cdk::api::instruction_counter();
    std::hint::black_box(compute::compute(std::hint::black_box(rounds)));
    ic_cdk::api::instruction_counter() - before
}

/// Loops without end: the execution fails when it reaches the instruction limit (and its changes
/// are rolled back), for measuring how others fare beside canisters that use whole messages.
#[ic_cdk::update]
fn spin() {
    let mut turns: u64 = 0;
    loop {
        turns = std::hint::black_box(turns.wrapping_add(1));
    }
}
