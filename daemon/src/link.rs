//! The sending half of a pipelined link, shared by every client library
//! (msgstore, profile): frames queued by many callers go out gathered into
//! few writes.

use crate::secure::LinkWriter;
use tokio::sync::mpsc;

/// Write queued frames, gathering whatever is already queued (up to
/// `batch_bytes_max`) into one write. Returns `Ok` once every sender is
/// gone (after shutting our side down, so the peer sees EOF), or the first
/// write error.
pub async fn write_frames(
    mut wr: LinkWriter,
    mut frames: mpsc::Receiver<Vec<u8>>,
    batch_bytes_max: usize,
) -> std::io::Result<()> {
    let mut out = Vec::new();
    while let Some(first) = frames.recv().await {
        out.clear();
        out.extend_from_slice(&first);
        while out.len() < batch_bytes_max {
            match frames.try_recv() {
                Ok(frame) => out.extend_from_slice(&frame),
                Err(_) => break,
            }
        }
        wr.send(&out).await?;
    }
    let _ = wr.shutdown().await;
    Ok(())
}
