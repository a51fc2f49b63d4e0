//! Adapts a [`BlockPolicy`] to marshal's `Application`: builds and checks [`Block`]s.

use super::{
    block::{Block, BlockLimits},
    policy::{BlockHeader, BlockPolicy, BlockView},
    seeds::{Scheme, SeedCache},
};
use commonware_consensus::{
    Application, Epochable as _,
    marshal::{ancestry::Ancestry, core::Mailbox, standard::Standard},
    simplex::{scheme::bls12381_threshold::vrf::Seed, types::Context},
    types::{Height, Round, View},
};
use commonware_cryptography::bls12381::primitives::variant::MinSig;
use commonware_cryptography::{Digested, Digestible as _, ed25519, sha256::Digest};
use commonware_runtime::Clock;
use futures::StreamExt as _;
use std::time::Duration;
use tracing::{debug, warn};

/// How often a proposer looks again for its parent's seed while consensus delivers it.
const SEED_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// How often a paced leader looks again whether work arrived.
const PACING_POLL_INTERVAL: Duration = Duration::from_millis(5);

/// The node's policy plus the checks every block must pass regardless of the policy.
#[derive(Clone)]
pub(crate) struct PolicyApplication<P> {
    pub(crate) policy: P,
    pub(crate) scheme: Scheme,
    pub(crate) seeds: SeedCache,
    pub(crate) limits: BlockLimits,
    /// How long a proposer waits for its parent's seed before skipping its turn.
    pub(crate) seed_wait: Duration,
    pub(crate) min_block_interval: Duration,
    pub(crate) idle_block_interval: Duration,
    /// Finalized history, for the parent's seed when consensus did not report its certificate
    /// in this run (after a restart, consensus resumes above its last finalization).
    pub(crate) marshal: Mailbox<Scheme, Standard<Block>>,
}

fn header(block: &Block) -> BlockHeader {
    BlockHeader {
        height: block.height_u64(),
        time_nanos: block.time_nanos(),
        digest: block.digest().0,
    }
}

impl<P: BlockPolicy> PolicyApplication<P> {
    /// The parent's seed from its stored finalization, if the parent was finalized in the
    /// round the proposal names.
    async fn finalized_seed(
        &self,
        context: &Context<Digest, ed25519::PublicKey>,
        parent: &Block,
    ) -> Option<Seed<MinSig>> {
        let finalization = self
            .marshal
            .get_finalization(Height::new(parent.height_u64()))
            .await?;
        if finalization.proposal.payload != parent.digest()
            || finalization.proposal.round != Round::new(context.epoch(), context.parent.0)
        {
            return None;
        }
        let certificate = finalization.certificate.get()?;
        Some(Seed::new(
            finalization.proposal.round,
            certificate.seed_signature,
        ))
    }

    /// Checks that need no policy: time, limits, and the parent seed (see `SEED_LAG_HEIGHTS`).
    fn check_structure(
        &self,
        context: &Context<Digest, ed25519::PublicKey>,
        parent: &Block,
        block: &Block,
    ) -> Result<(), String> {
        if block.time_nanos() <= parent.time_nanos() {
            return Err(format!(
                "block time {} is not after parent time {}",
                block.time_nanos(),
                parent.time_nanos()
            ));
        }
        if block.ingress().len() > self.limits.ingress_messages_max
            || block.ingress_bytes() > self.limits.ingress_bytes_max
        {
            return Err("block ingress over the configured limits".to_string());
        }
        match (parent.height_u64(), block.parent_seed()) {
            (0, None) => Ok(()),
            (0, Some(_)) => Err("block on genesis carries a seed".to_string()),
            (_, None) => Err("block carries no seed of its parent's round".to_string()),
            (_, Some(seed)) => {
                let expected = Round::new(context.epoch(), context.parent.0);
                if seed.round != expected {
                    return Err(format!(
                        "seed is for round {:?}, parent round is {expected:?}",
                        seed.round
                    ));
                }
                // Seeds recorded from the certificates consensus verified need no second
                // pairing check; any other seed (a parent certified before this run) is checked.
                let known = self.seeds.get(context.parent.0).is_some_and(|k| &k == seed);
                if !known && !seed.verify(&self.scheme) {
                    return Err("seed signature does not verify".to_string());
                }
                Ok(())
            }
        }
    }
}

impl<E, P> Application<E> for PolicyApplication<P>
where
    E: Clock + Send + Sync + 'static,
    P: BlockPolicy,
{
    type SigningScheme = Scheme;
    type Context = Context<Digest, ed25519::PublicKey>;
    type Block = Block;
    type Input = ();

    async fn propose(
        &mut self,
        (runtime, context): (E, Self::Context),
        ancestry: impl Ancestry<Self::Block>,
        _input: (),
    ) -> Option<Digested<Block>> {
        let parent = ancestry.peek()?.inner().clone();
        let parent_seed = if parent.height_u64() == 0 {
            None
        } else {
            // Consensus reports the parent's certificate before asking for a proposal on it,
            // so this normally finds the seed at once.
            let mut waited = Duration::ZERO;
            loop {
                if let Some(seed) = self.seeds.get(context.parent.0) {
                    break Some(seed);
                }
                if let Some(seed) = self.finalized_seed(&context, &parent).await {
                    break Some(seed);
                }
                if waited >= self.seed_wait {
                    warn!(parent_view = %context.parent.0, "no seed for the parent's round; skipping proposal");
                    return None;
                }
                runtime.sleep(SEED_POLL_INTERVAL).await;
                waited += SEED_POLL_INTERVAL;
            }
        };
        // Pace blocks: no sooner than the minimum interval after the parent, and without work not
        // before the idle interval. Time is the runtime's (simulated in tests).
        let parent_time = Duration::from_nanos(parent.time_nanos());
        loop {
            let now = runtime
                .current()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let since_parent = now.saturating_sub(parent_time);
            if since_parent >= self.idle_block_interval
                || (since_parent >= self.min_block_interval && self.policy.has_work())
            {
                break;
            }
            let wait = self
                .min_block_interval
                .saturating_sub(since_parent)
                .max(PACING_POLL_INTERVAL)
                .min(self.idle_block_interval.saturating_sub(since_parent));
            runtime.sleep(wait).await;
        }
        let content = self.policy.propose(&header(&parent));
        let block = Block::new(
            parent.digest(),
            parent.height_u64() + 1,
            content.time_nanos,
            parent_seed,
            content.ingress,
        );
        if let Err(reason) = self.check_structure(&context, &parent, &block) {
            warn!(%reason, height = block.height_u64(), "policy proposed an invalid block; skipping proposal");
            return None;
        }
        let digest = block.digest();
        Some(Digested::precomputed(block, digest))
    }

    async fn verify(
        &mut self,
        (_runtime, context): (E, Self::Context),
        mut ancestry: impl Ancestry<Self::Block>,
    ) -> bool {
        let Some(block) = ancestry.next().await else {
            return false;
        };
        let Some(parent) = ancestry.next().await else {
            return false;
        };
        let (block, parent) = (block.inner(), parent.inner());
        let verdict = self
            .check_structure(&context, parent, block)
            .and_then(|()| {
                self.policy.verify(
                    &header(parent),
                    &BlockView {
                        height: block.height_u64(),
                        time_nanos: block.time_nanos(),
                        ingress: block.ingress(),
                    },
                )
            });
        match verdict {
            Ok(()) => true,
            Err(reason) => {
                debug!(%reason, height = block.height_u64(), view = %View::new(context.round.view().get()), "rejected block");
                false
            }
        }
    }
}
