//! Remembers the seeds of recent rounds so a proposer can put its parent's seed in its block.

use commonware_actor::Feedback;
use commonware_consensus::{
    Reporter, Viewable as _,
    simplex::{scheme::bls12381_threshold::vrf, types::Activity},
    types::View,
};
use commonware_cryptography::{bls12381::primitives::variant::MinSig, ed25519, sha256::Digest};
use commonware_utils::sync::Mutex;
use std::{collections::BTreeMap, sync::Arc};

/// The signing scheme of the engine.
pub(crate) type Scheme = vrf::Scheme<ed25519::PublicKey, MinSig>;

/// Views of seeds kept behind the highest recorded one; more than the views a proposal's parent
/// can lag behind its own view while the engine is live (one activity timeout).
const SEED_VIEWS_KEPT: u64 = 4_096;

/// Seed signatures of recent views, filled from the certificates consensus reports.
#[derive(Clone, Default)]
pub(crate) struct SeedCache {
    seeds: Arc<Mutex<BTreeMap<View, vrf::Seed<MinSig>>>>,
}

impl SeedCache {
    /// The seed of `view`, if a notarization or finalization for it was seen.
    pub(crate) fn get(&self, view: View) -> Option<vrf::Seed<MinSig>> {
        self.seeds.lock().get(&view).cloned()
    }

    fn insert(&self, seed: vrf::Seed<MinSig>) {
        let mut seeds = self.seeds.lock();
        let view = seed.view();
        seeds.insert(view, seed);
        let highest = seeds.keys().next_back().copied().unwrap_or(view);
        let keep_from = View::new(highest.get().saturating_sub(SEED_VIEWS_KEPT));
        *seeds = seeds.split_off(&keep_from);
    }
}

/// Wraps the consensus reporter to record the seed carried by each certificate.
#[derive(Clone)]
pub(crate) struct SeedRecorder<R> {
    pub(crate) inner: R,
    pub(crate) seeds: SeedCache,
}

impl<R> Reporter for SeedRecorder<R>
where
    R: Reporter<Activity = Activity<Scheme, Digest>>,
{
    type Activity = Activity<Scheme, Digest>;

    fn report(&mut self, activity: Self::Activity) -> Feedback {
        let seed = match &activity {
            Activity::Notarization(notarization) | Activity::Certification(notarization) => {
                notarization.certificate.get().map(|certificate| {
                    vrf::Seed::new(notarization.proposal.round, certificate.seed_signature)
                })
            }
            Activity::Finalization(finalization) => {
                finalization.certificate.get().map(|certificate| {
                    vrf::Seed::new(finalization.proposal.round, certificate.seed_signature)
                })
            }
            _ => None,
        };
        if let Some(seed) = seed {
            self.seeds.insert(seed);
        }
        self.inner.report(activity)
    }
}
