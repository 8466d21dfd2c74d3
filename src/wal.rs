//! The write-ahead log under `--data-dir`: every mutation is appended to a
//! file before it is acknowledged, through the same [`Log`] trait as the
//! memory-only default, and replayed at startup.
//!
//! # Files
//! `wal-<first seq, 20 digits>.log` segments. Each starts with a header
//! (`FRESHWAL`, format version, epoch) and holds records framed as
//! `[u32 length][u32 CRC-32 of the payload][payload]`, little-endian; the
//! payload is a protobuf [`WalRecord`]. A new segment starts when the current
//! one passes `segment_bytes`.
//!
//! # Durability
//! Records are written with one `write` each, so a process crash loses
//! nothing written. `fsync` decides what survives a machine crash:
//! - `always`: an acknowledgement waits until its record is on disk; one
//!   background `fsync` covers every record written meanwhile (group commit);
//! - `interval` (the default, every `fsync_interval`, 100 ms unless set):
//!   acknowledged writes of the last interval can be lost;
//! - `never`: the operating system decides.
//!
//! Seqs are never reused, whatever was lost: before it hands out seqs past
//! its reservation the log durably writes a `Reserve` record for the next
//! block, and after a restart it continues past the last reservation. A
//! version a client saw before a crash therefore never names another state.
//!
//! # Recovery
//! Segments are read in order. A record cut short or failing its checksum at
//! the very end of the last segment is a torn write: it is dropped and the
//! file truncated. So is a last segment whose header was cut short (a crash
//! between creating the file and writing its header): it holds no record
//! and is removed. Anything else that does not read (a bad checksum, a bad
//! header, a gap) stops startup with the file and offset, unless the operator
//! passes `--repair`, which truncates the log there and drops what follows.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use prost::Message;

use crate::log::{new_epoch, Log, LogError, Record};
use crate::policy::Policy;

pub(crate) const MAGIC: &[u8; 8] = b"FRESHWAL";
const FORMAT: u32 = 1;
pub(crate) const HEADER_BYTES: u64 = 8 + 4 + 8;
/// Largest record accepted when reading; larger lengths mean corruption.
const MAX_RECORD_BYTES: u32 = 256 << 20;
/// Bytes a frame adds to its payload: length and checksum.
pub(crate) const FRAME_OVERHEAD: usize = 8;
/// Seqs reserved per `Reserve` record.
const RESERVE_BLOCK: u64 = 10_000;

/// When the log calls `fsync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before every acknowledgement (group commit).
    Always,
    /// Every `interval`.
    Interval(Duration),
    /// Never: the operating system decides.
    Never,
}

/// Settings of the write-ahead log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalConfig {
    /// Where the segments live.
    pub dir: PathBuf,
    /// When to `fsync`.
    pub fsync: FsyncPolicy,
    /// Size after which a new segment starts.
    pub segment_bytes: u64,
    /// Truncate at corruption instead of refusing to start.
    pub repair: bool,
    /// Bytes of closed segments after which they are compacted into a
    /// snapshot.
    pub snapshot_bytes: u64,
}

/// A change as logged.
#[derive(Clone, PartialEq, Message)]
pub struct WalChange {
    /// The key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// The external version, if any.
    #[prost(uint64, optional, tag = "2")]
    pub external_version: Option<u64>,
    /// The critical bit.
    #[prost(bool, tag = "3")]
    pub critical: bool,
    /// The producer's event time.
    #[prost(uint64, tag = "4")]
    pub event_time_ms: u64,
    /// The change was a duplicate and had no effect.
    #[prost(bool, tag = "5")]
    pub duplicate: bool,
}

/// A publish as logged.
#[derive(Clone, PartialEq, Message)]
pub struct WalPublish {
    /// Its changes, in order.
    #[prost(message, repeated, tag = "1")]
    pub changes: Vec<WalChange>,
    /// The publishing client.
    #[prost(string, tag = "2")]
    pub origin: String,
}

/// A fill as logged.
#[derive(Clone, PartialEq, Message)]
pub struct WalFill {
    /// The key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Its dependencies, sorted and unique.
    #[prost(string, repeated, tag = "2")]
    pub dependencies: Vec<String>,
    /// The TTL granted.
    #[prost(uint64, tag = "3")]
    pub ttl_ms: u64,
    /// The seq observed.
    #[prost(uint64, tag = "4")]
    pub observed_seq: u64,
}

