//! [`IngressPoolImpl`]: validated update calls waiting to go into a block.

use openic_interfaces::{IngressPool, IngressPoolError};
use openic_types::{CanisterId, IngressEnvelope, RequestId, SignedIngress, Time};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use tokio::sync::Notify;

/// Answers whether a request id is already known outside the pool (the node passes a lookup of
/// the certified ingress history). Called without the pool's lock held, so it may take its own.
pub type KnownRequestIds = Arc<dyn Fn(&RequestId) -> bool + Send + Sync>;

/// Limits of the ingress pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressPoolConfig {
    /// Messages waiting in the pool at most.
    pub max_messages: usize,
    /// Bytes (see [`message_bytes`]) waiting in the pool at most.
    pub max_bytes: u64,
    /// Request ids taken into blocks and not yet reported executed, at most. When reached,
    /// [`IngressPoolImpl::take_for_block`] takes nothing until the node calls
    /// [`IngressPoolImpl::release_executed`] (or the ids expire).
    pub max_in_flight_messages: usize,
}

impl Default for IngressPoolConfig {
    fn default() -> Self {
        IngressPoolConfig {
            max_messages: 10_000,
            max_bytes: 256 * 1024 * 1024,
            max_in_flight_messages: 100_000,
        }
    }
}

/// The size a message counts for against the pool's and a block's byte limits: the HTTP body that
/// carried it, but never less than its argument and method name (so a message built without a
/// body size still counts).
pub fn message_bytes(message: &SignedIngress) -> u64 {
    let payload = message.arg.len() as u64 + message.method_name.len() as u64;
    message.size_bytes.max(payload)
}

/// A waiting message with the envelope it came in.
struct Queued {
    message: SignedIngress,
    envelope: IngressEnvelope,
}

#[derive(Default)]
struct Inner {
    /// Waiting messages, oldest first.
    queue: VecDeque<Queued>,
    /// Request ids of `queue`.
    queued_ids: HashSet<RequestId>,
    /// Sum of [`message_bytes`] over `queue`.
    queued_bytes: u64,
    /// Request ids taken into blocks and not yet reported executed, with their expiry.
    in_flight: HashMap<RequestId, Time>,
    /// The same, ordered by expiry, for pruning.
    in_flight_by_expiry: BTreeSet<(Time, RequestId)>,
}

impl Inner {
    /// Forgets in-flight ids that expired before `now`: past its expiry a request id can no longer
    /// be submitted (the HTTP interface refuses expired messages), so replay protection no longer
    /// needs the pool.
    fn prune_in_flight(&mut self, now: Time) {
        let keep = self
            .in_flight_by_expiry
            .split_off(&(now, RequestId([0; 32])));
        let expired = std::mem::replace(&mut self.in_flight_by_expiry, keep);
        for (_, id) in expired {
            self.in_flight.remove(&id);
        }
    }

    /// Drops queued messages that expired before `now`; returns how many.
    fn drop_expired(&mut self, now: Time) -> usize {
        let before = self.queue.len();
        let mut dropped_bytes = 0;
        let queued_ids = &mut self.queued_ids;
        self.queue.retain(|Queued { message, .. }| {
            let keep = message.ingress_expiry >= now;
            if !keep {
                queued_ids.remove(&message.request_id);
                dropped_bytes += message_bytes(message);
            }
            keep
        });
        self.queued_bytes -= dropped_bytes;
        before - self.queue.len()
    }
}

/// The ingress pool of a node: a bounded FIFO of validated update calls with replay protection.
///
/// A request id is refused while it is waiting in the pool, while it is in a block that has not
/// been reported executed (see [`IngressPoolImpl::release_executed`]), and whenever the
/// [`KnownRequestIds`] predicate knows it (the ingress history). Together these make sure a
/// request runs at most once.
pub struct IngressPoolImpl {
    config: IngressPoolConfig,
    known: KnownRequestIds,
    inner: Mutex<Inner>,
    /// Signalled on every accepted submit (a permit is stored if nobody waits).
    arrived: Notify,
}

impl std::fmt::Debug for IngressPoolImpl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("IngressPoolImpl")
            .field("config", &self.config)
            .field("messages", &inner.queue.len())
            .field("bytes", &inner.queued_bytes)
            .field("in_flight", &inner.in_flight.len())
            .finish()
    }
}

impl IngressPoolImpl {
    /// An empty pool with the given limits and "already known" predicate.
    pub fn new(config: IngressPoolConfig, known: KnownRequestIds) -> IngressPoolImpl {
        IngressPoolImpl {
            config,
            known,
            inner: Mutex::new(Inner::default()),
            arrived: Notify::new(),
        }
    }

