//! Support code for the end-to-end tests (`tests/tests/e2e.rs`) and the replica benchmark.
//!
//! Only the standard library is used here, so the benchmark and the tests share one small toolbox:
//! - [`test_canister_wasm`] builds the test canisters in `tests/canisters/` (a separate cargo workspace for
//!   `wasm32-unknown-unknown`) at most once per process, serialised across processes by a file lock;
//! - [`OpenicProcess`] runs the real `openic` binary (`openic start`, one node or a local subnet), waits for
//!   its `url:`/`root_key:` lines and kills it with SIGKILL or SIGTERM;
//! - [`SubnetProcesses`] makes a subnet with the CLI (`openic identity`, `openic genesis`) and runs each
//!   member as its own `openic replica` process ([`ReplicaProcess`]), to be killed and restarted one by one;
//! - [`js_dir`], [`ensure_js_dependencies`] and [`require_node`] prepare the JS and Motoko tests, which fail
//!   (never skip) when Node.js is missing.
//!
//! Invariants: every helper that waits has a named deadline and fails with a message saying what it waited
//! for and what to do, so a broken node makes a test fail quickly and readably instead of hanging. Processes
//! are only ever signalled by the pid of a process the test started (or a child of one), never by name, and
//! every process a helper started is killed when the helper is dropped; a helper dropped while its test
//! panics prints the processes' captured output.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

#[path = "../canisters/large/pseudo_random.rs"]
mod pseudo_random;

pub use pseudo_random::{LARGE_DATA_BYTES, checksum as large_data_checksum_of, large_data};

// The `large` canister exists to exceed the 2 MiB ingress limit (see `LARGE_DATA_BYTES`).
const _: () = assert!(LARGE_DATA_BYTES > 2 * 1024 * 1024);

/// The names of the canisters in `tests/canisters/` (each builds to `<name>.wasm`).
pub const TEST_CANISTERS: [&str; 4] = ["counter", "caller", "timer", "large"];

