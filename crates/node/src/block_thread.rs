//! The block thread: the single writer of the replicated state.
//!
//! For each block, in order: append it to the block log (durable), execute it, certify the new
//! state, and now and then write a checkpoint. Keeping this on one OS thread makes the order of
//! effects obvious and keeps wasm execution off the async runtime.

use crate::NodeConfig;
use crate::checkpointing::CheckpointSchedule;
use crate::metrics::NodeMetrics;
use openic_certification::CertifiedStateStore;
use openic_consensus::{BlockMaker, IngressPoolImpl};
use openic_execution::Scheduler;
use openic_interfaces::{BlockExecutor, BlockLog};
use openic_replicated_state::ReplicatedState;
use openic_state_manager::{FileBlockLog, FileCheckpointStore};
use openic_types::Time;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tracing::{error, info};

/// Everything the block thread owns.
pub(crate) struct BlockThread {
    pub config: NodeConfig,
    pub state: ReplicatedState,
    pub scheduler: Scheduler,
    pub block_log: FileBlockLog,
    pub checkpoints: FileCheckpointStore,
    pub certified: Arc<CertifiedStateStore>,
    pub pool: Arc<IngressPoolImpl>,
    pub clock: Arc<dyn Fn() -> Time + Send + Sync>,
    pub stop: Arc<AtomicBool>,
    pub wake: Arc<tokio::sync::Notify>,
    pub metrics: Arc<NodeMetrics>,
    /// Set, with the reason, when the thread stops making blocks because of an error.
    pub halted: Arc<parking_lot::Mutex<Option<String>>>,
    /// Held for as long as the block thread runs: no other process may use the state directory.
    pub _state_dir_lock: openic_state_manager::StateDirLock,
}

/// Starts the block thread.
pub(crate) fn spawn(thread: BlockThread) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("openic-blocks".into())
        .spawn(move || thread.run())
        .expect("spawning the block thread must succeed at start-up")
}

impl BlockThread {
    fn run(mut self) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(runtime) => runtime,
            Err(err) => {
                error!(%err, "cannot start the block thread's timer runtime; no blocks will be made");
                self.metrics.critical_errors.inc();
                return;
            }
        };
        let maker = BlockMaker::new(self.config.block_maker.clone(), self.clock.clone());
        let mut schedule = CheckpointSchedule::new(self.state.metadata.height);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let pending = self.scheduler.has_pending_work(&self.state);
            runtime.block_on(async {
                tokio::select! {
                    _ = maker.wait_for_work(&self.pool, self.config.block_maker.idle_block_interval, pending) => {}
                    _ = self.wake.notified() => {}
                }
            });
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let block = maker.make_block(
                self.state.metadata.height,
                self.state.metadata.time,
                &self.pool,
            );
            let started = Instant::now();
            if let Err(err) = self.block_log.append(&block) {
                // Without a durable log we cannot promise anything we certify: stop making blocks.
                error!(%err, height = %block.height, "cannot append to the block log; the node stops making blocks");
                self.metrics.critical_errors.inc();
                self.halt(format!(
                    "cannot append block {} to the block log: {err}",
                    block.height
                ));
                break;
            }
            self.metrics
                .block_log_append_duration_seconds
                .observe(started.elapsed().as_secs_f64());

            let started = Instant::now();
            let executed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.scheduler.execute_block(&mut self.state, &block)
            }));
            let summary = match executed {
                Ok(summary) => summary,
                Err(panic) => {
                    // The state may be half-updated: certifying or continuing could spread a wrong
                    // state. Stop making blocks and say so; the block is durable, so the cause can
                    // be investigated by replaying it.
                    let reason = format!(
                        "executing block {} panicked: {}",
                        block.height,
                        panic_message(&panic)
                    );
                    error!(%reason, "the node stops making blocks");
                    self.metrics.critical_errors.inc();
                    self.halt(reason);
                    return;
                }
            };
            self.metrics
                .block_execution_duration_seconds
                .observe(started.elapsed().as_secs_f64());
            self.metrics
                .ingress_inducted
                .inc_by(summary.ingress_inducted);
            self.metrics
                .messages_executed
                .inc_by(summary.messages_executed);
            self.metrics
                .instructions_executed
                .inc_by(summary.instructions_executed);

            let started = Instant::now();
            self.certified.certify(&mut self.state);
            self.metrics
                .certification_duration_seconds
                .observe(started.elapsed().as_secs_f64());
            self.pool
                .release_executed(block.ingress.iter().map(|m| &m.request_id));
            self.metrics.height.set(block.height.0 as i64);
            self.metrics.certified_height.set(block.height.0 as i64);
            self.metrics
                .canisters
                .set(self.state.canisters.len() as i64);

            let busy = summary.messages_executed > 0 || summary.ingress_inducted > 0;
            if schedule.after_height(&self.config, block.height, busy) {
                let written = self.checkpoint();
                schedule.attempted(block.height, written);
            }
        }
        if schedule.behind(self.state.metadata.height) {
            self.checkpoint();
        }
        info!(height = %self.state.metadata.height, "block thread stopped");
    }

    /// Records why the node stopped making blocks, for the status endpoint and calls.
    fn halt(&self, reason: String) {
        *self.halted.lock() = Some(reason);
    }

    fn checkpoint(&mut self) -> bool {
        crate::checkpointing::write_checkpoint(
            &self.state,
            &mut self.checkpoints,
            Some(&mut self.block_log),
            &self.metrics,
        )
    }
}

/// The message of a caught panic, if it carried one.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "(no message)".to_string()
    }
}
