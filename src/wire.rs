//! Hand-written wire types for the messages where the generated types cost
//! too much: `freshd.v1.NoticeBatch` on the way out, and the check requests
//! on the way in.
//!
//! A publish that reaches 1,000 streams would otherwise build and encode each
//! of its notices 1,000 times, two `String` copies each. Instead a notice is
//! encoded once, the first time a stream writes it ([`encode_entry`], kept by
//! the fan-out), and each stream's batch is those bytes laid end to end
//! ([`NoticeBatch::from_encoded`]). On the wire nothing changes: a batch is
//! still `repeated Notice notices = 1`, and decoding one gives
//! [`NoticeBatch::notices`] as the generated type would.
//!
//! A check request decoded by prost is a `String` per key, allocated, copied
//! and freed for a lookup that only reads it: a tenth of a 1,000-key batch's
//! server time. [`CheckRequestRef`] and [`CheckBatchRequestRef`] borrow
//! their strings from the request's bytes instead. They decode what prost
//! decodes, to the same values; input they do not take (a malformed
//! message, a group, anything unusual) is handed to prost, whose answer,
//! decoded message or error, is then the answer.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::pb;

/// `freshd.v1.CheckRequest`, its strings borrowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckRequestRef<'a> {
    /// The key.
    pub key: &'a str,
    /// The cached copy's version.
    pub version: u64,
    /// The cached copy's age, ms.
    pub age_ms: u64,
    /// The epoch the version came from; 0 for none.
    pub epoch: u64,
    /// Read your writes: the seq to wait for.
    pub min_seq: u64,
    /// The endpoint serving the copy, for the metrics.
    pub endpoint: &'a str,
    /// Whether the copy was served before the check.
    pub served: bool,
    /// The client's id.
    pub client_id: &'a str,
}

impl<'a> Borrowed<'a> for CheckRequestRef<'a> {
    type Owned = pb::CheckRequest;

    fn decode_fast(buf: &'a [u8]) -> Option<Self> {
        let mut m = Self::default();
        fields(buf, |tag, wire, buf| {
            match tag {
                1 => m.key = string(wire, buf)?,
                2 => m.version = uint(wire, buf)?,
                3 => m.age_ms = uint(wire, buf)?,
                4 => m.epoch = uint(wire, buf)?,
                5 => m.min_seq = uint(wire, buf)?,
                6 => m.endpoint = string(wire, buf)?,
                7 => m.served = uint(wire, buf)? != 0,
                8 => m.client_id = string(wire, buf)?,
                _ => skip(wire, tag, buf)?,
            }
            Some(())
        })?;
        Some(m)
    }

    fn of(m: &'a pb::CheckRequest) -> Self {
        Self {
            key: &m.key,
            version: m.version,
            age_ms: m.age_ms,
            epoch: m.epoch,
            min_seq: m.min_seq,
            endpoint: &m.endpoint,
            served: m.served,
            client_id: &m.client_id,
        }
    }
}

/// `freshd.v1.CheckItem`, its key borrowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckItemRef<'a> {
    /// The key.
    pub key: &'a str,
    /// The cached copy's version.
    pub version: u64,
    /// The cached copy's age, ms.
    pub age_ms: u64,
    /// Whether the copy was served before the check.
    pub served: bool,
}

impl<'a> CheckItemRef<'a> {
    fn decode_fast(buf: &'a [u8]) -> Option<Self> {
        let mut m = Self::default();
        fields(buf, |tag, wire, buf| {
            match tag {
                1 => m.key = string(wire, buf)?,
                2 => m.version = uint(wire, buf)?,
                3 => m.age_ms = uint(wire, buf)?,
                4 => m.served = uint(wire, buf)? != 0,
                _ => skip(wire, tag, buf)?,
            }
            Some(())
        })?;
        Some(m)
    }
}

