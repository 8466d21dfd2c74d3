//! HPACK (RFC 7541), the header compression of HTTP/2: a decoder for the
//! header blocks a peer sends, with the connection's dynamic table, and a
//! table-less encoder for the blocks freshd writes.
//!
//! The decoder hands each field to a callback as borrowed bytes: a field the
//! peer indexed (most of a gRPC request's headers after the first request on
//! a connection) costs no allocation, and a Huffman-coded string is decoded
//! into a buffer the decoder reuses. Every length, index and integer in a
//! block is checked against what is left of the block and against the
//! table, so no input can make it panic, read out of bounds or grow past
//! the table size it advertised ([`Decoder::new`]); the fuzz target
//! `hpack` (`crate::fuzzing::hpack`) holds it to that.
//!
//! This is the header layer of freshd's own HTTP/2 connection code, where
//! the request path decodes headers without building a `HeaderMap`
//! (docs/ARCHITECTURE.md, "Server").
//!
//! The encoder writes a field as an index when the static table has it
//! exactly, else as a literal without indexing (with the name indexed when
//! the static table has the name), and never Huffman-codes: it keeps no
//! dynamic table, so the peer's decoder needs none either.

use std::collections::VecDeque;
use std::fmt;
use std::sync::OnceLock;

use bytes::BufMut;

/// The bytes a table entry counts for beyond its name and value (RFC 7541
/// section 4.1), which is also what a field counts for in a header list's
/// size (RFC 9113 section 6.5.2).
pub const ENTRY_OVERHEAD: usize = 32;

