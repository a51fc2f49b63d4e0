//! BFT block agreement for a subnet of several replicas, over Commonware's `simplex` consensus
//! with the threshold-VRF signing scheme and `marshal` for ordered, durable delivery.
//!
//! The rest of openic sees no Commonware type: the node implements [`BlockPolicy`] (what goes
//! into a block and whether a peer's block is acceptable) and consumes [`Deliveries`] (finalized
//! blocks of opaque ingress, each with its block time and a random seed).
//!
//! Invariants of what is delivered: heights start at 1 and increase by exactly one; every
//! replica delivers the same block and seed at each height; block times strictly increase; each
//! height is delivered at least once and again after a restart until acknowledged; the seed
//! delivered with height `h` was unknown to everyone while the content of height
//! `h - SEED_LAG_HEIGHTS` and earlier could still change ([`SEED_LAG_HEIGHTS`]).

mod application;
mod block;
mod delivery;
mod engine;
mod policy;
mod seeds;

pub use block::BlockLimits;
pub use delivery::{Deliveries, DeliveryAck, FinalizedBlock, SEED_LAG_HEIGHTS};
pub use engine::{
    BftConfig, BftError, BftHandle, ChannelSpec, Channels, FloorControl, SigningSetup, channels,
    start,
};
pub use policy::{BlockContent, BlockHeader, BlockPolicy, BlockView};

#[cfg(test)]
mod tests;