/// How long an `openic` process may take to print its `url:` and `root_key:` lines.
pub const PROCESS_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an `openic` process may take to exit after SIGTERM (it finishes a block and writes a checkpoint).
pub const PROCESS_TERMINATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the members of a new subnet may take to generate the subnet key together and serve HTTP (all of
/// them start at once and share a possibly busy machine).
pub const SUBNET_READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long `openic start --replicas N` may take to exit after SIGTERM (its N replicas each write a
/// checkpoint, at the same time).
pub const SUBNET_TERMINATE_TIMEOUT: Duration = Duration::from_secs(90);
/// At most this much of a child's output is kept for failure messages (the newest part is kept).
pub const CHILD_OUTPUT_BYTES_MAX: usize = 64 * 1024;

/// The `tests/` directory of the repository.
pub fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `tests/canisters/` cargo workspace.
pub fn canisters_dir() -> PathBuf {
    tests_dir().join("canisters")
}

/// The `tests/js/` npm package (JS agent and Motoko tests).
pub fn js_dir() -> PathBuf {
    tests_dir().join("js")
}

/// The cargo that runs this test (so the toolchain pinned in rust-toolchain.toml also builds the canisters).
fn cargo_command() -> Command {
    let cargo = std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .unwrap_or_else(|| "cargo".into());
    Command::new(cargo)
}

/// The bytes of the test canister `name` (one of [`TEST_CANISTERS`]), built in release mode for
/// `wasm32-unknown-unknown`.
///
/// The first call in a process runs
/// `cargo build --release --locked --target wasm32-unknown-unknown --manifest-path tests/canisters/Cargo.toml`
/// (a no-op when nothing changed) while holding an exclusive lock on `tests/canisters/target/.build-lock`,
/// so parallel test binaries neither race nor repeat the work. Later calls only read the file.
///
/// # Panics
/// If the build fails (the message includes cargo's output) or `name` is not a test canister.
pub fn test_canister_wasm(name: &str) -> Vec<u8> {
    assert!(
        TEST_CANISTERS.contains(&name),
        "{name:?} is not a test canister; the canisters in tests/canisters are {TEST_CANISTERS:?}"
    );
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let wasm_dir = match BUILT.get_or_init(build_test_canisters) {
        Ok(dir) => dir,
        Err(message) => panic!("{message}"),
    };
    let path = wasm_dir.join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

fn build_test_canisters() -> Result<PathBuf, String> {
    let canisters = canisters_dir();
    let target_dir = canisters.join("target");
    std::fs::create_dir_all(&target_dir)
        .map_err(|error| format!("cannot create {}: {error}", target_dir.display()))?;
    let lock_path = target_dir.join(".build-lock");
    let lock_file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|error| {
            format!(
                "cannot open the build lock {}: {error}",
                lock_path.display()
            )
        })?;
    lock_file
        .lock()
        .map_err(|error| format!("cannot lock {}: {error}", lock_path.display()))?;
    let started = Instant::now();
    let output = cargo_command()
        .current_dir(&canisters)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-unknown-unknown",
            "--manifest-path",
        ])
        .arg(canisters.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // Flags meant for the host build (coverage, target-cpu=native, ...) must not leak into the wasm build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .map_err(|error| format!("cannot run cargo to build the test canisters: {error}"))?;
    // Unlocking happens when `lock_file` is dropped, after the build has finished writing.
    drop(lock_file);
    if !output.status.success() {
        return Err(format!(
            "building the test canisters failed ({}); run `cargo build --release --target wasm32-unknown-unknown \
             --manifest-path tests/canisters/Cargo.toml` to see why.\n--- cargo stderr ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let elapsed = started.elapsed();
    if elapsed > Duration::from_secs(5) {
        eprintln!("built the test canisters in {:.1} s", elapsed.as_secs_f64());
    }
    Ok(target_dir.join("wasm32-unknown-unknown").join("release"))
}

/// The checksum the `large` canister's `checksum` query must return (recomputed from the shared generator).
pub fn large_data_checksum() -> u64 {
    large_data_checksum_of(&large_data(LARGE_DATA_BYTES))
}

/// The `openic` binary: `$OPENIC_BIN`, or `openic` in the target directory of this test executable
/// (`target/debug/deps/e2e-… -> target/debug/openic`).
///
/// # Panics
/// If the binary does not exist; the message says how to build it.
pub fn openic_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("OPENIC_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "OPENIC_BIN={} is not a file",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().expect("the test executable's path is readable");
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile_dir| profile_dir.join(format!("openic{}", std::env::consts::EXE_SUFFIX)));
    match candidate {
        Some(path) if path.is_file() => path,
        _ => panic!(
            "the openic binary was not found next to {} (expected target/<profile>/openic). \
             Build it first with `cargo build -p openic` (scripts/test does), or point OPENIC_BIN at it.",
            exe.display()
        ),
    }
}

/// Output of a child process, kept for failure messages (bounded by [`CHILD_OUTPUT_BYTES_MAX`]).
#[derive(Clone, Default)]
pub struct CapturedOutput(Arc<Mutex<String>>);

impl CapturedOutput {
    fn push_line(&self, line: &str) {
        let mut text = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        text.push_str(line);
        text.push('\n');
        if text.len() > CHILD_OUTPUT_BYTES_MAX {
            let mut cut = text.len() - CHILD_OUTPUT_BYTES_MAX;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            text.replace_range(..cut, "");
        }
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Reads `stream` line by line into this buffer on a background thread, forwarding each line to `lines`.
    fn drain<R: Read + Send + 'static>(&self, stream: R, lines: Option<mpsc::Sender<String>>) {
        let captured = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                captured.push_line(&line);
                if let Some(sender) = &lines {
                    // The receiver goes away once the ready lines were seen; later lines are only captured.
                    let _ = sender.send(line);
                }
            }
        });
    }
}

/// The lines an `openic` process prints once it serves HTTP: one `url:` per node, then `root_key:`.
struct ReadyLines {
    urls: Vec<String>,
    root_key_der: Vec<u8>,
}

/// Spawns `openic <arguments>` with its stdout and stderr captured into `output`; returns the child and a
/// channel of its stdout lines.
fn spawn_openic(
    arguments: &[OsString],
    output: &CapturedOutput,
) -> (Child, mpsc::Receiver<String>) {
    let binary = openic_binary();
    let mut child = Command::new(&binary)
        .args(arguments)
        // Plain log lines: the captured output is read by people and, in a few tests, searched.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()));
    let (line_sender, line_receiver) = mpsc::channel();
    output.drain(
        child.stdout.take().expect("stdout is piped"),
        Some(line_sender),
    );
    output.drain(child.stderr.take().expect("stderr is piped"), None);
    (child, line_receiver)
}