/// The dynamic table size HTTP/2 starts with (`SETTINGS_HEADER_TABLE_SIZE`).
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// Why a header block could not be decoded. Any of them but
/// [`DecodeError::ListTooLarge`] leaves the dynamic table out of step with
/// the peer's, which ends the connection (`COMPRESSION_ERROR`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The block ends inside a field.
    Truncated,
    /// An integer runs past the 4 continuation bytes a header needs.
    IntegerOverflow,
    /// An index that is in neither table (0 is never valid).
    BadIndex {
        /// The index.
        index: usize,
        /// Entries in the dynamic table, after the static table's 61.
        dynamic: usize,
    },
    /// A Huffman-coded string holds the end-of-string symbol.
    HuffmanEos,
    /// A Huffman-coded string ends in more than 7 bits of padding, or in
    /// padding that is not all ones.
    HuffmanPadding,
    /// A table size update above the size the decoder allows.
    TableSizeTooLarge {
        /// The size asked for.
        size: usize,
        /// The most the decoder allows.
        max: usize,
    },
    /// A table size update after the block's first field.
    LateTableSizeUpdate,
    /// The fields add up to more than the header list size limit. The
    /// whole block was still decoded, so the table is in step: only the
    /// request is refused.
    ListTooLarge {
        /// The limit, in bytes (each field's name and value, plus 32).
        limit: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "header block ends inside a field"),
            DecodeError::IntegerOverflow => write!(f, "header block integer is too large"),
            DecodeError::BadIndex { index, dynamic } => write!(
                f,
                "header index {index} is not in the tables (1 to {})",
                STATIC.len() + dynamic
            ),
            DecodeError::HuffmanEos => write!(f, "Huffman-coded string holds the EOS symbol"),
            DecodeError::HuffmanPadding => {
                write!(f, "Huffman-coded string has invalid padding")
            }
            DecodeError::TableSizeTooLarge { size, max } => write!(
                f,
                "dynamic table size update to {size} bytes is above the limit of {max}"
            ),
            DecodeError::LateTableSizeUpdate => {
                write!(f, "dynamic table size update after a header field")
            }
            DecodeError::ListTooLarge { limit } => {
                write!(f, "header list is larger than the limit of {limit} bytes")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// The decoding side of one connection: its dynamic table and scratch
/// buffers for Huffman-coded strings.
#[derive(Debug)]
pub struct Decoder {
    table: Table,
    /// The most a table size update may ask for: the
    /// `SETTINGS_HEADER_TABLE_SIZE` this side advertised.
    max_size: usize,
    name: Vec<u8>,
    value: Vec<u8>,
}

impl Decoder {
    /// A decoder whose peer may use a dynamic table of up to `max_size`
    /// bytes (the `SETTINGS_HEADER_TABLE_SIZE` advertised; HTTP/2's default
    /// is [`DEFAULT_TABLE_SIZE`]).
    pub fn new(max_size: usize) -> Self {
        Decoder {
            table: Table::new(max_size),
            max_size,
            name: Vec::new(),
            value: Vec::new(),
        }
    }

    /// The dynamic table's size in bytes, as RFC 7541 counts it.
    pub fn table_size(&self) -> usize {
        self.table.size
    }

    /// The dynamic table's current limit in bytes.
    pub fn table_limit(&self) -> usize {
        self.table.max
    }

    /// Entries in the dynamic table.
    pub fn table_len(&self) -> usize {
        self.table.entries.len()
    }

    /// Decodes one complete header block (a HEADERS frame's fragment with
    /// its CONTINUATIONs), calling `each(name, value)` for its fields in
    /// order. Once the fields pass `max_list` bytes (name, value and 32 for
    /// each) the rest are decoded into the table but not handed over, and
    /// the answer is [`DecodeError::ListTooLarge`].
    pub fn decode(
        &mut self,
        mut block: &[u8],
        max_list: usize,
        mut each: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), DecodeError> {
        let Decoder {
            table,
            max_size,
            name: name_buf,
            value: value_buf,
        } = self;
        let mut list = 0usize;
        let mut fields = false;
        while let Some(&first) = block.first() {
            if first & 0x80 != 0 {
                // Indexed field.
                let index = integer(&mut block, 7)?;
                let (name, value) = table.get(index)?;
                fields = true;
                list = list.saturating_add(name.len() + value.len() + ENTRY_OVERHEAD);
                if list <= max_list {
                    each(name, value);
                }
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update.
                if fields {
                    return Err(DecodeError::LateTableSizeUpdate);
                }
                let size = integer(&mut block, 5)?;
                if size > *max_size {
                    return Err(DecodeError::TableSizeTooLarge {
                        size,
                        max: *max_size,
                    });
                }
                table.resize(size);
            } else {
                // A literal: with incremental indexing (01), without (0000)
                // or never indexed (0001).
                let indexing = first & 0xc0 == 0x40;
                let prefix = if indexing { 6 } else { 4 };
                let index = integer(&mut block, prefix)?;
                let entry = {
                    let name: &[u8] = if index == 0 {
                        string(&mut block, name_buf)?.unwrap_or(name_buf)
                    } else {
                        table.get(index)?.0
                    };
                    let value = string(&mut block, value_buf)?.unwrap_or(value_buf);
                    fields = true;
                    list = list.saturating_add(name.len() + value.len() + ENTRY_OVERHEAD);
                    if list <= max_list {
                        each(name, value);
                    }
                    indexing.then(|| (Box::<[u8]>::from(name), Box::<[u8]>::from(value)))
                };
                if let Some((name, value)) = entry {
                    table.insert(name, value);
                }
            }
        }
        if list > max_list {
            return Err(DecodeError::ListTooLarge { limit: max_list });
        }
        Ok(())
    }
}

/// A dynamic table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

/// A dynamic table: newest entry first.
#[derive(Debug)]
struct Table {
    entries: VecDeque<Entry>,
    /// The entries' size, as RFC 7541 section 4.1 counts it.
    size: usize,
    /// The current limit.
    max: usize,
}

impl Table {
    fn new(max: usize) -> Self {
        Table {
            entries: VecDeque::new(),
            size: 0,
            max,
        }
    }

    /// The field at `index` (1-based: the static table's 61, then this one,
    /// newest first).
    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), DecodeError> {
        let bad = DecodeError::BadIndex {
            index,
            dynamic: self.entries.len(),
        };
        match index {
            0 => Err(bad),
            i if i <= STATIC.len() => {
                let (name, value) = STATIC[i - 1];
                Ok((name, value))
            }
            i => self
                .entries
                .get(i - STATIC.len() - 1)
                .map(|(n, v)| (&n[..], &v[..]))
                .ok_or(bad),
        }
    }

    fn insert(&mut self, name: Box<[u8]>, value: Box<[u8]>) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max {
            // Larger than the whole table: it empties the table and is not
            // kept (RFC 7541 section 4.4).
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict(self.max - size);
        self.size += size;
        self.entries.push_front((name, value));
    }

    fn resize(&mut self, max: usize) {
        self.max = max;
        self.evict(max);
    }

    /// Drops the oldest entries until the table takes at most `room`.
    fn evict(&mut self, room: usize) {
        while self.size > room {
            let Some((name, value)) = self.entries.pop_back() else {
                break;
            };
            self.size -= name.len() + value.len() + ENTRY_OVERHEAD;
        }
    }
}

