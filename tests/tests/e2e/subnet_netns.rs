//! Four replicas on four "hosts": network namespaces this test creates, each with its own address
//! on a bridge, started from one genesis file with `openic replica`. One host's link is cut (a
//! partition) and healed; the subnet keeps serving through the other three, and the cut-off
//! replica catches up once it is back.
//!
//! Needs root and `ip` (iproute2); elsewhere the test says why and does nothing. Every name it
//! creates carries this process's id, and everything is removed at the end, also on failure.

use crate::support::*;
use openic_node::genesis::{Genesis, GenesisMember};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPLICAS: usize = 4;
const HTTP_PORT: u16 = 8080;
const P2P_PORT: u16 = 4100;

/// Runs `ip` with `args`; panics with its output on failure.
fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e}"));
    assert!(
        output.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The names and addresses of one test run's namespaces, veth pairs and bridge.
#[derive(Clone)]
struct HostNames {
    tag: String,
    bridge: String,
    octet: u8,
}

/// Owns the hosts of one test run: removes them on drop.
struct Hosts(HostNames);

impl std::ops::Deref for Hosts {
    type Target = HostNames;
    fn deref(&self) -> &HostNames {
        &self.0
    }
}

impl HostNames {
    fn namespace(&self, index: usize) -> String {
        format!("oic{}n{index}", self.tag)
    }

    fn host_link(&self, index: usize) -> String {
        format!("oic{}v{index}", self.tag)
    }

    fn address(&self, index: usize) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(10, 213, self.octet, 10 + index as u8)
    }

    /// Cuts (`up = false`) or restores a host's only link.
    fn set_link(&self, index: usize, up: bool) {
        ip(&[
            "link",
            "set",
            &self.host_link(index),
            if up { "up" } else { "down" },
        ]);
    }
}

impl Hosts {
    fn create() -> Hosts {
        let pid = std::process::id();
        let hosts = Hosts(HostNames {
            tag: format!("{:x}", pid % 0xfffff),
            bridge: format!("oic{:x}br", pid % 0xfffff),
            octet: (pid % 250) as u8 + 1,
        });
        ip(&["link", "add", &hosts.bridge, "type", "bridge"]);
        let gateway = format!("10.213.{}.1/24", hosts.octet);
        ip(&["addr", "add", &gateway, "dev", &hosts.bridge]);
        ip(&["link", "set", &hosts.bridge, "up"]);
        for index in 0..REPLICAS {
            let namespace = hosts.namespace(index);
            let host_link = hosts.host_link(index);
            ip(&["netns", "add", &namespace]);
            ip(&[
                "link", "add", &host_link, "type", "veth", "peer", "name", "eth0", "netns",
                &namespace,
            ]);
            ip(&["link", "set", &host_link, "master", &hosts.bridge]);
            ip(&["link", "set", &host_link, "up"]);
            let address = format!("{}/24", hosts.address(index));
            ip(&["-n", &namespace, "addr", "add", &address, "dev", "eth0"]);
            ip(&["-n", &namespace, "link", "set", "eth0", "up"]);
            ip(&["-n", &namespace, "link", "set", "lo", "up"]);
        }
        hosts
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for index in 0..REPLICAS {
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.namespace(index)])
                .status();
            let _ = Command::new("ip")
                .args(["link", "delete", &self.host_link(index)])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "delete", &self.bridge])
            .status();
    }
}

/// A replica process inside a namespace; killed (by pid) on drop.
struct NamespacedReplica {
    child: Child,
    url: String,
    root_key: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for NamespacedReplica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_replica(hosts: &HostNames, index: usize, dir: &std::path::Path) -> NamespacedReplica {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &hosts.namespace(index)])
        .arg(openic_tests::openic_binary())
        .arg("replica")
        .arg("--identity")
        .arg(dir.join("node.key"))
        .arg("--genesis")
        .arg(dir.join("genesis.json"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--bind", &hosts.address(index).to_string()])
        .args(["--port", &HTTP_PORT.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting openic replica in a namespace");
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = child.stderr.take().expect("stderr is piped");
    let stderr_log = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut log = stderr_log.lock().unwrap_or_else(|e| e.into_inner());
            if log.len() < 256 * 1024 {
                log.push_str(&line);
                log.push('\n');
            }
        }
    });
    let stdout = child.stdout.take().expect("stdout is piped");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    NamespacedReplica {
        child,
        url: String::new(),
        root_key: String::new(),
        log,
    }
    .ready(lines_rx)
}

