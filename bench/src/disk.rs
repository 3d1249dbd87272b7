//! The raw disk ceiling and directory sizes.

use crate::report::{DiskResult, LatencyHist, PhaseResult};
use anyhow::{Context, Result};
use std::{
    fs::OpenOptions,
    io::Write,
    os::unix::fs::MetadataExt,
    path::Path,
    time::{Duration, Instant},
};

/// Append `record_bytes`-sized records sequentially to one new file in
/// `dir` (O_APPEND), one `write` and one fdatasync per `records_per_sync`
/// records, for `duration`. Latency is per batch (write + fdatasync).
pub fn ceiling(
    dir: &Path,
    record_bytes: usize,
    records_per_sync: usize,
    duration: Duration,
) -> Result<DiskResult> {
    let records_per_sync = records_per_sync.max(1);
    let path = dir.join("disk-ceiling.log");
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut batch = vec![0u8; record_bytes * records_per_sync];
    crate::load::Rng::new(0xD15C).fill(&mut batch);
    let mut hist = LatencyHist::new();
    let mut records = 0u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        let t0 = Instant::now();
        file.write_all(&batch)
            .with_context(|| format!("write {}", path.display()))?;
        file.sync_data()
            .with_context(|| format!("fdatasync {}", path.display()))?;
        hist.record(t0.elapsed());
        records += records_per_sync as u64;
    }
    let elapsed = start.elapsed();
    drop(file);
    std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    Ok(DiskResult {
        phase: PhaseResult {
            phase: "disk_ceiling".into(),
            target: "disk".into(),
            setting: format!("fdatasync/{records_per_sync}"),
            connections: 1,
            pipeline: records_per_sync,
            ops: records,
            ops_in_window: records,
            abandoned: 0,
            errors: 0,
            first_error: None,
            elapsed_secs: elapsed.as_secs_f64(),
            ops_per_sec: records as f64 / elapsed.as_secs_f64().max(1e-9),
            latency: hist.summary(),
            server_cpu_us_per_op: None,
            client_cpu_us_per_op: None,
            rate_samples: Vec::new(),
        },
        record_bytes,
        records_per_sync,
    })
}

/// Allocated bytes of every file under `dir` (what `du` reports).
pub fn dir_allocated_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("read dir {}", d.display()))? {
            let entry = entry?;
            let meta = entry
                .path()
                .symlink_metadata()
                .with_context(|| format!("stat {}", entry.path().display()))?;
            if meta.is_dir() {
                stack.push(entry.path());
            }
            total += meta.blocks() * 512;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_runs_and_counts_whole_batches() {
        let dir = tempfile::tempdir().unwrap();
        let r = ceiling(dir.path(), 260, 10, Duration::from_millis(50)).unwrap();
        assert!(r.phase.ops > 0);
        assert_eq!(r.phase.ops % 10, 0);
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }

    #[test]
    fn du_counts_nested_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/f"), vec![1u8; 10_000]).unwrap();
        assert!(dir_allocated_bytes(dir.path()).unwrap() >= 10_000);
    }
}