/// Reads `lines` until the `root_key:` line (collecting the `url:` lines before it) and checks that
/// `url_count` URLs came. On a timeout, an early exit or a wrong count, kills `child` (and its children) and
/// panics with `what` and the captured output.
fn wait_for_ready_lines(
    child: &mut Child,
    lines: &mpsc::Receiver<String>,
    output: &CapturedOutput,
    url_count: usize,
    timeout: Duration,
    what: &str,
) -> ReadyLines {
    let deadline = Instant::now() + timeout;
    let mut urls = Vec::new();
    let root_key_der = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(remaining) {
            Ok(line) => {
                if let Some(value) = line.strip_prefix("url: ") {
                    urls.push(value.trim().to_string());
                } else if let Some(value) = line.strip_prefix("root_key: ") {
                    match decode_hex(value.trim()) {
                        Ok(decoded) => break decoded,
                        Err(error) => {
                            kill_with_children(child);
                            panic!(
                                "{what} printed a bad root_key line {line:?}: {error}\n--- output ---\n{}",
                                output.text()
                            );
                        }
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                kill_with_children(child);
                panic!(
                    "{what} did not print `url:` and `root_key:` within {timeout:?}.\n--- output ---\n{}",
                    output.text()
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait();
                // Give the stderr thread a moment to capture the last lines.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "{what} exited ({status:?}) before it was ready.\n--- output ---\n{}",
                    output.text()
                );
            }
        }
    };
    if urls.len() != url_count {
        kill_with_children(child);
        panic!(
            "{what} printed {} `url:` lines before its root key, expected {url_count}: {urls:?}\n--- output ---\n{}",
            urls.len(),
            output.text()
        );
    }
    ReadyLines { urls, root_key_der }
}

/// Sends `signal` (a name such as `TERM`) to the process `pid`.
///
/// # Panics
/// If the `kill` utility cannot run or fails (the process does not exist).
fn send_signal(pid: u32, signal: &str) {
    // std has no way to send SIGTERM; the `kill` utility is part of every POSIX system.
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap_or_else(|error| panic!("running `kill -{signal} {pid}`: {error}"));
    assert!(status.success(), "`kill -{signal} {pid}` failed: {status}");
}

/// The ids of the live child processes of `pid` (from `/proc`; empty where there is no `/proc`).
pub fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children = Vec::new();
    for entry in entries.flatten() {
        let Some(candidate) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        else {
            continue;
        };
        if let Some((state, parent)) = process_state_and_parent(candidate)
            && parent == pid
            && state != 'Z'
        {
            children.push(candidate);
        }
    }
    children.sort_unstable();
    children
}

/// Whether the process `pid` exists and has not exited (a zombie counts as exited).
pub fn is_process_alive(pid: u32) -> bool {
    process_state_and_parent(pid).is_some_and(|(state, _)| state != 'Z')
}

