//! Snapshots of a shard as files (docs/STORAGE.md, "Replicated shards"):
//! [`Engine::write_snapshot`] checkpoints and archives the directory's
//! state (the index, copied; the bucket files up to their committed
//! length; pending compacted files; `routing.toml`), and
//! [`Engine::install_snapshot`] unpacks an archive beside a shard
//! directory, checks all of it, and swaps it in with renames that
//! [`Engine::open_replicated`] finishes or undoes after a crash.

mod archive;

pub(crate) use archive::SnapshotSummary;

use super::{buckets::parse_compacted_name, checkpoint::lock, routing::ROUTING_FILE, Engine};
use crate::{Error, Result};
use archive::{ArchiveReader, ArchiveWriter, FileHeader};
use std::{
    collections::BTreeSet,
    fs::{self, File, OpenOptions},
    io::{Read, Write},
    path::{Path, PathBuf},
};

/// The index copy's path in an archive (and in the shard directory).
const INDEX_PATH: &str = "index/data.mdb";
/// Where the index is copied to while it is archived (unlinked at once).
const INDEX_COPY_TMP: &str = "snapshot-index.tmp";
/// Written into `<dir>.incoming` once all of it is durable and checked.
const COMPLETE_MARKER: &str = "COMPLETE";

impl Engine {
    /// Checkpoint ([`Engine::checkpoint_now`]), then write an archive of
    /// the state it made durable into `out`: a compacted copy of the index
    /// (with the applied marker), every bucket file up to its committed
    /// length, any compacted file awaiting its swap, `routing.toml` if
    /// present. Not the log (a checkpoint covers it), not `LOCK`. The
    /// caller holds the engine exclusively throughout.
    pub(crate) fn write_snapshot(&mut self, out: &mut dyn Write) -> Result<SnapshotSummary> {
        self.checkpoint_now()?;
        let mut archive = ArchiveWriter::start(out)?;
        self.archive_index(&mut archive)?;
        self.archive_buckets(&mut archive)?;
        self.archive_pending_swaps(&mut archive)?;
        let routing = self.dir.join(ROUTING_FILE);
        if let Some(mut file) = open_if_exists(&routing)? {
            let len = file.metadata()?.len();
            archive.file(ROUTING_FILE, &mut file, len)?;
        }
        archive.finish()
    }

    /// Add a compacted copy of the index, made in a file unlinked as soon
    /// as it exists (nothing is left behind whatever happens).
    fn archive_index(&self, archive: &mut ArchiveWriter<'_>) -> Result<()> {
        let tmp = self.dir.join(INDEX_COPY_TMP);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        fs::remove_file(&tmp)?;
        self.index.copy_to(&mut file)?;
        let len = file.metadata()?.len();
        archive.file(INDEX_PATH, &mut file, len)
    }

    /// Add every bucket file the index knows, up to its committed length
    /// (what lies past it is garbage; a file shorter than that, damaged,
    /// goes as it is, and a missing one is left out).
    fn archive_buckets(&self, archive: &mut ArchiveWriter<'_>) -> Result<()> {
        let mut ids: Vec<u32> = self.bucket_meta.keys().copied().collect();
        ids.sort_unstable();
        for bucket in ids {
            let path = lock(&self.buckets).path(bucket);
            let Some(mut file) = open_if_exists(&path)? else {
                continue;
            };
            let len = self.bucket_meta[&bucket].len.min(file.metadata()?.len());
            archive.file(&self.relative(&path)?, &mut file, len)?;
        }
        Ok(())
    }

