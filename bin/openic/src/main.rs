//! The `openic` command. Parses arguments, builds configuration and hands over to `openic-node`
//! (for `start`) or to the official `ic-agent`/`ic-utils` clients (for `deploy`, `call`, `status`),
//! so what the CLI does is exactly what any IC client would do. No logic of the replica lives here.

use anyhow::{Context, Result, anyhow, bail};
use candid::Principal;
use clap::{Parser, Subcommand};
use ic_agent::Agent;
use ic_agent::identity::BasicIdentity;
use ic_utils::call::SyncCall as _;
use ic_utils::interfaces::ManagementCanister;
use ic_utils::interfaces::management_canister::builders::CanisterInstallMode as InstallMode;
use ic_utils::interfaces::management_canister::{
    CanisterLogFilter, CanisterLogRecord, FetchCanisterLogsArgs,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

const DEFAULT_URL: &str = "http://127.0.0.1:8000";

#[derive(Parser)]
#[command(
    name = "openic",
    version,
    about = "An open implementation of the Internet Computer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Caps on the HTTP server's connections and on the memory of queries.
#[derive(clap::Args, Clone, Copy, Debug)]
struct ResourceArgs {
    /// Most HTTP connections open at once (default: what the open-file limit leaves, at most
    /// 10000; the node raises its soft limit to the hard one at start). Idle connections are shed
    /// first when the cap is reached.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// Most HTTP connections open at once from one client address (an IPv6 /64 counts as one;
    /// default: a quarter of --max-connections).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections_per_ip: Option<u64>,
    /// MiB of memory that queries, composite queries and inspect_message may touch together
    /// (heap copied in and grown, stable memory written); an execution that finds no room is
    /// rejected at once as transient, to be retried (default: a quarter of the machine's memory,
    /// at least 512).
    #[arg(long, value_parser = clap::value_parser!(u64).range(16..))]
    query_memory_mib: Option<u64>,
    /// MiB of memory files that hold the images of large canister heaps (16 MiB and more), so an
    /// update costs the pages it touches rather than the heap's size; the least recently used go
    /// first, and a heap without an image runs copied in, slower (default: a quarter of the
    /// machine's memory, at least 1024; 0 turns images off).
    #[arg(long)]
    heap_image_memory_mib: Option<u64>,
}

impl ResourceArgs {
    fn apply(self, config: &mut openic_node::NodeConfig) {
        let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        config.http.connections.max_connections = self.max_connections.map(to_usize);
        config.http.connections.max_connections_per_ip = self.max_connections_per_ip.map(to_usize);
        config.query_memory_budget_bytes =
            self.query_memory_mib.map(|mib| mib.saturating_mul(1 << 20));
        if let Some(mib) = self.heap_image_memory_mib {
            config.embedder.max_heap_image_bytes = to_usize(mib.saturating_mul(1 << 20));
        }
    }

    /// The same flags, for a child process.
    fn to_args(self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(n) = self.max_connections {
            args.extend(["--max-connections".to_string(), n.to_string()]);
        }
        if let Some(n) = self.max_connections_per_ip {
            args.extend(["--max-connections-per-ip".to_string(), n.to_string()]);
        }
        if let Some(n) = self.query_memory_mib {
            args.extend(["--query-memory-mib".to_string(), n.to_string()]);
        }
        if let Some(n) = self.heap_image_memory_mib {
            args.extend(["--heap-image-memory-mib".to_string(), n.to_string()]);
        }
        args
    }
}

#[derive(Subcommand)]
enum Command {
    /// Start a local one-node network that serves canisters. Prints `url:` and `root_key:` once ready.
    Start {
        /// Directory for keys, the block log and checkpoints (created if missing).
        #[arg(long, default_value = ".openic/state")]
        state_dir: PathBuf,
        /// TCP port of the HTTP interface (0 = any free port).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Address to bind to. Loopback by default: a local network is for this machine only.
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
        /// Run a subnet of this many replicas, each its own process with its own state directory
        /// (`<state-dir>/replica-<i>`), HTTP port (`--port + i`) and p2p port (`--p2p-port + i`).
        /// They agree by BFT consensus and tolerate (replicas - 1) / 3 faulty ones.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        replicas: u16,
        /// First p2p port of a multi-replica local subnet.
        #[arg(long, default_value_t = 8100)]
        p2p_port: u16,
        #[command(flatten)]
        resources: ResourceArgs,
    },
    /// Create (or show) a node identity: the Ed25519 key that names a replica to its peers and
    /// signs its query replies. Prints the public key to put in the genesis file.
    Identity {
        /// The identity file (created with a new key if missing; keep it secret).
        #[arg(long, default_value = "node.key")]
        identity: PathBuf,
    },
    /// Write the genesis file of a new subnet from its members' public keys and p2p addresses.
    Genesis {
        /// A member, as NAME=PUBLIC_KEY_HEX@HOST:PORT (repeat for every member, in a fixed order).
        #[arg(long = "member", required = true)]
        members: Vec<String>,
        /// Where to write the file.
        #[arg(long, default_value = "genesis.json")]
        out: PathBuf,
        /// Heights between the checkpoints the subnet signs for state sync (a replica that lost
        /// its state fetches the latest one from its peers).
        #[arg(long, default_value_t = openic_node::genesis::DEFAULT_CATCH_UP_INTERVAL_HEIGHTS)]
        catch_up_interval: u64,
    },
    /// Run one replica of a subnet from its identity and the subnet's genesis file. At the first
    /// start the members generate the subnet key together: start every member.
    Replica {
        /// This replica's identity file (`openic identity`).
        #[arg(long, default_value = "node.key")]
        identity: PathBuf,
        /// The subnet's genesis file (`openic genesis`).
        #[arg(long, default_value = "genesis.json")]
        genesis: PathBuf,
        /// Directory for the key share, blocks and checkpoints (created if missing).
        #[arg(long, default_value = ".openic/replica")]
        state_dir: PathBuf,
        /// TCP port of the HTTP interface (0 = any free port).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Address the HTTP interface binds to.
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
        /// Address to accept peers on (default: this member's address in the genesis file).
        #[arg(long)]
        p2p_listen: Option<SocketAddr>,
        /// Shut down (cleanly) when standard input closes: `openic start --replicas` passes it, so
        /// its replicas stop with it even when it is killed with SIGKILL.
        #[arg(long, hide = true)]
        exit_with_parent: bool,
        /// Threads that run p2p and consensus (HTTP and execution have their own).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
        consensus_threads: u16,
        #[command(flatten)]
        resources: ResourceArgs,
    },
    /// Create a canister (unless --canister is given) and install a wasm module (plain or gzip) in it.
    Deploy {
        /// The wasm module.
        wasm: PathBuf,
        /// Install argument in Candid text, e.g. '(42 : nat64)'.
        #[arg(long)]
        arg: Option<String>,
        /// Install into this existing canister instead of creating one.
        #[arg(long)]
        canister: Option<String>,
        /// install, reinstall or upgrade (default: install for a new canister, upgrade for --canister).
        #[arg(long)]
        mode: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Call a canister method with Candid text arguments and print the Candid reply.
    Call {
        /// The canister id.
        canister: String,
        /// The method name.
        method: String,
        /// Arguments in Candid text, e.g. '("world")'. Default: no arguments.
        args: Option<String>,
        /// Send as a query (fast, not replicated) instead of an update.
        #[arg(long)]
        query: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Print a canister's log (what it printed with `debug_print` and why it trapped), oldest
    /// first, as `[index. time]: content`. Needs the right to read it (a controller by default;
    /// see the `log_visibility` setting).
    Logs {
        /// The canister id.
        canister: String,
        /// Keep printing new records as they arrive (until interrupted).
        #[arg(long, short)]
        follow: bool,
        /// With --follow: milliseconds between fetches.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
        interval_ms: u64,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show the status of a running network.
    Status {
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(clap::Args)]
struct Connection {
    /// URL of the network.
    #[arg(long, env = "OPENIC_URL", default_value = DEFAULT_URL)]
    url: String,
    /// PEM file of the identity to sign with (created on first use).
    #[arg(long, env = "OPENIC_IDENTITY")]
    identity: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the whole chain of causes on one line, without a backtrace.
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Start {
                state_dir,
                port,
                bind,
                replicas: 1,
                resources,
                ..
            } => start(state_dir, SocketAddr::new(bind, port), resources).await,
            Command::Start {
                state_dir,
                port,
                bind,
                replicas,
                p2p_port,
                resources,
            } => start_local_subnet(state_dir, bind, port, p2p_port, replicas, resources).await,
            Command::Identity { identity } => show_identity(&identity),
            Command::Genesis {
                members,
                out,
                catch_up_interval,
            } => write_genesis(&members, &out, catch_up_interval),
            Command::Replica {
                identity,
                genesis,
                state_dir,
                port,
                bind,
                p2p_listen,
                exit_with_parent,
                consensus_threads,
                resources,
            } => {
                init_logging();
                let mut node = openic_node::NodeConfig::new(state_dir);
                node.listen_addr = SocketAddr::new(bind, port);
                resources.apply(&mut node);
                let config = openic_node::ReplicaConfig {
                    node,
                    identity,
                    genesis: openic_node::genesis::Genesis::load(&genesis)?,
                    p2p_listen,
                    consensus_threads: usize::from(consensus_threads),
                };
                replica(config, exit_with_parent).await
            }
            Command::Deploy {
                wasm,
                arg,
                canister,
                mode,
                connection,
            } => {
                deploy(
                    &connection,
                    &wasm,
                    arg.as_deref(),
                    canister.as_deref(),
                    mode.as_deref(),
                )
                .await
            }
            Command::Call {
                canister,
                method,
                args,
                query,
                connection,
            } => call(&connection, &canister, &method, args.as_deref(), query).await,
            Command::Logs {
                canister,
                follow,
                interval_ms,
                connection,
            } => logs(&connection, &canister, follow, interval_ms).await,
            Command::Status { connection } => status(&connection).await,
        }
    })
}

async fn start(state_dir: PathBuf, listen_addr: SocketAddr, resources: ResourceArgs) -> Result<()> {
    init_logging();
    let mut config = openic_node::NodeConfig::new(state_dir.clone());
    config.listen_addr = listen_addr;
    resources.apply(&mut config);
    let node = openic_node::start(config)
        .await
        .with_context(|| format!("starting openic with state in {}", state_dir.display()))?;
    // These two lines are the interface for scripts: print them only once the node answers.
    println!("url: {}", node.url());
    println!("root_key: {}", hex::encode(node.root_key_der()));
    wait_for_termination().await;
    eprintln!("shutting down (finishing the current block and writing a checkpoint)…");
    node.shutdown().await;
    Ok(())
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OPENIC_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn show_identity(path: &Path) -> Result<()> {
    let key = openic_node::load_or_create_identity(path)
        .with_context(|| format!("loading or creating the identity {}", path.display()))?;
    let der = key.public_key_der();
    println!("public_key: {}", hex::encode(&der[der.len() - 32..]));
    println!("node_id: {}", key.node_id());
    Ok(())
}

fn parse_member(text: &str) -> Result<openic_node::genesis::GenesisMember> {
    let (name, rest) = text
        .split_once('=')
        .ok_or_else(|| anyhow!("member `{text}`: expected NAME=PUBLIC_KEY_HEX@HOST:PORT"))?;
    let (public_key, address) = rest
        .split_once('@')
        .ok_or_else(|| anyhow!("member `{text}`: expected NAME=PUBLIC_KEY_HEX@HOST:PORT"))?;
    let p2p_address = address
        .parse()
        .with_context(|| format!("member `{name}`: `{address}` is not HOST:PORT"))?;
    Ok(openic_node::genesis::GenesisMember {
        name: name.to_string(),
        public_key: public_key.to_ascii_lowercase(),
        p2p_address,
    })
}

fn write_genesis(members: &[String], out: &Path, catch_up_interval: u64) -> Result<()> {
    let members = members
        .iter()
        .map(|member| parse_member(member))
        .collect::<Result<Vec<_>>>()?;
    let mut genesis = openic_node::genesis::Genesis::new(members)?;
    genesis.catch_up_interval_heights = catch_up_interval;
    genesis.validate()?;
    if out.exists() {
        bail!(
            "{} exists; a subnet's genesis file must not change once members use it (remove it \
             first if no replica started from it)",
            out.display()
        );
    }
    std::fs::write(out, genesis.to_json()).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "genesis: {} ({} members, tolerates {} faulty)",
        out.display(),
        genesis.members.len(),
        genesis.max_faults()
    );
    Ok(())
}

async fn replica(config: openic_node::ReplicaConfig, exit_with_parent: bool) -> Result<()> {
    let state_dir = config.node.state_dir.clone();
    let replica = openic_node::start_replica(config)
        .await
        .with_context(|| format!("starting a replica with state in {}", state_dir.display()))?;
    println!("url: {}", replica.url());
    println!("root_key: {}", hex::encode(replica.root_key_der()));
    if exit_with_parent {
        tokio::select! {
            _ = wait_for_termination() => {}
            _ = stdin_closed() => eprintln!("the parent process is gone"),
        }
    } else {
        wait_for_termination().await;
    }
    eprintln!("shutting down (finishing the current block and writing a checkpoint)…");
    replica.shutdown().await;
    Ok(())
}

/// Runs a local subnet: one `openic replica` process per member, made from identities and a
/// genesis file kept in `state_dir` (so a restart resumes the same subnet).
async fn start_local_subnet(
    state_dir: PathBuf,
    bind: std::net::IpAddr,
    port: u16,
    p2p_port: u16,
    replicas: u16,
    resources: ResourceArgs,
) -> Result<()> {
    use tokio::io::AsyncBufReadExt as _;
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let genesis_path = state_dir.join("genesis.json");
    let mut members = Vec::new();
    for index in 0..replicas {
        let identity = state_dir.join(format!("replica-{index}")).join("node.key");
        let key = openic_node::load_or_create_identity(&identity)
            .with_context(|| format!("identity {}", identity.display()))?;
        let der = key.public_key_der();
        let p2p = p2p_port
            .checked_add(index)
            .ok_or_else(|| anyhow!("--p2p-port + replicas exceeds 65535"))?;
        members.push(openic_node::genesis::GenesisMember {
            name: format!("replica-{index}"),
            public_key: hex::encode(&der[der.len() - 32..]),
            p2p_address: SocketAddr::new(bind, p2p),
        });
    }
    let genesis = openic_node::genesis::Genesis::new(members)?;
    if genesis_path.exists() {
        let existing = openic_node::genesis::Genesis::load(&genesis_path)?;
        if existing != genesis {
            bail!(
                "{} describes another subnet (other replicas or ports); start with the same \
                 --replicas, --bind and --p2p-port, or use another --state-dir",
                genesis_path.display()
            );
        }
    } else {
        std::fs::write(&genesis_path, genesis.to_json())
            .with_context(|| format!("writing {}", genesis_path.display()))?;
    }
    let binary = std::env::current_exe().context("locating the openic binary")?;
    let mut children = Vec::new();
    for index in 0..replicas {
        let http_port = if port == 0 {
            0
        } else {
            port.checked_add(index)
                .ok_or_else(|| anyhow!("--port + replicas exceeds 65535"))?
        };
        let dir = state_dir.join(format!("replica-{index}"));
        let mut child = tokio::process::Command::new(&binary)
            .arg("replica")
            .arg("--identity")
            .arg(dir.join("node.key"))
            .arg("--genesis")
            .arg(&genesis_path)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--bind")
            .arg(bind.to_string())
            .arg("--port")
            .arg(http_port.to_string())
            .arg("--exit-with-parent")
            .args(resources.to_args())
            // Held open by this process: when it dies, however it dies, the replica sees the end
            // of its input and shuts down.
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting replica {index}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("replica {index} has no stdout"))?;
        children.push((index, child, tokio::io::BufReader::new(stdout).lines()));
    }
    let mut root_key = None;
    for (index, child, lines) in &mut children {
        let mut url = None;
        while let Some(line) = lines
            .next_line()
            .await
            .with_context(|| format!("reading replica {index}'s output"))?
        {
            if let Some(value) = line.strip_prefix("url: ") {
                url = Some(value.to_string());
            } else if let Some(value) = line.strip_prefix("root_key: ") {
                match &root_key {
                    None => root_key = Some(value.to_string()),
                    Some(key) if key != value => {
                        bail!("replica {index} reports another root key than replica 0")
                    }
                    Some(_) => {}
                }
                break;
            }
        }
        let Some(url) = url else {
            let status = child.wait().await.ok();
            bail!("replica {index} stopped before it was ready ({status:?}); see its log above");
        };
        println!("url: {url}");
    }
    if let Some(root_key) = root_key {
        println!("root_key: {root_key}");
    }
    wait_for_termination().await;
    eprintln!("shutting down the replicas…");
    for (_, child, _) in &children {
        if let Some(pid) = child.id() {
            // Only our own children, by pid: SIGTERM lets each write a checkpoint.
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
    for (_, child, _) in &mut children {
        let _ = child.wait().await;
    }
    Ok(())
}

/// Completes when standard input reaches its end (the writing process exited or closed it).
async fn stdin_closed() {
    use tokio::io::AsyncReadExt as _;
    let mut stdin = tokio::io::stdin();
    let mut buffer = [0u8; 64];
    loop {
        match stdin.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn wait_for_termination() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn default_identity_path() -> Result<PathBuf> {
    let home =
        std::env::var_os("HOME").ok_or_else(|| anyhow!("HOME is not set; pass --identity FILE"))?;
    Ok(PathBuf::from(home).join(".config/openic/identity.pem"))
}

/// Loads the PEM identity at `path`, creating a new Ed25519 identity there if the file is missing.
fn load_or_create_identity(path: &Path) -> Result<BasicIdentity> {
    if !path.exists() {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let key = ic_ed25519::PrivateKey::generate();
        let pem = key.serialize_pkcs8_pem(ic_ed25519::PrivateKeyFormat::Pkcs8v2);
        std::fs::write(path, pem)
            .with_context(|| format!("writing identity {}", path.display()))?;
        eprintln!("created a new identity in {}", path.display());
    }
    BasicIdentity::from_pem_file(path).map_err(|e| {
        anyhow!(
            "cannot read identity {}: {e}. Is it an Ed25519 PEM file?",
            path.display()
        )
    })
}

async fn agent(connection: &Connection) -> Result<Agent> {
    let identity_path = match &connection.identity {
        Some(path) => path.clone(),
        None => default_identity_path()?,
    };
    let identity = load_or_create_identity(&identity_path)?;
    let agent = Agent::builder()
        .with_url(connection.url.as_str())
        .with_identity(identity)
        .build()
        .with_context(|| format!("invalid network URL {}", connection.url))?;
    agent.fetch_root_key().await.with_context(|| {
        format!(
            "cannot reach an openic network at {}. Start one with `openic start`, or pass --url.",
            connection.url
        )
    })?;
    Ok(agent)
}

fn parse_canister(text: &str) -> Result<Principal> {
    Principal::from_text(text).map_err(|e| anyhow!("`{text}` is not a canister id: {e}"))
}

fn encode_args(args: Option<&str>) -> Result<Vec<u8>> {
    let text = args.unwrap_or("()");
    let parsed = candid_parser::parse_idl_args(text)
        .map_err(|e| anyhow!("invalid Candid arguments `{text}`: {e}"))?;
    parsed
        .to_bytes()
        .map_err(|e| anyhow!("cannot encode Candid arguments `{text}`: {e}"))
}

/// Decoding work allowed when printing a reply: a hostile canister's reply must not hang the CLI.
const REPLY_DECODING_QUOTA: usize = 10_000_000;

fn print_reply(bytes: &[u8]) {
    let mut config = candid::de::DecoderConfig::new();
    config
        .set_decoding_quota(REPLY_DECODING_QUOTA)
        .set_skipping_quota(REPLY_DECODING_QUOTA);
    match candid::IDLArgs::from_bytes_with_config(bytes, &config) {
        Ok(args) => println!("{args}"),
        Err(_) => println!("0x{}", hex::encode(bytes)),
    }
}

async fn deploy(
    connection: &Connection,
    wasm_path: &Path,
    arg: Option<&str>,
    canister: Option<&str>,
    mode: Option<&str>,
) -> Result<()> {
    let wasm =
        std::fs::read(wasm_path).with_context(|| format!("reading {}", wasm_path.display()))?;
    let arg = encode_args(arg)?;
    let agent = agent(connection).await?;
    let management = ManagementCanister::create(&agent);
    let (canister_id, default_mode) = match canister {
        Some(text) => (parse_canister(text)?, InstallMode::Upgrade(None)),
        None => {
            let (id,) = management
                .create_canister()
                .as_provisional_create_with_amount(None)
                .call_and_wait()
                .await
                .context("creating a canister")?;
            eprintln!("created canister {id}");
            (id, InstallMode::Install)
        }
    };
    let mode = match mode {
        None => default_mode,
        Some("install") => InstallMode::Install,
        Some("reinstall") => InstallMode::Reinstall,
        Some("upgrade") => InstallMode::Upgrade(None),
        Some(other) => bail!("unknown install mode `{other}`; use install, reinstall or upgrade"),
    };
    management
        .install(&canister_id, &wasm)
        .with_mode(mode)
        .with_raw_arg(arg)
        .await
        .with_context(|| format!("installing {} into {canister_id}", wasm_path.display()))?;
    println!("{canister_id}");
    Ok(())
}

async fn call(
    connection: &Connection,
    canister: &str,
    method: &str,
    args: Option<&str>,
    query: bool,
) -> Result<()> {
    let canister_id = parse_canister(canister)?;
    let arg = encode_args(args)?;
    let agent = agent(connection).await?;
    let reply = if query {
        agent.query(&canister_id, method).with_arg(arg).call().await
    } else {
        agent
            .update(&canister_id, method)
            .with_arg(arg)
            .call_and_wait()
            .await
    }
    .with_context(|| format!("calling {canister_id}.{method}"))?;
    print_reply(&reply);
    Ok(())
}

/// One log record as `openic logs` prints it: `[idx. RFC 3339 time]: content` (content as text,
/// bytes that are not UTF-8 replaced).
fn format_log_record(record: &CanisterLogRecord) -> String {
    let time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(record.timestamp_nanos))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{}ns", record.timestamp_nanos));
    format!(
        "[{}. {time}]: {}",
        record.idx,
        String::from_utf8_lossy(&record.content)
    )
}

async fn logs(
    connection: &Connection,
    canister: &str,
    follow: bool,
    interval_ms: u64,
) -> Result<()> {
    let canister_id = parse_canister(canister)?;
    let agent = agent(connection).await?;
    let management = ManagementCanister::create(&agent);
    // Without --follow one fetch of the newest records; with it, each later fetch asks only for
    // records after the last one printed (indexes only grow).
    let mut next_idx: Option<u64> = None;
    loop {
        let filter = next_idx.map(|start| CanisterLogFilter::ByIdx {
            start,
            end: u64::MAX,
        });
        let (result,) = management
            .fetch_canister_logs(&FetchCanisterLogsArgs {
                canister_id,
                filter,
            })
            .call()
            .await
            .with_context(|| format!("fetching the logs of {canister_id}"))?;
        for record in &result.canister_log_records {
            println!("{}", format_log_record(record));
        }
        if let Some(last) = result.canister_log_records.last() {
            next_idx = Some(last.idx.saturating_add(1));
        } else if next_idx.is_none() {
            next_idx = Some(0);
        }
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(interval_ms)).await;
    }
}

async fn status(connection: &Connection) -> Result<()> {
    let agent = Agent::builder()
        .with_url(connection.url.as_str())
        .build()
        .with_context(|| format!("invalid network URL {}", connection.url))?;
    let status = agent.status().await.with_context(|| {
        format!(
            "cannot reach an openic network at {}. Start one with `openic start`.",
            connection.url
        )
    })?;
    println!("url: {}", connection.url);
    println!(
        "health: {}",
        status.replica_health_status.as_deref().unwrap_or("unknown")
    );
    if let Some(version) = &status.impl_version {
        println!("version: {version}");
    }
    if let Some(root_key) = &status.root_key {
        println!("root_key: {}", hex::encode(root_key));
    }
    if let Some(ic_agent::agent::status::Value::Integer(height)) =
        status.values.get("certified_height").map(|v| &**v)
    {
        println!("certified_height: {height}");
    }
    Ok(())
}
