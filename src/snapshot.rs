//! Snapshots of the whole state under `--data-dir`, and the compaction that
//! writes them.
//!
//! A snapshot `snapshot-<seq, 20 digits>.snap` holds everything applied up to
//! its seq: a header (`FRESHSNP`, format, epoch), then frames like the log's
//! (`[u32 length][u32 CRC-32][protobuf]`): a [`SnapMeta`], then one
//! [`SnapNode`] per key. It is written to a temporary file, synced and
//! renamed, so a snapshot either exists whole or not at all.
//!
//! Compaction never stops writes: when closed log segments add up to
//! `snapshot_bytes`, a background thread builds the state they describe (and
//! the resume history of Watch streams) in a
//! separate store (the previous snapshot plus their records, through the same
//! replay code as recovery), writes it as a new snapshot, and deletes those
//! segments and older snapshots. Disk use stays bounded by about one snapshot
//! plus `snapshot_bytes` of log. Recovery loads the newest snapshot and
//! replays the log after it; so snapshot plus replay is, by construction, the
//! state of replay from zero.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::log::MemoryLog;
use crate::store::{Store, StoreConfig};
use crate::wal::{self, io_err, WalError, WalPolicy, HEADER_BYTES};

pub(crate) const MAGIC: &[u8; 8] = b"FRESHSNP";

/// What a snapshot says about itself.
#[derive(Clone, PartialEq, Message)]
pub struct SnapMeta {
    /// Everything up to this seq is in it.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// The highest seq the log had reserved.
    #[prost(uint64, tag = "2")]
    pub reserved: u64,
    /// An upper bound of the last change of every key not in it.
    #[prost(uint64, tag = "3")]
    pub forgotten_seq: u64,
    /// How many keys follow.
    #[prost(uint64, tag = "4")]
    pub nodes: u64,
    /// The freshness policies; the one without a namespace is the default.
    #[prost(message, repeated, tag = "5")]
    pub policies: Vec<WalPolicy>,
    /// The resume history's floor: every notice after it is in `history`.
    #[prost(uint64, tag = "6")]
    pub history_floor: u64,
    /// The resume history, oldest first.
    #[prost(message, repeated, tag = "7")]
    pub history: Vec<SnapNotice>,
}

/// A notice of the resume history.
#[derive(Clone, PartialEq, Message)]
pub struct SnapNotice {
    /// Its seq.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// The key.
    #[prost(string, tag = "2")]
    pub key: String,
    /// Its version.
    #[prost(uint64, tag = "3")]
    pub version: u64,
    /// The published key that caused it.
    #[prost(string, tag = "4")]
    pub cause: String,
    /// The critical bit.
    #[prost(bool, tag = "5")]
    pub critical: bool,
    /// The producer's event time.
    #[prost(uint64, tag = "6")]
    pub event_time_ms: u64,
    /// The publishing client.
    #[prost(string, tag = "7")]
    pub origin: String,
}

/// One key in a snapshot.
#[derive(Clone, PartialEq, Message)]
pub struct SnapNode {
    /// The key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Its version.
    #[prost(uint64, tag = "2")]
    pub version: u64,
    /// Its last change's seq.
    #[prost(uint64, tag = "3")]
    pub last_change_seq: u64,
    /// When that change was applied, Unix ms.
    #[prost(uint64, tag = "4")]
    pub changed_at_ms: u64,
    /// Its producer event time, Unix ms.
    #[prost(uint64, tag = "5")]
    pub event_time_ms: u64,
    /// The last external version seen.
    #[prost(uint64, optional, tag = "6")]
    pub external_version: Option<u64>,
    /// The critical bit of the last change.
    #[prost(bool, tag = "7")]
    pub critical: bool,
    /// Until when it answers checks, Unix ms; 0: not registered.
    #[prost(uint64, tag = "8")]
    pub expires_unix_ms: u64,
    /// The seq of its last critical change.
    #[prost(uint64, tag = "9")]
    pub last_critical_seq: u64,
    /// Its soft purge time, Unix ms; 0: none.
    #[prost(uint64, tag = "10")]
    pub soft_purge_unix_ms: u64,
    /// Its dependencies, sorted.
    #[prost(string, repeated, tag = "11")]
    pub dependencies: Vec<String>,
}

fn path_of(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("snapshot-{seq:020}.snap"))
}

