//! A canister's log: what `ic0.debug_print` printed and why executions trapped, in a ring bounded by
//! the canister's `log_memory_limit` setting (spec: `fetch_canister_logs`).
//!
//! # Accounting
//!
//! A record takes [`LOG_RECORD_OVERHEAD_BYTES`] plus its content, as the IC counts it (the size of
//! its `CanisterLogRecord`: index, timestamp and content). A record takes at most
//! [`MAX_LOG_RECORD_BYTES`]; longer content is cut. When a new record does not fit, the oldest
//! records are dropped until it does. Indexes keep counting across dropped records and across
//! `clear` (reinstall, uninstall), so an index names one record for the canister's whole life.
//!
//! # Limits
//!
//! `log_memory_limit` 0 turns logging off (records are counted but not kept); `update_settings`
//! refuses other values outside [`MIN_LOG_MEMORY_LIMIT`]..=[`MAX_LOG_MEMORY_LIMIT`] with the IC's
//! texts (a state that holds such a value anyway keeps at least one whole record's room). A fetch returns at most
//! [`MAX_FETCH_RESULT_BYTES`] of records: the newest without a filter, the oldest matching ones with
//! a filter, so a client pages forward with `by_idx`.

use openic_types::Time;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Bytes a record takes besides its content (index, timestamp, content header).
pub const LOG_RECORD_OVERHEAD_BYTES: u64 = 40;
/// Most bytes one record takes; longer content is cut to fit.
pub const MAX_LOG_RECORD_BYTES: u64 = 4 * 1024;
/// The smallest non-zero log capacity (smaller non-zero limits are raised to it).
pub const MIN_LOG_MEMORY_LIMIT: u64 = 4 * 1024;
/// The default `log_memory_limit` (the IC's).
pub const DEFAULT_LOG_MEMORY_LIMIT: u64 = 4 * 1024;
/// The largest `log_memory_limit` a canister may set.
pub const MAX_LOG_MEMORY_LIMIT: u64 = 2 * 1024 * 1024;
/// Most record bytes one `fetch_canister_logs` returns (the IC's bound).
pub const MAX_FETCH_RESULT_BYTES: u64 = 2_000_000;

/// One log record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Its index: consecutive per canister, never reused.
    pub idx: u64,
    /// The block time of the execution that wrote it, in ns since 1970.
    pub timestamp_nanos: u64,
    /// What was printed (or the trap message, prefixed `[TRAP]: `).
    #[serde(with = "serde_bytes")]
    pub content: Vec<u8>,
}

impl LogRecord {
    /// The bytes this record takes in the log.
    pub fn size(&self) -> u64 {
        LOG_RECORD_OVERHEAD_BYTES + self.content.len() as u64
    }
}

/// Which records a fetch asks for (both ranges inclusive). A range whose start is past its end
/// matches nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFilter {
    /// Records with `start <= idx <= end`.
    ByIdx {
        /// First index.
        start: u64,
        /// Last index.
        end: u64,
    },
    /// Records with `start <= timestamp_nanos <= end`.
    ByTimestampNanos {
        /// First timestamp.
        start: u64,
        /// Last timestamp.
        end: u64,
    },
}

impl LogFilter {
    fn matches(&self, record: &LogRecord) -> bool {
        match *self {
            LogFilter::ByIdx { start, end } => (start..=end).contains(&record.idx),
            LogFilter::ByTimestampNanos { start, end } => {
                (start..=end).contains(&record.timestamp_nanos)
            }
        }
    }
}

/// The bytes a log with setting `log_memory_limit` keeps.
pub fn log_capacity(log_memory_limit: u64) -> u64 {
    if log_memory_limit == 0 {
        0
    } else {
        log_memory_limit.clamp(MIN_LOG_MEMORY_LIMIT, MAX_LOG_MEMORY_LIMIT)
    }
}

/// A canister's log records, oldest first, and the index of the next one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanisterLog {
    next_idx: u64,
    records: VecDeque<LogRecord>,
    bytes_used: u64,
}

impl CanisterLog {
    /// The index the next record gets.
    pub fn next_idx(&self) -> u64 {
        self.next_idx
    }

