//! Shared fixtures: in-process nodes, agents with default verification, canister deployment helpers.

use candid::utils::{ArgumentDecoder, ArgumentEncoder};
use candid::{Principal, decode_args, encode_args};
use ic_agent::{Agent, AgentError, Identity};
use ic_utils::interfaces::ManagementCanister;
use ic_utils::interfaces::management_canister::builders::CanisterInstallMode;
use openic_node::{NodeConfig, RunningNode};
use openic_types::ids::{CanisterId, FIRST_USER_CANISTER_INDEX};
use std::path::Path;
use std::time::{Duration, Instant};

/// Cycles given to every test canister at creation (plenty for any test; well below the IC's maximum).
pub const TEST_CANISTER_CYCLES: u128 = 100_000_000_000_000;
/// An update that has not reached a terminal status after this long fails the test (ic-agent's default is 5
/// minutes, far too long to wait for a broken node).
pub const UPDATE_POLLING_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for condition polling (timers firing etc.).
pub const POLL_TIMEOUT: Duration = Duration::from_secs(30);

/// A node started in-process on a free port, with its own state directory.
pub struct TestNode {
    /// The node (taken by `shutdown`).
    pub node: Option<RunningNode>,
    /// The state directory (deleted when the fixture is dropped).
    pub state_dir: tempfile::TempDir,
}

impl TestNode {
    /// Starts a node with a fresh state directory.
    pub async fn start() -> TestNode {
        TestNode::start_with(|_| {}).await
    }

    /// Starts a node with a fresh state directory and the configuration `configure` makes of the
    /// test default.
    pub async fn start_with(configure: impl FnOnce(&mut NodeConfig)) -> TestNode {
        let state_dir = tempfile::tempdir().expect("creating a temporary state directory");
        let mut config = test_node_config(state_dir.path());
        configure(&mut config);
        let node = start_node(config).await;
        TestNode {
            node: Some(node),
            state_dir,
        }
    }

    /// The node's URL.
    pub fn url(&self) -> String {
        self.node.as_ref().expect("node is running").url()
    }

    /// The node's root key (DER).
    pub fn root_key_der(&self) -> Vec<u8> {
        self.node.as_ref().expect("node is running").root_key_der()
    }

    /// An anonymous agent for this node (see [`agent`]).
    pub async fn agent(&self) -> Agent {
        let agent = connect(&self.url(), None).await;
        assert_eq!(
            agent.read_root_key(),
            self.root_key_der(),
            "the root key served by /api/v2/status differs from the node's root key"
        );
        agent
    }

    /// Shuts the node down cleanly (the state directory stays until the fixture is dropped).
    pub async fn shutdown(&mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown().await;
        }
    }
}

/// The configuration of a test node: on `127.0.0.1:0` (any free port) with state in `state_dir`.
pub fn test_node_config(state_dir: &Path) -> NodeConfig {
    let mut config = NodeConfig::new(state_dir);
    config.listen_addr = "127.0.0.1:0".parse().expect("valid socket address");
    config
}

/// Starts a node with `config`.
pub async fn start_node(config: NodeConfig) -> RunningNode {
    let state_dir = config.state_dir.clone();
    openic_node::start(config).await.unwrap_or_else(|error| {
        panic!(
            "openic_node::start failed for {}: {error}",
            state_dir.display()
        )
    })
}

/// Starts a node on `127.0.0.1:0` (any free port) with state in `state_dir`.
pub async fn start_node_in(state_dir: &Path) -> RunningNode {
    start_node(test_node_config(state_dir)).await
}

/// An agent for `url` with the client's default verification (certificates and query signatures), after
/// `fetch_root_key` (a local network's root key is not the mainnet key built into ic-agent).
pub async fn connect(url: &str, identity: Option<Box<dyn Identity>>) -> Agent {
    let mut builder = Agent::builder()
        .with_url(url)
        .with_max_polling_time(UPDATE_POLLING_TIMEOUT);
    if let Some(identity) = identity {
        builder = builder.with_boxed_identity(identity);
    }
    let agent = builder.build().expect("building an ic-agent Agent");
    agent
        .fetch_root_key()
        .await
        .unwrap_or_else(|error| panic!("fetch_root_key from {url} failed: {error}"));
    agent
}

/// The effective canister id used for canister creation: the first user canister id, which is inside the
/// subnet's certified canister ranges.
pub fn creation_effective_canister_id() -> Principal {
    Principal::from_text(CanisterId::from_u64(FIRST_USER_CANISTER_INDEX).to_string())
        .expect("openic canister ids are valid principals")
}

