//! Counters of a block device, shared with whoever wants to read them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of one block device (updated by the event loop).
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Descriptor chains taken from the queue.
    pub requests: AtomicU64,
    /// Successful read requests.
    pub reads: AtomicU64,
    /// Successful write requests.
    pub writes: AtomicU64,
    /// Successful flush requests.
    pub flushes: AtomicU64,
    /// Bytes read from the backing file into guest memory.
    pub read_bytes: AtomicU64,
    /// Bytes written from guest memory to the backing file.
    pub write_bytes: AtomicU64,
    /// Requests answered with an error status (I/O error, read-only,
    /// unsupported) or dropped as malformed.
    pub failures: AtomicU64,
    /// Chains that were not valid requests (a subset of `failures`).
    pub invalid_requests: AtomicU64,
}

/// A copy of [`BlockMetrics`] at one instant.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockMetricsSnapshot {
    /// See [`BlockMetrics::requests`].
    pub requests: u64,
    /// See [`BlockMetrics::reads`].
    pub reads: u64,
    /// See [`BlockMetrics::writes`].
    pub writes: u64,
    /// See [`BlockMetrics::flushes`].
    pub flushes: u64,
    /// See [`BlockMetrics::read_bytes`].
    pub read_bytes: u64,
    /// See [`BlockMetrics::write_bytes`].
    pub write_bytes: u64,
    /// See [`BlockMetrics::failures`].
    pub failures: u64,
    /// See [`BlockMetrics::invalid_requests`].
    pub invalid_requests: u64,
}

impl BlockMetrics {
    /// Reads all counters.
    pub fn snapshot(&self) -> BlockMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockMetricsSnapshot {
            requests: get(&self.requests),
            reads: get(&self.reads),
            writes: get(&self.writes),
            flushes: get(&self.flushes),
            read_bytes: get(&self.read_bytes),
            write_bytes: get(&self.write_bytes),
            failures: get(&self.failures),
            invalid_requests: get(&self.invalid_requests),
        }
    }

    pub(crate) fn inc(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}
