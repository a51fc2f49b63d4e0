//! The `openic` command. Parses arguments, builds configuration and hands over to `openic-node`
//! (for `start`) or to the official `ic-agent`/`ic-utils` clients (for `deploy`, `call`, `status`),
//! so what the CLI does is exactly what any IC client would do. No logic of the replica lives here.

use anyhow::{Context, Result, anyhow, bail};
use candid::Principal;
use clap::{Parser, Subcommand};
use ic_agent::Agent;
use ic_agent::identity::BasicIdentity;
use ic_utils::interfaces::ManagementCanister;
use ic_utils::interfaces::management_canister::builders::CanisterInstallMode as InstallMode;
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
            } => start(state_dir, SocketAddr::new(bind, port)).await,
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
            Command::Status { connection } => status(&connection).await,
        }
    })
}

async fn start(state_dir: PathBuf, listen_addr: SocketAddr) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OPENIC_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config = openic_node::NodeConfig::new(state_dir.clone());
    config.listen_addr = listen_addr;
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