/// The state letter and parent pid of a process, from `/proc/<pid>/stat`.
fn process_state_and_parent(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (command) state ppid ...`; the command may contain spaces and parentheses.
    let after_command = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_command.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

/// Kills `child` with SIGKILL and reaps it, then SIGKILLs its own children (an `openic start --replicas N`
/// process has N `openic replica` children, which would otherwise outlive it). Errors are ignored: this is
/// clean-up.
fn kill_with_children(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let children = child_pids(child.id());
    let _ = child.kill();
    let _ = child.wait();
    for pid in children {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// Sends SIGTERM to `child` and waits up to `timeout` for it to exit; kills it (and its children) and panics
/// with `what` and the captured output if it does not.
fn terminate_child(
    child: &mut Child,
    output: &CapturedOutput,
    timeout: Duration,
    what: &str,
) -> ExitStatus {
    send_signal(child.id(), "TERM");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(exit) = child
            .try_wait()
            .unwrap_or_else(|error| panic!("polling {what}: {error}"))
        {
            return exit;
        }
        if Instant::now() > deadline {
            kill_with_children(child);
            panic!(
                "{what} did not exit within {timeout:?} of SIGTERM.\n--- output ---\n{}",
                output.text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running `openic start` process (one node, or a local subnet of `openic replica` children). Dropping it
/// kills the process and its children (SIGKILL).
pub struct OpenicProcess {
    child: Child,
    urls: Vec<String>,
    root_key_der: Vec<u8>,
    output: CapturedOutput,
    terminate_timeout: Duration,
}

impl OpenicProcess {
    /// Starts `openic start --state-dir <state_dir> --port 0` and waits (up to [`PROCESS_READY_TIMEOUT`]) until
    /// it has printed `url: …` and `root_key: <hex>`.
    ///
    /// # Panics
    /// If the binary cannot be started, exits early, or does not become ready in time; the message includes
    /// the process's output.
    pub fn start(state_dir: &Path) -> OpenicProcess {
        OpenicProcess::start_with(state_dir, &[])
    }

    /// As [`OpenicProcess::start`], with `extra` arguments after `openic start`'s own.
    ///
    /// # Panics
    /// As [`OpenicProcess::start`].
    pub fn start_with(state_dir: &Path, extra: &[&str]) -> OpenicProcess {
        let mut arguments: Vec<OsString> = vec![
            "start".into(),
            "--state-dir".into(),
            state_dir.into(),
            "--port".into(),
            "0".into(),
        ];
        arguments.extend(extra.iter().map(OsString::from));
        OpenicProcess::launch(
            &arguments,
            1,
            PROCESS_READY_TIMEOUT,
            PROCESS_TERMINATE_TIMEOUT,
        )
    }

    /// Starts a local subnet, `openic start --replicas <replicas> --state-dir <state_dir> --port 0
    /// --p2p-port <p2p_port>` (p2p ports `p2p_port..p2p_port + replicas` must be free, see
    /// [`free_loopback_ports`]), and waits (up to [`SUBNET_READY_TIMEOUT`]) until it has printed one `url:`
    /// line per replica and then `root_key:`.
    ///
    /// # Panics
    /// As [`OpenicProcess::start`]; also if the number of `url:` lines is not `replicas`.
    pub fn start_subnet(state_dir: &Path, replicas: u16, p2p_port: u16) -> OpenicProcess {
        let arguments = [
            "start".into(),
            "--state-dir".into(),
            state_dir.into(),
            "--port".into(),
            "0".into(),
            "--replicas".into(),
            replicas.to_string().into(),
            "--p2p-port".into(),
            p2p_port.to_string().into(),
        ];
        OpenicProcess::launch(
            &arguments,
            usize::from(replicas),
            SUBNET_READY_TIMEOUT,
            SUBNET_TERMINATE_TIMEOUT,
        )
    }

    fn launch(
        arguments: &[OsString],
        url_count: usize,
        ready_timeout: Duration,
        terminate_timeout: Duration,
    ) -> OpenicProcess {
        let output = CapturedOutput::default();
        let (mut child, lines) = spawn_openic(arguments, &output);
        let ready = wait_for_ready_lines(
            &mut child,
            &lines,
            &output,
            url_count,
            ready_timeout,
            "openic start",
        );
        OpenicProcess {
            child,
            urls: ready.urls,
            root_key_der: ready.root_key_der,
            output,
            terminate_timeout,
        }
    }

    /// The URL the process printed (the first replica's, for a subnet).
    pub fn url(&self) -> &str {
        &self.urls[0]
    }

    /// Every URL the process printed, one per replica.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The root key (DER) the process printed.
    pub fn root_key_der(&self) -> &[u8] {
        &self.root_key_der
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The ids of the process's live children (the replicas of a local subnet).
    pub fn child_pids(&self) -> Vec<u32> {
        child_pids(self.child.id())
    }

    /// Everything the process printed so far (for failure messages).
    pub fn output(&self) -> String {
        self.output.text()
    }

    /// Kills the process with SIGKILL (no chance to clean up) and waits for it to be gone; its children (if
    /// any) are killed too.
    pub fn kill(mut self) {
        kill_with_children(&mut self.child);
    }

    /// Kills only this process with SIGKILL, not its children (they are expected to notice and
    /// stop by themselves), and waits for it to be gone.
    pub fn kill_parent_only(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to [`PROCESS_TERMINATE_TIMEOUT`] ([`SUBNET_TERMINATE_TIMEOUT`] for a
    /// subnet) for the process to exit.
    ///
    /// # Panics
    /// If the signal cannot be sent or the process does not exit in time (it is then killed).
    pub fn terminate(mut self) -> ExitStatus {
        let timeout = self.terminate_timeout;
        terminate_child(&mut self.child, &self.output, timeout, "openic start")
    }
}

impl Drop for OpenicProcess {
    fn drop(&mut self) {
        kill_with_children(&mut self.child);
        if std::thread::panicking() {
            eprintln!(
                "--- output of openic start (pid {}) ---\n{}",
                self.child.id(),
                self.output.text()
            );
        }
    }
}

/// Finds `count` consecutive loopback ports that are free now, below Linux's default ephemeral range
/// (32768–60999) so no outgoing connection takes one of them while a test runs, and returns the first.
/// Ports are picked at random, so tests running in parallel rarely try the same ones.
///
/// # Panics
/// If no such ports are found after many attempts.
pub fn free_loopback_ports(count: u16) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    const FIRST: u16 = 20_000;
    const LAST: u16 = 32_000;
    const ATTEMPTS: usize = 500;
    let count = count.max(1);
    for attempt in 0..ATTEMPTS {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_usize(attempt);
        let span = u64::from(LAST - FIRST - count);
        let base = FIRST + (hasher.finish() % span) as u16;
        // Hold every port of the range at once, then release them all.
        let listeners: Result<Vec<_>, _> = (base..base + count)
            .map(|port| std::net::TcpListener::bind(("127.0.0.1", port)))
            .collect();
        if listeners.is_ok() {
            return base;
        }
    }
    panic!(
        "found no {count} consecutive free loopback ports in {FIRST}..{LAST} after {ATTEMPTS} attempts"
    );
}

/// The files one member of a subnet runs from (all kept across restarts).
#[derive(Clone, Debug)]
pub struct ReplicaFiles {
    /// The member's identity (`openic identity`).
    pub identity: PathBuf,
    /// The subnet's genesis file (`openic genesis`).
    pub genesis: PathBuf,
    /// The replica's state directory (key share, blocks, checkpoints).
    pub state_dir: PathBuf,
}

impl ReplicaFiles {
    fn arguments(&self) -> Vec<OsString> {
        vec![
            "replica".into(),
            "--identity".into(),
            self.identity.clone().into(),
            "--genesis".into(),
            self.genesis.clone().into(),
            "--state-dir".into(),
            self.state_dir.clone().into(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--port".into(),
            "0".into(),
        ]
    }
}

/// An `openic replica` process that was started and may not serve yet (at genesis it waits for every other
/// member). Dropping it kills the process.
pub struct StartingReplica {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    output: CapturedOutput,
}

impl StartingReplica {
    /// Waits up to `timeout` until the replica printed `url:` and `root_key:`.
    ///
    /// # Panics
    /// If it exits early or is not ready in time (it is then killed); the message includes its output.
    pub fn wait_ready(mut self, timeout: Duration) -> ReplicaProcess {
        let mut child = self.child.take().expect("taken only here");
        let ready = wait_for_ready_lines(
            &mut child,
            &self.lines,
            &self.output,
            1,
            timeout,
            "openic replica",
        );
        let url = ready.urls.into_iter().next().expect("one url");
        ReplicaProcess {
            child,
            url,
            root_key_der: ready.root_key_der,
            output: self.output.clone(),
        }
    }
}

impl Drop for StartingReplica {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            kill_with_children(child);
        }
    }
}

/// A running `openic replica` process (HTTP on a free loopback port). Dropping it kills it (SIGKILL).
pub struct ReplicaProcess {
    child: Child,
    url: String,
    root_key_der: Vec<u8>,
    output: CapturedOutput,
}

impl ReplicaProcess {
    /// Starts `openic replica` from `files` without waiting for it to serve; its output goes to `output`
    /// (pass the same buffer across restarts to keep one log per member).
    ///
    /// # Panics
    /// If the binary cannot be started.
    pub fn spawn(files: &ReplicaFiles, output: &CapturedOutput) -> StartingReplica {
        let (child, lines) = spawn_openic(&files.arguments(), output);
        StartingReplica {
            child: Some(child),
            lines,
            output: output.clone(),
        }
    }

    /// Starts `openic replica` from `files` and waits (up to [`PROCESS_READY_TIMEOUT`]) until it serves. Only
    /// for a member that already holds its key share (at genesis every member must start at once: use
    /// [`ReplicaProcess::spawn`] for each, then [`StartingReplica::wait_ready`]).
    ///
    /// # Panics
    /// As [`StartingReplica::wait_ready`].
    pub fn start(files: &ReplicaFiles, output: &CapturedOutput) -> ReplicaProcess {
        ReplicaProcess::spawn(files, output).wait_ready(PROCESS_READY_TIMEOUT)
    }

    /// The URL the replica printed.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The root key (DER) the replica printed.
    pub fn root_key_der(&self) -> &[u8] {
        &self.root_key_der
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the replica printed so far (for failure messages).
    pub fn output(&self) -> String {
        self.output.text()
    }

    /// Kills the replica with SIGKILL (a crash: no checkpoint, nothing flushed) and waits for it to be gone.
    pub fn kill(mut self) {
        kill_with_children(&mut self.child);
    }

    /// Sends SIGTERM and waits up to [`PROCESS_TERMINATE_TIMEOUT`] for the replica to exit.
    ///
    /// # Panics
    /// If the signal cannot be sent or the replica does not exit in time (it is then killed).
    pub fn terminate(mut self) -> ExitStatus {
        terminate_child(
            &mut self.child,
            &self.output,
            PROCESS_TERMINATE_TIMEOUT,
            "openic replica",
        )
    }
}

impl Drop for ReplicaProcess {
    fn drop(&mut self) {
        kill_with_children(&mut self.child);
    }
}

/// A subnet of `openic replica` processes on loopback, made with the CLI: `openic identity` for each member
/// and `openic genesis` for the genesis file, in a directory the caller owns. Members are numbered from 0 and
/// can be killed, terminated and restarted one by one (with the same identity, genesis and state directory).
/// Dropping it kills every running replica, and prints every member's log if the test is panicking.
pub struct SubnetProcesses {
    files: Vec<ReplicaFiles>,
    replicas: Vec<Option<ReplicaProcess>>,
    outputs: Vec<CapturedOutput>,
    root_key_der: Vec<u8>,
}

impl SubnetProcesses {
    /// Creates a subnet of `count` members in `dir` (`dir/replica-<i>/node.key`, `dir/genesis.json`,
    /// `dir/replica-<i>/state`; p2p on free loopback ports), starts every member at once and waits (up to
    /// [`SUBNET_READY_TIMEOUT`]) until all generated the subnet key and serve HTTP.
    ///
    /// # Panics
    /// If a CLI step fails, a replica does not become ready, or the replicas report different root keys.
    pub fn start(dir: &Path, count: u16) -> SubnetProcesses {
        Self::start_with_catch_up_interval(dir, count, None)
    }

    /// [`SubnetProcesses::start`] with the genesis file's catch-up interval (heights between the
    /// checkpoints the subnet signs for state sync) set, or the default for `None`.
    pub fn start_with_catch_up_interval(
        dir: &Path,
        count: u16,
        catch_up_interval: Option<u64>,
    ) -> SubnetProcesses {
        let genesis = dir.join("genesis.json");
        let p2p_base = free_loopback_ports(count);
        let mut files = Vec::new();
        let mut genesis_arguments: Vec<OsString> = vec!["genesis".into()];
        for index in 0..count {
            let member_dir = dir.join(format!("replica-{index}"));
            std::fs::create_dir_all(&member_dir)
                .unwrap_or_else(|error| panic!("cannot create {}: {error}", member_dir.display()));
            let identity = member_dir.join("node.key");
            let printed = run_openic(&[
                "identity".into(),
                "--identity".into(),
                identity.clone().into(),
            ]);
            let public_key = printed
                .lines()
                .find_map(|line| line.strip_prefix("public_key: "))
                .unwrap_or_else(|| {
                    panic!("`openic identity` printed no public_key line:\n{printed}")
                })
                .trim()
                .to_string();
            genesis_arguments.push("--member".into());
            genesis_arguments.push(
                format!(
                    "replica-{index}={public_key}@127.0.0.1:{}",
                    p2p_base + index
                )
                .into(),
            );
            files.push(ReplicaFiles {
                identity,
                genesis: genesis.clone(),
                state_dir: member_dir.join("state"),
            });
        }
        genesis_arguments.push("--out".into());
        genesis_arguments.push(genesis.clone().into());
        if let Some(interval) = catch_up_interval {
            genesis_arguments.push("--catch-up-interval".into());
            genesis_arguments.push(interval.to_string().into());
        }
        run_openic(&genesis_arguments);

        let outputs: Vec<CapturedOutput> =
            files.iter().map(|_| CapturedOutput::default()).collect();
        // Every member must run for the key generation at genesis: start them all, then wait for each.
        let starting: Vec<StartingReplica> = files
            .iter()
            .zip(&outputs)
            .map(|(files, output)| ReplicaProcess::spawn(files, output))
            .collect();
        // Built before waiting, so a member that fails to start gets every member's log printed on drop.
        let mut subnet = SubnetProcesses {
            replicas: files.iter().map(|_| None).collect(),
            files,
            outputs,
            root_key_der: Vec::new(),
        };
        for (index, replica) in starting.into_iter().enumerate() {
            subnet.replicas[index] = Some(replica.wait_ready(SUBNET_READY_TIMEOUT));
        }
        subnet.root_key_der = subnet.replica(0).root_key_der().to_vec();
        for index in 1..subnet.replica_count() {
            assert_eq!(
                subnet.replica(index).root_key_der(),
                subnet.root_key_der,
                "replica {index} reports another root key than replica 0"
            );
        }
        subnet
    }

    /// How many members the subnet has.
    pub fn replica_count(&self) -> usize {
        self.files.len()
    }

    /// The subnet's root key (DER), as every member printed it.
    pub fn root_key_der(&self) -> &[u8] {
        &self.root_key_der
    }

    /// The files member `index` runs from.
    pub fn files(&self, index: usize) -> &ReplicaFiles {
        &self.files[index]
    }

    /// Whether member `index` runs.
    pub fn is_running(&self, index: usize) -> bool {
        self.replicas[index].is_some()
    }

    /// The indices of the running members.
    pub fn running(&self) -> Vec<usize> {
        (0..self.replica_count())
            .filter(|index| self.is_running(*index))
            .collect()
    }

    /// Member `index`'s process.
    ///
    /// # Panics
    /// If it does not run.
    pub fn replica(&self, index: usize) -> &ReplicaProcess {
        self.replicas[index]
            .as_ref()
            .unwrap_or_else(|| panic!("replica {index} does not run"))
    }

    /// Member `index`'s URL (it changes with each restart: HTTP binds any free port).
    ///
    /// # Panics
    /// If it does not run.
    pub fn url(&self, index: usize) -> &str {
        self.replica(index).url()
    }

    /// Everything member `index` printed, over all its runs.
    pub fn output(&self, index: usize) -> String {
        self.outputs[index].text()
    }

    /// Every member's output, for failure messages.
    pub fn all_output(&self) -> String {
        let mut text = String::new();
        for (index, output) in self.outputs.iter().enumerate() {
            text.push_str(&format!("--- replica {index} ---\n{}", output.text()));
        }
        text
    }

    /// Kills member `index` with SIGKILL (a crash) and waits for it to be gone.
    ///
    /// # Panics
    /// If it does not run.
    pub fn kill(&mut self, index: usize) {
        let replica = self.replicas[index]
            .take()
            .unwrap_or_else(|| panic!("replica {index} does not run"));
        replica.kill();
        self.outputs[index].push_line("--- killed (SIGKILL) by the test ---");
    }

    /// Stops member `index` with SIGTERM and returns its exit status.
    ///
    /// # Panics
    /// If it does not run or does not exit in time.
    pub fn terminate(&mut self, index: usize) -> ExitStatus {
        let replica = self.replicas[index]
            .take()
            .unwrap_or_else(|| panic!("replica {index} does not run"));
        let exit = replica.terminate();
        self.outputs[index].push_line(&format!("--- terminated (SIGTERM) by the test: {exit} ---"));
        exit
    }

    /// Starts member `index` again from its identity, genesis and state directory, waits until it serves and
    /// checks that it reports the subnet's root key.
    ///
    /// # Panics
    /// If it runs already, does not become ready, or reports another root key.
    pub fn restart(&mut self, index: usize) {
        assert!(!self.is_running(index), "replica {index} runs already");
        self.outputs[index].push_line("--- restarted by the test ---");
        let replica = ReplicaProcess::start(&self.files[index], &self.outputs[index]);
        assert_eq!(
            replica.root_key_der(),
            self.root_key_der,
            "replica {index} reports another root key after its restart"
        );
        self.replicas[index] = Some(replica);
    }
}

impl Drop for SubnetProcesses {
    fn drop(&mut self) {
        for replica in &mut self.replicas {
            drop(replica.take());
        }
        if std::thread::panicking() {
            eprintln!("{}", self.all_output());
        }
    }
}

/// Runs `openic <arguments>` to completion and returns its stdout.
///
/// # Panics
/// If it cannot run or fails; the message includes its output.
pub fn run_openic(arguments: &[OsString]) -> String {
    let binary = openic_binary();
    let output = Command::new(&binary)
        .args(arguments)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", binary.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "`openic {arguments:?}` failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Lowercase or uppercase hex to bytes.
pub fn decode_hex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits ({})", text.len()));
    }
    (0..text.len())
        .step_by(2)
        .map(|index| {
            u8::from_str_radix(&text[index..index + 2], 16)
                .map_err(|error| format!("bad hex at offset {index}: {error}"))
        })
        .collect()
}

/// Checks that `node` (Node.js >= 20) is on PATH.
///
/// # Panics
/// If it is not: the JS and Motoko tests must fail, not skip, when their runtime is missing.
pub fn require_node() {
    let output = Command::new("node").arg("--version").output().unwrap_or_else(|error| {
        panic!(
            "Node.js is required for the JS and Motoko tests but `node --version` failed: {error}. \
             Install Node.js >= 20 with npm (e.g. `apt-get install nodejs npm`)."
        )
    });
    assert!(
        output.status.success(),
        "`node --version` failed: {}",
        output.status
    );
    let version = String::from_utf8_lossy(&output.stdout);
    let major: u32 = version
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 20,
        "Node.js >= 20 is required for the JS tests, found {}",
        version.trim()
    );
}