/// Reads an integer with an `prefix`-bit prefix (RFC 7541 section 5.1).
fn integer(input: &mut &[u8], prefix: u8) -> Result<usize, DecodeError> {
    let (&first, rest) = input.split_first().ok_or(DecodeError::Truncated)?;
    *input = rest;
    let mask = (1usize << prefix) - 1;
    let mut value = usize::from(first) & mask;
    if value < mask {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let (&byte, rest) = input.split_first().ok_or(DecodeError::Truncated)?;
        *input = rest;
        if shift > 21 {
            return Err(DecodeError::IntegerOverflow);
        }
        value += usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// Reads a string literal (RFC 7541 section 5.2): the block's own bytes,
/// or `None` when it was Huffman-coded and its decoding is in `scratch`.
fn string<'a>(
    input: &mut &'a [u8],
    scratch: &mut Vec<u8>,
) -> Result<Option<&'a [u8]>, DecodeError> {
    let huffman = input.first().is_some_and(|b| b & 0x80 != 0);
    let len = integer(input, 7)?;
    if len > input.len() {
        return Err(DecodeError::Truncated);
    }
    let (raw, rest) = input.split_at(len);
    *input = rest;
    if !huffman {
        return Ok(Some(raw));
    }
    scratch.clear();
    huffman_decode(raw, scratch)?;
    Ok(None)
}

/// Appends the Huffman decoding of `coded` to `out`.
fn huffman_decode(coded: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let machine = machine();
    // The shortest code is 5 bits.
    out.reserve(coded.len() * 8 / 5);
    let mut state = 0usize;
    for &byte in coded {
        for nibble in [byte >> 4, byte & 0x0f] {
            let step = machine.steps[state * 16 + usize::from(nibble)];
            if step.flags & FAIL != 0 {
                return Err(DecodeError::HuffmanEos);
            }
            if step.flags & EMIT != 0 {
                out.push(step.symbol);
            }
            state = usize::from(step.next);
        }
    }
    if !machine.may_end[state] {
        return Err(DecodeError::HuffmanPadding);
    }
    Ok(())
}

const EMIT: u8 = 1;
const FAIL: u8 = 2;

/// One transition of the Huffman decoder: from a state, on a nibble.
#[derive(Clone, Copy, Debug, Default)]
struct Step {
    next: u8,
    symbol: u8,
    flags: u8,
}

/// The Huffman code as a state machine read four bits at a time. A state
/// is an inner node of the code's tree (the root is 0); the shortest code
/// being 5 bits, a nibble completes at most one symbol.
struct Machine {
    steps: Vec<Step>,
    /// A string may end in the state: at the root, or within 7 bits of it
    /// on the all-ones path (the EOS code's prefix, which pads a string).
    may_end: Vec<bool>,
}

