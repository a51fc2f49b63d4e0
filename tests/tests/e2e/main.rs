//! End-to-end tests: real openic nodes driven by the unmodified official clients.
//!
//! Every test starts its own node (in-process with `openic_node::start`, or the `openic` binary for the crash
//! tests) on a free port with a fresh state directory, so tests are independent and may run in parallel.
//! Clients keep their default verification: ic-agent verifies every certificate (BLS, against the fetched
//! root key) and every query's node signature; @icp-sdk/core does the same in the JS test.
//!
//! Modules:
//! - `canisters`: create, install, update, query, upgrade, chunked install, lifecycle, traps, certified data,
//!   inter-canister calls and timers with ic-utils and ic-agent;
//! - `chain_keys`: ECDSA, Schnorr and vetKD keys from a canister built with ic-cdk-management-canister,
//!   verified with k256, ic-ed25519 and ic-vetkeys, and fees that agree with `ic0.cost_*`;
//! - `logs`: canister logs (prints and traps) through `fetch_canister_logs`, visibility, filters, upgrade,
//!   restart and reinstall;
//! - `snapshots`: take, load, list, delete, replace, download and upload canister snapshots; a
//!   snapshot restores heap, stable memory and certified data, and survives a restart;
//! - `identities`: anonymous, Ed25519, secp256k1 and P-256 senders, and controller checks;
//! - `durability`: state survives a clean shutdown, SIGTERM and SIGKILL of the `openic` process;
//! - `raw_http`: hand-made envelopes over raw HTTP/1.1 (bad signature, expiry, oversized body);
//! - `subnet`: four replicas agreeing by BFT consensus, each call to another replica;
//! - `subnet_faults`: four `openic replica` processes (and `openic start --replicas 4`) under crashes,
//!   lost finality, catch-up after a restart, state sync after a wipe or a divergence, and a restart of the
//!   whole subnet;
//! - `subnet_netns`: four replicas on four network namespaces, one partitioned and healed;
//! - `js`: @icp-sdk/core (node:test) and a Motoko (wasm64, enhanced orthogonal persistence) canister.
//!
//! The attack tests are a test binary of their own (`tests/attacks.rs`): cargo runs test binaries one
//! after another, so their connection storms and gigabyte queries never share the machine with the
//! timing-sensitive subnet tests here.

mod canisters;
mod chain_keys;
mod durability;
mod identities;
mod js;
mod logs;
mod raw_http;
mod snapshots;
mod subnet;
mod subnet_faults;
mod subnet_netns;
mod support;