/// A policy change as logged.
#[derive(Clone, PartialEq, Message)]
pub struct WalPolicy {
    /// The namespace; unset: the default.
    #[prost(string, optional, tag = "1")]
    pub namespace: Option<String>,
    /// Set (true) or removed (false).
    #[prost(bool, tag = "2")]
    pub set: bool,
    /// Max age, ms (0: none).
    #[prost(uint64, tag = "3")]
    pub max_age_ms: u64,
    /// Revalidate after, ms (0: never).
    #[prost(uint64, tag = "4")]
    pub revalidate_after_ms: u64,
    /// Stale-while-revalidate window, ms.
    #[prost(uint64, tag = "5")]
    pub stale_while_revalidate_ms: u64,
    /// Allow stale on critical.
    #[prost(bool, tag = "6")]
    pub allow_stale_on_critical: bool,
    /// Check sample rate.
    #[prost(double, tag = "7")]
    pub check_sample_rate: f64,
}

/// A soft purge as logged.
#[derive(Clone, PartialEq, Message)]
pub struct WalPurge {
    /// The prefix.
    #[prost(string, tag = "1")]
    pub prefix: String,
    /// The spread, ms.
    #[prost(uint64, tag = "2")]
    pub jitter_ms: u64,
}

/// A reservation of seqs up to `up_to`.
#[derive(Clone, PartialEq, Message)]
pub struct WalReserve {
    /// The highest seq reserved.
    #[prost(uint64, tag = "1")]
    pub up_to: u64,
}

/// The body of a record.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Body {
    /// A publish.
    #[prost(message, tag = "3")]
    Publish(WalPublish),
    /// A fill.
    #[prost(message, tag = "4")]
    Fill(WalFill),
    /// A policy change.
    #[prost(message, tag = "5")]
    Policy(WalPolicy),
    /// A soft purge.
    #[prost(message, tag = "6")]
    Purge(WalPurge),
    /// A reservation.
    #[prost(message, tag = "7")]
    Reserve(WalReserve),
}

/// One record of the log.
#[derive(Clone, PartialEq, Message)]
pub struct WalRecord {
    /// The mutation's seq (0 for a reservation).
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// When it was applied, Unix ms.
    #[prost(uint64, tag = "2")]
    pub unix_ms: u64,
    /// What it was.
    #[prost(oneof = "Body", tags = "3, 4, 5, 6, 7")]
    pub body: Option<Body>,
}

impl WalPolicy {
    /// The policy it sets, if it sets one.
    pub fn policy(&self) -> Option<Policy> {
        let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
        self.set.then(|| Policy {
            max_age: ms(self.max_age_ms),
            revalidate_after: ms(self.revalidate_after_ms),
            stale_while_revalidate: Duration::from_millis(self.stale_while_revalidate_ms),
            allow_stale_on_critical: self.allow_stale_on_critical,
            check_sample_rate: self.check_sample_rate,
        })
    }
}

/// Converts a mutation to its logged form.
fn to_wal(seq: u64, record: &Record<'_>) -> WalRecord {
    let (unix_ms, body) = match *record {
        Record::Publish {
            changes,
            duplicate,
            origin,
            unix_ms,
        } => (
            unix_ms,
            Body::Publish(WalPublish {
                changes: changes
                    .iter()
                    .zip(duplicate)
                    .map(|(c, &d)| WalChange {
                        key: c.key.clone(),
                        external_version: c.external_version,
                        critical: c.critical,
                        event_time_ms: c.event_time_ms,
                        duplicate: d,
                    })
                    .collect(),
                origin: origin.to_owned(),
            }),
        ),
        Record::Fill { spec, unix_ms } => (
            unix_ms,
            Body::Fill(WalFill {
                key: spec.key.clone(),
                dependencies: spec.dependencies.clone(),
                ttl_ms: spec.ttl_ms,
                observed_seq: spec.observed_seq,
            }),
        ),
        Record::Policy { namespace, policy } => {
            let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis() as u64);
            let p = policy.copied().unwrap_or_default();
            (
                0,
                Body::Policy(WalPolicy {
                    namespace: namespace.map(str::to_owned),
                    set: policy.is_some(),
                    max_age_ms: ms(p.max_age),
                    revalidate_after_ms: ms(p.revalidate_after),
                    stale_while_revalidate_ms: p.stale_while_revalidate.as_millis() as u64,
                    allow_stale_on_critical: p.allow_stale_on_critical,
                    check_sample_rate: p.check_sample_rate,
                }),
            )
        }
        Record::Purge {
            prefix,
            jitter_ms,
            unix_ms,
        } => (
            unix_ms,
            Body::Purge(WalPurge {
                prefix: prefix.to_owned(),
                jitter_ms,
            }),
        ),
    };
    WalRecord {
        seq,
        unix_ms,
        body: Some(body),
    }
}

