//! The ordered log that gives every mutation its sequence number.
//!
//! Every mutation (a publish, a fill) is appended here before it is applied,
//! and the seq the log returns becomes the version of every key it changes.
//! The embedded default keeps nothing but the counter; a write-ahead file and
//! a NATS JetStream stream implement the same trait, so one applier serves all
//! of them.

use crate::policy::Policy;
use crate::store::{FillSpec, PublishChange};

/// A mutation as the log records it: everything needed to apply it again,
/// identically, when the log is replayed.
#[derive(Debug, Clone, Copy)]
pub enum Record<'a> {
    /// A publish: its changes in request order, and which of them were
    /// duplicates (those have no effect).
    Publish {
        /// The changes.
        changes: &'a [PublishChange],
        /// `duplicate[i]` is true when `changes[i]` had no effect.
        duplicate: &'a [bool],
        /// The publishing client's id, for no-loop.
        origin: &'a str,
        /// When it was applied.
        unix_ms: u64,
    },
    /// A fill that passed its `observed_seq` check.
    Fill {
        /// The fill.
        spec: &'a FillSpec,
        /// When it was applied (its TTL runs from here).
        unix_ms: u64,
    },
    /// A freshness policy set (`Some`) or removed (`None`) for a namespace
    /// (`None`: the default).
    Policy {
        /// The namespace.
        namespace: Option<&'a str>,
        /// The policy.
        policy: Option<&'a Policy>,
    },
    /// A soft purge (hard purges are logged as publishes).
    Purge {
        /// The prefix.
        prefix: &'a str,
        /// The spread, ms.
        jitter_ms: u64,
        /// When it was applied.
        unix_ms: u64,
    },
}

/// An ordered, append-only log of mutations.
///
/// Appends are serialised by the caller; `append` must return strictly
/// increasing seqs, starting above [`Log::last_seq`].
pub trait Log: Send {
    /// The history this log's seqs belong to.
    fn epoch(&self) -> u64;
    /// The seq of the last appended record (0 when empty).
    fn last_seq(&self) -> u64;
    /// Appends a record and returns its seq.
    fn append(&mut self, record: &Record<'_>) -> Result<u64, LogError>;
    /// A handle to wait until appended records are durable, for logs that
    /// write to disk.
    fn durability(&self) -> Option<crate::wal::Durability> {
        None
    }
}

/// A log that could not take a record.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LogError(pub String);

/// The memory-only log of the embedded default: a counter and an epoch that is
/// new every time the process starts, since nothing survives a restart.
#[derive(Debug)]
pub struct MemoryLog {
    epoch: u64,
    seq: u64,
}

impl MemoryLog {
    /// A new, empty history with a random non-zero epoch.
    pub fn new() -> Self {
        Self::with_epoch(new_epoch())
    }

    /// A new, empty history with the given epoch.
    pub fn with_epoch(epoch: u64) -> Self {
        Self { epoch, seq: 0 }
    }
}

impl Default for MemoryLog {
    fn default() -> Self {
        Self::new()
    }
}

impl Log for MemoryLog {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn last_seq(&self) -> u64 {
        self.seq
    }

    fn append(&mut self, _record: &Record<'_>) -> Result<u64, LogError> {
        self.seq += 1;
        Ok(self.seq)
    }
}

/// A random epoch id; never 0, which clients use to mean "no epoch".
pub fn new_epoch() -> u64 {
    loop {
        let epoch: u64 = rand::random();
        // Keep epochs within 2^53 so that JSON clients read them exactly.
        let epoch = epoch & ((1 << 53) - 1);
        if epoch != 0 {
            return epoch;
        }
    }
}