/// Creates an empty canister (provisional, with [`TEST_CANISTER_CYCLES`]) controlled by the agent's identity.
pub async fn create_canister(agent: &Agent) -> Principal {
    let management = ManagementCanister::create(agent);
    let (canister_id,) = management
        .create_canister()
        .as_provisional_create_with_amount(Some(TEST_CANISTER_CYCLES))
        .with_effective_canister_id(creation_effective_canister_id())
        .call_and_wait()
        .await
        .unwrap_or_else(|error| panic!("provisional_create_canister_with_cycles failed: {error}"));
    canister_id
}

/// Installs `wasm` into `canister_id` with ic-utils' `install` (which switches to chunked upload above
/// 1.85 MiB) and the Candid-encoded `init_arg`.
pub async fn install(
    agent: &Agent,
    canister_id: Principal,
    wasm: &[u8],
    mode: CanisterInstallMode,
    init_arg: Vec<u8>,
) {
    let management = ManagementCanister::create(agent);
    management
        .install(&canister_id, wasm)
        .with_raw_arg(init_arg)
        .with_mode(mode)
        .call_and_wait()
        .await
        .unwrap_or_else(|error| {
            panic!(
                "installing into {canister_id} ({mode:?}, {} bytes) failed: {error}",
                wasm.len()
            )
        });
}

/// Creates a canister and installs the test canister `name` with `init_arg`.
pub async fn deploy(agent: &Agent, name: &str, init_arg: Vec<u8>) -> Principal {
    let wasm = openic_tests::test_canister_wasm(name);
    let canister_id = create_canister(agent).await;
    install(
        agent,
        canister_id,
        &wasm,
        CanisterInstallMode::Install,
        init_arg,
    )
    .await;
    canister_id
}

/// Candid-encodes a tuple of arguments.
pub fn args(arguments: impl ArgumentEncoder) -> Vec<u8> {
    encode_args(arguments).expect("Candid encoding of test arguments")
}

/// An update call, returning the decoded reply or the agent's error.
pub async fn try_update<R>(
    agent: &Agent,
    canister_id: Principal,
    method: &str,
    arg: Vec<u8>,
) -> Result<R, AgentError>
where
    R: for<'a> ArgumentDecoder<'a>,
{
    let reply = agent
        .update(&canister_id, method)
        .with_arg(arg)
        .call_and_wait()
        .await?;
    Ok(decode_args(&reply)
        .unwrap_or_else(|error| panic!("{method}: cannot decode the reply: {error}")))
}

/// An update call that must succeed.
pub async fn update<R>(agent: &Agent, canister_id: Principal, method: &str, arg: Vec<u8>) -> R
where
    R: for<'a> ArgumentDecoder<'a>,
{
    try_update(agent, canister_id, method, arg)
        .await
        .unwrap_or_else(|error| panic!("update {canister_id}.{method} failed: {error}"))
}

/// A query call (its signature is verified by the agent), returning the decoded reply or the agent's error.
pub async fn try_query<R>(
    agent: &Agent,
    canister_id: Principal,
    method: &str,
    arg: Vec<u8>,
) -> Result<R, AgentError>
where
    R: for<'a> ArgumentDecoder<'a>,
{
    let reply = agent
        .query(&canister_id, method)
        .with_arg(arg)
        .call()
        .await?;
    Ok(decode_args(&reply)
        .unwrap_or_else(|error| panic!("{method}: cannot decode the reply: {error}")))
}

/// A query call that must succeed.
pub async fn query<R>(agent: &Agent, canister_id: Principal, method: &str, arg: Vec<u8>) -> R
where
    R: for<'a> ArgumentDecoder<'a>,
{
    try_query(agent, canister_id, method, arg)
        .await
        .unwrap_or_else(|error| panic!("query {canister_id}.{method} failed: {error}"))
}

/// The counter's value via the `get` query.
pub async fn counter_value(agent: &Agent, counter: Principal) -> u64 {
    let (value,): (u64,) = query(agent, counter, "get", args(())).await;
    value
}

/// Polls `condition` every 200 ms until it holds or [`POLL_TIMEOUT`] passes.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + POLL_TIMEOUT;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {POLL_TIMEOUT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The reject inside an agent error (certified or not), if it is one.
pub fn reject_of(error: &AgentError) -> Option<&ic_agent::agent::RejectResponse> {
    match error {
        AgentError::CertifiedReject { reject, .. }
        | AgentError::UncertifiedReject { reject, .. } => Some(reject),
        _ => None,
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).to_vec()
}
