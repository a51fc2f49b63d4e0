//! A subnet of four replicas agreeing by BFT consensus, driven by the unmodified ic-agent with its
//! default verification: every call goes to another replica, every certificate is checked against
//! the root key the replicas generated together, every query's signature against the answering
//! replica's key.

use crate::support::*;
use candid::Principal;
use openic_node::genesis::{Genesis, GenesisMember};
use openic_node::{NodeConfig, ReplicaConfig, RunningNode};
use std::net::SocketAddr;

/// A free loopback port (bound once and released; good enough on a test machine).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// Four replicas started in-process from one genesis file, each with its own state directory.
pub struct TestSubnet {
    /// The replicas (taken by `shutdown`).
    pub replicas: Vec<RunningNode>,
    /// Their state directories and identities, removed when the subnet is dropped.
    _dirs: Vec<tempfile::TempDir>,
}

impl TestSubnet {
    /// Starts `count` replicas; returns once every one has its key share and serves HTTP.
    pub async fn start(count: usize) -> TestSubnet {
        let dirs: Vec<tempfile::TempDir> = (0..count)
            .map(|_| tempfile::tempdir().expect("a state directory"))
            .collect();
        let mut members = Vec::new();
        for (index, dir) in dirs.iter().enumerate() {
            let identity = openic_state_manager_identity(&dir.path().join("identity.key"));
            members.push(GenesisMember {
                name: format!("replica-{index}"),
                public_key: hex::encode(identity),
                p2p_address: SocketAddr::from(([127, 0, 0, 1], free_port())),
            });
        }
        let genesis = Genesis::new(members).expect("a valid genesis");
        let mut starting = Vec::new();
        for dir in &dirs {
            let mut node = NodeConfig::new(dir.path().join("state"));
            node.listen_addr = "127.0.0.1:0".parse().expect("an address");
            let config = ReplicaConfig {
                node,
                identity: dir.path().join("identity.key"),
                genesis: genesis.clone(),
                p2p_listen: None,
                // Four replicas share this process and the machine's cores.
                consensus_threads: 1,
            };
            starting.push(tokio::spawn(openic_node::start_replica(config)));
        }
        let mut replicas = Vec::new();
        for started in starting {
            replicas.push(
                started
                    .await
                    .expect("the start task")
                    .unwrap_or_else(|error| panic!("a replica failed to start: {error}")),
            );
        }
        TestSubnet {
            replicas,
            _dirs: dirs,
        }
    }

    /// Stops every replica.
    pub async fn shutdown(&mut self) {
        for replica in self.replicas.drain(..) {
            replica.shutdown().await;
        }
    }
}

/// Creates (or loads) the identity file and returns its raw public key.
fn openic_state_manager_identity(path: &std::path::Path) -> [u8; 32] {
    let key = openic_node::load_or_create_identity(path).expect("an identity file");
    let der = key.public_key_der();
    der[der.len() - 32..].try_into().expect("32 bytes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_serve_ic_agent_from_any_replica() {
    let mut subnet = TestSubnet::start(4).await;
    let root_key = subnet.replicas[0].root_key_der();
    for replica in &subnet.replicas {
        assert_eq!(
            replica.root_key_der(),
            root_key,
            "every replica serves the same root key"
        );
    }
    let mut agents = Vec::new();
    for replica in &subnet.replicas {
        let agent = connect(&replica.url(), None).await;
        assert_eq!(agent.read_root_key(), root_key);
        agents.push(agent);
    }
    let counter = deploy(&agents[0], "counter", args((Some(5u64),))).await;
    let (first,): (u64,) = update(&agents[1], counter, "inc", args(())).await;
    let (second,): (u64,) = update(&agents[2], counter, "inc", args(())).await;
    assert_eq!((first, second), (6, 7));
    // Each replica answers queries on state certified by the subnet, signed with its own key. A
    // replica that lags may still answer from a state before the install (no module yet) or
    // before the updates: it must catch up within the poll timeout.
    for agent in &agents {
        let deadline = std::time::Instant::now() + POLL_TIMEOUT;
        loop {
            let answer = try_query::<(u64,)>(agent, counter, "get", args(())).await;
            if matches!(answer, Ok((7,))) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "a replica still answers {answer:?} long after the update was certified"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let (caller,): (Principal,) = update(&agents[3], counter, "whoami", args(())).await;
    assert_eq!(caller, Principal::anonymous());
    subnet.shutdown().await;
}
