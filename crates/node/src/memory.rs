//! The node's memory as a resource: the budget that non-replicated executions (queries, composite
//! queries, `canister_inspect_message`) reserve the memory they touch from, and the allocator
//! trimmer that gives memory freed by canisters and closed connections back to the kernel.
//!
//! See Note [memory budget] in the embedder for what an execution reserves. The node's resident
//! memory is then bounded by: the replicated state it holds (canister heaps and stable memories,
//! shared between the latest state and the certified snapshots) + one replicated execution at a
//! time (bounded by the canister limits) + this budget + the connections' buffers (bounded by
//! the connection caps). docs/RELIABILITY.md shows the bound under attack.

use openic_embedders::{Embedder, MemoryBudget};
use parking_lot::{Condvar, Mutex};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// The smallest default budget: enough for several queries of a canister with a large heap.
const MIN_DEFAULT_BUDGET_BYTES: u64 = 512 * MIB;

/// The default budget for non-replicated executions: a quarter of the machine's memory (the rest
/// holds the replicated state, the replicated execution and the page cache), at least 512 MiB.
pub fn default_query_memory_budget() -> u64 {
    let info = rustix::system::sysinfo();
    let total = u64::from(info.mem_unit).saturating_mul(info.totalram as u64);
    (total / 4).max(MIN_DEFAULT_BUDGET_BYTES)
}

/// The smallest default bound of heap images.
const MIN_DEFAULT_HEAP_IMAGE_BYTES: u64 = 1024 * MIB;

/// The default bound of the embedder's heap images (the memory files that let updates on large
/// heaps cost the pages they touch; Note [tracked heaps] in `openic-embedders`): a quarter of the
/// machine's memory, at least 1 GiB. A heap that does not fit runs without an image, copied in.
pub fn default_heap_image_bytes() -> u64 {
    let info = rustix::system::sysinfo();
    let total = u64::from(info.mem_unit).saturating_mul(info.totalram as u64);
    (total / 4).max(MIN_DEFAULT_HEAP_IMAGE_BYTES)
}

/// Metrics of the budget.
#[derive(Debug, Default)]
struct BudgetMetrics {
    capacity: Gauge,
    reserved: Gauge,
    refusals: Counter,
}

/// A node-wide [`MemoryBudget`]: a reservation that does not fit is refused at once, with a
/// message that says what was busy and when to retry. It does not wait: a waiting execution would
/// hold one of the node's execution slots (the HTTP API's `max_concurrent_executions`) while doing
/// nothing, so light queries would queue behind heavy ones that wait.
#[derive(Debug)]
pub struct NodeMemoryBudget {
    capacity: u64,
    reserved: Mutex<u64>,
    metrics: BudgetMetrics,
}

impl NodeMemoryBudget {
    /// A budget of `capacity` bytes.
    pub fn new(capacity: u64) -> NodeMemoryBudget {
        let metrics = BudgetMetrics::default();
        metrics
            .capacity
            .set(i64::try_from(capacity).unwrap_or(i64::MAX));
        NodeMemoryBudget {
            capacity,
            reserved: Mutex::new(0),
            metrics,
        }
    }

    /// Registers the budget's metrics (`query_memory_budget_bytes`, `…_reserved_bytes`,
    /// `…_refusals`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "query_memory_budget_bytes",
            "Memory that non-replicated executions (queries, inspect_message) may reserve together",
            self.metrics.capacity.clone(),
        );
        registry.register(
            "query_memory_reserved_bytes",
            "Memory reserved by the non-replicated executions running now",
            self.metrics.reserved.clone(),
        );
        registry.register(
            "query_memory_refusals",
            "Executions stopped because the memory budget had no room (the client was told to retry)",
            self.metrics.refusals.clone(),
        );
    }

    /// The budget in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes reserved now.
    pub fn reserved(&self) -> u64 {
        *self.reserved.lock()
    }

    fn set_gauge(&self, reserved: u64) {
        self.metrics
            .reserved
            .set(i64::try_from(reserved).unwrap_or(i64::MAX));
    }
}

impl MemoryBudget for NodeMemoryBudget {
    fn reserve(&self, bytes: u64) -> Result<(), String> {
        if bytes > self.capacity {
            self.metrics.refusals.inc();
            return Err(format!(
                "it needs {} MiB of memory at once, more than this node's whole memory budget for \
                 queries ({} MiB, set with --query-memory-mib)",
                bytes.div_ceil(MIB),
                self.capacity / MIB
            ));
        }
        let mut reserved = self.reserved.lock();
        if *reserved + bytes > self.capacity {
            self.metrics.refusals.inc();
            return Err(format!(
                "the node's memory budget for queries ({} MiB) is in use by other executions \
                 ({} MiB reserved, {} MiB more needed); retry in a few seconds",
                self.capacity / MIB,
                reserved.div_ceil(MIB),
                bytes.div_ceil(MIB),
            ));
        }
        *reserved += bytes;
        self.set_gauge(*reserved);
        Ok(())
    }

