//! Hands finalized blocks to the node in height order, each with its execution seed.

use super::block::Block;
use commonware_actor::Feedback;
use commonware_codec::Encode as _;
use commonware_consensus::{Reporter, marshal::Update};
use commonware_cryptography::{Digested, Digestible as _};
use commonware_utils::{
    Acknowledgement as _,
    acknowledgement::Exact,
    sync::{Mutex, Notify},
};
use std::{collections::VecDeque, sync::Arc};
use tracing::error;

/// How many heights after a request the seed delivered with a height may decide its outcome.
///
/// # Seed rule (commit, then reveal)
///
/// Height `h` is delivered as soon as it is final, with the seed block `h` carries: the seed of
/// the round in which its parent `h - 1` was proposed, checked against the subnet key by every
/// replica before it votes, so all replicas (also ones catching up from storage or peers) read
/// the same 48 bytes from the finalized chain.
///
/// That seed is not secret from `h`'s proposer, and a Byzantine leader of a round can even learn
/// its own round's seed before any block of the round is notarized (any `2f+1` votes of round `v`
/// reveal it, and it can gather them from `f+1` honest replicas it showed different blocks;
/// Commonware's `bls12381_threshold::vrf` docs). So the seed delivered with `h` must not decide
/// anything about `h` or `h - 1`. Honest replicas vote in the round of `h - 1` only after leaving
/// the round of `h - 2`, that is after `h - 2` was notarized (its content fixed; it is final, so
/// its round was not nullified), so the seed delivered with `h` was unknown to everyone while
/// the content of `h - 2` and every earlier height could still change. Execution therefore uses
/// it only for answers to requests made at `h - SEED_LAG_HEIGHTS` or earlier (`raw_rand` answers
/// two heights after the call, as the Internet Computer answers it in a later round), and
/// execution of a height never waits for later blocks.
pub const SEED_LAG_HEIGHTS: u64 = 2;

/// A finalized block with the randomness it executes with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinalizedBlock {
    /// Height (the first delivered block is 1; genesis is not delivered).
    pub height: u64,
    /// Block time in nanoseconds since the Unix epoch; strictly increases with height.
    pub time_nanos: u64,
    /// Opaque ingress messages, in block order.
    pub ingress: Vec<Vec<u8>>,
    /// SHA-256 digest of the block's canonical encoding.
    pub digest: [u8; 32],
    /// Compressed BLS12-381 G1 threshold signature over the round that proposed the parent (see
    /// [`SEED_LAG_HEIGHTS`]); `None` only at height 1, whose parent is genesis.
    pub seed: Option<[u8; 48]>,
}

/// The acknowledgement of one delivered height.
///
/// Acknowledge only after the height's effects are durable: unacknowledged heights are
/// delivered again after a restart. Dropping it without acknowledging stops delivery until
/// the engine restarts, as a crash would.
#[derive(Debug)]
pub struct DeliveryAck {
    ack: Exact,
}

impl DeliveryAck {
    /// Marks the height as durably executed.
    pub fn acknowledge(self) {
        self.ack.acknowledge();
    }
}

#[derive(Default)]
struct Queue {
    blocks: VecDeque<(Digested<Block>, Exact)>,
    closed: bool,
    /// Heights at or below this are acknowledged and dropped instead of delivered (the node
    /// installed a fetched state at this height; see [`Deliveries::skip_through`]).
    skip_through: u64,
}

/// The receiving end of finalized-block delivery.
pub struct Deliveries {
    queue: Arc<Mutex<Queue>>,
    notify: Arc<Notify>,
}

/// The reporter marshal delivers finalized blocks to.
#[derive(Clone)]
pub(crate) struct DeliverySink {
    queue: Arc<Mutex<Queue>>,
    notify: Arc<Notify>,
}