/// A log that could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A record or header did not read.
    #[error(
        "{path} at offset {offset}: {what}; the log is corrupt. Restore the data \
         directory from a backup, or start with --repair to truncate the log here \
         (mutations after this point are lost)"
    )]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// What is wrong.
        what: String,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the background syncer shares with the log.
struct Sync {
    state: Mutex<SyncState>,
    wake: Condvar,
    synced: tokio::sync::watch::Sender<u64>,
}

struct SyncState {
    /// The segment being written, for `fsync`.
    file: Option<Arc<File>>,
    /// The highest seq written.
    written: u64,
    /// The log is closing.
    closed: bool,
}

/// A handle to wait until a seq is on disk.
#[derive(Clone)]
pub struct Durability {
    sync: Arc<Sync>,
    waits: bool,
}

impl Durability {
    /// Waits until `seq` is on disk, when the fsync policy is `always`; at
    /// once otherwise.
    pub async fn wait(&self, seq: u64) {
        if !self.waits {
            return;
        }
        self.sync.wake.notify_one();
        let mut synced = self.sync.synced.subscribe();
        let _ = synced.wait_for(|s| *s >= seq).await;
    }
}

/// The write-ahead log.
pub struct FileLog {
    config: WalConfig,
    epoch: u64,
    seq: u64,
    reserved: u64,
    file: Arc<File>,
    segment_len: u64,
    sync: Arc<Sync>,
    syncer: Option<thread::JoinHandle<()>>,
    /// Set: compact with this store configuration.
    compactor: Option<crate::store::StoreConfig>,
    /// Bytes of closed segments not yet in a snapshot.
    uncompacted: u64,
    compacting: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for FileLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLog")
            .field("dir", &self.config.dir)
            .field("epoch", &self.epoch)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

pub(crate) fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("wal-{first_seq:020}.log"))
}