    /// Bytes the kept records take.
    pub fn bytes_used(&self) -> u64 {
        self.bytes_used
    }

    /// The kept records, oldest first.
    pub fn records(&self) -> &VecDeque<LogRecord> {
        &self.records
    }

    /// Appends a record written at `time`, keeping at most `log_capacity(log_memory_limit)` bytes.
    /// The record gets the next index even when logging is off or it cannot be kept.
    pub fn append(&mut self, log_memory_limit: u64, time: Time, mut content: Vec<u8>) {
        let idx = self.next_idx;
        self.next_idx = self.next_idx.saturating_add(1);
        let capacity = log_capacity(log_memory_limit);
        if capacity == 0 {
            return;
        }
        let max_content = capacity
            .min(MAX_LOG_RECORD_BYTES)
            .saturating_sub(LOG_RECORD_OVERHEAD_BYTES);
        content.truncate(max_content as usize);
        let record = LogRecord {
            idx,
            timestamp_nanos: time.as_nanos_since_unix_epoch(),
            content,
        };
        self.bytes_used += record.size();
        self.records.push_back(record);
        self.shrink_to(capacity);
    }

    /// Drops the oldest records until the rest fits the capacity of `log_memory_limit` (after the
    /// setting changed).
    pub fn resize(&mut self, log_memory_limit: u64) {
        self.shrink_to(log_capacity(log_memory_limit));
    }

    fn shrink_to(&mut self, capacity: u64) {
        while self.bytes_used > capacity {
            let Some(oldest) = self.records.pop_front() else {
                break;
            };
            self.bytes_used -= oldest.size();
        }
    }

    /// Removes every record; indexes keep counting (spec: logs are purged on reinstall and
    /// uninstall).
    pub fn clear(&mut self) {
        self.records.clear();
        self.bytes_used = 0;
    }

