//! Support code for the end-to-end tests (`tests/tests/e2e.rs`) and the replica benchmark.
//!
//! Only the standard library is used here, so the benchmark and the tests share one small toolbox:
//! - [`test_canister_wasm`] builds the test canisters in `tests/canisters/` (a separate cargo workspace for
//!   `wasm32-unknown-unknown`) at most once per process, serialised across processes by a file lock;
//! - [`OpenicProcess`] runs the real `openic` binary, waits for its `url:`/`root_key:` lines and kills it
//!   with SIGKILL or SIGTERM;
//! - [`js_dir`], [`ensure_js_dependencies`] and [`require_node`] prepare the JS and Motoko tests, which fail
//!   (never skip) when Node.js is missing.
//!
//! Invariant: every helper that waits has a named deadline and fails with a message saying what it waited
//! for and what to do, so a broken node makes a test fail quickly and readably instead of hanging.

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

/// A running `openic start` process. Dropping it kills the process (SIGKILL).
pub struct OpenicProcess {
    child: Child,
    url: String,
    root_key_der: Vec<u8>,
    output: CapturedOutput,
}

impl OpenicProcess {
    /// Starts `openic start --state-dir <state_dir> --port 0` and waits (up to [`PROCESS_READY_TIMEOUT`]) until
    /// it has printed `url: …` and `root_key: <hex>`.
    ///
    /// # Panics
    /// If the binary cannot be started, exits early, or does not become ready in time; the message includes
    /// the process's output.
    pub fn start(state_dir: &Path) -> OpenicProcess {
        let binary = openic_binary();
        let mut child = Command::new(&binary)
            .arg("start")
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--port", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()));
        let output = CapturedOutput::default();
        let (line_sender, line_receiver) = mpsc::channel();
        output.drain(
            child.stdout.take().expect("stdout is piped"),
            Some(line_sender),
        );
        output.drain(child.stderr.take().expect("stderr is piped"), None);

        let deadline = Instant::now() + PROCESS_READY_TIMEOUT;
        let mut url = None;
        let mut root_key_der = None;
        while url.is_none() || root_key_der.is_none() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match line_receiver.recv_timeout(remaining) {
                Ok(line) => {
                    if let Some(value) = line.strip_prefix("url: ") {
                        url = Some(value.trim().to_string());
                    } else if let Some(value) = line.strip_prefix("root_key: ") {
                        let decoded = decode_hex(value.trim()).unwrap_or_else(|error| {
                            panic!("openic printed a bad root_key line {line:?}: {error}")
                        });
                        root_key_der = Some(decoded);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "openic did not print `url:` and `root_key:` within {PROCESS_READY_TIMEOUT:?}.\n--- output ---\n{}",
                        output.text()
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait();
                    // Give the stderr thread a moment to capture the last lines.
                    std::thread::sleep(Duration::from_millis(100));
                    panic!(
                        "openic exited ({status:?}) before it was ready.\n--- output ---\n{}",
                        output.text()
                    );
                }
            }
        }
        OpenicProcess {
            child,
            url: url.expect("loop ends only when set"),
            root_key_der: root_key_der.expect("loop ends only when set"),
            output,
        }
    }

    /// The URL the process printed.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The root key (DER) the process printed.
    pub fn root_key_der(&self) -> &[u8] {
        &self.root_key_der
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far (for failure messages).
    pub fn output(&self) -> String {
        self.output.text()
    }

    /// Kills the process with SIGKILL (no chance to clean up) and waits for it to be gone.
    pub fn kill(mut self) {
        self.child.kill().expect("sending SIGKILL to openic");
        self.child
            .wait()
            .expect("reaping the killed openic process");
    }

    /// Sends SIGTERM and waits up to [`PROCESS_TERMINATE_TIMEOUT`] for the process to exit.
    ///
    /// # Panics
    /// If the signal cannot be sent or the process does not exit in time (it is then killed).
    pub fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        // std has no way to send SIGTERM; the `kill` utility is part of every POSIX system.
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("running `kill -TERM`");
        assert!(status.success(), "`kill -TERM {pid}` failed: {status}");
        let deadline = Instant::now() + PROCESS_TERMINATE_TIMEOUT;
        loop {
            if let Some(exit) = self.child.try_wait().expect("polling the openic process") {
                return exit;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "openic did not exit within {PROCESS_TERMINATE_TIMEOUT:?} of SIGTERM.\n--- output ---\n{}",
                    self.output.text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for OpenicProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
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
