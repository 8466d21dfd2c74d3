//! Hand-written wire types for the one message where the generated type costs
//! too much: `freshd.v1.NoticeBatch`.
//!
//! A publish that reaches 1,000 streams would otherwise build and encode each
//! of its notices 1,000 times, two `String` copies each. Instead a notice is
//! encoded once, the first time a stream writes it ([`encode_entry`], kept by
//! the fan-out), and each stream's batch is those bytes laid end to end
//! ([`NoticeBatch::from_encoded`]). On the wire nothing changes: a batch is
//! still `repeated Notice notices = 1`, and decoding one gives
//! [`NoticeBatch::notices`] as the generated type would.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::pb;

/// `freshd.v1.NoticeBatch`: the notices of one Watch response, in seq order.
///
/// Built by the server from notices already encoded, or from
/// [`pb::Notice`]s; decoded, its notices are in [`NoticeBatch::notices`].
#[derive(Clone, PartialEq, Default, Debug)]
pub struct NoticeBatch {
    /// The notices given one by one (and every notice of a decoded batch).
    pub notices: Vec<pb::Notice>,
    /// Notices already encoded as entries of field 1, written after
    /// `notices`.
    encoded: Bytes,
}

impl NoticeBatch {
    /// A batch of `notices`.
    pub fn new(notices: Vec<pb::Notice>) -> Self {
        Self {
            notices,
            encoded: Bytes::new(),
        }
    }

    /// A batch of notices already encoded, each by [`encode_entry`], laid end
    /// to end in seq order.
    pub fn from_encoded(encoded: Bytes) -> Self {
        Self {
            notices: Vec::new(),
            encoded,
        }
    }
}

impl Message for NoticeBatch {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encoding::message::encode_repeated(1, &self.notices, buf);
        buf.put_slice(&self.encoded);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag == 1 {
            encoding::message::merge_repeated(wire_type, &mut self.notices, buf, ctx).map_err(
                |mut e| {
                    e.push("NoticeBatch", "notices");
                    e
                },
            )
        } else {
            encoding::skip_field(wire_type, tag, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        encoding::message::encoded_len_repeated(1, &self.notices) + self.encoded.len()
    }

    fn clear(&mut self) {
        self.notices.clear();
        self.encoded = Bytes::new();
    }
}

/// The fields of one notice, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct NoticeFields<'a> {
    /// The change's seq.
    pub seq: u64,
    /// The key.
    pub key: &'a str,
    /// Its version after the change.
    pub version: u64,
    /// The published key that caused it, as the stream may see it.
    pub cause: &'a str,
    /// The critical bit.
    pub critical: bool,
    /// The producer's event time, Unix ms.
    pub event_time_unix_ms: u64,
}

/// Appends one notice to `out` as an entry of `NoticeBatch.notices` (field
/// tag, length, then the `Notice` message), byte for byte what prost writes
/// for the same [`pb::Notice`]: fields in number order, default values
/// left out.
pub fn encode_entry(n: &NoticeFields<'_>, out: &mut impl BufMut) {
    let uint = |tag: u32, v: u64| {
        if v == 0 {
            0
        } else {
            encoding::key_len(tag) + encoding::encoded_len_varint(v)
        }
    };
    let string = |tag: u32, s: &str| {
        if s.is_empty() {
            0
        } else {
            encoding::key_len(tag) + encoding::encoded_len_varint(s.len() as u64) + s.len()
        }
    };
    let len = uint(1, n.seq)
        + string(2, n.key)
        + uint(3, n.version)
        + string(4, n.cause)
        + uint(5, u64::from(n.critical))
        + uint(6, n.event_time_unix_ms);
    encoding::encode_key(1, WireType::LengthDelimited, out);
    encoding::encode_varint(len as u64, out);
    fn put_uint(tag: u32, v: u64, out: &mut impl BufMut) {
        if v != 0 {
            encoding::encode_key(tag, WireType::Varint, out);
            encoding::encode_varint(v, out);
        }
    }
    fn put_string(tag: u32, s: &str, out: &mut impl BufMut) {
        if !s.is_empty() {
            encoding::encode_key(tag, WireType::LengthDelimited, out);
            encoding::encode_varint(s.len() as u64, out);
            out.put_slice(s.as_bytes());
        }
    }
    put_uint(1, n.seq, out);
    put_string(2, n.key, out);
    put_uint(3, n.version, out);
    put_string(4, n.cause, out);
    put_uint(5, u64::from(n.critical), out);
    put_uint(6, n.event_time_unix_ms, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(seq: u64, key: &str, cause: &str, critical: bool, event: u64) -> pb::Notice {
        pb::Notice {
            seq,
            key: key.into(),
            version: seq.wrapping_mul(3),
            cause: cause.into(),
            critical,
            event_time_unix_ms: event,
        }
    }

    fn fields(n: &pb::Notice) -> NoticeFields<'_> {
        NoticeFields {
            seq: n.seq,
            key: &n.key,
            version: n.version,
            cause: &n.cause,
            critical: n.critical,
            event_time_unix_ms: n.event_time_unix_ms,
        }
    }

    fn samples() -> Vec<pb::Notice> {
        let long = "k".repeat(300);
        vec![
            notice(1, "feed:1", "posts:1", false, 0),
            notice(0, "", "", false, 0),
            notice(u64::MAX, "a", "", true, u64::MAX),
            notice(200, &long, &long, true, 1_700_000_000_000),
            notice(7, "ключ:é", "原因", false, 1),
        ]
    }

    #[test]
    fn entries_are_what_prost_writes() {
        for n in samples() {
            let mut ours = Vec::new();
            encode_entry(&fields(&n), &mut ours);
            let mut theirs = Vec::new();
            encoding::message::encode(1, &n, &mut theirs);
            assert_eq!(ours, theirs, "{n:?}");
        }
    }

    #[test]
    fn a_batch_of_entries_decodes_to_its_notices() {
        let notices = samples();
        let mut encoded = Vec::new();
        for n in &notices {
            encode_entry(&fields(n), &mut encoded);
        }
        let batch = NoticeBatch::from_encoded(encoded.into());
        let bytes = batch.encode_to_vec();
        assert_eq!(bytes.len(), batch.encoded_len());
        assert_eq!(NoticeBatch::decode(&bytes[..]).unwrap().notices, notices);
        // Built one by one, the same bytes.
        assert_eq!(NoticeBatch::new(notices).encode_to_vec(), bytes);
    }

    #[test]
    fn a_bad_batch_names_the_field() {
        // Field 1, length 5, then 2 bytes.
        let err = NoticeBatch::decode(&[0x0a, 0x05, 0x08, 0x01][..]).unwrap_err();
        assert!(err.to_string().contains("NoticeBatch.notices"), "{err}");
    }
}
