//! The log-writer threads of the daemon: perform the deferred durable log
//! writes of closed batches ([`Engine::end_batch_deferred`]) while the
//! server thread answers the next batch. Several writes run at once (each
//! to its own reserved range): a disk completes concurrent synchronous
//! writes far faster than one after the other. Completions may arrive out
//! of order; the server answers batches strictly in order. Once a write
//! fails, later writes are refused without touching the log: replay must
//! find the log ending at the first failure.
//!
//! [`Engine::end_batch_deferred`]: crate::engine::Engine::end_batch_deferred

use crate::engine::DeferredWrite;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// What the thread reports: the batch number and how its write went.
pub(crate) type Completion = (u64, Result<(), String>);

pub(crate) struct LogWriter {
    tx: Option<flume::Sender<(u64, DeferredWrite)>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl LogWriter {
    /// Start `threads` writer threads; completions arrive on the returned
    /// receiver.
    pub(crate) fn start(
        threads: usize,
    ) -> std::io::Result<(LogWriter, mpsc::UnboundedReceiver<Completion>)> {
        let (tx, rx) = flume::unbounded::<(u64, DeferredWrite)>();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let failed: Arc<Mutex<Option<String>>> = Arc::default();
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads.max(1) {
            let (rx, done_tx, failed) = (rx.clone(), done_tx.clone(), failed.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(format!("msgstore-log-{i}"))
                    .spawn(move || write_loop(&rx, &done_tx, &failed))?,
            );
        }
        Ok((
            LogWriter {
                tx: Some(tx),
                threads: handles,
            },
            done_rx,
        ))
    }

    /// Queue a batch's write; false if the threads are gone.
    pub(crate) fn submit(&self, batch: u64, write: DeferredWrite) -> bool {
        self.tx
            .as_ref()
            .is_some_and(|tx| tx.send((batch, write)).is_ok())
    }
}

fn write_loop(
    rx: &flume::Receiver<(u64, DeferredWrite)>,
    done: &mpsc::UnboundedSender<Completion>,
    failed: &Mutex<Option<String>>,
) {
    for (batch, write) in rx.iter() {
        let earlier = failed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let result = match earlier {
            Some(first) => Err(format!("an earlier log write failed: {first}")),
            None => write.perform(),
        };
        if let Err(e) = &result {
            failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(|| e.clone());
        }
        if done.send((batch, result)).is_err() {
            return;
        }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.tx.take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
