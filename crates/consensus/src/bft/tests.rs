//! Subnets of 4 replicas in Commonware's deterministic runtime over a simulated network.

use super::*;
use commonware_cryptography::{
    Signer as _,
    bls12381::{
        dkg::feldman_desmedt::deal,
        primitives::{sharing::Mode, variant::MinSig},
    },
    ed25519,
};
use commonware_p2p::simulated::{self, Link, Network, Oracle};
use commonware_runtime::{Clock as _, Runner as _, Spawner as _, Supervisor as _, deterministic};
use commonware_utils::{
    N3f1, NZUsize,
    ordered::{Quorum as _, Set},
    probability,
    sync::Mutex,
};
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::Arc,
    time::Duration,
};

const REPLICAS: usize = 4;
/// Runtime seeds the honest-subnet test runs over (about 1.2 s of real time each).
const SEEDS: u64 = 20;
const LINK: Link = Link {
    latency: Duration::from_millis(10),
    jitter: Duration::from_millis(2),
    success_rate: probability!(1.0),
};
/// Ingress that every replica's policy rejects.
const POISON: &[u8] = b"poison";

/// Proposes unique messages from its own pool and accepts only messages it could have made.
#[derive(Clone)]
struct TestPolicy {
    pool: Arc<Mutex<VecDeque<Vec<u8>>>>,
}

impl TestPolicy {
    fn new(replica: usize, messages: usize, poison_first: bool) -> Self {
        let mut pool: VecDeque<Vec<u8>> = (0..messages)
            .map(|k| format!("tx-{replica}-{k}").into_bytes())
            .collect();
        if poison_first {
            pool.push_front(POISON.to_vec());
        }
        Self {
            pool: Arc::new(Mutex::new(pool)),
        }
    }
}

impl BlockPolicy for TestPolicy {
    fn propose(&mut self, parent: &BlockHeader) -> BlockContent {
        BlockContent {
            time_nanos: parent.time_nanos + 1_000_000,
            ingress: self.pool.lock().pop_front().into_iter().collect(),
        }
    }

    fn verify(&mut self, parent: &BlockHeader, block: &BlockView<'_>) -> Result<(), String> {
        if block.time_nanos > parent.time_nanos + 60_000_000_000 {
            return Err("time too far ahead".to_string());
        }
        match block.ingress.iter().find(|m| !m.starts_with(b"tx-")) {
            Some(_) => Err("malformed ingress".to_string()),
            None => Ok(()),
        }
    }
}

/// What one replica's consumer saw: every delivery (with repeats) in order.
type Seen = Arc<Mutex<Vec<FinalizedBlock>>>;

struct Subnet {
    keys: Vec<ed25519::PrivateKey>,
    setups: Vec<SigningSetup>,
    oracle: Oracle<ed25519::PublicKey, deterministic::Context>,
    config: BftConfig,
}

fn test_config(replica: usize) -> BftConfig {
    BftConfig {
        partition_prefix: format!("replica-{replica}"),
        namespace: b"openic-test-subnet".to_vec(),
        block_limits: BlockLimits {
            ingress_messages_max: 8,
            ingress_bytes_max: 64 * 1024,
        },
        ..BftConfig::default()
    }
}

async fn subnet(context: &mut deterministic::Context) -> Subnet {
    let keys: Vec<ed25519::PrivateKey> = (0..REPLICAS as u64)
        .map(ed25519::PrivateKey::from_seed)
        .collect();
    let participants = Set::from_iter_dedup(keys.iter().map(|k| k.public_key()));
    // Order keys as the participant set orders them, so index i holds share i.
    let mut keys = keys;
    keys.sort_by_key(|k| participants.index(&k.public_key()).map(|i| i.get()));
    let (output, shares) = deal::<MinSig, _, N3f1>(
        // A fixed RNG, not the runtime's: a restarted run must deal the same keys.
        commonware_utils::test_rng(),
        Mode::NonZeroCounter,
        participants.clone(),
    )
    .expect("deal");
    let config = test_config(0);
    let setups = keys
        .iter()
        .map(|key| {
            SigningSetup::new(
                &config.namespace,
                output.public().clone(),
                shares.get_value(&key.public_key()).expect("share").clone(),
                participants.iter().cloned().collect(),
                key.clone(),
            )
            .expect("signing setup")
        })
        .collect();
    let (network, oracle) = Network::new_with_peers(
        context.child("network"),
        simulated::Config {
            max_size: 1024 * 1024,
            max_peers_per_set: NZUsize!(REPLICAS),
            disconnect_on_block: true,
            tracked_peer_sets: NZUsize!(1),
        },
        participants.iter().cloned(),
    )
    .await;
    network.start();
    for a in participants.iter() {
        for b in participants.iter() {
            if a != b {
                oracle
                    .add_link(a.clone(), b.clone(), LINK)
                    .await
                    .expect("link");
            }
        }
    }
    Subnet {
        keys,
        setups,
        oracle,
        config,
    }
}

