//! The ingress history: the status of every recent update call, by request id.

use openic_types::{IngressStatus, RequestId, Time};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Status of recent update calls. Invariant: an entry is kept at least until its `ingress_expiry`
/// has passed (so a request id runs at most once), and every insert, update and removal is recorded
/// in the change set until certification drains it with [`IngressHistory::take_changes`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IngressHistory {
    statuses: BTreeMap<RequestId, IngressStatus>,
    /// Request ids by the time after which they may be pruned.
    by_expiry: BTreeMap<Time, BTreeSet<RequestId>>,
    /// Request ids changed since the last `take_changes`. Not part of the replicated state proper:
    /// not serialised, and ignored by equality.
    #[serde(skip)]
    changed: BTreeSet<RequestId>,
}

impl PartialEq for IngressHistory {
    fn eq(&self, other: &Self) -> bool {
        self.statuses == other.statuses
    }
}

impl IngressHistory {
    /// The status of `id`, if known.
    pub fn get(&self, id: &RequestId) -> Option<&IngressStatus> {
        self.statuses.get(id)
    }

    /// Whether `id` is known.
    pub fn contains(&self, id: &RequestId) -> bool {
        self.statuses.contains_key(id)
    }

    /// Inserts or replaces the status of `id`.
    pub fn set(&mut self, id: RequestId, status: IngressStatus) {
        if let Some(old) = self.statuses.get(&id)
            && old.ingress_expiry != status.ingress_expiry
            && let Some(set) = self.by_expiry.get_mut(&old.ingress_expiry)
        {
            set.remove(&id);
        }
        self.by_expiry
            .entry(status.ingress_expiry)
            .or_default()
            .insert(id);
        self.statuses.insert(id, status);
        self.changed.insert(id);
    }

    /// Removes every entry whose expiry is before `now` and returns how many were removed.
    pub fn prune_expired(&mut self, now: Time) -> usize {
        let keep = self.by_expiry.split_off(&now);
        let expired = std::mem::replace(&mut self.by_expiry, keep);
        let mut removed = 0;
        for id in expired.into_values().flatten() {
            if self.statuses.remove(&id).is_some() {
                self.changed.insert(id);
                removed += 1;
            }
        }
        removed
    }

    /// Iterates over all entries in request-id order.
    pub fn iter(&self) -> impl Iterator<Item = (&RequestId, &IngressStatus)> {
        self.statuses.iter()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.statuses.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.statuses.is_empty()
    }

    /// Returns and clears the set of request ids changed (inserted, updated or removed) since the
    /// last call.
    pub fn take_changes(&mut self) -> BTreeSet<RequestId> {
        std::mem::take(&mut self.changed)
    }
}
