//! [`BlockMaker`]: makes the blocks of a one-node subnet.

use crate::IngressPoolImpl;
use openic_types::{Block, Height, Time};
use std::sync::Arc;
use std::time::Duration;

/// The wall clock, injected so tests control time: nanoseconds since the Unix epoch.
pub type Clock = Arc<dyn Fn() -> Time + Send + Sync>;

/// The system clock as a [`Clock`] (the node's default).
pub fn system_clock() -> Clock {
    Arc::new(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Time(u64::try_from(nanos).unwrap_or(u64::MAX))
    })
}

/// Limits and pacing of block making.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMakerConfig {
    /// Ingress messages per block at most.
    pub max_ingress_messages_per_block: usize,
    /// Ingress bytes per block at most (see [`crate::message_bytes`]); a single larger message
    /// still gets a block of its own. Must stay well below the block log's record limit.
    pub max_ingress_bytes_per_block: u64,
    /// A block is made at least this often even with nothing to do, so the certified `/time`
    /// stays fresh (clients refuse certificates whose time is too old).
    pub idle_block_interval: Duration,
}

impl Default for BlockMakerConfig {
    fn default() -> Self {
        BlockMakerConfig {
            max_ingress_messages_per_block: 1_000,
            max_ingress_bytes_per_block: 4 * 1024 * 1024,
            idle_block_interval: Duration::from_secs(1),
        }
    }
}

/// Why [`BlockMaker::wait_for_work`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Ingress is waiting in the pool.
    Ingress,
    /// The state has work that needs a block (queued messages, timers, heartbeats).
    PendingWork,
    /// The idle interval elapsed: make a block to refresh the certified time.
    Idle,
}

/// Makes the blocks of a one-node subnet: `Block { height: h + 1, time, ingress }` where `time`
/// is the clock's time, bumped to 1 ns past the previous block's if the clock did not advance (or
/// went back), so block times strictly increase.
pub struct BlockMaker {
    config: BlockMakerConfig,
    clock: Clock,
}