    /// Add the compacted files the last checkpoint lists as pending swaps
    /// that are still in `compact/` (after a merged checkpoint, none: the
    /// merge renamed them into place; the open of the installed copy
    /// finishes any).
    fn archive_pending_swaps(&self, archive: &mut ArchiveWriter<'_>) -> Result<()> {
        let pending = self.index.checkpoint_meta()?.pending_swaps;
        let compact = self.dir.join("compact");
        let mut names: Vec<String> = match fs::read_dir(&compact) {
            Ok(entries) => entries
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<std::io::Result<_>>()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        names.retain(|n| parse_compacted_name(n).is_some_and(|swap| pending.contains(&swap)));
        names.sort_unstable();
        for name in names {
            let mut file = File::open(compact.join(&name))?;
            let len = file.metadata()?.len();
            archive.file(&format!("compact/{name}"), &mut file, len)?;
        }
        Ok(())
    }

    /// `path` (inside the shard directory) relative to it, `/`-separated.
    fn relative(&self, path: &Path) -> Result<String> {
        path.strip_prefix(&self.dir)
            .ok()
            .and_then(Path::to_str)
            .map(str::to_owned)
            .ok_or_else(|| Error::Storage(format!("{} is outside the shard", path.display())))
    }

    /// Replace the shard directory `dir` (which must not be open) with the
    /// state an archive from [`Engine::write_snapshot`] holds. The archive
    /// is unpacked into `<dir>.incoming` (a stale one removed first), every
    /// file checked and made durable, `COMPLETE` written; only then `dir`
    /// becomes `<dir>.old`, `<dir>.incoming` becomes `dir`, and `<dir>.old`
    /// is removed. A damaged, truncated or foreign archive is refused
    /// ([`Error::BadSnapshot`]) with `dir` untouched. Open the result with
    /// [`Engine::open_replicated`], which also finishes or undoes a swap a
    /// crash interrupted.
    pub(crate) fn install_snapshot(dir: &Path, input: &mut dyn Read) -> Result<SnapshotSummary> {
        let sides = Siblings::of(dir)?;
        let existed = dir.exists();
        // Refuses a directory an engine has open; creates a missing one.
        let lock = daemon::DirLock::acquire(dir)?;
        remove_dir_if_exists(&sides.incoming)?;
        let summary = match receive(&sides.incoming, input) {
            Ok(summary) => summary,
            Err(e) => {
                let _ = fs::remove_dir_all(&sides.incoming);
                if !existed {
                    drop(lock);
                    let _ = fs::remove_dir_all(dir);
                }
                return Err(e);
            }
        };
        swap_in(dir, &sides)?;
        drop(lock);
        tracing::info!(
            dir = %dir.display(),
            files = summary.files,
            bytes = summary.bytes,
            "installed a snapshot"
        );
        Ok(summary)
    }
}

/// The directories beside a shard directory an install uses.
struct Siblings {
    /// `<dir>.incoming`: the archive being unpacked.
    incoming: PathBuf,
    /// `<dir>.old`: the replaced directory, until it is removed.
    old: PathBuf,
    /// The directory holding all three.
    parent: PathBuf,
}

impl Siblings {
    fn of(dir: &Path) -> Result<Siblings> {
        let name = dir.file_name().ok_or_else(|| {
            Error::Config(format!("{} cannot be a shard directory", dir.display()))
        })?;
        let with = |suffix: &str| {
            let mut n = name.to_os_string();
            n.push(suffix);
            dir.with_file_name(n)
        };
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(Siblings {
            incoming: with(".incoming"),
            old: with(".old"),
            parent,
        })
    }
}

/// Unpack and check the archive from `input` into the new directory
/// `incoming`; every file and directory durable, then `COMPLETE`.
fn receive(incoming: &Path, input: &mut dyn Read) -> Result<SnapshotSummary> {
    fs::create_dir_all(incoming)?;
    let mut reader = ArchiveReader::start(input)?;
    let mut seen = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    while let Some(header) = reader.next_file()? {
        if !seen.insert(header.path.clone()) {
            return Err(Error::BadSnapshot(format!("{} twice", header.path)));
        }
        receive_file(incoming, &mut reader, &header, &mut dirs)?;
    }
    let summary = reader.finish()?;
    if !seen.contains(INDEX_PATH) {
        return Err(Error::BadSnapshot(format!("no {INDEX_PATH}")));
    }
    // Deepest first, then the root: each entry is durable in its parent.
    for d in dirs.iter().rev() {
        super::wal::sync_dir(d)?;
    }
    super::wal::sync_dir(incoming)?;
    File::create(incoming.join(COMPLETE_MARKER))?.sync_all()?;
    super::wal::sync_dir(incoming)?;
    Ok(summary)
}

/// Write one file of the archive under `incoming`, durably; note the
/// directories it needed (every one below `incoming`) in `dirs`.
fn receive_file(
    incoming: &Path,
    reader: &mut ArchiveReader<'_>,
    header: &FileHeader,
    dirs: &mut BTreeSet<PathBuf>,
) -> Result<()> {
    let target = incoming.join(&header.path);
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
        let below = parent.ancestors().take_while(|a| *a != incoming);
        dirs.extend(below.map(Path::to_path_buf));
    }
    let mut file = File::create(&target)?;
    reader.copy_file(header, &mut file)?;
    file.sync_all()?;
    Ok(())
}

/// `dir` -> `<dir>.old`, `<dir>.incoming` -> `dir`, then `<dir>.old` and
/// the marker go; each rename made durable before the next step.
fn swap_in(dir: &Path, sides: &Siblings) -> Result<()> {
    remove_dir_if_exists(&sides.old)?;
    fs::rename(dir, &sides.old)?;
    fs::rename(&sides.incoming, dir)?;
    super::wal::sync_dir(&sides.parent)?;
    fs::remove_file(dir.join(COMPLETE_MARKER))?;
    super::wal::sync_dir(dir)?;
    fs::remove_dir_all(&sides.old)?;
    super::wal::sync_dir(&sides.parent)
}

/// Before `dir` is opened replicated: finish a swap a crash interrupted
/// (`dir` missing, `<dir>.incoming` complete: it becomes `dir`) or undo it
/// (`dir` missing, `<dir>.old` there: it becomes `dir` again).
pub(super) fn finish_interrupted_install(dir: &Path) -> Result<()> {
    if dir.exists() {
        return Ok(());
    }
    let sides = Siblings::of(dir)?;
    if sides.incoming.join(COMPLETE_MARKER).exists() {
        fs::rename(&sides.incoming, dir)?;
        tracing::warn!(dir = %dir.display(), "finished an interrupted snapshot install");
    } else if sides.old.exists() {
        fs::rename(&sides.old, dir)?;
        tracing::warn!(dir = %dir.display(), "undid an interrupted snapshot install");
    } else {
        return Ok(());
    }
    super::wal::sync_dir(&sides.parent)
}

/// Once `dir` is open (locked): remove what an interrupted install left
/// (`<dir>.incoming`, `<dir>.old`, the marker).
pub(super) fn remove_install_leftovers(dir: &Path) -> Result<()> {
    let sides = Siblings::of(dir)?;
    let mut removed = remove_dir_if_exists(&sides.incoming)?;
    removed |= remove_dir_if_exists(&sides.old)?;
    if removed {
        tracing::warn!(dir = %dir.display(), "removed leftovers of an interrupted snapshot install");
        super::wal::sync_dir(&sides.parent)?;
    }
    match fs::remove_file(dir.join(COMPLETE_MARKER)) {
        Ok(()) => super::wal::sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Remove the directory tree `path` if it exists; whether it did.
fn remove_dir_if_exists(path: &Path) -> Result<bool> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// `path` opened for reading, or `None` if it does not exist.
fn open_if_exists(path: &Path) -> Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests;
