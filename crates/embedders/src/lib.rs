//! The wasm embedder: runs one entry point of one canister on wasmtime, deterministically, and
//! reports what the System API calls asked for.
//!
//! The embedder knows nothing of call contexts, queues or cycles accounting: it takes a canister's
//! [`ExecutionState`](openic_replicated_state::ExecutionState) and a read-only
//! [`SystemStateView`], runs one function under an instruction limit, and returns the new memories
//! and globals plus the requested [`SystemStateChanges`] (outgoing calls, cycles accepted,
//! certified data, timer). The caller (the execution crate) applies them, or discards everything
//! if the execution trapped.
//!
//! Invariants:
//! - Determinism: the same module, state, view and input give the same output on every machine
//!   (NaN canonicalisation, fuel metering, no threads or relaxed SIMD; see Note
//!   [deterministic engine] in `config`).
//! - A trap leaves no trace: on `Err`, the output carries no state and no changes.
//! - Every ic0 import checks its execution context and traps outside it.
//! - No execution state lives in wasmtime between executions: each execution instantiates afresh
//!   and puts the heap and globals in and takes them out (Note [instance-free state] in
//!   `instrumentation`); large heaps are mapped from file images and only written pages are
//!   compared back (Note [tracked heaps] in `heap_image`).

pub mod api;
pub mod config;
mod embedder;
mod heap_image;
mod imports;
mod instrumentation;
mod linker;
mod memory_pool;
mod sliced;
pub mod system_api;
mod validation;

pub use api::*;
pub use config::{EmbedderConfig, EmbedderError};
pub use embedder::{HEAP_PAGE_WRITE_INSTRUCTIONS, WasmtimeEmbedder};
pub use sliced::{FinishedExecution, completion_slice};
