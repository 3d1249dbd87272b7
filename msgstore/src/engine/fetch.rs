//! Reading one page of a mailbox. The chain walk follows the structure;
//! each record the page shows has its checksum checked (a damaged one is
//! skipped, counted and logged). The page borrows the payloads from the
//! bucket map and the memtable, and the caller encodes it wherever it wants
//! (the daemon: straight into a connection's buffer, with no copy per
//! record).

use super::{checkpoint::lock, codec::read_record, Engine};
use crate::{Fetched, Result};
use proto::{
    shard::{FETCH_BYTES_MAX, FETCH_COUNT_MAX},
    shard_page::StoredRecordRef,
};

/// A page of records, borrowed from the engine.
pub(crate) struct PageRef<'a> {
    pub records: Vec<StoredRecordRef<'a>>,
    /// Records with a higher seq remain that a fetch can show: the page
    /// left one out for its limits. (Live records that cannot be shown, a
    /// damaged one or those a damaged link cut off from the chain, do not
    /// count: otherwise a page could be empty and still say more, and a
    /// client would ask for it again forever. Undamaged, this is exactly
    /// "live records with a higher seq than the last one returned remain".)
    pub more: bool,
    /// The newest batch that logged a record of this page; 0 if every
    /// record came from a bucket file (which holds only durable records).
    /// Once that batch is durable, so is everything the page shows.
    pub newest_batch: u64,
}

/// A page being filled within its limits.
struct Limits {
    bytes: u64,
    count_max: usize,
    bytes_max: u64,
    /// A record was refused: nothing later may be added, or the page
    /// would skip it; the page says more.
    full: bool,
}

impl Limits {
    /// Whether one more record of `len` payload bytes fits (counting it if
    /// so). The first record always fits, so one large message cannot
    /// block a mailbox.
    fn admit(&mut self, held: usize, len: usize) -> bool {
        let len = len as u64;
        if self.full || held >= self.count_max || (held > 0 && self.bytes + len > self.bytes_max) {
            self.full = true;
            return false;
        }
        self.bytes += len;
        true
    }
}

impl Engine {
    /// Read the page of `user` after `after_seq` (and after what is
    /// acknowledged) within the limits (clamped to the protocol's), and
    /// hand it to `answer` while it is borrowed.
    pub(crate) fn fetch_with<R>(
        &mut self,
        user: u64,
        after_seq: u64,
        (max_count, max_bytes): (u32, u32),
        answer: impl FnOnce(&PageRef<'_>) -> R,
    ) -> Result<R> {
        self.check_usable()?;
        let state = self.load_user(user)?;
        self.admit(user, state.as_ref(), false)?;
        let mut page = PageRef {
            records: Vec::new(),
            more: false,
            newest_batch: 0,
        };
        let Some(state) = state else {
            return Ok(answer(&page));
        };
        let start = after_seq.max(state.acked_seq) + 1;
        let mut limits = Limits {
            bytes: 0,
            count_max: max_count.min(FETCH_COUNT_MAX) as usize,
            bytes_max: u64::from(max_bytes.min(FETCH_BYTES_MAX)),
            full: false,
        };
        let links = if start <= state.tail_seq {
            self.chain(user, &state, start)?
        } else {
            Vec::new()
        };
        let unflushed = self.unflushed(user).filter(|p| p.seq >= start).count();
        page.records = Vec::with_capacity(limits.count_max.min(links.len() + unflushed));
        let committed = self.committed_len(state.bucket);
        // Only a page with bucket records takes the lock (a running
        // checkpoint holds it while it writes each bucket).
        let mut buckets = (!links.is_empty()).then(|| lock(&self.buckets));
        let view = match buckets.as_mut() {
            Some(b) => b.view(state.bucket)?.unwrap_or(&[]),
            None => &[][..],
        };
        let view = &view[..committed.min(view.len())];
        // The walk went newest first; the page shows the oldest.
        let mut corrupt = Vec::new();
        for link in links.iter().rev() {
            let rec = match read_record(view, link.offset, usize::MAX >> 1) {
                Ok(rec) => rec,
                Err(_) => {
                    corrupt.push(link.offset);
                    continue;
                }
            };
            if !limits.admit(page.records.len(), rec.payload.len()) {
                break;
            }
            page.records.push(StoredRecordRef {
                seq: rec.header.seq,
                msg_id: rec.header.msg_id,
                timestamp_ms: rec.header.timestamp_ms,
                payload: rec.payload,
            });
        }
        for p in self.unflushed(user).filter(|p| p.seq >= start) {
            if !limits.admit(page.records.len(), p.payload.len()) {
                break;
            }
            page.newest_batch = page.newest_batch.max(p.batch);
            page.records.push(StoredRecordRef {
                seq: p.seq,
                msg_id: p.msg_id,
                timestamp_ms: p.timestamp_ms,
                payload: &p.payload,
            });
        }
        // Every readable record from `start` on was offered to the page, in
        // seq order: one remains iff the limits refused one.
        page.more = limits.full;
        let answered = answer(&page);
        drop(page);
        drop(buckets);
        for offset in corrupt {
            self.count_unreachable(state.bucket, offset, 1, "checksum");
        }
        Ok(answered)
    }

    /// [`Engine::fetch_with`], copied out.
    pub(super) fn fetch(
        &mut self,
        user: u64,
        after_seq: u64,
        max_count: u32,
        max_bytes: u32,
    ) -> Result<Fetched> {
        self.fetch_with(user, after_seq, (max_count, max_bytes), |page| Fetched {
            records: page
                .records
                .iter()
                .map(StoredRecordRef::to_record)
                .collect(),
            more: page.more,
        })
    }

    /// Bytes of `bucket` that readers may look at (a running checkpoint
    /// writes past them).
    pub(super) fn committed_len(&self, bucket: u32) -> usize {
        let len = self.bucket_meta.get(&bucket).map_or(0, |m| m.len);
        usize::try_from(len).unwrap_or(usize::MAX)
    }
}