/// Runs `tests/js/install.sh` (`npm ci` from the lock file) once per process, under a file lock shared with
/// other test processes.
///
/// # Panics
/// If Node.js/npm is missing or the install fails (the message includes npm's output).
pub fn ensure_js_dependencies() {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        require_node();
        let js = js_dir();
        let lock_path = std::env::temp_dir().join("openic-tests-npm-ci.lock");
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|error| format!("cannot open {}: {error}", lock_path.display()))?;
        lock_file
            .lock()
            .map_err(|error| format!("cannot lock {}: {error}", lock_path.display()))?;
        // Another process may have installed it meanwhile; `npm ci` is cheap to skip when the lock is unchanged.
        let marker = js.join("node_modules").join(".package-lock.json");
        let lock = js.join("package-lock.json");
        let up_to_date = match (std::fs::metadata(&marker), std::fs::metadata(&lock)) {
            (Ok(installed), Ok(locked)) => match (installed.modified(), locked.modified()) {
                (Ok(installed), Ok(locked)) => installed >= locked,
                _ => false,
            },
            _ => false,
        };
        if up_to_date {
            return Ok(());
        }
        let output = Command::new("sh")
            .arg(js.join("install.sh"))
            .output()
            .map_err(|error| format!("cannot run tests/js/install.sh: {error}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "tests/js/install.sh failed ({}):\n{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    });
    if let Err(message) = result {
        panic!("{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_data_is_deterministic_and_has_the_promised_size() {
        let data = large_data(LARGE_DATA_BYTES);
        assert_eq!(data.len(), LARGE_DATA_BYTES);
        assert_eq!(data, large_data(LARGE_DATA_BYTES));
        // Not a constant fill: a compressor (or an optimiser) could otherwise shrink it.
        let distinct = data.iter().collect::<std::collections::BTreeSet<_>>().len();
        assert_eq!(distinct, 256);
    }

    #[test]
    fn checksum_is_fnv1a() {
        // FNV-1a 64 test vectors.
        assert_eq!(large_data_checksum_of(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(large_data_checksum_of(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(large_data_checksum_of(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn decode_hex_accepts_hex_and_rejects_garbage() {
        assert_eq!(decode_hex("00ff10Ab"), Ok(vec![0x00, 0xff, 0x10, 0xab]));
        assert!(decode_hex("abc").is_err());
        assert!(decode_hex("zz").is_err());
    }

    #[test]
    fn captured_output_keeps_only_the_newest_bytes() {
        let captured = CapturedOutput::default();
        for index in 0..10_000 {
            captured.push_line(&format!("line {index}"));
        }
        let text = captured.text();
        assert!(text.len() <= CHILD_OUTPUT_BYTES_MAX);
        assert!(text.ends_with("line 9999\n"));
    }

    #[test]
    fn test_canisters_build_and_are_wasm() {
        for name in TEST_CANISTERS {
            let wasm = test_canister_wasm(name);
            assert_eq!(&wasm[..4], b"\0asm", "{name}.wasm is not a wasm module");
        }
        assert!(test_canister_wasm("large").len() > 2 * 1024 * 1024);
    }
}

/// Figures the benchmarks (`tests/benches`) print: percentiles, durations, and a process's CPU
/// time and memory from `/proc`.
pub mod measure {
    use std::time::Duration;

    /// The `p` quantile (0.0 to 1.0) of `sorted`, which must not be empty.
    pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[index]
    }

    /// `d` in milliseconds, two decimals.
    pub fn ms(d: Duration) -> String {
        format!("{:.2} ms", d.as_secs_f64() * 1000.0)
    }

    /// `d` in whole microseconds.
    pub fn us(d: Duration) -> String {
        format!("{:.0} µs", d.as_secs_f64() * 1e6)
    }

    /// CPU time (user + system) a process has used so far: `pid`, or this process for `None`;
    /// zero once the process is gone. /proc reports it in USER_HZ ticks, which Linux fixes at 100
    /// per second for user space.
    pub fn cpu_time(pid: Option<u32>) -> Duration {
        let path = match pid {
            Some(pid) => format!("/proc/{pid}/stat"),
            None => "/proc/self/stat".to_string(),
        };
        let Ok(stat) = std::fs::read_to_string(path) else {
            return Duration::ZERO;
        };
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        Duration::from_millis(ticks * 10)
    }

    /// Resident set size of a process in kB, from /proc (`?` if unknown).
    pub fn rss_kb(pid: u32) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(|v| v.to_string()))
            })
            .unwrap_or_else(|| "?".into())
    }
}