/// Starts replica `index`; its consumer records deliveries and acknowledges heights up to
/// `ack_through` (holding later acknowledgements, as a node that has not executed them yet).
async fn start_replica(
    context: &deterministic::Context,
    subnet: &Subnet,
    index: usize,
    policy: TestPolicy,
    ack_through: u64,
) -> Seen {
    let public_key = subnet.keys[index].public_key();
    let control = subnet.oracle.control(public_key.clone());
    let mut registered = Vec::new();
    for spec in channels(&subnet.config, REPLICAS as u32) {
        registered.push(
            control
                .register(spec.id, spec.rate_limit)
                .await
                .expect("register channel"),
        );
    }
    let mut registered = registered.into_iter();
    let mut next = || registered.next().expect("five channels");
    let channels = Channels {
        votes: next(),
        certificates: next(),
        certificate_fetch: next(),
        blocks: next(),
        block_fetch: next(),
    };
    let replica = context.child("replica").with_attribute("index", index);
    let consumer = replica.child("consumer");
    let (_handle, mut deliveries) = start(
        replica,
        &test_config(index),
        subnet.setups[index].clone(),
        policy,
        subnet.oracle.manager(),
        control,
        channels,
    )
    .await
    .expect("engine starts");
    let seen: Seen = Arc::default();
    let record = seen.clone();
    consumer.spawn(move |_| async move {
        let mut held = Vec::new();
        while let Some((block, ack)) = deliveries.next().await {
            let height = block.height;
            record.lock().push(block);
            if height <= ack_through {
                ack.acknowledge();
            } else {
                held.push(ack);
            }
        }
    });
    seen
}

/// The last delivery of each height.
fn chain(seen: &Seen) -> BTreeMap<u64, FinalizedBlock> {
    seen.lock().iter().map(|b| (b.height, b.clone())).collect()
}

/// Waits (in simulated time) until every replica in `seen` has delivered `height`.
async fn wait_for_height(
    context: &deterministic::Context,
    seen: &[Seen],
    height: u64,
    limit: Duration,
) {
    let deadline = context.current() + limit;
    while context.current() < deadline {
        if seen.iter().all(|s| chain(s).contains_key(&height)) {
            return;
        }
        context.sleep(Duration::from_millis(50)).await;
    }
    let reached: Vec<_> = seen
        .iter()
        .map(|s| chain(s).keys().next_back().copied())
        .collect();
    panic!("replicas did not reach height {height} within {limit:?}: {reached:?}");
}

/// Checks the chains agree, are contiguous from 1, and have increasing times.
fn assert_consistent(chains: &[BTreeMap<u64, FinalizedBlock>], through: u64) {
    for height in 1..=through {
        let first = &chains[0][&height];
        for other in &chains[1..] {
            assert_eq!(&other[&height], first, "replicas differ at height {height}");
        }
        if height > 1 {
            assert!(first.time_nanos > chains[0][&(height - 1)].time_nanos);
        }
    }
}

fn run_all_honest(seed: u64) -> (String, BTreeMap<u64, FinalizedBlock>) {
    let runner = deterministic::Runner::new(
        deterministic::Config::new()
            .with_seed(seed)
            .with_timeout(Some(Duration::from_secs(120))),
    );
    runner.start(|mut context| async move {
        let subnet = subnet(&mut context).await;
        let mut seen = Vec::new();
        for index in 0..REPLICAS {
            seen.push(
                start_replica(
                    &context,
                    &subnet,
                    index,
                    TestPolicy::new(index, 100, false),
                    u64::MAX,
                )
                .await,
            );
        }
        wait_for_height(&context, &seen, 20, Duration::from_secs(60)).await;
        let chains: Vec<_> = seen.iter().map(chain).collect();
        assert_consistent(&chains, 20);
        // Each message appears at most once, and proposals made it into the chain.
        let mut messages = BTreeSet::new();
        for block in chains[0].values() {
            for message in &block.ingress {
                assert!(
                    messages.insert(message.clone()),
                    "message {message:?} finalized twice"
                );
            }
        }
        assert!(
            messages.len() >= 10,
            "only {} messages finalized",
            messages.len()
        );
        // Seeds differ between heights (they come from different rounds); only height 1, whose
        // parent is genesis, has none.
        let seeds: BTreeSet<_> = chains[0].values().map(|b| b.seed).collect();
        assert_eq!(seeds.len(), chains[0].len());
        for (height, block) in &chains[0] {
            assert_eq!(
                block.seed.is_none(),
                *height == 1,
                "seed at height {height}"
            );
        }
        (context.auditor().state(), chains[0].clone())
    })
}

#[test]
fn four_replicas_finalize_identical_chains() {
    let _ = run_all_honest(0);
}

#[test]
fn four_replicas_finalize_over_many_seeds() {
    for seed in 1..=SEEDS {
        let outcome = std::panic::catch_unwind(|| run_all_honest(seed));
        assert!(outcome.is_ok(), "subnet failed with seed {seed}");
    }
}