    fn release(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut reserved = self.reserved.lock();
        *reserved = reserved.saturating_sub(bytes);
        self.set_gauge(*reserved);
    }
}

/// How often the trimmer looks at the allocator.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// Freed bytes that make the trimmer return memory to the kernel at once.
pub const TRIM_THRESHOLD_BYTES: u64 = 32 * MIB;

/// Past this long since the last trim, any free memory over the threshold is returned (it may
/// have been reused and freed again between two looks).
const TRIM_AT_LEAST_EVERY: Duration = Duration::from_secs(30);

/// Metrics of the trimmer.
#[derive(Debug, Default, Clone)]
struct TrimMetrics {
    trims: Counter,
    returned_bytes: Counter,
    free_bytes: Gauge,
}

/// When to trim: the allocator's free bytes are sampled; memory freed since the last trim (free
/// bytes above their lowest value since then) is what trimming could return.
#[derive(Debug)]
struct TrimPolicy {
    lowest_free_since_trim: u64,
    last_trim: Instant,
}

impl TrimPolicy {
    fn new(now: Instant) -> TrimPolicy {
        TrimPolicy {
            lowest_free_since_trim: u64::MAX,
            last_trim: now,
        }
    }

    /// Whether to trim now, with `free` bytes free.
    fn should_trim(&mut self, free: u64, now: Instant) -> bool {
        self.lowest_free_since_trim = self.lowest_free_since_trim.min(free);
        let freed_since = free - self.lowest_free_since_trim;
        let due = now.duration_since(self.last_trim) >= TRIM_AT_LEAST_EVERY;
        freed_since >= TRIM_THRESHOLD_BYTES || (due && free >= TRIM_THRESHOLD_BYTES)
    }

    fn trimmed(&mut self, free_after: u64, now: Instant) {
        // Trimming discards free pages but keeps the chunks free: the free bytes stay what they
        // were, and only memory freed from now on counts again.
        self.lowest_free_since_trim = free_after;
        self.last_trim = now;
    }
}

