//! Deterministic execution of blocks: the scheduler, call contexts, cycles, and the management
//! canister; plus the non-replicated paths that read the certified state (queries and ingress
//! inspection).
//!
//! - [`Scheduler`] (the node's `BlockExecutor`) inducts a block's ingress, runs timers and
//!   heartbeats, and executes canister messages (calls, responses, management calls) until the
//!   queues are empty or a round limit is reached.
//! - [`QueryExecution`] (the `QueryExecutor`) runs queries and composite queries on the latest
//!   certified snapshot; [`IngressFilter`] (the `IngressInspector`) runs the checks and
//!   `canister_inspect_message` before an update call enters the pool.
//! - [`management`] implements the management canister `aaaaa-aa`.
//!
//! Invariants:
//! - Determinism: block execution depends only on the state and the block (time and randomness
//!   come from them; canisters are visited in id order and queues are FIFO; see the note
//!   "round order" in `scheduler`). No clock, no OS randomness, no hash-map iteration.
//! - A failed execution leaves no trace but its fee: its memory, calls, accepted cycles and
//!   reply are all discarded, and the call is answered with the error.
//! - Every call context is answered exactly once: by the canister, by an error, or with "did not
//!   reply" once its last callback has run; every request gets exactly one response.
//! - Reject code 6 never reaches users.

mod common;
pub mod config;
mod inspect;
pub mod management;
mod query;
mod reservation;
mod scheduler;

pub use common::{EMPTY_CANDID_REPLY, memory_usage_bytes};
pub use config::{ExecutionConfig, SubnetContext};
pub use inspect::IngressFilter;
pub use management::RAW_RAND_LAG_HEIGHTS;
pub use query::QueryExecution;
pub use scheduler::Scheduler;

#[cfg(test)]
mod tests;