pub(crate) fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_prefix("wal-")
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            found.push((n, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// What opening the log found.
pub struct Opened {
    /// The log, positioned after the last good record.
    pub log: FileLog,
    /// The newest snapshot, to load before replaying `records`.
    pub snapshot: Option<PathBuf>,
    /// Every mutation after the snapshot, in order, to replay.
    pub records: Vec<WalRecord>,
    /// Torn records dropped at the tail.
    pub dropped_tail: bool,
}

/// One segment, read.
struct SegmentRead {
    records: Vec<WalRecord>,
    reserved: u64,
    /// Where the good records end.
    end: u64,
    /// The segment was truncated there (torn tail, or --repair).
    truncated: bool,
}

/// The records of a segment's bytes, as far as they read.
#[derive(Debug)]
pub(crate) struct Parsed {
    /// The mutations, in order.
    pub(crate) records: Vec<WalRecord>,
    /// The highest seq reserved.
    pub(crate) reserved: u64,
    /// Where the good records end.
    pub(crate) end: usize,
    /// Why reading stopped before the end of the data, and whether the bad
    /// record reaches the end of the data (a torn write); `None` when every
    /// byte read.
    pub(crate) failure: Option<(String, bool)>,
}

/// Reads the records of a segment from `bytes` (the whole file, header
/// included, checked by the caller), continuing a log whose last seq was
/// `last_seq`. A record that does not frame or decode stops the reading
/// (see [`Parsed::failure`]); a seq that goes back or a record without a
/// body is corruption that no truncation repairs: `Err((offset, what))`.
pub(crate) fn parse_segment(bytes: &[u8], last_seq: &mut u64) -> Result<Parsed, (u64, String)> {
    let mut parsed = Parsed {
        records: Vec::new(),
        reserved: 0,
        end: bytes.len(),
        failure: None,
    };
    let mut offset = HEADER_BYTES as usize;
    while offset < bytes.len() {
        let failure = match read_frame(&bytes[offset..]) {
            Ok((payload, len)) => match WalRecord::decode(payload) {
                Ok(record) => {
                    if record.seq != 0 && record.seq <= *last_seq {
                        return Err((
                            offset as u64,
                            format!("seq {} after seq {}", record.seq, last_seq),
                        ));
                    }
                    match &record.body {
                        Some(Body::Reserve(r)) => parsed.reserved = parsed.reserved.max(r.up_to),
                        // Only reservations go without a seq: a mutation
                        // without one cannot be placed, and replaying it
                        // would reset the order check.
                        Some(_) if record.seq == 0 => {
                            return Err((offset as u64, "a mutation record with seq 0".into()))
                        }
                        Some(_) => {
                            *last_seq = record.seq;
                            parsed.records.push(record);
                        }
                        None => return Err((offset as u64, "a record without a body".into())),
                    }
                    offset += len;
                    continue;
                }
                Err(e) => (
                    format!("a record that does not decode ({e})"),
                    offset + len == bytes.len(),
                ),
            },
            Err(failure) => failure,
        };
        parsed.end = offset;
        parsed.failure = Some(failure);
        break;
    }
    Ok(parsed)
}

/// Reads a segment's records. A bad record is a torn write when `is_last`
/// and it reaches the end of the file; otherwise it is corruption, an error
/// unless `repair`, which truncates there.
fn read_segment(
    path: &Path,
    is_last: bool,
    repair: bool,
    epoch: &mut Option<u64>,
    last_seq: &mut u64,
) -> Result<SegmentRead, WalError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err(path))?;
    let corrupt = |offset: u64, what: String| WalError::Corrupt {
        path: path.to_owned(),
        offset,
        what,
    };
    let file_epoch = read_header(&bytes, MAGIC).map_err(|(o, w)| corrupt(o, w))?;
    if *epoch.get_or_insert(file_epoch) != file_epoch {
        return Err(corrupt(
            12,
            format!("epoch {file_epoch} differs from the rest of the log"),
        ));
    }
    let parsed = parse_segment(&bytes, last_seq).map_err(|(o, w)| corrupt(o, w))?;
    let mut read = SegmentRead {
        records: parsed.records,
        reserved: parsed.reserved,
        end: parsed.end as u64,
        truncated: false,
    };
    let Some((what, reaches_end)) = parsed.failure else {
        return Ok(read);
    };
    let offset = parsed.end;
    if is_last && reaches_end {
        tracing::warn!(file = %path.display(), offset, "dropping a torn record at the end of the log");
    } else if repair {
        tracing::warn!(file = %path.display(), offset, error = %what, "--repair: truncating the log here");
    } else {
        return Err(corrupt(offset as u64, what));
    }
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    f.set_len(offset as u64).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    read.truncated = true;
    Ok(read)
}

/// Whether the segment at `path` is shorter than a header and its bytes
/// begin one (magic and format; the epoch is not known here): created by a
/// rotation or a first start that stopped before the header was written.
fn header_cut_short(path: &Path) -> Result<bool, WalError> {
    // The length first: a whole segment is read once, by `read_segment`.
    if fs::metadata(path).map_err(io_err(path))?.len() >= HEADER_BYTES {
        return Ok(false);
    }
    let bytes = fs::read(path).map_err(io_err(path))?;
    if bytes.len() >= HEADER_BYTES as usize {
        return Ok(false);
    }
    let expected = header(MAGIC, 0);
    let n = bytes.len().min(12);
    Ok(bytes[..n] == expected[..n])
}

/// Checks a file header; returns its epoch, or the offset and what is wrong.
pub(crate) fn read_header(bytes: &[u8], magic: &[u8; 8]) -> Result<u64, (u64, String)> {
    if bytes.len() < HEADER_BYTES as usize || &bytes[..8] != magic {
        return Err((0, "not a freshd file of this kind (bad header)".into()));
    }
    let format = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if format != FORMAT {
        return Err((8, format!("format {format}, expected {FORMAT}")));
    }
    Ok(u64::from_le_bytes(
        bytes[12..20].try_into().expect("8 bytes"),
    ))
}

/// The header of a log segment or snapshot.
pub(crate) fn header(magic: &[u8; 8], epoch: u64) -> Vec<u8> {
    let mut header = Vec::with_capacity(HEADER_BYTES as usize);
    header.extend_from_slice(magic);
    header.extend_from_slice(&FORMAT.to_le_bytes());
    header.extend_from_slice(&epoch.to_le_bytes());
    header
}

