//! The process's heap, from jemalloc's statistics (every daemon binary and
//! `imctl` use jemalloc as their allocator): `process_heap_allocated_bytes`
//! (bytes the program holds) and `process_heap_resident_bytes` (pages
//! jemalloc holds from the system), refreshed at every scrape.

/// Read jemalloc's current totals: (allocated, resident) bytes. Both are 0
/// in a program whose allocator is not jemalloc.
pub fn stats() -> (u64, u64) {
    use tikv_jemalloc_ctl::{epoch, stats};
    if epoch::advance().is_err() {
        return (0, 0);
    }
    let allocated = stats::allocated::read().unwrap_or(0) as u64;
    let resident = stats::resident::read().unwrap_or(0) as u64;
    (allocated, resident)
}

/// Describe the heap gauges (once per process).
pub(crate) fn describe() {
    metrics::describe_gauge!(
        "process_heap_allocated_bytes",
        metrics::Unit::Bytes,
        "Heap bytes the process holds (jemalloc stats.allocated)"
    );
    metrics::describe_gauge!(
        "process_heap_resident_bytes",
        metrics::Unit::Bytes,
        "Heap pages jemalloc holds from the system (stats.resident)"
    );
    refresh();
}

/// Set the heap gauges to the current totals.
pub(crate) fn refresh() {
    let (allocated, resident) = stats();
    metrics::gauge!("process_heap_allocated_bytes").set(allocated as f64);
    metrics::gauge!("process_heap_resident_bytes").set(resident as f64);
}
