//! Block making: the ingress pool and, for a one-node subnet, the block maker that finalizes blocks
//! of ingress at increasing heights.
//!
//! - [`IngressPoolImpl`] holds validated update calls in arrival order, bounded in messages and
//!   bytes, and refuses a request id it has seen (waiting, in a block not yet executed, or known to
//!   the certified ingress history), so each request runs at most once.
//! - [`BlockMaker`] turns the pool into blocks: `Block { height: h + 1, time, ingress }`, waking
//!   when ingress arrives, when the state has pending work, or every idle interval so the certified
//!   time stays fresh.
//!
//! Invariants of the blocks made here: heights increase by exactly one; times strictly increase
//! (`max(now, previous + 1 ns)`); no block holds a message whose expiry is before the block's time;
//! no request id is put in two blocks while the pool is told, through
//! [`IngressPoolImpl::release_executed`] and the "known" predicate, which ids were executed.
//!
//! A one-node subnet needs no agreement, so a block is final as soon as it is made (and logged).
//! A multi-node subnet will replace [`BlockMaker`] with a BFT engine (Commonware's `simplex`, see
//! `/work/shared/reference/commonware.md`) behind the same shape: it proposes blocks of ingress
//! from this pool and delivers finalized blocks at increasing heights with increasing times, which
//! the node logs and executes exactly as it does the blocks made here.

pub mod bft;
pub mod block_maker;
pub mod certifier;
pub mod dkg;
pub mod ingress_pool;
pub mod simulation;
mod split_mix;
pub mod subnet;

pub use block_maker::{BlockMaker, BlockMakerConfig, Clock, Wake, system_clock};
pub use certifier::{
    CertificationPool, CertificationPoolConfig, KeyShare, PartialSignature, PoolEvent,
    PublicSharing, SignerIndex, Statement, sign_partial, sign_statement, verify_group_signature,
    verify_partial,
};
pub use dkg::{DkgOutput, DkgSession, DkgStatus, Outgoing, Recipient};
pub use ingress_pool::{IngressPoolConfig, IngressPoolImpl, KnownRequestIds, message_bytes};
