//! What the one-replica block thread and a replica's execution thread share about durable state:
//! loading it (latest checkpoint plus the block log after it), when to write a checkpoint, and
//! writing one.

use crate::metrics::NodeMetrics;
use crate::{NodeConfig, NodeError};
use openic_interfaces::{BlockExecutor, BlockLog, CheckpointStore};
use openic_replicated_state::ReplicatedState;
use openic_state_manager::{FileBlockLog, FileCheckpointStore};
use openic_types::Height;
use std::time::Instant;
use tracing::{error, info, warn};

/// Loads the latest checkpoint (or `genesis` when there is none) and replays the block log after
/// it, if the node keeps one (a replica does not: consensus redelivers what no checkpoint covers).
/// Errors if the log does not continue the checkpoint's height.
pub(crate) fn load_state(
    checkpoints: &mut FileCheckpointStore,
    block_log: Option<&mut FileBlockLog>,
    executor: &mut impl BlockExecutor,
    genesis: impl FnOnce() -> ReplicatedState,
) -> Result<ReplicatedState, NodeError> {
    let mut state = match checkpoints.load_latest()? {
        Some(state) => state,
        None => genesis(),
    };
    let checkpoint_height = state.metadata.height;
    let Some(block_log) = block_log else {
        info!(height = %checkpoint_height, "state loaded");
        return Ok(state);
    };
    let blocks = block_log.read_after(checkpoint_height)?;
    for block in &blocks {
        if block.height != state.metadata.height.increment() {
            return Err(NodeError::Replay(format!(
                "block log has height {} after state height {}",
                block.height, state.metadata.height
            )));
        }
        executor.execute_block(&mut state, block);
    }
    info!(height = %state.metadata.height, %checkpoint_height, replayed = blocks.len(), "state loaded");
    Ok(state)
}

/// When to write a checkpoint: after enough busy heights or time; idle blocks (which keep
/// `/time` fresh) only force one now and then, to bound the replay on restart.
pub(crate) struct CheckpointSchedule {
    last_height: Height,
    last_at: Instant,
    busy_heights: u64,
}

impl CheckpointSchedule {
    /// A schedule whose last checkpoint is the state loaded at `height`.
    pub(crate) fn new(height: Height) -> Self {
        CheckpointSchedule {
            last_height: height,
            last_at: Instant::now(),
            busy_heights: 0,
        }
    }

    /// Records an executed height (`busy` if it executed or inducted anything) and says whether
    /// a checkpoint is due now.
    pub(crate) fn after_height(&mut self, config: &NodeConfig, height: Height, busy: bool) -> bool {
        if busy {
            self.busy_heights += 1;
        }
        let since = self.last_at.elapsed();
        self.busy_heights >= config.checkpoint_interval_heights
            || (self.busy_heights > 0 && since >= config.checkpoint_interval)
            || (height != self.last_height && since >= config.idle_checkpoint_interval)
    }

    /// Records an attempt to checkpoint `height`; a failed one is retried after the interval.
    pub(crate) fn attempted(&mut self, height: Height, written: bool) {
        if written {
            self.last_height = height;
            self.busy_heights = 0;
        }
        self.last_at = Instant::now();
    }

    /// Whether `height` is newer than the last checkpoint (a shutdown then writes one).
    pub(crate) fn behind(&self, height: Height) -> bool {
        height != self.last_height
    }
}

/// Writes a checkpoint of `state` and drops the blocks it covers from the block log, if the node
/// keeps one. A failure is logged and survived: the block log (or, on a replica, consensus's
/// redelivery of unacknowledged heights) still holds everything since the previous checkpoint.
pub(crate) fn write_checkpoint(
    state: &ReplicatedState,
    checkpoints: &mut FileCheckpointStore,
    block_log: Option<&mut FileBlockLog>,
    metrics: &NodeMetrics,
) -> bool {
    let started = Instant::now();
    let height = state.metadata.height;
    match checkpoints.write_checkpoint(state) {
        Ok(()) => {
            metrics
                .checkpoint_duration_seconds
                .observe(started.elapsed().as_secs_f64());
            // Keep the blocks after the *oldest* kept checkpoint: if the latest turns out
            // corrupt on load, the previous one is used and needs them.
            let oldest = match checkpoints.oldest_checkpoint_height() {
                Ok(oldest) => oldest.unwrap_or(Height(0)),
                Err(err) => {
                    warn!(%err, "cannot list checkpoints; keeping the whole block log");
                    Height(0)
                }
            };
            if let Some(block_log) = block_log
                && let Err(err) = block_log.truncate_through(oldest)
            {
                warn!(%err, %height, "checkpoint written but the block log could not be truncated");
            }
            true
        }
        Err(err) => {
            error!(%err, %height, "writing a checkpoint failed; will retry at the next interval");
            metrics.critical_errors.inc();
            false
        }
    }
}