    /// The pool's limits.
    pub fn config(&self) -> &IngressPoolConfig {
        &self.config
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.inner.lock().queue.len()
    }

    /// Whether no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.inner.lock().queue.is_empty()
    }

    /// Whether a waiting message is not excluded: one a proposal could still take, where
    /// `exclude` names the messages already in blocks not yet executed.
    pub fn has_selectable(&self, exclude: &dyn Fn(&RequestId) -> bool) -> bool {
        self.inner
            .lock()
            .queue
            .iter()
            .any(|queued| !exclude(&queued.message.request_id))
    }

    /// Bytes waiting (see [`message_bytes`]).
    pub fn bytes(&self) -> u64 {
        self.inner.lock().queued_bytes
    }

    /// Request ids taken into blocks and not yet released.
    pub fn in_flight_len(&self) -> usize {
        self.inner.lock().in_flight.len()
    }

    /// Takes messages for a block whose time is `now`, oldest first: at most `max_messages`, and
    /// at most `max_bytes` except that the first message is always taken (so one large message
    /// cannot block the queue; the pool's own byte limit bounds it). Messages that expired before
    /// `now` are dropped from the whole pool, never returned. The ids taken stay "in flight"
    /// (refused by `submit`) until [`IngressPoolImpl::release_executed`] or their expiry.
    pub fn take_for_block(
        &self,
        max_messages: usize,
        max_bytes: u64,
        now: Time,
    ) -> Vec<SignedIngress> {
        let mut inner = self.inner.lock();
        inner.prune_in_flight(now);
        let dropped = inner.drop_expired(now);
        if dropped > 0 {
            tracing::debug!(dropped, "dropped expired ingress messages from the pool");
        }
        let capacity = self
            .config
            .max_in_flight_messages
            .saturating_sub(inner.in_flight.len());
        if capacity == 0 && !inner.queue.is_empty() {
            tracing::warn!(
                in_flight = inner.in_flight.len(),
                "ingress pool holds back messages: too many taken into blocks and not yet \
                 reported executed"
            );
        }
        let limit = max_messages.min(capacity);
        let mut taken = Vec::new();
        let mut taken_bytes = 0u64;
        while taken.len() < limit {
            let Some(next) = inner.queue.front() else {
                break;
            };
            let size = message_bytes(&next.message);
            if !taken.is_empty() && taken_bytes.saturating_add(size) > max_bytes {
                break;
            }
            let Queued { message, .. } = inner.queue.pop_front().expect("front exists");
            inner.queued_ids.remove(&message.request_id);
            inner.queued_bytes -= size;
            inner
                .in_flight
                .insert(message.request_id, message.ingress_expiry);
            inner
                .in_flight_by_expiry
                .insert((message.ingress_expiry, message.request_id));
            taken_bytes += size;
            taken.push(message);
        }
        taken
    }

    /// Envelopes for a block proposed at time `now` on a multi-replica subnet, oldest first, within
    /// the same limits as [`IngressPoolImpl::take_for_block`], skipping messages for which
    /// `exclude` is true (those already in a proposed block the new one extends) and messages
    /// that expired before `now`. At most `max_per_canister` messages go to any one canister (the
    /// management canister counting as one): execution rejects what does not fit in a canister's
    /// input queue, so the excess waits in the pool for a later block instead, while messages to
    /// other canisters still get in.
    ///
    /// Unlike `take_for_block` this leaves the messages in the pool: a proposal may never be
    /// finalized (its view can time out), and its messages must then go into a later block. They
    /// leave the pool when a finalized block includes them ([`IngressPoolImpl::note_included`]) or
    /// when they expire.
    pub fn select_for_proposal(
        &self,
        max_messages: usize,
        max_bytes: u64,
        max_per_canister: usize,
        now: Time,
        exclude: &dyn Fn(&RequestId) -> bool,
    ) -> Vec<IngressEnvelope> {
        let mut inner = self.inner.lock();
        inner.prune_in_flight(now);
        inner.drop_expired(now);
        let mut selected = Vec::new();
        let mut selected_bytes = 0u64;
        let mut per_canister: BTreeMap<CanisterId, usize> = BTreeMap::new();
        for Queued { message, envelope } in &inner.queue {
            if selected.len() >= max_messages {
                break;
            }
            if exclude(&message.request_id) {
                continue;
            }
            let to_canister = per_canister.entry(message.canister_id).or_default();
            if *to_canister >= max_per_canister {
                continue;
            }
            let size = message_bytes(message);
            if !selected.is_empty() && selected_bytes.saturating_add(size) > max_bytes {
                break;
            }
            *to_canister += 1;
            selected_bytes += size;
            selected.push(envelope.clone());
        }
        selected
    }

    /// Records that `ingress` is in a finalized block that did not come from
    /// [`IngressPoolImpl::take_for_block`] (a block replayed from the log, or, on a multi-node
    /// subnet, proposed by another node): those messages leave the queue if they are waiting, and
    /// their ids are refused like taken ones until released or expired.
    pub fn note_included(&self, ingress: &[SignedIngress]) {
        if ingress.is_empty() {
            return;
        }
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let included: HashSet<RequestId> = ingress.iter().map(|m| m.request_id).collect();
        if included.iter().any(|id| inner.queued_ids.contains(id)) {
            let mut removed_bytes = 0;
            let queued_ids = &mut inner.queued_ids;
            inner.queue.retain(|Queued { message, .. }| {
                let keep = !included.contains(&message.request_id);
                if !keep {
                    queued_ids.remove(&message.request_id);
                    removed_bytes += message_bytes(message);
                }
                keep
            });
            inner.queued_bytes -= removed_bytes;
        }
        for message in ingress {
            if inner
                .in_flight
                .insert(message.request_id, message.ingress_expiry)
                .is_none()
            {
                inner
                    .in_flight_by_expiry
                    .insert((message.ingress_expiry, message.request_id));
            }
        }
    }

    /// Reports that these request ids were executed and the certified state (which the
    /// [`KnownRequestIds`] predicate reads) now knows them, so the pool can stop tracking them.
    pub fn release_executed<'a>(&self, ids: impl IntoIterator<Item = &'a RequestId>) {
        let mut inner = self.inner.lock();
        for id in ids {
            if let Some(expiry) = inner.in_flight.remove(id) {
                inner.in_flight_by_expiry.remove(&(expiry, *id));
            }
        }
    }

    /// Completes when a message has been accepted since the last wake-up. A message accepted
    /// while nobody waits is remembered, so a waiter never misses one; a wake-up may therefore find
    /// the pool already emptied by `take_for_block`: check [`IngressPoolImpl::is_empty`].
    pub async fn wait_for_ingress(&self) {
        self.arrived.notified().await
    }

    /// The notifier signalled on every accepted submit.
    pub(crate) fn arrived(&self) -> &Notify {
        &self.arrived
    }
}

