//! Long executions in slices (the IC's deterministic time slicing), on worker threads.
//!
//! Note [sliced executions]: a message may run up to the update instruction limit (tens of
//! billions of instructions, seconds of CPU). Run in one go it would hold the block, and every
//! other canister's messages with it. So a replicated execution runs on a worker thread and in
//! slices of a fixed number of instructions: the scheduler grants it slices, one per round, and
//! the worker stops (blocks) once it has run past what it was granted. Where the worker stops is
//! timing: it notices its position at wasmtime's epoch checks (function entries and loop
//! headers), which fire when a ticker thread advances the engine's epoch (every millisecond while
//! sliced executions run). What the scheduler sees is not timing: an execution that used `u`
//! instructions in all completes in slice `max(1, ceil(u / slice))` ([`completion_slice`]), and
//! [`SlicedExecution::wait`] for slice `k` answers "finished" exactly when that is at most `k`: it
//! waits until the worker either finished or ran past `k` slices (which proves `u > k * slice`).
//! So every replica applies the execution in the same round, whatever its threads did, and a
//! replica that restarts from a checkpoint taken mid-execution runs it again from its start
//! through the slices already granted and continues in step with the others. A worker may be
//! granted slices ahead of those the scheduler asks about (it runs them while the node does the
//! rest of a block), which changes when the answer is ready, never what it is.
//!
//! Handing an execution to another thread costs tens of microseconds on a virtual machine (the
//! wake-up crosses CPUs), more than a small update takes, so the scheduler first runs every
//! execution on its own thread within one slice, and starts it again on a worker only if it ran
//! out of instructions there (`Scheduler::execute_and_apply` in the execution crate).

use crate::api::{SlicedExecution, WasmExecutionOutput};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::Duration;

/// How often the ticker advances the engine's epoch while sliced executions run: how late a worker
/// notices that it ran past its grant.
const TICK: Duration = Duration::from_millis(1);

/// Idle worker threads kept for the next executions (more exit when they finish).
const MAX_IDLE_WORKERS: usize = 4;

/// Native stack of a worker thread: wasm runs on it (at most `max_wasm_stack_bytes`, checked at
/// engine construction to be below this) plus the host frames of the System API.
pub(crate) const WORKER_STACK_BYTES: usize = 8 * 1024 * 1024;

