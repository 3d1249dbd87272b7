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

/// jemalloc's `MALLCTL_ARENAS_ALL`: an arena index naming every arena.
const ALL_ARENAS: usize = 4096;

/// Give the system back now the pages of memory the program freed
/// (jemalloc otherwise returns them over `dirty_decay_ms`, and only while
/// the program keeps allocating): for a process that just went idle after
/// freeing much. Under another global allocator, jemalloc holds nothing
/// and this does nothing.
pub fn release_freed_pages() {
    let name = format!("arena.{ALL_ARENAS}.purge\0");
    // SAFETY: `arena.<i>.purge` takes and returns nothing: both pointer
    // pairs are null, the name is NUL-terminated.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        tracing::debug!(rc, "jemalloc purge failed");
    }
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

#[cfg(test)]
mod tests {
    #[test]
    fn freed_pages_can_be_released_at_any_time() {
        let big = vec![1u8; 8 << 20];
        drop(big);
        super::release_freed_pages();
        super::release_freed_pages();
    }
}
