//! Deterministic execution of blocks: the scheduler, call contexts, cycles, and the management canister.