/// The slice in which an execution that used `instructions` in all completes (1-based): see Note
/// [sliced executions].
pub fn completion_slice(instructions: u64, slice_instructions: u64) -> u64 {
    instructions.div_ceil(slice_instructions.max(1)).max(1)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent; a panic elsewhere does not poison it.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the worker and the scheduler share about one sliced execution.
#[derive(Debug)]
pub(crate) struct SliceControl {
    slice_instructions: u64,
    inner: Mutex<SliceInner>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct SliceInner {
    /// Slices the execution may run through.
    granted: u64,
    /// Instructions used so far, as the worker last reported.
    consumed: u64,
    /// The scheduler let go of the execution: the worker stops at its next epoch check.
    aborted: bool,
    /// The result, once the worker finished, and the slice it completes in.
    finished: Option<(Option<WasmExecutionOutput>, u64)>,
}

impl SliceControl {
    pub(crate) fn new(slice_instructions: u64) -> Arc<Self> {
        Arc::new(SliceControl {
            slice_instructions: slice_instructions.max(1),
            inner: Mutex::new(SliceInner::default()),
            changed: Condvar::new(),
        })
    }

    /// Called by the worker at epoch checks with the instructions used so far: blocks while the
    /// execution is past its grant. `Err` once the scheduler let go of it.
    pub(crate) fn checkpoint(&self, consumed: u64) -> Result<(), Aborted> {
        let mut inner = lock(&self.inner);
        inner.consumed = consumed;
        self.changed.notify_all();
        while !inner.aborted && consumed > inner.granted.saturating_mul(self.slice_instructions) {
            inner = self.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
        if inner.aborted { Err(Aborted) } else { Ok(()) }
    }

    /// Called by the worker with the result.
    pub(crate) fn finish(&self, output: WasmExecutionOutput) {
        let slice = completion_slice(output.instructions_used, self.slice_instructions);
        let mut inner = lock(&self.inner);
        inner.finished = Some((Some(output), slice));
        self.changed.notify_all();
    }

    pub(crate) fn grant(&self, slices: u64) {
        let mut inner = lock(&self.inner);
        if slices > inner.granted {
            inner.granted = slices;
            self.changed.notify_all();
        }
    }

    fn wait(&self, slices: u64) -> Option<WasmExecutionOutput> {
        self.grant(slices);
        let mut inner = lock(&self.inner);
        loop {
            if let Some((output, completes_in)) = &mut inner.finished {
                return if *completes_in <= slices {
                    output.take()
                } else {
                    None
                };
            }
            if inner.consumed > slices.saturating_mul(self.slice_instructions) {
                return None;
            }
            inner = self.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn abort(&self) {
        lock(&self.inner).aborted = true;
        self.changed.notify_all();
    }
}

/// The scheduler let go of a sliced execution (see [`SliceControl::checkpoint`]).
#[derive(Debug)]
pub(crate) struct Aborted;

impl std::fmt::Display for Aborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the sliced execution was abandoned")
    }
}

impl std::error::Error for Aborted {}

/// The scheduler's handle on an execution running on a worker. Dropping it abandons the
/// execution (the worker stops at its next epoch check and discards it).
#[derive(Debug)]
pub(crate) struct WorkerExecution {
    pub(crate) control: Arc<SliceControl>,
}

impl SlicedExecution for WorkerExecution {
    fn grant(&mut self, slices: u64) {
        self.control.grant(slices);
    }

    fn wait(&mut self, slices: u64) -> Option<WasmExecutionOutput> {
        self.control.wait(slices)
    }
}

impl Drop for WorkerExecution {
    fn drop(&mut self) {
        self.control.abort();
    }
}

/// An execution that already ran to the end (embedders that do not run on workers): it still
/// completes in the slice its instruction count says.
#[derive(Debug)]
pub struct FinishedExecution {
    output: Option<WasmExecutionOutput>,
    completes_in: u64,
}

impl FinishedExecution {
    /// Wraps a finished execution's output.
    pub fn new(output: WasmExecutionOutput, slice_instructions: u64) -> Self {
        let completes_in = completion_slice(output.instructions_used, slice_instructions);
        FinishedExecution {
            output: Some(output),
            completes_in,
        }
    }
}

impl SlicedExecution for FinishedExecution {
    fn grant(&mut self, _slices: u64) {}

    fn wait(&mut self, slices: u64) -> Option<WasmExecutionOutput> {
        if self.completes_in <= slices {
            self.output.take()
        } else {
            None
        }
    }
}

pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// Worker threads for sliced executions: a thread is reused when one is idle and started when
/// none is (a paused execution keeps its thread).
pub(crate) struct Workers {
    sender: Mutex<mpsc::Sender<Job>>,
    receiver: Arc<Mutex<mpsc::Receiver<Job>>>,
    idle: Arc<AtomicUsize>,
}

impl Workers {
    pub(crate) fn new() -> Self {
        let (sender, receiver) = mpsc::channel();
        Workers {
            sender: Mutex::new(sender),
            receiver: Arc::new(Mutex::new(receiver)),
            idle: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Runs `job` on a worker. Fails, handing the job back, only if no thread can be started.
    pub(crate) fn run(&self, job: Job) -> Result<(), (Job, std::io::Error)> {
        let claimed = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if !claimed {
            let receiver = Arc::clone(&self.receiver);
            let idle = Arc::clone(&self.idle);
            #[allow(
                clippy::disallowed_methods,
                reason = "workers run sliced executions; what the scheduler learns from them does not depend on their timing (Note [sliced executions])"
            )]
            let spawned = std::thread::Builder::new()
                .name("openic-exec".into())
                .stack_size(WORKER_STACK_BYTES)
                .spawn(move || worker_loop(&receiver, &idle));
            if let Err(error) = spawned {
                return Err((job, error));
            }
        }
        // The receiver lives as long as `self`, so sending cannot fail.
        let _ = lock(&self.sender).send(job);
        Ok(())
    }
}

fn worker_loop(receiver: &Mutex<mpsc::Receiver<Job>>, idle: &AtomicUsize) {
    loop {
        let job = lock(receiver).recv();
        let Ok(job) = job else {
            // The embedder is gone.
            return;
        };
        job();
        if idle.load(Ordering::Acquire) >= MAX_IDLE_WORKERS {
            return;
        }
        idle.fetch_add(1, Ordering::AcqRel);
    }
}

/// Advances the engine's epoch every [`TICK`] while at least one sliced execution runs, so that
/// their epoch checks call back (see Note [sliced executions]).
pub(crate) struct EpochTicker {
    shared: Arc<TickerShared>,
}

#[derive(Default)]
struct TickerShared {
    /// Running sliced executions, and whether the ticker should end.
    state: Mutex<(usize, bool)>,
    wake: Condvar,
}

impl EpochTicker {
    #[allow(
        clippy::disallowed_methods,
        reason = "the ticker decides only how late a worker notices where it is, never what the scheduler sees (Note [sliced executions])"
    )]
    pub(crate) fn new(engine: wasmtime::Engine) -> std::io::Result<Self> {
        let shared = Arc::new(TickerShared::default());
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("openic-epoch".into())
            .spawn(move || {
                loop {
                    {
                        let mut state = lock(&thread_shared.state);
                        while state.0 == 0 && !state.1 {
                            state = thread_shared
                                .wake
                                .wait(state)
                                .unwrap_or_else(|e| e.into_inner());
                        }
                        if state.1 {
                            return;
                        }
                    }
                    engine.increment_epoch();
                    std::thread::sleep(TICK);
                }
            })?;
        Ok(EpochTicker { shared })
    }

    /// Keeps the ticker running until the guard is dropped.
    pub(crate) fn running(&self) -> TickerGuard {
        lock(&self.shared.state).0 += 1;
        self.shared.wake.notify_all();
        TickerGuard {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        lock(&self.shared.state).1 = true;
        self.shared.wake.notify_all();
    }
}

/// See [`EpochTicker::running`].
pub(crate) struct TickerGuard {
    shared: Arc<TickerShared>,
}

impl Drop for TickerGuard {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        state.0 = state.0.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(instructions_used: u64) -> WasmExecutionOutput {
        WasmExecutionOutput {
            instructions_used,
            result: Err(crate::api::ExecutionError::InstructionLimitExceeded { limit: 0 }),
            debug_prints: Vec::new(),
        }
    }

    #[test]
    fn an_execution_completes_in_the_slice_its_instructions_say() {
        assert_eq!(completion_slice(0, 10), 1);
        assert_eq!(completion_slice(10, 10), 1);
        assert_eq!(completion_slice(11, 10), 2);
        assert_eq!(completion_slice(30, 10), 3);
        let mut finished = FinishedExecution::new(output(25), 10);
        assert!(finished.wait(1).is_none());
        assert!(finished.wait(2).is_none());
        assert_eq!(finished.wait(3).unwrap().instructions_used, 25);
    }

    #[test]
    #[allow(
        clippy::disallowed_methods,
        reason = "the test plays the worker on a thread of its own"
    )]
    fn a_worker_past_its_grant_blocks_until_granted_more_and_stops_when_abandoned() {
        let control = SliceControl::new(10);
        let worker = Arc::clone(&control);
        let (progress, reached) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            for consumed in [5, 15, 25, 35] {
                if worker.checkpoint(consumed).is_err() {
                    return consumed;
                }
                progress.send(consumed).unwrap();
            }
            0
        });
        let mut handle = WorkerExecution { control };
        // Granted one slice: the worker reports 15 > 10 and blocks; slice 1 is not the end.
        assert!(handle.wait(1).is_none());
        assert_eq!(reached.recv().unwrap(), 5);
        assert!(reached.recv_timeout(Duration::from_millis(50)).is_err());
        assert!(handle.wait(2).is_none());
        assert_eq!(reached.recv().unwrap(), 15);
        drop(handle);
        assert_eq!(thread.join().unwrap(), 25, "abandoned at its next check");
    }
}