/// A connected delivery sink and its consumer.
pub(crate) fn channel() -> (DeliverySink, Deliveries) {
    let queue = Arc::new(Mutex::new(Queue::default()));
    let notify = Arc::new(Notify::new());
    (
        DeliverySink {
            queue: queue.clone(),
            notify: notify.clone(),
        },
        Deliveries { queue, notify },
    )
}

impl Reporter for DeliverySink {
    type Activity = Update<Block, Exact>;

    fn report(&mut self, activity: Self::Activity) -> Feedback {
        if let Update::Block(block, ack) = activity {
            let mut queue = self.queue.lock();
            if queue.closed {
                return Feedback::Closed;
            }
            if block.inner().height_u64() <= queue.skip_through {
                ack.acknowledge();
                return Feedback::Ok;
            }
            queue.blocks.push_back((block, ack));
            drop(queue);
            self.notify.notify_one();
        }
        Feedback::Ok
    }
}

impl Deliveries {
    /// The next finalized height, in order and at least once, with its acknowledgement.
    ///
    /// Returns `None` only after the deliveries were closed with [`Deliveries::close`].
    pub async fn next(&mut self) -> Option<(FinalizedBlock, DeliveryAck)> {
        loop {
            let notify = self.notify.clone();
            let notified = notify.notified();
            if let Some(ready) = self.try_next() {
                return ready;
            }
            notified.await;
        }
    }

    /// Acknowledges and drops every height up to and including `height`, queued or still to come:
    /// the node installed a state at `height` fetched from its peers (state sync), and the engine's
    /// floor was moved there, so deliveries continue at `height + 1`.
    ///
    /// The caller must only skip to a height above everything that may be queued (the engine
    /// holds at most `pending_acks_max` unacknowledged heights): a queued height above `height`
    /// would be delivered again after the floor moved, and its acknowledgement can be neither
    /// given (it was not executed) nor dropped (the engine stops on a dropped one). Such heights
    /// are kept, and logged as a critical error.
    pub fn skip_through(&self, height: u64) {
        let mut queue = self.queue.lock();
        queue.skip_through = queue.skip_through.max(height);
        while let Some((block, _)) = queue.blocks.front() {
            if block.inner().height_u64() > queue.skip_through {
                break;
            }
            if let Some((_, ack)) = queue.blocks.pop_front() {
                ack.acknowledge();
            }
        }
        if let Some((block, _)) = queue.blocks.front() {
            error!(
                skipped_through = height,
                queued = block.inner().height_u64(),
                "critical: heights above a state-sync floor were already queued"
            );
        }
        drop(queue);
        self.notify.notify_one();
    }

    /// Stops delivery: pending heights stay unacknowledged (and are delivered after a restart).
    pub fn close(&self) {
        self.queue.lock().closed = true;
        self.notify.notify_one();
    }

    /// The next final height, `Some(None)` if closed, `None` to wait.
    #[allow(clippy::option_option)]
    fn try_next(&mut self) -> Option<Option<(FinalizedBlock, DeliveryAck)>> {
        let mut queue = self.queue.lock();
        if queue.closed {
            return Some(None);
        }
        let (block, ack) = queue.blocks.pop_front()?;
        drop(queue);
        let height = block.inner().height_u64();
        // Verified blocks above height 1 carry their parent's seed (see `Application`), and a
        // compressed G1 signature is 48 bytes; anything else means a broken chain.
        let seed = block
            .inner()
            .parent_seed()
            .map(|seed| <[u8; 48]>::try_from(seed.signature.encode().as_ref()));
        let seed = match seed {
            Some(Ok(bytes)) => Some(bytes),
            None if height == 1 => None,
            _ => {
                error!(
                    height,
                    "critical: no valid seed in a finalized block; delivery stops"
                );
                self.close();
                drop(ack);
                return Some(None);
            }
        };
        let block = block.inner();
        Some(Some((
            FinalizedBlock {
                height,
                time_nanos: block.time_nanos(),
                ingress: block.ingress().to_vec(),
                digest: block.digest().0,
                seed,
            },
            DeliveryAck { ack },
        )))
    }
}
