//! What the node decides about blocks: the only BFT-facing trait it implements.

/// The parent a block is built on or checked against, as the node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHeader {
    /// Height of the parent (genesis is 0).
    pub height: u64,
    /// Block time of the parent in nanoseconds since the Unix epoch.
    pub time_nanos: u64,
    /// SHA-256 digest of the parent's canonical encoding.
    pub digest: [u8; 32],
}

/// A proposed block's content, borrowed for verification.
#[derive(Clone, Copy, Debug)]
pub struct BlockView<'a> {
    /// Height of the block (parent height + 1).
    pub height: u64,
    /// Block time in nanoseconds since the Unix epoch.
    pub time_nanos: u64,
    /// The opaque ingress messages, in proposal order.
    pub ingress: &'a [Vec<u8>],
}

/// The content of a block this replica proposes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockContent {
    /// Block time in nanoseconds since the Unix epoch; must exceed the parent's time.
    pub time_nanos: u64,
    /// Opaque ingress messages (signed request envelopes); must fit the configured limits.
    pub ingress: Vec<Vec<u8>>,
}

/// The node's rules for making and accepting blocks.
///
/// The engine already checks what needs no node knowledge: the parent link and height, that the
/// time strictly increases, the ingress limits and the seed a block carries. The policy adds the
/// checks that need the node (request signatures, expiry, duplicates against executed history,
/// and a bound on the distance between the block time and its own clock).
///
/// The engine clones the policy for concurrent calls; clones must share whatever state they
/// need (for example an ingress pool behind an `Arc`).
pub trait BlockPolicy: Clone + Send + Sync + 'static {
    /// Content for a block on top of `parent`.
    ///
    /// A proposal whose time is not greater than `parent.time_nanos`, or that exceeds the
    /// configured limits, is dropped (this replica's turn is skipped) rather than sent, since
    /// every other replica would reject it.
    fn propose(&mut self, parent: &BlockHeader) -> BlockContent;

    /// Whether `block` is acceptable on top of `parent`.
    ///
    /// Must be deterministic given `parent` and `block` across honest replicas: replicas that
    /// disagree split the vote and slow finality. Return `Err` only for blocks that are
    /// permanently invalid; the reason is logged.
    fn verify(&mut self, parent: &BlockHeader, block: &BlockView<'_>) -> Result<(), String>;

    /// Whether a block now would carry or cause work (ingress waiting, messages queued): a
    /// leader with work proposes after the minimum block interval, one without after the idle
    /// interval (see `BftConfig`). The default, always true, makes blocks as fast as allowed.
    fn has_work(&self) -> bool {
        true
    }
}