fn machine() -> &'static Machine {
    static MACHINE: OnceLock<Machine> = OnceLock::new();
    MACHINE.get_or_init(|| {
        // The code's tree: an inner node's children, a leaf as !symbol.
        let mut tree: Vec<[i32; 2]> = vec![[0, 0]];
        let mut depth_ones: Vec<(u32, bool)> = vec![(0, true)];
        for (symbol, &(code, bits)) in HUFFMAN.iter().enumerate() {
            let mut node = 0usize;
            for i in (0..bits).rev() {
                let bit = ((code >> i) & 1) as usize;
                if i == 0 {
                    tree[node][bit] = !(symbol as i32);
                } else {
                    if tree[node][bit] == 0 {
                        let (depth, ones) = depth_ones[node];
                        tree.push([0, 0]);
                        depth_ones.push((depth + 1, ones && bit == 1));
                        tree[node][bit] = (tree.len() - 1) as i32;
                    }
                    node = tree[node][bit] as usize;
                }
            }
        }
        assert!(tree.len() <= 256, "the HPACK code has 256 inner nodes");
        let mut steps = vec![Step::default(); tree.len() * 16];
        for state in 0..tree.len() {
            for nibble in 0..16u8 {
                let mut node = state;
                let mut step = Step::default();
                for i in (0..4).rev() {
                    let child = tree[node][usize::from((nibble >> i) & 1)];
                    if child < 0 {
                        let symbol = !child;
                        if symbol == 256 {
                            step.flags |= FAIL;
                            break;
                        }
                        step.symbol = symbol as u8;
                        step.flags |= EMIT;
                        node = 0;
                    } else {
                        node = child as usize;
                    }
                }
                step.next = node as u8;
                steps[state * 16 + usize::from(nibble)] = step;
            }
        }
        let may_end = depth_ones
            .iter()
            .map(|&(depth, ones)| depth == 0 || (ones && depth <= 7))
            .collect();
        Machine { steps, may_end }
    })
}

/// Writes one header field: as an index when the static table holds it
/// exactly, else as a literal without indexing, its name indexed when the
/// static table holds the name.
pub fn encode_field(name: &[u8], value: &[u8], out: &mut impl BufMut) {
    let mut name_index = 0;
    for (i, &(n, v)) in STATIC.iter().enumerate() {
        if n == name {
            if v == value {
                return put_integer(i + 1, 7, 0x80, out);
            }
            if name_index == 0 {
                name_index = i + 1;
            }
        }
    }
    // A literal without indexing.
    put_integer(name_index, 4, 0x00, out);
    if name_index == 0 {
        put_string(name, out);
    }
    put_string(value, out);
}

/// Appends the Huffman coding of `s` (RFC 7541 appendix B) to `out`,
/// padded with ones to a whole byte. freshd's own blocks do not use it;
/// it makes the decoder's test inputs.
pub fn huffman_encode(s: &[u8], out: &mut Vec<u8>) {
    let (mut acc, mut bits) = (0u64, 0u32);
    for &b in s {
        let (code, len) = HUFFMAN[usize::from(b)];
        acc = (acc << len) | u64::from(code);
        bits += u32::from(len);
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
    }
}