impl std::fmt::Debug for BlockMaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockMaker")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl BlockMaker {
    /// A block maker with these limits reading time from `clock`.
    pub fn new(config: BlockMakerConfig, clock: Clock) -> BlockMaker {
        BlockMaker { config, clock }
    }

    /// The limits and pacing.
    pub fn config(&self) -> &BlockMakerConfig {
        &self.config
    }

    /// The time of the block after one at `last_time`: `max(now, last_time + 1 ns)`.
    pub fn next_block_time(&self, last_time: Time) -> Time {
        (self.clock)().max(last_time.saturating_add_nanos(1))
    }

    /// Makes the block after the one at (`last_height`, `last_time`), with as much ingress from
    /// `pool` as the per-block limits allow. Messages expired at the block's time are dropped, not
    /// included. The block may be empty.
    pub fn make_block(
        &self,
        last_height: Height,
        last_time: Time,
        pool: &IngressPoolImpl,
    ) -> Block {
        let time = self.next_block_time(last_time);
        let ingress = pool.take_for_block(
            self.config.max_ingress_messages_per_block,
            self.config.max_ingress_bytes_per_block,
            time,
        );
        Block {
            height: last_height.increment(),
            time,
            ingress,
            randomness: [0; 32],
        }
    }

    /// Waits until there is a reason to make a block: returns at once if `has_pending_work` or the
    /// pool holds ingress, otherwise when ingress arrives or after `idle_interval` (usually
    /// [`BlockMakerConfig::idle_block_interval`]), whichever comes first.
    pub async fn wait_for_work(
        &self,
        pool: &IngressPoolImpl,
        idle_interval: Duration,
        has_pending_work: bool,
    ) -> Wake {
        if has_pending_work {
            return Wake::PendingWork;
        }
        let deadline = tokio::time::Instant::now() + idle_interval;
        loop {
            // Register for the notification before looking at the pool, so a message that arrives
            // in between still wakes us.
            let arrived = pool.arrived().notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if !pool.is_empty() {
                return Wake::Ingress;
            }
            tokio::select! {
                // A stale wake-up (its message already taken) just loops and waits again.
                _ = &mut arrived => continue,
                _ = tokio::time::sleep_until(deadline) => return Wake::Idle,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IngressPoolConfig;
    use crate::ingress_pool::tests::{SubmitMessage, message, pool};
    use std::sync::atomic::{AtomicU64, Ordering};

    fn manual_clock(start: u64) -> (Arc<AtomicU64>, Clock) {
        let now = Arc::new(AtomicU64::new(start));
        let reader = now.clone();
        (now, Arc::new(move || Time(reader.load(Ordering::SeqCst))))
    }

    #[test]
    fn heights_increase_by_one_and_times_strictly() {
        let (now, clock) = manual_clock(1_000);
        let maker = BlockMaker::new(BlockMakerConfig::default(), clock);
        let pool = pool(IngressPoolConfig::default());
        let first = maker.make_block(Height(0), Time(0), &pool);
        assert_eq!((first.height, first.time), (Height(1), Time(1_000)));
        // The clock stands still: the next block is 1 ns later.
        let second = maker.make_block(first.height, first.time, &pool);
        assert_eq!((second.height, second.time), (Height(2), Time(1_001)));
        // The clock goes back: still strictly increasing.
        now.store(10, Ordering::SeqCst);
        let third = maker.make_block(second.height, second.time, &pool);
        assert_eq!((third.height, third.time), (Height(3), Time(1_002)));
        now.store(5_000, Ordering::SeqCst);
        let fourth = maker.make_block(third.height, third.time, &pool);
        assert_eq!((fourth.height, fourth.time), (Height(4), Time(5_000)));
    }

    #[test]
    fn blocks_carry_ingress_within_limits_and_drop_expired() {
        let (_, clock) = manual_clock(1_000);
        let maker = BlockMaker::new(
            BlockMakerConfig {
                max_ingress_messages_per_block: 2,
                ..BlockMakerConfig::default()
            },
            clock,
        );
        let pool = pool(IngressPoolConfig::default());
        pool.submit_message(message(1, 999, 10)).unwrap();
        for tag in 2..=4 {
            pool.submit_message(message(tag, 2_000, 10)).unwrap();
        }
        let block = maker.make_block(Height(7), Time(0), &pool);
        let tags: Vec<u8> = block.ingress.iter().map(|m| m.request_id.0[0]).collect();
        assert_eq!(
            tags,
            vec![2, 3],
            "expired message 1 dropped, limit of 2 kept"
        );
        assert_eq!(block.height, Height(8));
        assert_eq!(
            maker.make_block(Height(8), block.time, &pool).ingress.len(),
            1
        );
    }

    #[tokio::test]
    async fn wakes_on_submit_before_the_idle_interval() {
        let (_, clock) = manual_clock(1);
        let maker = BlockMaker::new(BlockMakerConfig::default(), clock);
        let pool = Arc::new(pool(IngressPoolConfig::default()));
        let submitter = pool.clone();
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            submitter.submit_message(message(1, 100, 10)).unwrap();
        });
        let wake = maker
            .wait_for_work(&pool, Duration::from_secs(30), false)
            .await;
        assert_eq!(wake, Wake::Ingress);
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn idle_interval_pending_work_and_waiting_ingress() {
        let (_, clock) = manual_clock(1);
        let maker = BlockMaker::new(BlockMakerConfig::default(), clock);
        let pool = pool(IngressPoolConfig::default());
        let started = std::time::Instant::now();
        let wake = maker
            .wait_for_work(&pool, Duration::from_millis(60), false)
            .await;
        assert_eq!(wake, Wake::Idle);
        assert!(started.elapsed() >= Duration::from_millis(60));

        let wake = maker
            .wait_for_work(&pool, Duration::from_secs(30), true)
            .await;
        assert_eq!(wake, Wake::PendingWork);

        // Ingress submitted while nobody waited is found at once.
        pool.submit_message(message(1, 100, 10)).unwrap();
        let wake = maker
            .wait_for_work(&pool, Duration::from_secs(30), false)
            .await;
        assert_eq!(wake, Wake::Ingress);

        // After the block took it, the stored wake-up is stale: wait for the idle interval again.
        pool.take_for_block(10, u64::MAX, Time(0));
        let started = std::time::Instant::now();
        let wake = maker
            .wait_for_work(&pool, Duration::from_millis(60), false)
            .await;
        assert_eq!(wake, Wake::Idle);
        assert!(started.elapsed() >= Duration::from_millis(60));
    }
}