/// Gives memory the allocator holds free back to the kernel, within about [`TRIM_INTERVAL`] of
/// [`TRIM_THRESHOLD_BYTES`] being freed, and the linear memories the embedder keeps warm once
/// they stayed unused for a period.
///
/// Freed canister pages (uninstall, reinstall, delete, discarded pages of old states), request
/// buffers and connection state go back to glibc's malloc, which keeps them for reuse and only
/// gives back the top of its main heap by itself. Once a second this thread asks how much malloc
/// holds free and, when enough was freed since the last trim, calls `malloc_trim(0)`, which
/// returns every whole free page of every arena (`madvise(MADV_DONTNEED)`). Stops when dropped.
#[derive(Debug)]
pub struct MemoryTrimmer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MemoryTrimmer {
    /// Starts the trimmer thread and registers its metrics (`memory_trims`,
    /// `memory_returned_bytes`, `allocator_free_bytes`).
    pub fn start(
        registry: &mut Registry,
        embedder: Arc<dyn Embedder>,
    ) -> std::io::Result<MemoryTrimmer> {
        let metrics = TrimMetrics::default();
        registry.register(
            "memory_trims",
            "Times freed memory was returned to the kernel (malloc_trim)",
            metrics.trims.clone(),
        );
        registry.register(
            "memory_returned_bytes",
            "Bytes of resident memory returned to the kernel by trimming",
            metrics.returned_bytes.clone(),
        );
        registry.register(
            "allocator_free_bytes",
            "Bytes the allocator holds in free chunks (resident or already returned)",
            metrics.free_bytes.clone(),
        );
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("memory-trim".into())
                .spawn(move || {
                    let mut policy = TrimPolicy::new(Instant::now());
                    let (stopped, wake) = &*stop;
                    let mut stopped = stopped.lock();
                    while !*stopped {
                        wake.wait_for(&mut stopped, TRIM_INTERVAL);
                        if *stopped {
                            break;
                        }
                        // Linear memories kept warm but unused for a whole period.
                        metrics
                            .returned_bytes
                            .inc_by(embedder.release_idle_memory());
                        let Some(free) = allocator_free_bytes() else {
                            continue;
                        };
                        metrics
                            .free_bytes
                            .set(i64::try_from(free).unwrap_or(i64::MAX));
                        if policy.should_trim(free, Instant::now()) {
                            let returned = trim_and_measure();
                            metrics.trims.inc();
                            metrics.returned_bytes.inc_by(returned);
                            policy.trimmed(allocator_free_bytes().unwrap_or(free), Instant::now());
                        }
                    }
                })?
        };
        Ok(MemoryTrimmer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for MemoryTrimmer {
    fn drop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Trims, and returns by how much the process's resident memory went down.
fn trim_and_measure() -> u64 {
    let started = Instant::now();
    let before = resident_bytes();
    trim();
    let after = resident_bytes();
    let returned = before.saturating_sub(after);
    tracing::debug!(
        returned_mib = returned / MIB,
        resident_mib = after / MIB,
        took_ms = started.elapsed().as_millis() as u64,
        "returned freed memory to the kernel"
    );
    returned
}

/// The process's resident memory in bytes (0 where `/proc` is missing).
pub fn resident_bytes() -> u64 {
    // statm: size resident shared text lib data dt, in pages.
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| {
            pages.saturating_mul(rustix::param::page_size() as u64)
        })
}

use allocator::{allocator_free_bytes, trim};

/// The two calls into glibc's malloc: the only `unsafe` of the node crate. Both are plain C
/// functions without preconditions; each `unsafe` block states why it is sound.
#[allow(unsafe_code)]
mod allocator {
    /// Bytes glibc's malloc holds in free chunks (`None` with another allocator).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    pub(super) fn allocator_free_bytes() -> Option<u64> {
        // SAFETY: mallinfo2 only reads the allocator's statistics (under its own locks).
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks as u64)
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    pub(super) fn allocator_free_bytes() -> Option<u64> {
        None
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    pub(super) fn trim() {
        // SAFETY: malloc_trim only releases whole free pages back to the kernel (under the
        // allocator's own locks); no allocation is moved or invalidated.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    pub(super) fn trim() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_add_up_to_the_capacity_and_release_makes_room() {
        let budget = NodeMemoryBudget::new(100 * MIB);
        budget.reserve(60 * MIB).expect("room");
        budget.reserve(40 * MIB).expect("exactly full");
        let refused = budget.reserve(1).expect_err("no room");
        assert!(
            refused.contains("in use by other executions") && refused.contains("retry"),
            "{refused}"
        );
        budget.release(40 * MIB);
        assert_eq!(budget.reserved(), 60 * MIB);
        budget.reserve(40 * MIB).expect("room again");
    }

    #[test]
    fn more_than_the_whole_budget_is_refused_with_its_own_reason() {
        let budget = NodeMemoryBudget::new(10 * MIB);
        let refused = budget
            .reserve(11 * MIB)
            .expect_err("larger than the budget");
        assert!(refused.contains("more than this node's whole memory budget"));
        assert_eq!(budget.reserved(), 0);
    }

    #[test]
    fn the_policy_trims_memory_freed_since_the_last_trim() {
        let start = Instant::now();
        let mut policy = TrimPolicy::new(start);
        assert!(!policy.should_trim(10 * MIB, start));
        // 40 MiB freed: trim.
        assert!(policy.should_trim(50 * MIB, start + TRIM_INTERVAL));
        policy.trimmed(50 * MIB, start + TRIM_INTERVAL);
        // Nothing freed since (the free chunks are already returned): no trim.
        assert!(!policy.should_trim(50 * MIB, start + 2 * TRIM_INTERVAL));
        // Reused, then freed again: trim.
        assert!(!policy.should_trim(5 * MIB, start + 3 * TRIM_INTERVAL));
        assert!(policy.should_trim(50 * MIB, start + 4 * TRIM_INTERVAL));
        policy.trimmed(50 * MIB, start + 4 * TRIM_INTERVAL);
        // Reused and freed between two looks: caught by the periodic trim.
        assert!(!policy.should_trim(50 * MIB, start + 5 * TRIM_INTERVAL));
        assert!(policy.should_trim(50 * MIB, start + 4 * TRIM_INTERVAL + TRIM_AT_LEAST_EVERY));
    }

    #[test]
    fn trimming_returns_freed_heap_memory_to_the_kernel() {
        if allocator_free_bytes().is_none() {
            return;
        }
        // 128 MiB in small allocations (below malloc's mmap threshold, so they live in its
        // arenas), all touched, then freed except one allocated last, which keeps the main heap's
        // top from shrinking by itself.
        let blocks: Vec<Vec<u8>> = (0..32_768).map(|i| vec![i as u8 | 1; 4096]).collect();
        let keep = vec![1u8; 4096];
        drop(blocks);
        let returned = trim_and_measure();
        assert!(returned >= 64 * MIB, "returned {} MiB", returned / MIB);
        assert_eq!(keep[0], 1);
    }
}