/// `freshd.v1.CheckBatchRequest`, its strings borrowed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckBatchRequestRef<'a> {
    /// The items, in order.
    pub items: Vec<CheckItemRef<'a>>,
    /// The epoch the versions came from; 0 for none.
    pub epoch: u64,
    /// Read your writes: the seq to wait for.
    pub min_seq: u64,
    /// The endpoint serving the copies, for the metrics.
    pub endpoint: &'a str,
    /// The client's id.
    pub client_id: &'a str,
}

impl<'a> Borrowed<'a> for CheckBatchRequestRef<'a> {
    type Owned = pb::CheckBatchRequest;

    fn decode_fast(buf: &'a [u8]) -> Option<Self> {
        let mut m = Self::default();
        fields(buf, |tag, wire, buf| {
            match tag {
                1 => {
                    if wire != WireType::LengthDelimited {
                        return None;
                    }
                    m.items.push(CheckItemRef::decode_fast(bytes(buf)?)?);
                }
                2 => m.epoch = uint(wire, buf)?,
                3 => m.min_seq = uint(wire, buf)?,
                4 => m.endpoint = string(wire, buf)?,
                5 => m.client_id = string(wire, buf)?,
                _ => skip(wire, tag, buf)?,
            }
            Some(())
        })?;
        Some(m)
    }

    fn of(m: &'a pb::CheckBatchRequest) -> Self {
        Self {
            items: m
                .items
                .iter()
                .map(|i| CheckItemRef {
                    key: &i.key,
                    version: i.version,
                    age_ms: i.age_ms,
                    served: i.served,
                })
                .collect(),
            epoch: m.epoch,
            min_seq: m.min_seq,
            endpoint: &m.endpoint,
            client_id: &m.client_id,
        }
    }
}

/// A request whose strings borrow the bytes it was decoded from, beside
/// the generated type it stands for.
pub trait Borrowed<'a>: Sized {
    /// The generated type.
    type Owned: Message + Default;

    /// Decodes `buf` to what prost would decode it to; `None` for anything
    /// this decoder leaves to prost (malformed input, groups).
    fn decode_fast(buf: &'a [u8]) -> Option<Self>;

    /// A view of a decoded message.
    fn of(m: &'a Self::Owned) -> Self;
}

/// Decodes `buf` as prost would decode an `R::Owned`, borrowing its
/// strings from `buf`; what the borrowing decoder leaves to prost is
/// decoded by prost into `owned`, and borrowed from there. Prost's error
/// when neither takes it.
pub fn decode<'a, R: Borrowed<'a>>(
    buf: &'a [u8],
    owned: &'a mut Option<R::Owned>,
) -> Result<R, DecodeError> {
    if let Some(request) = R::decode_fast(buf) {
        return Ok(request);
    }
    let m = R::Owned::decode(buf)?;
    Ok(R::of(owned.insert(m)))
}

/// Calls `field` with each field's tag and wire type, and the bytes from
/// the field's value on (it takes the value off them).
fn fields<'a>(
    mut buf: &'a [u8],
    mut field: impl FnMut(u32, WireType, &mut &'a [u8]) -> Option<()>,
) -> Option<()> {
    while !buf.is_empty() {
        let (tag, wire) = encoding::decode_key(&mut buf).ok()?;
        field(tag, wire, &mut buf)?;
    }
    Some(())
}

/// A length-delimited field's bytes.
fn bytes<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = encoding::decode_varint(buf).ok()?;
    if len > buf.len() as u64 {
        return None;
    }
    let (field, rest) = buf.split_at(len as usize);
    *buf = rest;
    Some(field)
}

/// A `string` field.
fn string<'a>(wire: WireType, buf: &mut &'a [u8]) -> Option<&'a str> {
    if wire != WireType::LengthDelimited {
        return None;
    }
    std::str::from_utf8(bytes(buf)?).ok()
}

/// A `uint64` or `bool` field, as its varint.
fn uint(wire: WireType, buf: &mut &[u8]) -> Option<u64> {
    if wire != WireType::Varint {
        return None;
    }
    encoding::decode_varint(buf).ok()
}

