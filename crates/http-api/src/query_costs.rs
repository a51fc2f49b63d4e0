//! Cost classes of queries: queries to a method that recently took long run in a lane of their
//! own, which holds at most all but one of the execution slots, so cheap queries always find a
//! slot while expensive ones loop.
//!
//! Note [query lanes]: slots are handed out first come, first served, so without lanes a few
//! clients looping queries that each run for 100 ms hold every slot, and a 1 ms query waits for
//! one of them to finish. The cost of a method is known only after it ran, so it is learnt: the
//! node keeps a moving average of the CPU time each (canister, method) took (the most recent
//! [`MAX_TRACKED_METHODS`] methods), and a query whose method averages at least the threshold
//! first takes a slot of the expensive lane. A method's first queries run as cheap ones until the
//! first of them finishes. The averages are node-local measurements that only order admission;
//! they never touch replicated state.
//!
//! Expensive queries also run at a lower CPU priority, on threads of their own
//! ([`ExpensiveThreads`], nice [`EXPENSIVE_QUERY_NICE`]): when they keep every core busy, the
//! block thread (update calls), the HTTP threads and cheap queries still get the CPU when they
//! need it.

use openic_types::CanisterId;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Most methods whose cost is remembered; past it, the least recently measured are forgotten.
pub const MAX_TRACKED_METHODS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Cost {
    /// Moving average of the execution time (weight 1/4 for each new measurement).
    average: Duration,
    /// When it was last measured, in measurements made (for forgetting the oldest).
    measured_at: u64,
}

/// The moving averages of recent query methods.
#[derive(Debug)]
pub(crate) struct QueryCosts {
    expensive_from: Duration,
    state: Mutex<Costs>,
}

#[derive(Debug, Default)]
struct Costs {
    by_method: BTreeMap<(CanisterId, String), Cost>,
    /// `measured_at` → method, to forget the least recently measured.
    by_age: BTreeMap<u64, (CanisterId, String)>,
    measurements: u64,
}

impl QueryCosts {
    /// Methods averaging at least `expensive_from` are expensive.
    pub(crate) fn new(expensive_from: Duration) -> QueryCosts {
        QueryCosts {
            expensive_from,
            state: Mutex::new(Costs::default()),
        }
    }

    /// Whether queries of `method` of `canister` recently took at least the threshold.
    pub(crate) fn is_expensive(&self, canister: &CanisterId, method: &str) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .by_method
            .get(&(*canister, method.to_string()))
            .is_some_and(|cost| cost.average >= self.expensive_from)
    }

    /// Records that a query of `method` of `canister` took `took`.
    pub(crate) fn record(&self, canister: CanisterId, method: String, took: Duration) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.measurements += 1;
        let now = state.measurements;
        let key = (canister, method);
        let previous = state.by_method.get(&key).copied();
        let average = match previous {
            Some(cost) => {
                state.by_age.remove(&cost.measured_at);
                (cost.average * 3 + took) / 4
            }
            None => took,
        };
        state.by_method.insert(
            key.clone(),
            Cost {
                average,
                measured_at: now,
            },
        );
        state.by_age.insert(now, key);
        while state.by_method.len() > MAX_TRACKED_METHODS {
            let Some((_, oldest)) = state.by_age.pop_first() else {
                break;
            };
            state.by_method.remove(&oldest);
        }
    }

    /// Number of methods remembered (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_method
            .len()
    }
}

/// CPU time the calling thread has used (not time spent waiting for a core, so a cheap query
/// on a busy node still measures as cheap).
pub(crate) fn thread_cpu_time() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

/// The nice value of the threads that run expensive queries (0 is the default; 19 the lowest
/// priority). At 10 a thread weighs about a tenth of a default one when both want the CPU.
pub const EXPENSIVE_QUERY_NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run expensive queries at [`EXPENSIVE_QUERY_NICE`]; as many as the expensive lane
/// has places, so a job never waits for a thread. They stop when this is dropped.
pub(crate) struct ExpensiveThreads {
    jobs: std::sync::mpsc::SyncSender<Job>,
}

impl ExpensiveThreads {
    pub(crate) fn start(threads: usize) -> std::io::Result<ExpensiveThreads> {
        let (jobs, receiver) = std::sync::mpsc::sync_channel::<Job>(threads);
        let receiver = std::sync::Arc::new(Mutex::new(receiver));
        for index in 0..threads {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("query-expensive-{index}"))
                .spawn(move || {
                    // Linux keeps the nice value per thread; `None` is the calling thread. A
                    // refusal (a seccomp profile, say) leaves it at the default priority.
                    if let Err(error) =
                        rustix::process::setpriority_process(None, EXPENSIVE_QUERY_NICE)
                    {
                        tracing::debug!(%error, "expensive queries run at the default priority");
                    }
                    loop {
                        let job = match receiver.lock() {
                            Ok(receiver) => receiver.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(ExpensiveThreads { jobs })
    }

    /// Runs `job` on one of the threads and returns its result.
    pub(crate) async fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = reply.send(job());
        });
        // The queue holds as many jobs as there are threads, and the lane admits no more than
        // that at once, so it is never full.
        self.jobs.try_send(job).map_err(|error| match error {
            std::sync::mpsc::TrySendError::Full(_) => {
                "every expensive-query thread is busy".to_string()
            }
            std::sync::mpsc::TrySendError::Disconnected(_) => {
                "the expensive query threads stopped".to_string()
            }
        })?;
        answer
            .await
            .map_err(|_| "an expensive query thread crashed".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canister(n: u64) -> CanisterId {
        CanisterId::from_u64(n)
    }

    #[test]
    fn a_method_becomes_expensive_after_it_ran_long_and_cheap_again_after_it_ran_short() {
        let costs = QueryCosts::new(Duration::from_millis(10));
        let c = canister(1);
        assert!(!costs.is_expensive(&c, "scan"), "unknown methods are cheap");
        costs.record(c, "scan".into(), Duration::from_millis(100));
        assert!(costs.is_expensive(&c, "scan"));
        assert!(!costs.is_expensive(&c, "get"), "per method");
        assert!(!costs.is_expensive(&canister(2), "scan"), "per canister");
        for _ in 0..12 {
            costs.record(c, "scan".into(), Duration::from_millis(1));
        }
        assert!(!costs.is_expensive(&c, "scan"), "the average follows");
    }

    #[test]
    fn the_least_recently_measured_methods_are_forgotten() {
        let costs = QueryCosts::new(Duration::from_millis(10));
        for n in 0..(MAX_TRACKED_METHODS as u64 + 10) {
            costs.record(canister(n), "m".into(), Duration::from_millis(50));
        }
        assert_eq!(costs.tracked(), MAX_TRACKED_METHODS);
        assert!(
            !costs.is_expensive(&canister(0), "m"),
            "the oldest was forgotten"
        );
        assert!(costs.is_expensive(&canister(MAX_TRACKED_METHODS as u64 + 9), "m"));
    }

    #[tokio::test]
    async fn expensive_threads_run_jobs_at_a_lower_priority() {
        let threads = ExpensiveThreads::start(2).expect("threads");
        let nice = threads
            .run(|| rustix::process::getpriority_process(None))
            .await
            .expect("ran")
            .expect("getpriority");
        assert_eq!(nice, EXPENSIVE_QUERY_NICE);
        let (a, b) = tokio::join!(threads.run(|| 1), threads.run(|| 2));
        assert_eq!((a, b), (Ok(1), Ok(2)));
    }
}