    /// The records a fetch returns: without a filter the newest that fit
    /// [`MAX_FETCH_RESULT_BYTES`], with one the oldest matching records that fit, in order.
    pub fn fetch(&self, filter: Option<LogFilter>) -> Vec<&LogRecord> {
        let mut total = 0u64;
        match filter {
            None => {
                let mut newest: Vec<&LogRecord> = self
                    .records
                    .iter()
                    .rev()
                    .take_while(|record| {
                        total += record.size();
                        total <= MAX_FETCH_RESULT_BYTES
                    })
                    .collect();
                newest.reverse();
                newest
            }
            Some(filter) => self
                .records
                .iter()
                .filter(|record| filter.matches(record))
                .take_while(|record| {
                    total += record.size();
                    total <= MAX_FETCH_RESULT_BYTES
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(records: &[&LogRecord]) -> Vec<(u64, String)> {
        records
            .iter()
            .map(|r| (r.idx, String::from_utf8_lossy(&r.content).into_owned()))
            .collect()
    }

    #[test]
    fn records_get_consecutive_indexes_and_the_block_time() {
        let mut log = CanisterLog::default();
        log.append(DEFAULT_LOG_MEMORY_LIMIT, Time(5), b"a".to_vec());
        log.append(DEFAULT_LOG_MEMORY_LIMIT, Time(7), b"bc".to_vec());
        let records = log.fetch(None);
        assert_eq!(contents(&records), [(0, "a".into()), (1, "bc".into())]);
        assert_eq!(records[1].timestamp_nanos, 7);
        assert_eq!(log.bytes_used(), 2 * LOG_RECORD_OVERHEAD_BYTES + 3);
    }

    #[test]
    fn the_oldest_records_go_when_the_limit_is_reached() {
        let mut log = CanisterLog::default();
        // 100 records of 140 bytes each in a 4 KiB log: the last 29 stay.
        for i in 0..100u64 {
            log.append(4096, Time(i), vec![b'x'; 100]);
        }
        let kept = log.fetch(None);
        assert_eq!(kept.len(), 4096 / 140);
        assert_eq!(kept.last().unwrap().idx, 99);
        assert_eq!(kept.first().unwrap().idx, 100 - (4096 / 140) as u64);
        assert!(log.bytes_used() <= 4096);
        assert_eq!(log.next_idx(), 100);
    }

    #[test]
    fn a_long_record_is_cut_to_fit() {
        let mut log = CanisterLog::default();
        log.append(4096, Time(0), vec![b'y'; 10_000]);
        assert_eq!(log.records()[0].size(), MAX_LOG_RECORD_BYTES);
        // A larger log keeps the per-record bound.
        log.append(MAX_LOG_MEMORY_LIMIT, Time(0), vec![b'y'; 10_000]);
        assert_eq!(log.records()[0].size(), MAX_LOG_RECORD_BYTES);
    }

    #[test]
    fn limit_zero_keeps_nothing_and_small_limits_keep_one_page() {
        let mut log = CanisterLog::default();
        log.append(0, Time(0), b"dropped".to_vec());
        assert!(log.records().is_empty());
        assert_eq!(log.next_idx(), 1);
        assert_eq!(log_capacity(1), MIN_LOG_MEMORY_LIMIT);
        assert_eq!(log_capacity(u64::MAX), MAX_LOG_MEMORY_LIMIT);
        log.append(1, Time(0), b"kept".to_vec());
        assert_eq!(contents(&log.fetch(None)), [(1, "kept".into())]);
    }

    #[test]
    fn shrinking_the_limit_drops_the_oldest_and_clear_keeps_counting() {
        let mut log = CanisterLog::default();
        for i in 0..50u64 {
            log.append(MAX_LOG_MEMORY_LIMIT, Time(i), vec![b'z'; 200]);
        }
        assert_eq!(log.records().len(), 50);
        log.resize(4096);
        assert_eq!(log.records().len(), 4096 / 240);
        assert_eq!(log.records().back().unwrap().idx, 49);
        log.clear();
        assert_eq!(log.bytes_used(), 0);
        log.append(4096, Time(99), b"after".to_vec());
        assert_eq!(contents(&log.fetch(None)), [(50, "after".into())]);
    }

    #[test]
    fn filters_select_inclusive_ranges() {
        let mut log = CanisterLog::default();
        for i in 0..10u64 {
            log.append(
                MAX_LOG_MEMORY_LIMIT,
                Time(1000 + i * 10),
                i.to_string().into_bytes(),
            );
        }
        let by_idx = log.fetch(Some(LogFilter::ByIdx { start: 3, end: 5 }));
        assert_eq!(by_idx.iter().map(|r| r.idx).collect::<Vec<_>>(), [3, 4, 5]);
        let by_time = log.fetch(Some(LogFilter::ByTimestampNanos {
            start: 1015,
            end: 1040,
        }));
        assert_eq!(by_time.iter().map(|r| r.idx).collect::<Vec<_>>(), [2, 3, 4]);
        assert!(
            log.fetch(Some(LogFilter::ByIdx { start: 5, end: 3 }))
                .is_empty()
        );
        assert!(
            log.fetch(Some(LogFilter::ByIdx {
                start: 50,
                end: u64::MAX
            }))
            .is_empty()
        );
    }

    #[test]
    fn a_fetch_returns_at_most_the_result_bound() {
        let mut log = CanisterLog::default();
        // 600 records of 4 KiB: 2.4 MB, more than one fetch returns.
        for i in 0..600u64 {
            log.append(u64::MAX, Time(i), vec![b'w'; 5000]);
        }
        assert_eq!(
            log.records().len(),
            (MAX_LOG_MEMORY_LIMIT / MAX_LOG_RECORD_BYTES) as usize
        );
        let newest = log.fetch(None);
        let bytes: u64 = newest.iter().map(|r| r.size()).sum();
        assert!(bytes <= MAX_FETCH_RESULT_BYTES);
        assert_eq!(newest.last().unwrap().idx, 599);
        let oldest = log.fetch(Some(LogFilter::ByIdx {
            start: 0,
            end: u64::MAX,
        }));
        assert_eq!(oldest[0].idx, log.records()[0].idx);
        assert_eq!(oldest.len(), newest.len());
    }
}