impl IngressPool for IngressPoolImpl {
    fn submit(
        &self,
        message: SignedIngress,
        envelope: IngressEnvelope,
    ) -> Result<(), IngressPoolError> {
        let id = message.request_id;
        // Outside the lock: the predicate may lock the certified state.
        if (self.known)(&id) {
            return Err(IngressPoolError::Duplicate(id));
        }
        let size = message_bytes(&message);
        {
            let mut inner = self.inner.lock();
            if inner.queued_ids.contains(&id) || inner.in_flight.contains_key(&id) {
                return Err(IngressPoolError::Duplicate(id));
            }
            if inner.queue.len() >= self.config.max_messages
                || inner.queued_bytes.saturating_add(size) > self.config.max_bytes
            {
                return Err(IngressPoolError::Full {
                    messages: inner.queue.len(),
                    bytes: inner.queued_bytes,
                });
            }
            inner.queued_ids.insert(id);
            inner.queued_bytes += size;
            inner.queue.push_back(Queued { message, envelope });
        }
        self.arrived.notify_one();
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use openic_types::Principal;
    use std::sync::atomic::{AtomicBool, Ordering};

    pub(crate) fn message(tag: u8, expiry: u64, size_bytes: u64) -> SignedIngress {
        SignedIngress {
            request_id: RequestId([tag; 32]),
            sender: Principal::anonymous(),
            canister_id: CanisterId::from_u64(1),
            effective_canister_id: CanisterId::from_u64(1),
            method_name: "m".to_string(),
            arg: vec![tag; 3],
            ingress_expiry: Time(expiry),
            size_bytes,
        }
    }

    /// Submits a test message with a one-byte stand-in envelope (its tag).
    pub(crate) trait SubmitMessage {
        fn submit_message(&self, message: SignedIngress) -> Result<(), IngressPoolError>;
    }

    impl SubmitMessage for IngressPoolImpl {
        fn submit_message(&self, message: SignedIngress) -> Result<(), IngressPoolError> {
            let envelope = IngressEnvelope {
                effective_canister_id: message.effective_canister_id,
                bytes: Arc::from(vec![message.request_id.0[0]]),
            };
            self.submit(message, envelope)
        }
    }

    pub(crate) fn pool(config: IngressPoolConfig) -> IngressPoolImpl {
        IngressPoolImpl::new(config, Arc::new(|_: &RequestId| false))
    }

    fn tags(messages: &[SignedIngress]) -> Vec<u8> {
        messages.iter().map(|m| m.request_id.0[0]).collect()
    }

    #[test]
    fn limits_on_messages_and_bytes() {
        let pool = pool(IngressPoolConfig {
            max_messages: 3,
            max_bytes: 1_000,
            ..IngressPoolConfig::default()
        });
        pool.submit_message(message(1, 100, 100)).unwrap();
        pool.submit_message(message(2, 100, 100)).unwrap();
        assert_eq!(
            pool.submit_message(message(3, 100, 900)),
            Err(IngressPoolError::Full {
                messages: 2,
                bytes: 200
            })
        );
        pool.submit_message(message(3, 100, 800)).unwrap();
        assert_eq!(pool.bytes(), 1_000);
        assert!(matches!(
            pool.submit_message(message(4, 100, 1)),
            Err(IngressPoolError::Full { messages: 3, .. })
        ));
        // Taking frees room.
        assert_eq!(pool.take_for_block(1, u64::MAX, Time(0)).len(), 1);
        pool.submit_message(message(4, 100, 1)).unwrap();
        assert_eq!(pool.len(), 3);
    }

    #[test]
    fn duplicates_in_pool_in_flight_and_known_are_refused() {
        let known_flag = Arc::new(AtomicBool::new(false));
        let flag = known_flag.clone();
        let pool = IngressPoolImpl::new(
            IngressPoolConfig::default(),
            Arc::new(move |id: &RequestId| id.0[0] == 9 || flag.load(Ordering::SeqCst)),
        );
        let duplicate = |tag| Err(IngressPoolError::Duplicate(RequestId([tag; 32])));
        pool.submit_message(message(1, 100, 10)).unwrap();
        assert_eq!(pool.submit_message(message(1, 100, 10)), duplicate(1));
        assert_eq!(pool.submit_message(message(9, 100, 10)), duplicate(9));

        // Taken into a block: still refused until the node releases it.
        assert_eq!(tags(&pool.take_for_block(10, u64::MAX, Time(0))), vec![1]);
        assert_eq!(pool.in_flight_len(), 1);
        assert_eq!(pool.submit_message(message(1, 100, 10)), duplicate(1));
        // Executed and certified: the ingress history (the predicate) now answers for it.
        known_flag.store(true, Ordering::SeqCst);
        pool.release_executed([&RequestId([1; 32])]);
        assert_eq!(pool.in_flight_len(), 0);
        assert_eq!(pool.submit_message(message(1, 100, 10)), duplicate(1));
        known_flag.store(false, Ordering::SeqCst);
        pool.submit_message(message(1, 100, 10)).unwrap();
    }

    #[test]
    fn fifo_with_block_limits() {
        let pool = pool(IngressPoolConfig::default());
        for tag in 1..=6 {
            pool.submit_message(message(tag, 100, 100)).unwrap();
        }
        assert_eq!(tags(&pool.take_for_block(2, u64::MAX, Time(0))), vec![1, 2]);
        assert_eq!(tags(&pool.take_for_block(10, 250, Time(0))), vec![3, 4]);
        // A message larger than the block's byte limit still goes, alone, at the head of a block.
        assert_eq!(tags(&pool.take_for_block(10, 50, Time(0))), vec![5]);
        assert_eq!(tags(&pool.take_for_block(10, u64::MAX, Time(0))), vec![6]);
        assert!(pool.take_for_block(10, u64::MAX, Time(0)).is_empty());
    }

    #[test]
    fn expired_messages_are_dropped_not_taken() {
        let pool = pool(IngressPoolConfig::default());
        pool.submit_message(message(1, 50, 10)).unwrap();
        pool.submit_message(message(2, 200, 10)).unwrap();
        pool.submit_message(message(3, 99, 10)).unwrap();
        pool.submit_message(message(4, 100, 10)).unwrap();
        // Expiry 100 may still start at time 100; 50 and 99 may not.
        let taken = pool.take_for_block(1, u64::MAX, Time(100));
        assert_eq!(tags(&taken), vec![2]);
        assert_eq!(pool.len(), 1, "message 3 was dropped with message 1");
        assert_eq!(pool.bytes(), 10);
        assert_eq!(tags(&pool.take_for_block(10, u64::MAX, Time(100))), vec![4]);
        // The expired messages' ids are free again (the HTTP layer refuses expired messages anyway).
        pool.submit_message(message(1, 500, 10)).unwrap();
    }

    #[test]
    fn messages_included_by_other_blocks_leave_the_pool() {
        let pool = pool(IngressPoolConfig::default());
        for tag in 1..=3 {
            pool.submit_message(message(tag, 100, 10)).unwrap();
        }
        pool.note_included(&[message(2, 100, 10), message(7, 100, 10)]);
        assert_eq!(pool.len(), 2);
        assert_eq!(pool.bytes(), 20);
        assert_eq!(pool.in_flight_len(), 2);
        assert_eq!(
            pool.submit_message(message(7, 100, 10)),
            Err(IngressPoolError::Duplicate(RequestId([7; 32])))
        );
        assert_eq!(
            tags(&pool.take_for_block(10, u64::MAX, Time(0))),
            vec![1, 3]
        );
    }

    #[test]
    fn in_flight_ids_are_bounded_and_expire() {
        let pool = pool(IngressPoolConfig {
            max_in_flight_messages: 2,
            ..IngressPoolConfig::default()
        });
        for tag in 1..=3 {
            pool.submit_message(message(tag, 100 * u64::from(tag), 10))
                .unwrap();
        }
        assert_eq!(
            tags(&pool.take_for_block(10, u64::MAX, Time(0))),
            vec![1, 2]
        );
        assert!(pool.take_for_block(10, u64::MAX, Time(0)).is_empty());
        pool.release_executed([&RequestId([1; 32])]);
        assert_eq!(tags(&pool.take_for_block(10, u64::MAX, Time(0))), vec![3]);
        // Message 2 (expiry 200) is forgotten once time passes its expiry.
        assert_eq!(pool.in_flight_len(), 2);
        pool.take_for_block(10, u64::MAX, Time(201));
        assert_eq!(pool.in_flight_len(), 1);
        pool.submit_message(message(2, 900, 10)).unwrap();
    }

    /// A proposal takes at most `max_per_canister` messages to one canister and goes on with
    /// messages to other canisters; the rest wait for a later block.
    #[test]
    fn proposals_cap_messages_per_canister() {
        let pool = pool(IngressPoolConfig::default());
        for tag in 1..=6 {
            let mut to = message(tag, 100, 10);
            if tag >= 5 {
                to.canister_id = CanisterId::from_u64(2);
            }
            pool.submit_message(to).unwrap();
        }
        let tags = |envelopes: &[IngressEnvelope]| -> Vec<u8> {
            envelopes.iter().map(|e| e.bytes[0]).collect()
        };
        let none = |_: &RequestId| false;
        assert_eq!(
            tags(&pool.select_for_proposal(10, 1_000, 2, Time(60), &none)),
            vec![1, 2, 5, 6]
        );
        assert_eq!(pool.len(), 6, "capped messages stay for a later block");
        pool.note_included(&[message(1, 100, 10), message(2, 100, 10)]);
        assert_eq!(
            tags(&pool.select_for_proposal(10, 1_000, 2, Time(60), &none)),
            vec![3, 4, 5, 6]
        );
    }

    /// Selecting for a proposal leaves messages in the pool (a proposal may never finalize),
    /// skips excluded and expired ones, and keeps to the limits; a finalized block removes them.
    #[test]
    fn proposals_select_without_taking() {
        let pool = pool(IngressPoolConfig::default());
        for tag in 1..=5 {
            pool.submit_message(message(tag, 100, 10)).unwrap();
        }
        pool.submit_message(message(6, 50, 10)).unwrap();
        let envelope_tags = |envelopes: &[IngressEnvelope]| -> Vec<u8> {
            envelopes.iter().map(|e| e.bytes[0]).collect()
        };
        let none = |_: &RequestId| false;
        assert_eq!(
            envelope_tags(&pool.select_for_proposal(3, 1_000, 10, Time(60), &none)),
            vec![1, 2, 3]
        );
        assert_eq!(
            pool.len(),
            5,
            "the expired message 6 is dropped, the others stay"
        );
        let in_parent = |id: &RequestId| id.0[0] == 2;
        assert_eq!(
            envelope_tags(&pool.select_for_proposal(10, 25, 10, Time(60), &in_parent)),
            vec![1, 3],
            "excluded ids are skipped and the byte limit holds"
        );
        pool.note_included(&[message(1, 100, 10), message(2, 100, 10)]);
        assert_eq!(
            envelope_tags(&pool.select_for_proposal(10, 1_000, 10, Time(60), &none)),
            vec![3, 4, 5]
        );
        assert_eq!(
            pool.submit_message(message(1, 100, 10)),
            Err(IngressPoolError::Duplicate(RequestId([1; 32]))),
            "included ids are refused until executed"
        );
    }
}
