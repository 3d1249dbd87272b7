//! The public handle of an open shard: cheap to clone, usable from threads
//! and from async tasks. Every call queues a command to the shard's single
//! writer thread and returns a [`Ticket`] for the answer.

use crate::{
    engine::{Command, Engine},
    Error, Result,
};
use proto::shard::{MailboxStats, ShardStats, StoredRecord};
use std::{
    future::Future,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    thread::JoinHandle,
};
use tokio::sync::oneshot;

pub use crate::config::EngineConfig;

/// One message to store, as [`Shard::append_batch`] takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendRequest {
    pub user: u64,
    pub msg_id: u128,
    pub payload: Vec<u8>,
}

/// A page of a mailbox, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fetched {
    pub records: Vec<StoredRecord>,
    /// Live records with a higher seq remain after this page.
    pub more: bool,
}

/// The pending answer to one command: `.wait()` from a thread, `.await` from
/// async code.
#[must_use = "a ticket is the only way to learn whether the command succeeded"]
pub struct Ticket<T> {
    inner: TicketInner<T>,
}

enum TicketInner<T> {
    Pending(oneshot::Receiver<Result<T>>),
    Ready(Option<Result<T>>),
}

impl<T> Ticket<T> {
    pub(crate) fn ready(result: Result<T>) -> Self {
        Self {
            inner: TicketInner::Ready(Some(result)),
        }
    }

    /// Block the calling thread until the answer arrives. Must not be called
    /// from inside an async runtime's worker thread.
    pub fn wait(self) -> Result<T> {
        match self.inner {
            TicketInner::Pending(rx) => rx.blocking_recv().unwrap_or(Err(Error::Closed)),
            TicketInner::Ready(r) => r.unwrap_or(Err(Error::Closed)),
        }
    }
}

// A ticket is never pin-projected: it only moves its receiver or value.
impl<T> Unpin for Ticket<T> {}

impl<T> Future for Ticket<T> {
    type Output = Result<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        match &mut self.get_mut().inner {
            TicketInner::Pending(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(Error::Closed))),
            TicketInner::Ready(r) => Poll::Ready(r.take().unwrap_or(Err(Error::Closed))),
        }
    }
}

/// Where the writer thread sends one answer.
pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

/// An open shard. Clones share the same writer thread.
#[derive(Clone)]
pub struct Shard {
    tx: flume::Sender<Command>,
    writer: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Shard {
    /// Open (creating if needed) the shard in `dir`: lock the directory, load
    /// the index, replay the write-ahead log, start the writer thread.
    pub fn open(dir: impl AsRef<Path>, config: EngineConfig) -> Result<Shard> {
        config.validate().map_err(Error::Config)?;
        let queue_max = config.queue_requests_max;
        let engine = Engine::open(dir.as_ref(), config)?;
        let (tx, rx) = flume::bounded(queue_max);
        let writer = std::thread::Builder::new()
            .name("msgstore-writer".into())
            .spawn(move || engine.run(rx))?;
        Ok(Shard {
            tx,
            writer: Arc::new(Mutex::new(Some(writer))),
        })
    }

    fn submit<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Ticket<T> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(make(reply)) {
            Ok(()) => Ticket {
                inner: TicketInner::Pending(rx),
            },
            Err(flume::TrySendError::Full(_)) => {
                metrics::counter!("msgstore_queue_full_total").increment(1);
                Ticket::ready(Err(Error::Overloaded("writer queue is full")))
            }
            Err(flume::TrySendError::Disconnected(_)) => Ticket::ready(Err(Error::Closed)),
        }
    }

    /// Store one message for `user`; answers its sequence number once the
    /// fsync policy's durability point is reached.
    pub fn append(&self, user: u64, msg_id: u128, payload: Vec<u8>) -> Ticket<u64> {
        self.submit(|reply| Command::Append {
            req: AppendRequest {
                user,
                msg_id,
                payload,
            },
            reply,
        })
    }

    /// Store several messages in one command; each succeeds or fails alone.
    pub fn append_batch(&self, items: Vec<AppendRequest>) -> Ticket<Vec<Result<u64>>> {
        self.submit(|reply| Command::AppendBatch { items, reply })
    }

    /// Live records of `user` with `seq > after_seq`, oldest first, at most
    /// `max_count` of them and at most `max_bytes` of payload (the first
    /// record is returned even if it alone is larger).
    pub fn fetch(
        &self,
        user: u64,
        after_seq: u64,
        max_count: u32,
        max_bytes: u32,
    ) -> Ticket<Fetched> {
        self.submit(|reply| Command::Fetch {
            user,
            after_seq,
            max_count,
            max_bytes,
            reply,
        })
    }

    /// Delete every record of `user` with `seq <= up_to_seq`; answers how
    /// many were removed by this call.
    pub fn ack(&self, user: u64, up_to_seq: u64) -> Ticket<u64> {
        self.submit(|reply| Command::Ack {
            user,
            up_to_seq,
            reply,
        })
    }

    pub fn user_stats(&self, user: u64) -> Ticket<MailboxStats> {
        self.submit(|reply| Command::UserStats { user, reply })
    }

    pub fn stats(&self) -> Ticket<ShardStats> {
        self.submit(|reply| Command::Stats { reply })
    }

    /// Run a checkpoint (and any due compaction) now.
    pub fn checkpoint(&self) -> Ticket<()> {
        self.submit(|reply| Command::Checkpoint { reply })
    }

    /// Finish every queued command, sync, checkpoint and stop the writer.
    /// Later calls on any clone answer [`Error::Closed`].
    pub fn close(&self) -> Result<()> {
        let result = self.submit(|reply| Command::Close { reply }).wait();
        if let Some(writer) = self.writer.lock().expect("writer lock").take() {
            let _ = writer.join();
        }
        match result {
            Err(Error::Closed) => Ok(()),
            other => other,
        }
    }
}