/// Skips an unknown field; a group (deprecated, never sent by freshd's
/// clients) is left to prost.
fn skip(wire: WireType, tag: u32, buf: &mut &[u8]) -> Option<()> {
    if matches!(wire, WireType::StartGroup | WireType::EndGroup) {
        return None;
    }
    encoding::skip_field(wire, tag, buf, DecodeContext::default()).ok()
}

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
            repair: false,
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

    mod requests {
        use super::super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        fn check_request() -> impl Strategy<Value = pb::CheckRequest> {
            (
                ".{0,24}",
                any::<u64>(),
                any::<u64>(),
                prop_oneof![Just(0u64), any::<u64>()],
                any::<u64>(),
                ".{0,8}",
                any::<bool>(),
                ".{0,8}",
            )
                .prop_map(
                    |(key, version, age_ms, epoch, min_seq, endpoint, served, client_id)| {
                        pb::CheckRequest {
                            key,
                            version,
                            age_ms,
                            epoch,
                            min_seq,
                            endpoint,
                            served,
                            client_id,
                        }
                    },
                )
        }

        fn check_batch_request() -> impl Strategy<Value = pb::CheckBatchRequest> {
            (
                vec(
                    (".{0,16}", any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
                        |(key, version, age_ms, served)| pb::CheckItem {
                            key,
                            version,
                            age_ms,
                            served,
                        },
                    ),
                    0..8,
                ),
                any::<u64>(),
                any::<u64>(),
                ".{0,8}",
                ".{0,8}",
            )
                .prop_map(|(items, epoch, min_seq, endpoint, client_id)| {
                    pb::CheckBatchRequest {
                        items,
                        epoch,
                        min_seq,
                        endpoint,
                        client_id,
                    }
                })
        }

        /// A piece of a request's bytes: messages laid end to end merge,
        /// unknown fields are skipped, and anything else may break it.
        fn pieces(message: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
            let piece = prop_oneof![
                4 => message,
                // Unknown fields of every wire type but groups.
                1 => (9u32..40, any::<u64>()).prop_map(|(tag, v)| {
                    let mut b = Vec::new();
                    encoding::encode_key(tag, WireType::Varint, &mut b);
                    encoding::encode_varint(v, &mut b);
                    b
                }),
                1 => (9u32..40, vec(any::<u8>(), 0..12)).prop_map(|(tag, bytes)| {
                    let mut b = Vec::new();
                    encoding::encode_key(tag, WireType::LengthDelimited, &mut b);
                    encoding::encode_varint(bytes.len() as u64, &mut b);
                    b.extend_from_slice(&bytes);
                    b
                }),
                1 => (9u32..40, any::<u64>()).prop_map(|(tag, v)| {
                    let mut b = Vec::new();
                    encoding::encode_key(tag, WireType::SixtyFourBit, &mut b);
                    b.extend_from_slice(&v.to_le_bytes());
                    b
                }),
                // A group, which only prost takes.
                1 => (9u32..40).prop_map(|tag| {
                    let mut b = Vec::new();
                    encoding::encode_key(tag, WireType::StartGroup, &mut b);
                    encoding::encode_key(tag, WireType::EndGroup, &mut b);
                    b
                }),
                // Bytes that are rarely a field.
                1 => vec(any::<u8>(), 1..6),
            ];
            vec(piece, 0..4).prop_map(|pieces| pieces.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]

            #[test]
            fn a_check_request_decodes_to_what_prost_decodes(m in check_request()) {
                let bytes = m.encode_to_vec();
                prop_assert_eq!(
                    CheckRequestRef::decode_fast(&bytes),
                    Some(CheckRequestRef::of(&m))
                );
            }

            #[test]
            fn a_check_batch_request_decodes_to_what_prost_decodes(
                m in check_batch_request()
            ) {
                let bytes = m.encode_to_vec();
                prop_assert_eq!(
                    CheckBatchRequestRef::decode_fast(&bytes),
                    Some(CheckBatchRequestRef::of(&m))
                );
            }

            #[test]
            fn any_check_bytes_decode_as_prost_decodes_them(
                bytes in pieces(check_request().prop_map(|m| m.encode_to_vec()))
            ) {
                let prost = pb::CheckRequest::decode(&bytes[..]);
                agree(
                    decode::<CheckRequestRef>(&bytes, &mut None),
                    prost.as_ref().map(CheckRequestRef::of),
                )?;
            }

            #[test]
            fn any_check_batch_bytes_decode_as_prost_decodes_them(
                bytes in pieces(check_batch_request().prop_map(|m| m.encode_to_vec()))
            ) {
                let prost = pb::CheckBatchRequest::decode(&bytes[..]);
                agree(
                    decode::<CheckBatchRequestRef>(&bytes, &mut None),
                    prost.as_ref().map(CheckBatchRequestRef::of),
                )?;
            }
        }

        /// Our decode and prost's agree: the same values, or the same error.
        fn agree<T: PartialEq + std::fmt::Debug>(
            ours: Result<T, DecodeError>,
            theirs: Result<T, &DecodeError>,
        ) -> Result<(), TestCaseError> {
            match (ours, theirs) {
                (Ok(ours), Ok(theirs)) => prop_assert_eq!(ours, theirs),
                (Err(ours), Err(theirs)) => prop_assert_eq!(ours.to_string(), theirs.to_string()),
                (ours, theirs) => prop_assert!(false, "{:?} vs {:?}", ours, theirs),
            }
            Ok(())
        }

        #[test]
        fn a_key_that_is_not_utf8_is_prost_s_error() {
            // key = 1: "f", 0xff, 0xfe.
            let bytes = [0x0a, 0x03, 0x66, 0xff, 0xfe];
            let e = decode::<CheckRequestRef>(&bytes, &mut None).unwrap_err();
            assert!(e.to_string().contains("CheckRequest.key"), "{e}");
            // The same key in a batch's item.
            let bytes = [0x0a, 0x05, 0x0a, 0x03, 0x66, 0xff, 0xfe];
            let e = decode::<CheckBatchRequestRef>(&bytes, &mut None)
                .unwrap_err()
                .to_string();
            assert!(e.contains("CheckBatchRequest.items"), "{e}");
            assert!(e.contains("CheckItem.key"), "{e}");
        }

        #[test]
        fn concatenated_requests_merge_as_prost_merges_them() {
            let a = pb::CheckBatchRequest {
                items: vec![pb::CheckItem {
                    key: "a".into(),
                    version: 1,
                    ..Default::default()
                }],
                epoch: 7,
                endpoint: "first".into(),
                ..Default::default()
            };
            let b = pb::CheckBatchRequest {
                items: vec![pb::CheckItem {
                    key: "b".into(),
                    version: 2,
                    ..Default::default()
                }],
                endpoint: "second".into(),
                ..Default::default()
            };
            let mut bytes = a.encode_to_vec();
            bytes.extend(b.encode_to_vec());
            let mut owned = None;
            let ours = decode::<CheckBatchRequestRef>(&bytes, &mut owned).unwrap();
            let keys: Vec<&str> = ours.items.iter().map(|i| i.key).collect();
            assert_eq!(keys, ["a", "b"]);
            // Scalars: the last one present wins (a default is not sent).
            assert_eq!((ours.epoch, ours.endpoint), (7, "second"));
            let theirs = pb::CheckBatchRequest::decode(&bytes[..]).unwrap();
            assert_eq!(ours, CheckBatchRequestRef::of(&theirs));
        }
    }

    #[test]
    fn a_bad_batch_names_the_field() {
        // Field 1, length 5, then 2 bytes.
        let err = NoticeBatch::decode(&[0x0a, 0x05, 0x08, 0x01][..]).unwrap_err();
        assert!(err.to_string().contains("NoticeBatch.notices"), "{err}");
    }
}