#[test]
fn same_seed_gives_same_run() {
    let (first_state, first_chain) = run_all_honest(7);
    let (second_state, second_chain) = run_all_honest(7);
    assert_eq!(first_chain, second_chain);
    assert_eq!(first_state, second_state);
}

#[test]
fn three_of_four_keep_finalizing() {
    deterministic::Runner::timed(Duration::from_secs(120)).start(|mut context| async move {
        let subnet = subnet(&mut context).await;
        let mut seen = Vec::new();
        for index in 1..REPLICAS {
            seen.push(
                start_replica(
                    &context,
                    &subnet,
                    index,
                    TestPolicy::new(index, 100, false),
                    u64::MAX,
                )
                .await,
            );
        }
        wait_for_height(&context, &seen, 20, Duration::from_secs(120)).await;
        let chains: Vec<_> = seen.iter().map(chain).collect();
        assert_consistent(&chains, 20);
    });
}

#[test]
fn two_of_four_stall_until_a_third_returns() {
    deterministic::Runner::timed(Duration::from_secs(300)).start(|mut context| async move {
        let subnet = subnet(&mut context).await;
        let mut seen = Vec::new();
        for index in 0..2 {
            seen.push(
                start_replica(
                    &context,
                    &subnet,
                    index,
                    TestPolicy::new(index, 100, false),
                    u64::MAX,
                )
                .await,
            );
        }
        context.sleep(Duration::from_secs(10)).await;
        for s in &seen {
            assert!(
                s.lock().is_empty(),
                "a height finalized with 2 of 4 replicas"
            );
        }
        seen.push(
            start_replica(
                &context,
                &subnet,
                2,
                TestPolicy::new(2, 100, false),
                u64::MAX,
            )
            .await,
        );
        wait_for_height(&context, &seen, 10, Duration::from_secs(120)).await;
        let chains: Vec<_> = seen.iter().map(chain).collect();
        assert_consistent(&chains, 10);
    });
}

#[test]
fn rejected_block_never_finalizes() {
    deterministic::Runner::timed(Duration::from_secs(120)).start(|mut context| async move {
        let subnet = subnet(&mut context).await;
        let mut seen = Vec::new();
        for index in 0..REPLICAS {
            // Every replica's first proposal carries ingress all policies reject.
            seen.push(
                start_replica(
                    &context,
                    &subnet,
                    index,
                    TestPolicy::new(index, 100, true),
                    u64::MAX,
                )
                .await,
            );
        }
        wait_for_height(&context, &seen, 20, Duration::from_secs(120)).await;
        let chains: Vec<_> = seen.iter().map(chain).collect();
        assert_consistent(&chains, 20);
        for block in chains[0].values() {
            assert!(
                !block.ingress.iter().any(|m| m == POISON),
                "rejected block finalized"
            );
        }
    });
}

#[test]
fn restarted_replica_redelivers_unacknowledged_heights() {
    const ACKED: u64 = 5;
    let first_run = deterministic::Runner::timed(Duration::from_secs(120));
    let (before, checkpoint) = first_run.start_and_recover(|mut context| async move {
        let subnet = subnet(&mut context).await;
        let mut seen = Vec::new();
        for index in 0..REPLICAS {
            let ack_through = if index == 0 { ACKED } else { u64::MAX };
            seen.push(
                start_replica(
                    &context,
                    &subnet,
                    index,
                    TestPolicy::new(index, 100, false),
                    ack_through,
                )
                .await,
            );
        }
        wait_for_height(&context, &seen, 12, Duration::from_secs(60)).await;
        chain(&seen[0])
    });
    let runner = deterministic::Runner::from(checkpoint);
    runner.start(|mut context| async move {
        let subnet = subnet(&mut context).await;
        let mut seen = Vec::new();
        for index in 0..REPLICAS {
            seen.push(
                start_replica(
                    &context,
                    &subnet,
                    index,
                    TestPolicy::new(index, 100, false),
                    u64::MAX,
                )
                .await,
            );
        }
        let target = before.keys().next_back().copied().unwrap_or(0) + 10;
        wait_for_height(&context, &seen, target, Duration::from_secs(60)).await;
        let first = seen[0].lock().first().map(|b| b.height);
        assert_eq!(
            first,
            Some(ACKED + 1),
            "restart must resume at the first unacknowledged height"
        );
        let after = chain(&seen[0]);
        for (height, block) in before.range(ACKED + 1..) {
            assert_eq!(
                &after[height], block,
                "height {height} changed across the restart"
            );
        }
        let chains: Vec<_> = seen.iter().map(chain).collect();
        // Every replica delivers the same blocks; the others had acknowledged everything, so
        // they resume above what they executed before the restart.
        for other in &chains[1..] {
            assert!(other.contains_key(&target));
            for (height, block) in other {
                assert_eq!(block, &chains[0][height]);
            }
        }
    });
}