impl NamespacedReplica {
    fn ready(mut self, lines: std::sync::mpsc::Receiver<String>) -> NamespacedReplica {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.root_key.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("url: ") {
                        self.url = url.to_string();
                    } else if let Some(key) = line.strip_prefix("root_key: ") {
                        self.root_key = key.to_string();
                    }
                }
                Err(_) => panic!(
                    "a replica in a namespace did not become ready; its log:\n{}",
                    self.log.lock().unwrap_or_else(|e| e.into_inner())
                ),
            }
        }
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_separate_hosts_survive_a_partition() {
    let as_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.starts_with(b"0"));
    let has_ip = Command::new("ip").arg("-V").output().is_ok();
    if !as_root || !has_ip {
        eprintln!("skipped: network namespaces need root and iproute2 (`ip`)");
        return;
    }
    let hosts = Hosts::create();
    let root = tempfile::tempdir().expect("a temporary directory");
    let mut members = Vec::new();
    let dirs: Vec<std::path::PathBuf> = (0..REPLICAS)
        .map(|index| root.path().join(format!("host-{index}")))
        .collect();
    for (index, dir) in dirs.iter().enumerate() {
        let key = openic_node::load_or_create_identity(&dir.join("node.key")).expect("an identity");
        let der = key.public_key_der();
        members.push(GenesisMember {
            name: format!("host-{index}"),
            public_key: hex::encode(&der[der.len() - 32..]),
            p2p_address: SocketAddr::from((hosts.address(index), P2P_PORT)),
        });
    }
    let genesis = Genesis::new(members).expect("a valid genesis");
    for dir in &dirs {
        std::fs::write(dir.join("genesis.json"), genesis.to_json()).expect("writing genesis");
    }
    // All members must run for the key generation at genesis: start them together.
    let starting: Vec<_> = (0..REPLICAS)
        .map(|index| {
            let names = hosts.0.clone();
            let dir = dirs[index].clone();
            std::thread::spawn(move || start_replica(&names, index, &dir))
        })
        .collect();
    let replicas: Vec<NamespacedReplica> = starting
        .into_iter()
        .map(|thread| thread.join().expect("a replica start thread"))
        .collect();
    let root_key = replicas[0].root_key.clone();
    assert!(replicas.iter().all(|r| r.root_key == root_key));

    let mut agents = Vec::new();
    for replica in &replicas {
        agents.push(connect(&replica.url, None).await);
    }
    let counter = deploy(&agents[0], "counter", args(())).await;
    for agent in &agents {
        let (_,): (u64,) = update(agent, counter, "inc", args(())).await;
    }

    // Partition host 3: the other three still make up 2f + 1 and keep certifying.
    hosts.set_link(3, false);
    for round in 0..3 {
        for agent in &agents[..3] {
            let (value,): (u64,) = update(agent, counter, "inc", args(())).await;
            assert!(value >= 5 + round, "the counter only grows");
        }
    }
    let expected = 4 + 9;
    // Heal: host 3 catches up from its peers and answers with the subnet's state.
    hosts.set_link(3, true);
    for (index, agent) in agents.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let value = try_query::<(u64,)>(agent, counter, "get", args(()))
                .await
                .map(|(value,)| value);
            if value.as_ref().is_ok_and(|value| *value == expected) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {index} did not reach the subnet's state after the partition healed \
                 (last answer {value:?}); its log:\n{}",
                replicas[index]
                    .log
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // And it takes calls again.
    let (value,): (u64,) = update(&agents[3], counter, "inc", args(())).await;
    assert_eq!(value, expected + 1);
    drop(replicas);
    drop(hosts);
}