/// Writes `value` with a `prefix`-bit prefix, the bits above it `high`.
pub fn put_integer(value: usize, prefix: u8, high: u8, out: &mut impl BufMut) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        out.put_u8(high | value as u8);
        return;
    }
    out.put_u8(high | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.put_u8((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.put_u8(rest as u8);
}

/// Writes a string literal as is (no Huffman coding).
fn put_string(s: &[u8], out: &mut impl BufMut) {
    put_integer(s.len(), 7, 0x00, out);
    out.put_slice(s);
}

/// The static table (RFC 7541 appendix A); index 1 is the first entry.
pub const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// The Huffman code (RFC 7541 appendix B): code and length in bits, by
/// symbol; 256 is the end-of-string symbol.
const HUFFMAN: [(u32, u8); 257] = [
    (0x1ff8, 13),
    (0x7fffd8, 23),
    (0xfffffe2, 28),
    (0xfffffe3, 28),
    (0xfffffe4, 28),
    (0xfffffe5, 28),
    (0xfffffe6, 28),
    (0xfffffe7, 28),
    (0xfffffe8, 28),
    (0xffffea, 24),
    (0x3ffffffc, 30),
    (0xfffffe9, 28),
    (0xfffffea, 28),
    (0x3ffffffd, 30),
    (0xfffffeb, 28),
    (0xfffffec, 28),
    (0xfffffed, 28),
    (0xfffffee, 28),
    (0xfffffef, 28),
    (0xffffff0, 28),
    (0xffffff1, 28),
    (0xffffff2, 28),
    (0x3ffffffe, 30),
    (0xffffff3, 28),
    (0xffffff4, 28),
    (0xffffff5, 28),
    (0xffffff6, 28),
    (0xffffff7, 28),
    (0xffffff8, 28),
    (0xffffff9, 28),
    (0xffffffa, 28),
    (0xffffffb, 28),
    (0x14, 6),
    (0x3f8, 10),
    (0x3f9, 10),
    (0xffa, 12),
    (0x1ff9, 13),
    (0x15, 6),
    (0xf8, 8),
    (0x7fa, 11),
    (0x3fa, 10),
    (0x3fb, 10),
    (0xf9, 8),
    (0x7fb, 11),
    (0xfa, 8),
    (0x16, 6),
    (0x17, 6),
    (0x18, 6),
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6),
    (0x1a, 6),
    (0x1b, 6),
    (0x1c, 6),
    (0x1d, 6),
    (0x1e, 6),
    (0x1f, 6),
    (0x5c, 7),
    (0xfb, 8),
    (0x7ffc, 15),
    (0x20, 6),
    (0xffb, 12),
    (0x3fc, 10),
    (0x1ffa, 13),
    (0x21, 6),
    (0x5d, 7),
    (0x5e, 7),
    (0x5f, 7),
    (0x60, 7),
    (0x61, 7),
    (0x62, 7),
    (0x63, 7),
    (0x64, 7),
    (0x65, 7),
    (0x66, 7),
    (0x67, 7),
    (0x68, 7),
    (0x69, 7),
    (0x6a, 7),
    (0x6b, 7),
    (0x6c, 7),
    (0x6d, 7),
    (0x6e, 7),
    (0x6f, 7),
    (0x70, 7),
    (0x71, 7),
    (0x72, 7),
    (0xfc, 8),
    (0x73, 7),
    (0xfd, 8),
    (0x1ffb, 13),
    (0x7fff0, 19),
    (0x1ffc, 13),
    (0x3ffc, 14),
    (0x22, 6),
    (0x7ffd, 15),
    (0x3, 5),
    (0x23, 6),
    (0x4, 5),
    (0x24, 6),
    (0x5, 5),
    (0x25, 6),
    (0x26, 6),
    (0x27, 6),
    (0x6, 5),
    (0x74, 7),
    (0x75, 7),
    (0x28, 6),
    (0x29, 6),
    (0x2a, 6),
    (0x7, 5),
    (0x2b, 6),
    (0x76, 7),
    (0x2c, 6),
    (0x8, 5),
    (0x9, 5),
    (0x2d, 6),
    (0x77, 7),
    (0x78, 7),
    (0x79, 7),
    (0x7a, 7),
    (0x7b, 7),
    (0x7ffe, 15),
    (0x7fc, 11),
    (0x3ffd, 14),
    (0x1ffd, 13),
    (0xffffffc, 28),
    (0xfffe6, 20),
    (0x3fffd2, 22),
    (0xfffe7, 20),
    (0xfffe8, 20),
    (0x3fffd3, 22),
    (0x3fffd4, 22),
    (0x3fffd5, 22),
    (0x7fffd9, 23),
    (0x3fffd6, 22),
    (0x7fffda, 23),
    (0x7fffdb, 23),
    (0x7fffdc, 23),
    (0x7fffdd, 23),
    (0x7fffde, 23),
    (0xffffeb, 24),
    (0x7fffdf, 23),
    (0xffffec, 24),
    (0xffffed, 24),
    (0x3fffd7, 22),
    (0x7fffe0, 23),
    (0xffffee, 24),
    (0x7fffe1, 23),
    (0x7fffe2, 23),
    (0x7fffe3, 23),
    (0x7fffe4, 23),
    (0x1fffdc, 21),
    (0x3fffd8, 22),
    (0x7fffe5, 23),
    (0x3fffd9, 22),
    (0x7fffe6, 23),
    (0x7fffe7, 23),
    (0xffffef, 24),
    (0x3fffda, 22),
    (0x1fffdd, 21),
    (0xfffe9, 20),
    (0x3fffdb, 22),
    (0x3fffdc, 22),
    (0x7fffe8, 23),
    (0x7fffe9, 23),
    (0x1fffde, 21),
    (0x7fffea, 23),
    (0x3fffdd, 22),
    (0x3fffde, 22),
    (0xfffff0, 24),
    (0x1fffdf, 21),
    (0x3fffdf, 22),
    (0x7fffeb, 23),
    (0x7fffec, 23),
    (0x1fffe0, 21),
    (0x1fffe1, 21),
    (0x3fffe0, 22),
    (0x1fffe2, 21),
    (0x7fffed, 23),
    (0x3fffe1, 22),
    (0x7fffee, 23),
    (0x7fffef, 23),
    (0xfffea, 20),
    (0x3fffe2, 22),
    (0x3fffe3, 22),
    (0x3fffe4, 22),
    (0x7ffff0, 23),
    (0x3fffe5, 22),
    (0x3fffe6, 22),
    (0x7ffff1, 23),
    (0x3ffffe0, 26),
    (0x3ffffe1, 26),
    (0xfffeb, 20),
    (0x7fff1, 19),
    (0x3fffe7, 22),
    (0x7ffff2, 23),
    (0x3fffe8, 22),
    (0x1ffffec, 25),
    (0x3ffffe2, 26),
    (0x3ffffe3, 26),
    (0x3ffffe4, 26),
    (0x7ffffde, 27),
    (0x7ffffdf, 27),
    (0x3ffffe5, 26),
    (0xfffff1, 24),
    (0x1ffffed, 25),
    (0x7fff2, 19),
    (0x1fffe3, 21),
    (0x3ffffe6, 26),
    (0x7ffffe0, 27),
    (0x7ffffe1, 27),
    (0x3ffffe7, 26),
    (0x7ffffe2, 27),
    (0xfffff2, 24),
    (0x1fffe4, 21),
    (0x1fffe5, 21),
    (0x3ffffe8, 26),
    (0x3ffffe9, 26),
    (0xffffffd, 28),
    (0x7ffffe3, 27),
    (0x7ffffe4, 27),
    (0x7ffffe5, 27),
    (0xfffec, 20),
    (0xfffff3, 24),
    (0xfffed, 20),
    (0x1fffe6, 21),
    (0x3fffe9, 22),
    (0x1fffe7, 21),
    (0x1fffe8, 21),
    (0x7ffff3, 23),
    (0x3fffea, 22),
    (0x3fffeb, 22),
    (0x1ffffee, 25),
    (0x1ffffef, 25),
    (0xfffff4, 24),
    (0xfffff5, 24),
    (0x3ffffea, 26),
    (0x7ffff4, 23),
    (0x3ffffeb, 26),
    (0x7ffffe6, 27),
    (0x3ffffec, 26),
    (0x3ffffed, 26),
    (0x7ffffe7, 27),
    (0x7ffffe8, 27),
    (0x7ffffe9, 27),
    (0x7ffffea, 27),
    (0x7ffffeb, 27),
    (0xffffffe, 28),
    (0x7ffffec, 27),
    (0x7ffffed, 27),
    (0x7ffffee, 27),
    (0x7ffffef, 27),
    (0x7fffff0, 27),
    (0x3ffffee, 26),
    (0x3fffffff, 30),
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn decode(decoder: &mut Decoder, block: &[u8], max_list: usize) -> Result<Fields, DecodeError> {
        let mut fields = Vec::new();
        decoder.decode(block, max_list, |n, v| {
            fields.push((n.to_vec(), v.to_vec()))
        })?;
        Ok(fields)
    }

    fn named(fields: &[(&str, &str)]) -> Fields {
        fields
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    /// Decodes `blocks` in turn on one decoder, checking each block's
    /// fields and the table's size and length after it.
    /// A block in hex, its fields, and the table's size and length after it.
    type Step<'a> = (&'a str, &'a [(&'a str, &'a str)], usize, usize);

    fn sequence(decoder: &mut Decoder, blocks: &[Step<'_>]) {
        for (i, (hex, fields, size, len)) in blocks.iter().enumerate() {
            let got = decode(decoder, &unhex(hex), usize::MAX).expect("a valid block");
            assert_eq!(got, named(fields), "block {i}");
            assert_eq!(
                (decoder.table_size(), decoder.table_len()),
                (*size, *len),
                "block {i}"
            );
        }
    }

    const REQUESTS: [&[(&str, &str)]; 3] = [
        &[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ],
        &[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
            ("cache-control", "no-cache"),
        ],
        &[
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/index.html"),
            (":authority", "www.example.com"),
            ("custom-key", "custom-value"),
        ],
    ];

    #[test]
    fn rfc_7541_c3_requests_without_huffman() {
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
        sequence(
            &mut d,
            &[
                (
                    "828684410f7777772e6578616d706c652e636f6d",
                    REQUESTS[0],
                    57,
                    1,
                ),
                ("828684be58086e6f2d6361636865", REQUESTS[1], 110, 2),
                (
                    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
                    REQUESTS[2],
                    164,
                    3,
                ),
            ],
        );
    }

    #[test]
    fn rfc_7541_c4_requests_with_huffman() {
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
        sequence(
            &mut d,
            &[
                ("828684418cf1e3c2e5f23a6ba0ab90f4ff", REQUESTS[0], 57, 1),
                ("828684be5886a8eb10649cbf", REQUESTS[1], 110, 2),
                (
                    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
                    REQUESTS[2],
                    164,
                    3,
                ),
            ],
        );
    }

    #[test]
    fn rfc_7541_c6_responses_evict_from_a_256_byte_table() {
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
        let first: &[(&str, &str)] = &[
            (":status", "302"),
            ("cache-control", "private"),
            ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
            ("location", "https://www.example.com"),
        ];
        let second: &[(&str, &str)] = &[
            (":status", "307"),
            ("cache-control", "private"),
            ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
            ("location", "https://www.example.com"),
        ];
        let third: &[(&str, &str)] = &[
            (":status", "200"),
            ("cache-control", "private"),
            ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
            ("location", "https://www.example.com"),
            ("content-encoding", "gzip"),
            (
                "set-cookie",
                "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
            ),
        ];
        // The first block starts with a size update to 256 bytes.
        sequence(
            &mut d,
            &[
                (
                    "3fe101488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3",
                    first,
                    222,
                    4,
                ),
                ("4883640effc1c0bf", second, 222, 4),
                (
                    "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
                    third,
                    215,
                    3,
                ),
            ],
        );
        assert_eq!(d.table_limit(), 256);
    }

    #[test]
    fn bad_blocks_are_refused_with_what_is_wrong() {
        let cases: &[(&str, DecodeError, &str)] = &[
            (
                "80",
                DecodeError::BadIndex {
                    index: 0,
                    dynamic: 0,
                },
                "header index 0 is not in the tables (1 to 61)",
            ),
            (
                "be",
                DecodeError::BadIndex {
                    index: 62,
                    dynamic: 0,
                },
                "header index 62 is not in the tables (1 to 61)",
            ),
            (
                "ff",
                DecodeError::Truncated,
                "header block ends inside a field",
            ),
            (
                "ffffffffff7f",
                DecodeError::IntegerOverflow,
                "header block integer is too large",
            ),
            (
                "4003616263",
                DecodeError::Truncated,
                "header block ends inside a field",
            ),
            (
                "0085",
                DecodeError::Truncated,
                "header block ends inside a field",
            ),
            // '0' is 00000: three bits of zero padding follow.
            (
                "408100",
                DecodeError::HuffmanPadding,
                "Huffman-coded string has invalid padding",
            ),
            // Eight bits of ones: padding longer than 7 bits.
            (
                "4081ff",
                DecodeError::HuffmanPadding,
                "Huffman-coded string has invalid padding",
            ),
            // Thirty ones: the EOS symbol.
            (
                "4084ffffffff",
                DecodeError::HuffmanEos,
                "Huffman-coded string holds the EOS symbol",
            ),
            (
                "3fe21f",
                DecodeError::TableSizeTooLarge {
                    size: 4097,
                    max: 4096,
                },
                "dynamic table size update to 4097 bytes is above the limit of 4096",
            ),
            (
                "8220",
                DecodeError::LateTableSizeUpdate,
                "dynamic table size update after a header field",
            ),
        ];
        for (hex, error, text) in cases {
            let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
            assert_eq!(
                decode(&mut d, &unhex(hex), usize::MAX).as_ref(),
                Err(error),
                "{hex}"
            );
            assert_eq!(error.to_string(), *text);
        }
    }

    #[test]
    fn an_oversized_list_is_refused_but_still_fills_the_table() {
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
        // :method GET (42 bytes as listed), then custom-key: custom-value
        // with incremental indexing.
        let block = unhex("82400a637573746f6d2d6b65790c637573746f6d2d76616c7565");
        let mut fields = Vec::new();
        let result = d.decode(&block, 50, |n, v| fields.push((n.to_vec(), v.to_vec())));
        assert_eq!(result, Err(DecodeError::ListTooLarge { limit: 50 }));
        assert_eq!(fields, named(&[(":method", "GET")]));
        assert_eq!((d.table_len(), d.table_size()), (1, 54));
        // The table is in step: the next block may index the entry.
        assert_eq!(
            decode(&mut d, &unhex("be"), usize::MAX),
            Ok(named(&[("custom-key", "custom-value")]))
        );
    }

    #[test]
    fn a_table_size_of_zero_empties_the_table() {
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
        decode(
            &mut d,
            &unhex("828684410f7777772e6578616d706c652e636f6d"),
            usize::MAX,
        )
        .unwrap();
        assert_eq!(d.table_len(), 1);
        assert_eq!(
            decode(&mut d, &unhex("2082"), usize::MAX),
            Ok(named(&[(":method", "GET")]))
        );
        assert_eq!((d.table_len(), d.table_size(), d.table_limit()), (0, 0, 0));
        // An entry larger than the table is not kept.
        assert_eq!(
            decode(&mut d, &unhex("4001610162"), usize::MAX),
            Ok(named(&[("a", "b")]))
        );
        assert_eq!(d.table_len(), 0);
    }

    #[test]
    fn the_encoder_indexes_exact_static_fields() {
        let mut out = Vec::new();
        encode_field(b":status", b"200", &mut out);
        encode_field(b"content-type", b"application/grpc", &mut out);
        encode_field(b"grpc-status", b"0", &mut out);
        // 0x88: static 8; 0x0f 0x10: content-type (31) without indexing.
        assert_eq!(&out[..3], &[0x88, 0x0f, 0x10]);
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
        assert_eq!(
            decode(&mut d, &out, usize::MAX),
            Ok(named(&[
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-status", "0")
            ]))
        );
        assert_eq!(d.table_len(), 0, "the encoder's fields are never indexed");
    }

    proptest! {
        #[test]
        fn encoded_fields_decode_to_themselves(
            fields in prop::collection::vec(
                (
                    prop_oneof![
                        Just(b":path".to_vec()),
                        Just(b"content-type".to_vec()),
                        Just(b"grpc-status".to_vec()),
                        prop::collection::vec(any::<u8>(), 0..40),
                    ],
                    prop_oneof![
                        Just(b"0".to_vec()),
                        Just(b"/".to_vec()),
                        prop::collection::vec(any::<u8>(), 0..300),
                    ],
                ),
                0..12,
            )
        ) {
            let mut block = Vec::new();
            for (n, v) in &fields {
                encode_field(n, v, &mut block);
            }
            let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
            prop_assert_eq!(decode(&mut d, &block, usize::MAX), Ok(fields));
        }

        #[test]
        fn huffman_coded_strings_decode_to_themselves(
            name in prop::collection::vec(any::<u8>(), 0..60),
            value in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            // A literal with incremental indexing and a new name, both
            // Huffman-coded; then the same field by its index.
            let mut block = vec![0x40];
            for s in [&name, &value] {
                let mut coded = Vec::new();
                huffman_encode(s, &mut coded);
                put_integer(coded.len(), 7, 0x80, &mut block);
                block.extend_from_slice(&coded);
            }
            block.push(0xbe);
            let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
            let field = (name.clone(), value.clone());
            prop_assert_eq!(decode(&mut d, &block, usize::MAX), Ok(vec![field.clone(), field]));
        }

        #[test]
        fn any_bytes_decode_or_fail_within_the_table_limit(
            blocks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..6),
            max in 0usize..300,
        ) {
            let mut d = Decoder::new(max);
            for block in &blocks {
                let _ = decode(&mut d, block, 1024);
                prop_assert!(d.table_size() <= d.table_limit() && d.table_limit() <= max);
            }
        }
    }
}
