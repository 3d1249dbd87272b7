//! STUB: replaced by the real engine.
use crate::{
    handle::{AppendRequest, Fetched, Reply},
    EngineConfig, Error, Result,
};
use proto::shard::{MailboxStats, ShardStats};
use std::path::Path;

pub(crate) enum Command {
    Append { req: AppendRequest, reply: Reply<u64> },
    AppendBatch { items: Vec<AppendRequest>, reply: Reply<Vec<Result<u64>>> },
    Fetch { user: u64, after_seq: u64, max_count: u32, max_bytes: u32, reply: Reply<Fetched> },
    Ack { user: u64, up_to_seq: u64, reply: Reply<u64> },
    UserStats { user: u64, reply: Reply<MailboxStats> },
    Stats { reply: Reply<ShardStats> },
    Checkpoint { reply: Reply<()> },
    Close { reply: Reply<()> },
}

pub(crate) struct Engine;

impl Engine {
    pub(crate) fn open(_dir: &Path, _config: EngineConfig) -> Result<Engine> {
        Err(Error::Storage("engine not built yet".into()))
    }
    pub(crate) fn run(self, _rx: flume::Receiver<Command>) {}
}