/// Reads every record of closed segments, for a compaction.
pub(crate) fn read_closed(
    segments: &[PathBuf],
    epoch: u64,
) -> Result<(Vec<WalRecord>, u64), WalError> {
    let mut records = Vec::new();
    let mut reserved = 0;
    let (mut e, mut last) = (Some(epoch), 0);
    for path in segments {
        let read = read_segment(path, false, false, &mut e, &mut last)?;
        records.extend(read.records);
        reserved = reserved.max(read.reserved);
    }
    Ok((records, reserved))
}

impl FileLog {
    /// Opens (or creates) the log in `config.dir`: finds the newest snapshot
    /// and reads every record after it.
    pub fn open(config: WalConfig) -> Result<Opened, WalError> {
        fs::create_dir_all(&config.dir).map_err(io_err(&config.dir))?;
        crate::snapshot::remove_unfinished(&config.dir)?;
        let snapshot = crate::snapshot::newest(&config.dir)?;
        let (floor, mut reserved, mut epoch) = match &snapshot {
            Some((seq, path)) => {
                let meta = crate::snapshot::read_meta(path)?;
                (*seq, meta.1.reserved, Some(meta.0))
            }
            None => (0, 0, None),
        };
        let mut found = segments(&config.dir)?;
        // A crash between creating a segment and writing its header leaves
        // a last segment shorter than a header: a torn write that never
        // held a record, dropped like a torn record.
        if let Some((_, path)) = found.last() {
            if header_cut_short(path)? {
                tracing::warn!(file = %path.display(), "dropping a log segment whose header was cut short (it holds no records)");
                fs::remove_file(path).map_err(io_err(path))?;
                sync_dir(&config.dir).map_err(io_err(&config.dir))?;
                found.pop();
            }
        }
        // Segments wholly covered by the snapshot are leftovers of a
        // compaction that stopped before deleting them.
        while found.len() > 1 && found[1].0 <= floor + 1 {
            let (_, path) = found.remove(0);
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
        if let Some((first, path)) = found.first() {
            let covered = if floor == 0 {
                *first == 1
            } else {
                *first <= floor + 1
            };
            if !covered && !config.repair {
                return Err(WalError::Corrupt {
                    path: path.clone(),
                    offset: 0,
                    what: format!(
                        "the log starts at seq {first} but no snapshot covers the seqs before it \
                         (newest snapshot: {})",
                        snapshot
                            .as_ref()
                            .map_or("none".into(), |(s, _)| format!("seq {s}"))
                    ),
                });
            }
        }
        let mut records = Vec::new();
        let mut last_seq = floor;
        let mut dropped_tail = false;
        let mut last: Option<(PathBuf, u64)> = None;
        // Closed segments not yet in a snapshot count toward the next one.
        let mut uncompacted = 0;
        for (i, (_, path)) in found.iter().enumerate() {
            let is_last = i + 1 == found.len();
            let mut skip_to = 0;
            let read = read_segment(path, is_last, config.repair, &mut epoch, &mut skip_to)?;
            reserved = reserved.max(read.reserved);
            for record in read.records {
                if record.seq > floor {
                    last_seq = last_seq.max(record.seq);
                    records.push(record);
                }
            }
            dropped_tail |= read.truncated && is_last;
            if !is_last {
                uncompacted += read.end;
            }
            last = Some((path.clone(), read.end));
            if read.truncated && !is_last {
                // --repair: what follows the corruption goes.
                for (_, later) in &found[i + 1..] {
                    fs::remove_file(later).map_err(io_err(later))?;
                }
                break;
            }
        }
        let epoch = epoch.unwrap_or_else(new_epoch);
        // Continue past everything that may have been handed out.
        let seq = last_seq.max(reserved);
        let (path, len) = match last {
            Some(last) => last,
            None => {
                let path = segment_path(&config.dir, seq + 1);
                write_header(&path, epoch)?;
                (path, HEADER_BYTES)
            }
        };
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let file = Arc::new(file);
        let sync = Arc::new(Sync {
            state: Mutex::new(SyncState {
                file: Some(file.clone()),
                written: seq,
                closed: false,
            }),
            wake: Condvar::new(),
            synced: tokio::sync::watch::Sender::new(seq),
        });
        let syncer = {
            let sync = sync.clone();
            let policy = config.fsync;
            thread::Builder::new()
                .name("freshd-wal-sync".into())
                .spawn(move || sync_loop(&sync, policy))
                .map_err(io_err(&config.dir))?
        };
        Ok(Opened {
            log: FileLog {
                config,
                epoch,
                seq,
                reserved: seq,
                file,
                segment_len: len,
                sync,
                syncer: Some(syncer),
                compactor: None,
                uncompacted,
                compacting: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            },
            snapshot: snapshot.map(|(_, p)| p),
            records,
            dropped_tail,
        })
    }

    /// Lets the log compact itself: once `snapshot_bytes` of closed segments
    /// pile up, a background thread writes a snapshot of them with this store
    /// configuration and deletes them.
    pub fn enable_compaction(&mut self, store: crate::store::StoreConfig) {
        self.compactor = Some(store);
    }

    /// A handle to wait for durability.
    pub fn durability(&self) -> Durability {
        Durability {
            sync: self.sync.clone(),
            waits: self.config.fsync == FsyncPolicy::Always,
        }
    }

    fn write(&mut self, record: &WalRecord) -> io::Result<()> {
        let frame = frame(&record.encode_to_vec());
        (&*self.file).write_all(&frame)?;
        self.segment_len += frame.len() as u64;
        Ok(())
    }

    /// Starts a new segment at `first_seq` once the current one is full, and
    /// compacts the closed ones in the background once they add up to
    /// `snapshot_bytes`.
    fn rotate(&mut self, first_seq: u64) -> io::Result<()> {
        if self.segment_len < self.config.segment_bytes {
            return Ok(());
        }
        self.file.sync_data()?;
        self.uncompacted += self.segment_len;
        let path = segment_path(&self.config.dir, first_seq);
        write_header(&path, self.epoch).map_err(|e| io::Error::other(e.to_string()))?;
        let file = Arc::new(OpenOptions::new().append(true).open(&path)?);
        self.file = file.clone();
        self.segment_len = HEADER_BYTES;
        self.sync.state.lock().file = Some(file);
        sync_dir(&self.config.dir)?;
        self.maybe_compact(first_seq);
        Ok(())
    }

    fn maybe_compact(&mut self, next_segment: u64) {
        use std::sync::atomic::Ordering;
        let Some(store) = self.compactor.clone() else {
            return;
        };
        if self.uncompacted < self.config.snapshot_bytes
            || self.compacting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.uncompacted = 0;
        let (dir, epoch, running) = (self.config.dir.clone(), self.epoch, self.compacting.clone());
        let spawned = thread::Builder::new()
            .name("freshd-compact".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                match crate::snapshot::compact(&store, &dir, epoch, next_segment) {
                    Ok(path) => tracing::info!(
                        snapshot = %path.display(),
                        took = ?started.elapsed(),
                        "compacted the log into a snapshot"
                    ),
                    Err(e) => tracing::error!(error = %e, "log compaction failed; will retry at the next segment"),
                }
                running.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.compacting.store(false, Ordering::Release);
        }
    }
}

fn write_header(path: &Path, epoch: u64) -> Result<(), WalError> {
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(&header(MAGIC, epoch)).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(io_err(dir))?;
    }
    Ok(())
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads one frame: its payload and the bytes it took, or what is wrong and
/// whether the bad frame reaches the end of the data (a torn write).
pub(crate) fn read_frame(data: &[u8]) -> Result<(&[u8], usize), (String, bool)> {
    if data.len() < 8 {
        return Err(("a record header cut short".into(), true));
    }
    let len = u32::from_le_bytes(data[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(data[4..8].try_into().expect("4 bytes"));
    if len > MAX_RECORD_BYTES {
        return Err((format!("a record of {len} bytes"), false));
    }
    let end = 8 + len as usize;
    if data.len() < end {
        return Err(("a record cut short".into(), true));
    }
    let payload = &data[8..end];
    if crc32fast::hash(payload) != crc {
        return Err(("a checksum mismatch".into(), end == data.len()));
    }
    Ok((payload, end))
}

/// Frames a payload: `[u32 length][u32 CRC-32][payload]`.
pub(crate) fn frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn sync_loop(sync: &Sync, policy: FsyncPolicy) {
    let mut state = sync.state.lock();
    loop {
        if state.closed {
            return;
        }
        match policy {
            FsyncPolicy::Always => {
                if state.written <= *sync.synced.borrow() {
                    sync.wake.wait(&mut state);
                    continue;
                }
            }
            FsyncPolicy::Interval(interval) => {
                sync.wake.wait_for(&mut state, interval);
                if state.closed {
                    return;
                }
                if state.written <= *sync.synced.borrow() {
                    continue;
                }
            }
            FsyncPolicy::Never => {
                sync.wake.wait(&mut state);
                continue;
            }
        }
        let (file, upto) = (state.file.clone(), state.written);
        drop(state);
        // One fsync covers every record written so far: group commit.
        if let Some(file) = file {
            if let Err(e) = file.sync_data() {
                tracing::error!(error = %e, "fsync of the log failed");
            }
        }
        sync.synced.send_replace(upto);
        state = sync.state.lock();
    }
}

impl Log for FileLog {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn last_seq(&self) -> u64 {
        self.seq
    }

    fn append(&mut self, record: &Record<'_>) -> Result<u64, LogError> {
        let seq = self.seq + 1;
        let fail = |e: io::Error| LogError(format!("writing the log: {e}"));
        self.rotate(seq).map_err(fail)?;
        if seq > self.reserved {
            let up_to = seq + RESERVE_BLOCK;
            self.write(&WalRecord {
                seq: 0,
                unix_ms: 0,
                body: Some(Body::Reserve(WalReserve { up_to })),
            })
            .map_err(fail)?;
            // The reservation must be on disk before any seq it covers is
            // handed out.
            self.file.sync_data().map_err(fail)?;
            self.reserved = up_to;
        }
        self.write(&to_wal(seq, record)).map_err(fail)?;
        self.seq = seq;
        {
            let mut state = self.sync.state.lock();
            state.written = seq;
        }
        if matches!(self.config.fsync, FsyncPolicy::Always) {
            self.sync.wake.notify_one();
        }
        Ok(seq)
    }

    fn durability(&self) -> Option<Durability> {
        Some(FileLog::durability(self))
    }
}

impl Drop for FileLog {
    fn drop(&mut self) {
        self.sync.state.lock().closed = true;
        self.sync.wake.notify_all();
        if let Some(syncer) = self.syncer.take() {
            let _ = syncer.join();
        }
        let _ = self.file.sync_data();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PublishChange;

    fn config(dir: &Path) -> WalConfig {
        WalConfig {
            dir: dir.to_owned(),
            fsync: FsyncPolicy::Always,
            segment_bytes: 1 << 20,
            repair: false,
            snapshot_bytes: u64::MAX,
        }
    }

    fn publish(log: &mut FileLog, key: &str) -> u64 {
        let changes = [PublishChange {
            key: key.into(),
            external_version: None,
            critical: false,
            event_time_ms: 0,
        }];
        log.append(&Record::Publish {
            changes: &changes,
            duplicate: &[false],
            origin: "",
            unix_ms: 1,
        })
        .unwrap()
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("freshd-wal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_frame_length_is_checked_before_it_is_used() {
        let good = frame(b"payload");
        assert_eq!(read_frame(&good), Ok((&b"payload"[..], good.len())));
        // Past the maximum: corruption wherever it is, and nothing is
        // allocated or sliced for it.
        for len in [u32::MAX, MAX_RECORD_BYTES + 1] {
            let mut bad = good.clone();
            bad[..4].copy_from_slice(&len.to_le_bytes());
            assert_eq!(
                read_frame(&bad),
                Err((format!("a record of {len} bytes"), false))
            );
        }
        // Within the maximum but past the data: a torn write.
        let mut cut = good.clone();
        cut[..4].copy_from_slice(&MAX_RECORD_BYTES.to_le_bytes());
        assert_eq!(read_frame(&cut), Err(("a record cut short".into(), true)));
        assert_eq!(
            read_frame(&good[..5]),
            Err(("a record header cut short".into(), true))
        );
        // A checksum mismatch is torn only at the end of the data.
        let mut flipped = good.clone();
        flipped[9] ^= 1;
        assert_eq!(
            read_frame(&flipped),
            Err(("a checksum mismatch".into(), true))
        );
        flipped.push(0);
        assert_eq!(
            read_frame(&flipped),
            Err(("a checksum mismatch".into(), false))
        );
    }

    #[test]
    fn a_mutation_without_a_seq_is_corruption() {
        let record = |seq: u64| {
            let r = to_wal(
                seq,
                &Record::Purge {
                    prefix: "p",
                    jitter_ms: 0,
                    unix_ms: 1,
                },
            );
            frame(&r.encode_to_vec())
        };
        let mut bytes = vec![0; HEADER_BYTES as usize];
        bytes.extend(record(1));
        let second = bytes.len() as u64;
        bytes.extend(record(0));
        bytes.extend(record(2));
        let mut last_seq = 0;
        let err = parse_segment(&bytes, &mut last_seq).err();
        assert_eq!(
            err,
            Some((second, "a mutation record with seq 0".to_owned()))
        );
    }

    #[test]
    fn records_survive_a_reopen_and_seqs_skip_the_reservation() {
        let dir = tempdir("reopen");
        let epoch;
        {
            let mut log = FileLog::open(config(&dir)).unwrap().log;
            epoch = log.epoch();
            assert_eq!(publish(&mut log, "a"), 1);
            assert_eq!(publish(&mut log, "b"), 2);
        }
        let opened = FileLog::open(config(&dir)).unwrap();
        assert_eq!(opened.log.epoch(), epoch);
        assert_eq!(opened.records.len(), 2);
        assert_eq!(opened.records[1].seq, 2);
        // Seq 1 reserved up to 1 + RESERVE_BLOCK: the next seq is past it.
        assert_eq!(opened.log.last_seq(), 1 + RESERVE_BLOCK);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_last_segment_with_its_header_cut_short_is_dropped() {
        let dir = tempdir("torn-header");
        let epoch;
        {
            let mut log = FileLog::open(config(&dir)).unwrap().log;
            epoch = log.epoch();
            for k in ["a", "b"] {
                publish(&mut log, k);
            }
        }
        let full = header(MAGIC, epoch);
        // A rotation cut short: an empty file, then part of a header.
        for cut in [0, 5, 12, HEADER_BYTES as usize - 1] {
            let next = segment_path(&dir, 1_000_000);
            fs::write(&next, &full[..cut]).unwrap();
            let opened = FileLog::open(config(&dir)).unwrap();
            assert_eq!(opened.records.len(), 2, "cut at {cut}");
            assert_eq!(opened.log.epoch(), epoch);
            assert!(!next.exists(), "cut at {cut}: the stub is removed");
            assert_eq!(segments(&dir).unwrap().len(), 1);
        }
        // Appending goes on in the segment before it.
        {
            let mut log = FileLog::open(config(&dir)).unwrap().log;
            publish(&mut log, "c");
        }
        assert_eq!(FileLog::open(config(&dir)).unwrap().records.len(), 3);

        // Short bytes that do not begin a header, or a short segment that
        // is not the last, are still corruption.
        let next = segment_path(&dir, 1_000_000);
        fs::write(&next, b"garbage").unwrap();
        assert!(matches!(
            FileLog::open(config(&dir)),
            Err(WalError::Corrupt { .. })
        ));
        fs::remove_file(&next).unwrap();
        let (_, last) = segments(&dir).unwrap().pop().unwrap();
        fs::write(segment_path(&dir, 2_000_000), &full).unwrap();
        fs::write(&last, &full[..5]).unwrap();
        assert!(matches!(
            FileLog::open(config(&dir)),
            Err(WalError::Corrupt { .. })
        ));
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_torn_tail_is_dropped_and_corruption_elsewhere_is_refused() {
        let dir = tempdir("torn");
        {
            let mut log = FileLog::open(config(&dir)).unwrap().log;
            for k in ["a", "b", "c"] {
                publish(&mut log, k);
            }
        }
        let (_, path) = segments(&dir).unwrap().pop().unwrap();
        let len = fs::metadata(&path).unwrap().len();
        // Cut the last record short.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let opened = FileLog::open(config(&dir)).unwrap();
        assert!(opened.dropped_tail);
        assert_eq!(opened.records.len(), 2);
        drop(opened);

        // Flip a byte inside the first mutation record, after the
        // reservation's frame.
        let mut bytes = fs::read(&path).unwrap();
        let h = HEADER_BYTES as usize;
        let reserve_len = u32::from_le_bytes(bytes[h..h + 4].try_into().unwrap()) as usize;
        let at = h + 8 + reserve_len + 8 + 2;
        bytes[at] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        match FileLog::open(config(&dir)) {
            Err(WalError::Corrupt {
                path: p, offset, ..
            }) => {
                assert_eq!(p, path);
                assert!(offset >= HEADER_BYTES);
            }
            other => panic!("expected corruption, got {:?}", other.err()),
        }
        let mut repair = config(&dir);
        repair.repair = true;
        let opened = FileLog::open(repair).unwrap();
        assert!(opened.records.len() < 2);
        fs::remove_dir_all(&dir).ok();
    }
}
