//! The wasm embedder: runs one entry point of one canister on wasmtime, deterministically, and
//! reports what the System API calls asked for.
//!
//! The embedder knows nothing of call contexts, queues or cycles accounting: it takes a canister's
//! [`ExecutionState`] and a read-only [`SystemStateView`], runs one function under an instruction
//! limit, and returns the new memories and globals plus the requested [`SystemStateChanges`]
//! (outgoing calls, cycles accepted, certified data, timer). The caller (the execution crate)
//! applies them, or discards everything if the execution trapped.
//!
//! Invariants:
//! - Determinism: the same module, state, view and input give the same output on every machine
//!   (NaN canonicalisation, fuel metering, no threads or relaxed SIMD; see `config`).
//! - A trap leaves no trace: on `Err`, the output carries no state and no changes.
//! - Every ic0 import checks its execution context and traps outside it.

pub mod api;

pub use api::*;