/// The snapshots in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = name
            .strip_prefix("snapshot-")
            .and_then(|n| n.strip_suffix(".snap"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            found.push((seq, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Removes snapshots a crash left half written.
pub fn remove_unfinished(dir: &Path) -> Result<(), WalError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("snapshot-") && name.ends_with(".tmp") {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// The newest snapshot in `dir`.
pub fn newest(dir: &Path) -> Result<Option<(u64, PathBuf)>, WalError> {
    Ok(list(dir)?.pop())
}

/// Reads a snapshot's epoch and meta, and (when `nodes`) every key.
fn read(path: &Path, nodes: bool) -> Result<(u64, SnapMeta, Vec<SnapNode>), WalError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err(path))?;
    decode(&bytes, nodes).map_err(|(offset, what)| WalError::Corrupt {
        path: path.to_owned(),
        offset: offset as u64,
        what,
    })
}

/// Decodes a snapshot file's bytes: its epoch and meta, and (when `nodes`)
/// every key; or the offset and what is wrong.
pub(crate) fn decode(
    bytes: &[u8],
    nodes: bool,
) -> Result<(u64, SnapMeta, Vec<SnapNode>), (usize, String)> {
    let epoch = wal::read_header(bytes, MAGIC).map_err(|(o, w)| (o as usize, w))?;
    let mut offset = HEADER_BYTES as usize;
    let (payload, len) = wal::read_frame(&bytes[offset..]).map_err(|(what, _)| (offset, what))?;
    let meta = SnapMeta::decode(payload).map_err(|e| (offset, e.to_string()))?;
    offset += len;
    let mut out = Vec::new();
    if nodes {
        // `meta.nodes` is only a claim: reserve no more than the frames left
        // could hold, so a corrupt count cannot ask for unbounded memory.
        let room = (bytes.len() - offset) / wal::FRAME_OVERHEAD;
        out.reserve(meta.nodes.min(room as u64) as usize);
        let mut offsets = Vec::with_capacity(out.capacity());
        while offset < bytes.len() {
            let (payload, len) =
                wal::read_frame(&bytes[offset..]).map_err(|(what, _)| (offset, what))?;
            out.push(SnapNode::decode(payload).map_err(|e| (offset, e.to_string()))?);
            offsets.push(offset);
            offset += len;
        }
        if out.len() as u64 != meta.nodes {
            return Err((
                offset,
                format!("{} keys, the snapshot announced {}", out.len(), meta.nodes),
            ));
        }
        // Each key once, each with distinct dependencies other than itself,
        // as the store wrote them: loading anything else would corrupt the
        // graph (a key held twice, an edge counted twice).
        let mut seen = hashbrown::HashSet::with_capacity(out.len());
        for (node, &at) in out.iter().zip(&offsets) {
            if !seen.insert(node.key.as_str()) {
                return Err((at, format!("the key {:?} a second time", node.key)));
            }
            let mut deps: Vec<&str> = node.dependencies.iter().map(String::as_str).collect();
            deps.sort_unstable();
            if deps.windows(2).any(|w| w[0] == w[1]) || deps.binary_search(&&*node.key).is_ok() {
                return Err((
                    at,
                    format!(
                        "the key {:?} with a repeated dependency or itself as one",
                        node.key
                    ),
                ));
            }
        }
    }
    Ok((epoch, meta, out))
}

/// A snapshot's epoch and meta.
pub fn read_meta(path: &Path) -> Result<(u64, SnapMeta), WalError> {
    read(path, false).map(|(e, m, _)| (e, m))
}

/// Loads the snapshot at `path` into an empty `store`; returns its seq.
pub fn load(store: &Store, path: &Path) -> Result<u64, WalError> {
    let (_, meta, nodes) = read(path, true)?;
    let seq = meta.seq;
    store.load_snapshot(meta, nodes);
    Ok(seq)
}

/// Writes `store` as the snapshot of seq `seq`.
pub fn write(
    dir: &Path,
    epoch: u64,
    seq: u64,
    reserved: u64,
    store: &Store,
) -> Result<PathBuf, WalError> {
    let path = path_of(dir, seq);
    let temp = path.with_extension("tmp");
    let result = (|| -> std::io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&temp)?;
        let mut w = BufWriter::new(file);
        w.write_all(&wal::header(MAGIC, epoch))?;
        let (meta, nodes) = store.snapshot(seq, reserved);
        w.write_all(&wal::frame(&meta.encode_to_vec()))?;
        for node in nodes {
            w.write_all(&wal::frame(&node.encode_to_vec()))?;
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&temp, &path)?;
        wal::sync_dir(dir)
    })();
    result.map_err(io_err(&path))?;
    Ok(path)
}

/// Compacts the closed segments (those before `next_segment`) with the
/// newest snapshot into a new snapshot, then deletes them and older
/// snapshots. Returns the new snapshot's path.
pub fn compact(
    config: &StoreConfig,
    dir: &Path,
    epoch: u64,
    next_segment: u64,
) -> Result<PathBuf, WalError> {
    let closed: Vec<PathBuf> = wal::segments(dir)?
        .into_iter()
        .filter(|(first, _)| *first < next_segment)
        .map(|(_, p)| p)
        .collect();
    let store = Store::new(config.clone(), Box::new(MemoryLog::with_epoch(epoch)));
    let (mut floor, mut reserved) = (0, 0);
    let previous = newest(dir)?;
    if let Some((_, path)) = &previous {
        let (_, meta, nodes) = read(path, true)?;
        floor = meta.seq;
        reserved = meta.reserved;
        store.load_snapshot(meta, nodes);
    }
    let (records, res) = wal::read_closed(&closed, epoch)?;
    reserved = reserved.max(res);
    // The replay records notices too: the snapshot carries the resume
    // history, so that streams resume exactly across a restart.
    store.recover(records.into_iter().filter(|r| r.seq > floor).collect());
    let seq = next_segment - 1;
    let path = write(dir, epoch, seq, reserved, &store)?;
    for segment in &closed {
        fs::remove_file(segment).map_err(io_err(segment))?;
    }
    for (old, old_path) in list(dir)? {
        if old < seq {
            fs::remove_file(&old_path).map_err(io_err(&old_path))?;
        }
    }
    wal::sync_dir(dir).map_err(io_err(dir))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_node_count_is_refused_without_reserving_memory_for_it() {
        for nodes in [u64::MAX, 1 << 40, 3] {
            let meta = SnapMeta {
                seq: 1,
                nodes,
                ..Default::default()
            };
            let mut bytes = wal::header(MAGIC, 7);
            bytes.extend(wal::frame(&meta.encode_to_vec()));
            bytes.extend(wal::frame(&SnapNode::default().encode_to_vec()));
            let (offset, what) = decode(&bytes, true).unwrap_err();
            assert_eq!(offset, bytes.len());
            assert_eq!(what, format!("1 keys, the snapshot announced {nodes}"));
            // The meta alone still reads.
            assert_eq!(decode(&bytes, false).unwrap().1, meta);
        }
    }

    #[test]
    fn a_key_twice_or_a_bad_edge_list_is_refused() {
        let node = |key: &str, deps: &[&str]| SnapNode {
            key: key.into(),
            dependencies: deps.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        };
        let file = |nodes: &[SnapNode]| {
            let meta = SnapMeta {
                seq: 1,
                nodes: nodes.len() as u64,
                ..Default::default()
            };
            let mut bytes = wal::header(MAGIC, 7);
            bytes.extend(wal::frame(&meta.encode_to_vec()));
            let mut at = Vec::new();
            for n in nodes {
                at.push(bytes.len());
                bytes.extend(wal::frame(&n.encode_to_vec()));
            }
            (bytes, at)
        };
        let good = [node("a", &["b", "c"]), node("b", &[]), node("c", &["b"])];
        assert_eq!(decode(&file(&good).0, true).unwrap().2, good);

        let (bytes, at) = file(&[node("a", &[]), node("b", &[]), node("a", &[])]);
        assert_eq!(
            decode(&bytes, true).unwrap_err(),
            (at[2], "the key \"a\" a second time".to_owned())
        );
        for deps in [&["b", "b"][..], &["a"][..], &["c", "a", "b"][..]] {
            let (bytes, at) = file(&[node("b", &[]), node("a", deps)]);
            assert_eq!(
                decode(&bytes, true).unwrap_err(),
                (
                    at[1],
                    "the key \"a\" with a repeated dependency or itself as one".to_owned()
                ),
                "{deps:?}"
            );
        }
    }
}
