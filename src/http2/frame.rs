//! HTTP/2 frames (RFC 9113 sections 4 and 6), as a server reads and writes
//! them: [`Head::parse`] reads a frame's 9-byte header, [`Frame::parse`]
//! checks its payload against the rules of its type and borrows from it,
//! and the `put_*` functions append frames to an output buffer.
//!
//! A frame that breaks a rule is a [`FrameError`] carrying the error code
//! the RFC gives it and whether it ends the connection or only its stream.
//! Unknown frame types and unknown settings are passed over, as the RFC
//! requires. Like [`super::hpack`], this is a layer of freshd's own HTTP/2
//! connection code ([`super::connection`]), which serves every connection;
//! the load tool reads `Watch` streams with it too.

use std::fmt;

use bytes::BufMut;

/// What a client sends first, before its SETTINGS.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The length of a frame's header.
pub const HEAD_LEN: usize = 9;

/// The smallest `SETTINGS_MAX_FRAME_SIZE` (and its default).
pub const MIN_MAX_FRAME_SIZE: u32 = 16_384;

/// The largest `SETTINGS_MAX_FRAME_SIZE`.
pub const MAX_MAX_FRAME_SIZE: u32 = (1 << 24) - 1;

/// The largest flow-control window.
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// Frame types.
pub mod kind {
    /// DATA.
    pub const DATA: u8 = 0x0;
    /// HEADERS.
    pub const HEADERS: u8 = 0x1;
    /// PRIORITY.
    pub const PRIORITY: u8 = 0x2;
    /// RST_STREAM.
    pub const RST_STREAM: u8 = 0x3;
    /// SETTINGS.
    pub const SETTINGS: u8 = 0x4;
    /// PUSH_PROMISE.
    pub const PUSH_PROMISE: u8 = 0x5;
    /// PING.
    pub const PING: u8 = 0x6;
    /// GOAWAY.
    pub const GOAWAY: u8 = 0x7;
    /// WINDOW_UPDATE.
    pub const WINDOW_UPDATE: u8 = 0x8;
    /// CONTINUATION.
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub mod flag {
    /// END_STREAM (DATA, HEADERS).
    pub const END_STREAM: u8 = 0x1;
    /// ACK (SETTINGS, PING).
    pub const ACK: u8 = 0x1;
    /// END_HEADERS (HEADERS, CONTINUATION).
    pub const END_HEADERS: u8 = 0x4;
    /// PADDED (DATA, HEADERS).
    pub const PADDED: u8 = 0x8;
    /// PRIORITY (HEADERS).
    pub const PRIORITY: u8 = 0x20;
}

/// Error codes (RFC 9113 section 7).
pub mod code {
    /// NO_ERROR.
    pub const NO_ERROR: u32 = 0x0;
    /// PROTOCOL_ERROR.
    pub const PROTOCOL_ERROR: u32 = 0x1;
    /// INTERNAL_ERROR.
    pub const INTERNAL_ERROR: u32 = 0x2;
    /// FLOW_CONTROL_ERROR.
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    /// STREAM_CLOSED.
    pub const STREAM_CLOSED: u32 = 0x5;
    /// FRAME_SIZE_ERROR.
    pub const FRAME_SIZE_ERROR: u32 = 0x6;
    /// REFUSED_STREAM.
    pub const REFUSED_STREAM: u32 = 0x7;
    /// CANCEL.
    pub const CANCEL: u32 = 0x8;
    /// COMPRESSION_ERROR.
    pub const COMPRESSION_ERROR: u32 = 0x9;
    /// ENHANCE_YOUR_CALM.
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
}

/// Setting identifiers (RFC 9113 section 6.5.2).
pub mod setting {
    /// SETTINGS_HEADER_TABLE_SIZE.
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    /// SETTINGS_ENABLE_PUSH.
    pub const ENABLE_PUSH: u16 = 0x2;
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    /// SETTINGS_INITIAL_WINDOW_SIZE.
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    /// SETTINGS_MAX_FRAME_SIZE.
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// A frame that breaks the rules of its type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameError {
    /// The error code to send (RFC 9113 section 7).
    pub code: u32,
    /// `Some(stream)` when only that stream ends (RST_STREAM); `None` when
    /// the connection does (GOAWAY).
    pub stream: Option<u32>,
    /// What was wrong, for the GOAWAY's debug data and the log.
    pub what: &'static str,
}

impl FrameError {
    fn connection(code: u32, what: &'static str) -> Self {
        FrameError {
            code,
            stream: None,
            what,
        }
    }

    fn stream(stream: u32, code: u32, what: &'static str) -> Self {
        FrameError {
            code,
            stream: Some(stream),
            what,
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.stream {
            Some(stream) => write!(f, "stream {stream}: {} (code {:#x})", self.what, self.code),
            None => write!(f, "{} (code {:#x})", self.what, self.code),
        }
    }
}

impl std::error::Error for FrameError {}

/// A frame's 9-byte header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// The payload's length.
    pub len: usize,
    /// The frame type ([`kind`]).
    pub kind: u8,
    /// The flags ([`flag`]).
    pub flags: u8,
    /// The stream identifier, its reserved bit cleared.
    pub stream: u32,
}

impl Head {
    /// Reads a header from the start of `buf`, if it holds one.
    pub fn parse(buf: &[u8]) -> Option<Head> {
        let b: &[u8; HEAD_LEN] = buf.first_chunk()?;
        Some(Head {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & MAX_WINDOW,
        })
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// A HEADERS frame's priority fields, or a PRIORITY frame's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Priority {
    /// The stream depended on.
    pub depends_on: u32,
    /// The exclusive flag.
    pub exclusive: bool,
    /// The weight, less one.
    pub weight: u8,
}

/// A frame, its payload borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// DATA.
    Data {
        /// Its stream.
        stream: u32,
        /// The data, without padding.
        data: &'a [u8],
        /// END_STREAM.
        end_stream: bool,
        /// What it takes from the flow-control windows: the whole payload,
        /// padding included.
        flow: usize,
    },
    /// HEADERS.
    Headers {
        /// Its stream.
        stream: u32,
        /// The header block fragment, without padding or priority.
        block: &'a [u8],
        /// END_STREAM.
        end_stream: bool,
        /// END_HEADERS: no CONTINUATION follows.
        end_headers: bool,
        /// The priority fields, if present.
        priority: Option<Priority>,
    },
    /// PRIORITY.
    Priority {
        /// Its stream.
        stream: u32,
        /// The priority.
        priority: Priority,
    },
    /// RST_STREAM.
    RstStream {
        /// Its stream.
        stream: u32,
        /// The error code.
        code: u32,
    },
    /// SETTINGS.
    Settings {
        /// ACK: an acknowledgement, with no settings.
        ack: bool,
        /// The settings, 6 bytes each; read them with [`settings`].
        payload: &'a [u8],
    },
    /// PING.
    Ping {
        /// ACK.
        ack: bool,
        /// The opaque data.
        data: [u8; 8],
    },
    /// GOAWAY.
    GoAway {
        /// The last stream the peer processed.
        last_stream: u32,
        /// The error code.
        code: u32,
        /// The debug data.
        debug: &'a [u8],
    },
    /// WINDOW_UPDATE.
    WindowUpdate {
        /// Its stream; 0 for the connection.
        stream: u32,
        /// The increment, 1 to 2^31-1.
        increment: u32,
    },
    /// CONTINUATION.
    Continuation {
        /// Its stream.
        stream: u32,
        /// The header block fragment.
        block: &'a [u8],
        /// END_HEADERS.
        end_headers: bool,
    },
    /// A type this side does not know: to be passed over.
    Unknown {
        /// The type.
        kind: u8,
    },
}

impl<'a> Frame<'a> {
    /// Checks `payload` (exactly `head.len` bytes) against the rules of the
    /// frame's type, as a server receives it: a PUSH_PROMISE, which only a
    /// server may send, is a protocol error.
    pub fn parse(head: &Head, payload: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        debug_assert_eq!(payload.len(), head.len);
        let stream = head.stream;
        let on_stream = |what: &'static str| {
            if stream == 0 {
                Err(FrameError::connection(code::PROTOCOL_ERROR, what))
            } else {
                Ok(())
            }
        };
        let on_connection = |what: &'static str| {
            if stream != 0 {
                Err(FrameError::connection(code::PROTOCOL_ERROR, what))
            } else {
                Ok(())
            }
        };
        match head.kind {
            kind::DATA => {
                on_stream("DATA on stream 0")?;
                let data = unpad(head, payload)?;
                Ok(Frame::Data {
                    stream,
                    data,
                    end_stream: head.has(flag::END_STREAM),
                    flow: payload.len(),
                })
            }
            kind::HEADERS => {
                on_stream("HEADERS on stream 0")?;
                let mut block = unpad(head, payload)?;
                let priority = if head.has(flag::PRIORITY) {
                    let Some((fields, rest)) = block.split_first_chunk::<5>() else {
                        return Err(FrameError::connection(
                            code::FRAME_SIZE_ERROR,
                            "HEADERS too short for its priority fields",
                        ));
                    };
                    block = rest;
                    // A stream depending on itself is a stream error, but
                    // its block must still be decoded (HPACK's table): the
                    // connection checks it then.
                    Some(read_priority(fields))
                } else {
                    None
                };
                Ok(Frame::Headers {
                    stream,
                    block,
                    end_stream: head.has(flag::END_STREAM),
                    end_headers: head.has(flag::END_HEADERS),
                    priority,
                })
            }
            kind::PRIORITY => {
                on_stream("PRIORITY on stream 0")?;
                let Some(fields) = payload.first_chunk::<5>().filter(|_| payload.len() == 5) else {
                    return Err(FrameError::stream(
                        stream,
                        code::FRAME_SIZE_ERROR,
                        "PRIORITY is not 5 bytes",
                    ));
                };
                let priority = read_priority(fields);
                if priority.depends_on == stream {
                    return Err(FrameError::stream(
                        stream,
                        code::PROTOCOL_ERROR,
                        "a stream cannot depend on itself",
                    ));
                }
                Ok(Frame::Priority { stream, priority })
            }
            kind::RST_STREAM => {
                on_stream("RST_STREAM on stream 0")?;
                let code = exactly_u32(payload, "RST_STREAM is not 4 bytes")?;
                Ok(Frame::RstStream { stream, code })
            }
            kind::SETTINGS => {
                on_connection("SETTINGS on a stream")?;
                let ack = head.has(flag::ACK);
                if ack && !payload.is_empty() {
                    return Err(FrameError::connection(
                        code::FRAME_SIZE_ERROR,
                        "SETTINGS acknowledgement with a payload",
                    ));
                }
                if payload.len() % 6 != 0 {
                    return Err(FrameError::connection(
                        code::FRAME_SIZE_ERROR,
                        "SETTINGS payload is not a multiple of 6 bytes",
                    ));
                }
                for (id, value) in settings(payload) {
                    check_setting(id, value)?;
                }
                Ok(Frame::Settings { ack, payload })
            }
            kind::PUSH_PROMISE => Err(FrameError::connection(
                code::PROTOCOL_ERROR,
                "PUSH_PROMISE from a client",
            )),
            kind::PING => {
                on_connection("PING on a stream")?;
                let data = payload
                    .first_chunk::<8>()
                    .filter(|_| payload.len() == 8)
                    .ok_or(FrameError::connection(
                        code::FRAME_SIZE_ERROR,
                        "PING is not 8 bytes",
                    ))?;
                Ok(Frame::Ping {
                    ack: head.has(flag::ACK),
                    data: *data,
                })
            }
            kind::GOAWAY => {
                on_connection("GOAWAY on a stream")?;
                let Some((fields, debug)) = payload.split_first_chunk::<8>() else {
                    return Err(FrameError::connection(
                        code::FRAME_SIZE_ERROR,
                        "GOAWAY shorter than 8 bytes",
                    ));
                };
                Ok(Frame::GoAway {
                    last_stream: u32::from_be_bytes([fields[0], fields[1], fields[2], fields[3]])
                        & MAX_WINDOW,
                    code: u32::from_be_bytes([fields[4], fields[5], fields[6], fields[7]]),
                    debug,
                })
            }
            kind::WINDOW_UPDATE => {
                let increment = exactly_u32(payload, "WINDOW_UPDATE is not 4 bytes")? & MAX_WINDOW;
                if increment == 0 {
                    let what = "WINDOW_UPDATE with an increment of 0";
                    return Err(if stream == 0 {
                        FrameError::connection(code::PROTOCOL_ERROR, what)
                    } else {
                        FrameError::stream(stream, code::PROTOCOL_ERROR, what)
                    });
                }
                Ok(Frame::WindowUpdate { stream, increment })
            }
            kind::CONTINUATION => {
                on_stream("CONTINUATION on stream 0")?;
                Ok(Frame::Continuation {
                    stream,
                    block: payload,
                    end_headers: head.has(flag::END_HEADERS),
                })
            }
            kind => Ok(Frame::Unknown { kind }),
        }
    }
}

/// The payload of a DATA or HEADERS frame without its padding.
fn unpad<'a>(head: &Head, payload: &'a [u8]) -> Result<&'a [u8], FrameError> {
    if !head.has(flag::PADDED) {
        return Ok(payload);
    }
    let Some((&pad, rest)) = payload.split_first() else {
        return Err(FrameError::connection(
            code::FRAME_SIZE_ERROR,
            "padded frame without its pad length",
        ));
    };
    let pad = usize::from(pad);
    if pad > rest.len() {
        return Err(FrameError::connection(
            code::PROTOCOL_ERROR,
            "padding as long as the frame or longer",
        ));
    }
    Ok(&rest[..rest.len() - pad])
}

fn read_priority(fields: &[u8; 5]) -> Priority {
    let word = u32::from_be_bytes([fields[0], fields[1], fields[2], fields[3]]);
    Priority {
        depends_on: word & MAX_WINDOW,
        exclusive: word & !MAX_WINDOW != 0,
        weight: fields[4],
    }
}

fn exactly_u32(payload: &[u8], what: &'static str) -> Result<u32, FrameError> {
    payload
        .first_chunk::<4>()
        .filter(|_| payload.len() == 4)
        .map(|b| u32::from_be_bytes(*b))
        .ok_or(FrameError::connection(code::FRAME_SIZE_ERROR, what))
}

/// The settings in a SETTINGS payload: identifier and value, in order.
pub fn settings(payload: &[u8]) -> impl Iterator<Item = (u16, u32)> + '_ {
    payload.chunks_exact(6).map(|s| {
        (
            u16::from_be_bytes([s[0], s[1]]),
            u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
        )
    })
}

fn check_setting(id: u16, value: u32) -> Result<(), FrameError> {
    match id {
        setting::ENABLE_PUSH if value > 1 => Err(FrameError::connection(
            code::PROTOCOL_ERROR,
            "SETTINGS_ENABLE_PUSH other than 0 or 1",
        )),
        setting::INITIAL_WINDOW_SIZE if value > MAX_WINDOW => Err(FrameError::connection(
            code::FLOW_CONTROL_ERROR,
            "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
        )),
        setting::MAX_FRAME_SIZE if !(MIN_MAX_FRAME_SIZE..=MAX_MAX_FRAME_SIZE).contains(&value) => {
            Err(FrameError::connection(
                code::PROTOCOL_ERROR,
                "SETTINGS_MAX_FRAME_SIZE outside 16384 to 2^24-1",
            ))
        }
        _ => Ok(()),
    }
}

/// Appends a frame header.
pub fn put_head(out: &mut impl BufMut, len: usize, kind: u8, flags: u8, stream: u32) {
    debug_assert!(len <= MAX_MAX_FRAME_SIZE as usize);
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream & MAX_WINDOW);
}

/// Appends a SETTINGS frame with `values`, or an acknowledgement when `ack`.
pub fn put_settings(out: &mut impl BufMut, values: &[(u16, u32)], ack: bool) {
    let (len, flags) = if ack {
        (0, flag::ACK)
    } else {
        (values.len() * 6, 0)
    };
    put_head(out, len, kind::SETTINGS, flags, 0);
    if !ack {
        for &(id, value) in values {
            out.put_u16(id);
            out.put_u32(value);
        }
    }
}

/// Appends a PING, or its acknowledgement when `ack`.
pub fn put_ping(out: &mut impl BufMut, data: [u8; 8], ack: bool) {
    put_head(out, 8, kind::PING, if ack { flag::ACK } else { 0 }, 0);
    out.put_slice(&data);
}

/// Appends a WINDOW_UPDATE for `stream` (0: the connection).
pub fn put_window_update(out: &mut impl BufMut, stream: u32, increment: u32) {
    debug_assert!((1..=MAX_WINDOW).contains(&increment));
    put_head(out, 4, kind::WINDOW_UPDATE, 0, stream);
    out.put_u32(increment);
}

/// Appends an RST_STREAM.
pub fn put_rst_stream(out: &mut impl BufMut, stream: u32, code: u32) {
    put_head(out, 4, kind::RST_STREAM, 0, stream);
    out.put_u32(code);
}

/// Appends a GOAWAY.
pub fn put_goaway(out: &mut impl BufMut, last_stream: u32, code: u32, debug: &[u8]) {
    put_head(out, 8 + debug.len(), kind::GOAWAY, 0, 0);
    out.put_u32(last_stream & MAX_WINDOW);
    out.put_u32(code);
    out.put_slice(debug);
}

/// Appends one DATA frame; `data` must fit the peer's frame size.
pub fn put_data(out: &mut impl BufMut, stream: u32, data: &[u8], end_stream: bool) {
    let flags = if end_stream { flag::END_STREAM } else { 0 };
    put_head(out, data.len(), kind::DATA, flags, stream);
    out.put_slice(data);
}

/// Appends a header block as a HEADERS frame, and as many CONTINUATIONs as
/// `max_frame` (the peer's frame size) requires.
pub fn put_headers(
    out: &mut impl BufMut,
    stream: u32,
    block: &[u8],
    end_stream: bool,
    max_frame: usize,
) {
    let max_frame = max_frame.max(MIN_MAX_FRAME_SIZE as usize);
    let mut chunks = block.chunks(max_frame);
    let first = chunks.next().unwrap_or_default();
    let last = first.len() == block.len();
    let mut flags = if end_stream { flag::END_STREAM } else { 0 };
    if last {
        flags |= flag::END_HEADERS;
    }
    put_head(out, first.len(), kind::HEADERS, flags, stream);
    out.put_slice(first);
    let mut sent = first.len();
    for chunk in chunks {
        sent += chunk.len();
        let flags = if sent == block.len() {
            flag::END_HEADERS
        } else {
            0
        };
        put_head(out, chunk.len(), kind::CONTINUATION, flags, stream);
        out.put_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_head(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out
    }

    fn parse(bytes: &[u8]) -> Result<Frame<'_>, FrameError> {
        let head = Head::parse(bytes).expect("a header");
        assert_eq!(bytes.len(), HEAD_LEN + head.len, "one whole frame");
        Frame::parse(&head, &bytes[HEAD_LEN..])
    }

    #[test]
    fn a_head_reads_its_fields_and_clears_the_reserved_bit() {
        let head = Head::parse(&[0x01, 0x00, 0x02, 0x01, 0x25, 0x80, 0x00, 0x00, 0x03, 0xff])
            .expect("a header");
        assert_eq!(
            head,
            Head {
                len: 65_538,
                kind: kind::HEADERS,
                flags: 0x25,
                stream: 3
            }
        );
        assert_eq!(Head::parse(&[0; 8]), None);
    }

    #[test]
    fn data_and_headers_lose_their_padding() {
        let bytes = frame(
            kind::DATA,
            flag::PADDED | flag::END_STREAM,
            1,
            b"\x03abc\0\0\0",
        );
        assert_eq!(
            parse(&bytes),
            Ok(Frame::Data {
                stream: 1,
                data: b"abc",
                end_stream: true,
                flow: 7
            })
        );
        let bytes = frame(
            kind::HEADERS,
            flag::PADDED | flag::PRIORITY | flag::END_HEADERS,
            5,
            b"\x02\x80\0\0\x03\x0f\x82\x86\0\0",
        );
        assert_eq!(
            parse(&bytes),
            Ok(Frame::Headers {
                stream: 5,
                block: b"\x82\x86",
                end_stream: false,
                end_headers: true,
                priority: Some(Priority {
                    depends_on: 3,
                    exclusive: true,
                    weight: 15
                }),
            })
        );
    }

    #[test]
    fn frames_that_break_their_rules_name_the_rule_and_the_code() {
        use code::*;
        let conn = |code, what| Err(FrameError::connection(code, what));
        let cases: Vec<(Vec<u8>, Result<Frame<'static>, FrameError>)> = vec![
            (
                frame(kind::DATA, 0, 0, b"x"),
                conn(PROTOCOL_ERROR, "DATA on stream 0"),
            ),
            (
                frame(kind::DATA, flag::PADDED, 1, b""),
                conn(FRAME_SIZE_ERROR, "padded frame without its pad length"),
            ),
            (
                frame(kind::DATA, flag::PADDED, 1, b"\x03ab"),
                conn(PROTOCOL_ERROR, "padding as long as the frame or longer"),
            ),
            (
                frame(kind::HEADERS, 0, 0, b""),
                conn(PROTOCOL_ERROR, "HEADERS on stream 0"),
            ),
            (
                frame(kind::HEADERS, flag::PRIORITY, 1, b"\0\0\0"),
                conn(
                    FRAME_SIZE_ERROR,
                    "HEADERS too short for its priority fields",
                ),
            ),
            (
                frame(kind::HEADERS, flag::PRIORITY, 1, b"\0\0\0\x01\x10"),
                Ok(Frame::Headers {
                    stream: 1,
                    block: b"",
                    end_stream: false,
                    end_headers: false,
                    priority: Some(Priority {
                        depends_on: 1,
                        exclusive: false,
                        weight: 16,
                    }),
                }),
            ),
            (
                frame(kind::PRIORITY, 0, 3, b"\0\0\0\x01"),
                Err(FrameError::stream(
                    3,
                    FRAME_SIZE_ERROR,
                    "PRIORITY is not 5 bytes",
                )),
            ),
            (
                frame(kind::RST_STREAM, 0, 1, b"\0\0\0\x08\0"),
                conn(FRAME_SIZE_ERROR, "RST_STREAM is not 4 bytes"),
            ),
            (
                frame(kind::SETTINGS, 0, 1, b""),
                conn(PROTOCOL_ERROR, "SETTINGS on a stream"),
            ),
            (
                frame(kind::SETTINGS, flag::ACK, 0, b"\0\x01\0\0\0\0"),
                conn(FRAME_SIZE_ERROR, "SETTINGS acknowledgement with a payload"),
            ),
            (
                frame(kind::SETTINGS, 0, 0, b"\0\x01\0\0\0"),
                conn(
                    FRAME_SIZE_ERROR,
                    "SETTINGS payload is not a multiple of 6 bytes",
                ),
            ),
            (
                frame(kind::SETTINGS, 0, 0, b"\0\x02\0\0\0\x02"),
                conn(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH other than 0 or 1"),
            ),
            (
                frame(kind::SETTINGS, 0, 0, b"\0\x04\x80\0\0\0"),
                conn(
                    FLOW_CONTROL_ERROR,
                    "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
                ),
            ),
            (
                frame(kind::SETTINGS, 0, 0, b"\0\x05\0\0\x3f\xff"),
                conn(
                    PROTOCOL_ERROR,
                    "SETTINGS_MAX_FRAME_SIZE outside 16384 to 2^24-1",
                ),
            ),
            (
                frame(kind::PUSH_PROMISE, 0, 1, b"\0\0\0\x02"),
                conn(PROTOCOL_ERROR, "PUSH_PROMISE from a client"),
            ),
            (
                frame(kind::PING, 0, 0, b"1234567"),
                conn(FRAME_SIZE_ERROR, "PING is not 8 bytes"),
            ),
            (
                frame(kind::PING, 0, 1, b"12345678"),
                conn(PROTOCOL_ERROR, "PING on a stream"),
            ),
            (
                frame(kind::GOAWAY, 0, 0, b"\0\0\0\x01"),
                conn(FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes"),
            ),
            (
                frame(kind::WINDOW_UPDATE, 0, 0, b"\0\0\x01"),
                conn(FRAME_SIZE_ERROR, "WINDOW_UPDATE is not 4 bytes"),
            ),
            (
                frame(kind::WINDOW_UPDATE, 0, 0, b"\0\0\0\0"),
                conn(PROTOCOL_ERROR, "WINDOW_UPDATE with an increment of 0"),
            ),
            (
                frame(kind::WINDOW_UPDATE, 0, 7, b"\x80\0\0\0"),
                Err(FrameError::stream(
                    7,
                    PROTOCOL_ERROR,
                    "WINDOW_UPDATE with an increment of 0",
                )),
            ),
            (
                frame(kind::CONTINUATION, 0, 0, b""),
                conn(PROTOCOL_ERROR, "CONTINUATION on stream 0"),
            ),
            // Padding one byte shorter than the payload leaves no data.
            (
                frame(kind::DATA, flag::PADDED, 1, b"\x02ab"),
                Ok(Frame::Data {
                    stream: 1,
                    data: b"",
                    end_stream: false,
                    flow: 3,
                }),
            ),
            // Unknown types, and unknown settings, are passed over.
            (
                frame(0xfa, 0xff, 9, b"anything"),
                Ok(Frame::Unknown { kind: 0xfa }),
            ),
            (
                frame(kind::SETTINGS, 0, 0, b"\0\x09\xff\xff\xff\xff"),
                Ok(Frame::Settings {
                    ack: false,
                    payload: b"\0\x09\xff\xff\xff\xff",
                }),
            ),
        ];
        for (bytes, expected) in &cases {
            assert_eq!(&parse(bytes), expected, "{bytes:02x?}");
        }
        assert_eq!(
            FrameError::stream(7, PROTOCOL_ERROR, "WINDOW_UPDATE with an increment of 0")
                .to_string(),
            "stream 7: WINDOW_UPDATE with an increment of 0 (code 0x1)"
        );
    }

    #[test]
    fn written_frames_read_back() {
        let mut out = Vec::new();
        put_settings(
            &mut out,
            &[
                (setting::INITIAL_WINDOW_SIZE, 1 << 20),
                (setting::MAX_CONCURRENT_STREAMS, 100),
            ],
            false,
        );
        put_settings(&mut out, &[], true);
        put_ping(&mut out, *b"pingpong", true);
        put_window_update(&mut out, 0, 65_535);
        put_rst_stream(&mut out, 3, code::CANCEL);
        put_goaway(&mut out, 9, code::NO_ERROR, b"bye");
        put_data(&mut out, 3, b"hello", true);
        let mut frames = Vec::new();
        let mut rest = &out[..];
        while let Some(head) = Head::parse(rest) {
            let (frame, tail) = rest.split_at(HEAD_LEN + head.len);
            frames.push(Frame::parse(&head, &frame[HEAD_LEN..]).expect("a valid frame"));
            rest = tail;
        }
        assert!(rest.is_empty());
        let Frame::Settings {
            ack: false,
            payload,
        } = frames[0]
        else {
            panic!("{:?}", frames[0]);
        };
        assert_eq!(
            settings(payload).collect::<Vec<_>>(),
            [(4, 1 << 20), (3, 100)]
        );
        assert_eq!(
            frames[1..],
            [
                Frame::Settings {
                    ack: true,
                    payload: b""
                },
                Frame::Ping {
                    ack: true,
                    data: *b"pingpong"
                },
                Frame::WindowUpdate {
                    stream: 0,
                    increment: 65_535
                },
                Frame::RstStream {
                    stream: 3,
                    code: code::CANCEL
                },
                Frame::GoAway {
                    last_stream: 9,
                    code: code::NO_ERROR,
                    debug: b"bye"
                },
                Frame::Data {
                    stream: 3,
                    data: b"hello",
                    end_stream: true,
                    flow: 5
                },
            ]
        );
    }

    proptest! {
        #[test]
        fn a_header_block_splits_into_headers_and_continuations(
            len in 0usize..60_000,
            max in prop_oneof![Just(16_384usize), 16_384usize..40_000],
            end_stream in any::<bool>(),
        ) {
            let block: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut out = Vec::new();
            put_headers(&mut out, 11, &block, end_stream, max);
            let mut rest = &out[..];
            let mut joined = Vec::new();
            let mut kinds = Vec::new();
            let mut ended = false;
            while let Some(head) = Head::parse(rest) {
                prop_assert!(head.len <= max);
                prop_assert!(!ended, "a frame after END_HEADERS");
                let (frame, tail) = rest.split_at(HEAD_LEN + head.len);
                rest = tail;
                match Frame::parse(&head, &frame[HEAD_LEN..]) {
                    Ok(Frame::Headers { stream: 11, block, end_stream: e, end_headers, priority: None }) => {
                        prop_assert_eq!(e, end_stream);
                        joined.extend_from_slice(block);
                        ended = end_headers;
                        kinds.push(kind::HEADERS);
                    }
                    Ok(Frame::Continuation { stream: 11, block, end_headers }) => {
                        joined.extend_from_slice(block);
                        ended = end_headers;
                        kinds.push(kind::CONTINUATION);
                    }
                    other => prop_assert!(false, "{:?}", other),
                }
            }
            prop_assert!(ended);
            prop_assert_eq!(kinds[0], kind::HEADERS);
            prop_assert_eq!(joined, block);
        }

        #[test]
        fn any_frame_parses_or_fails_without_panicking(
            kind in 0u8..12,
            flags in any::<u8>(),
            stream in any::<u32>(),
            payload in prop::collection::vec(any::<u8>(), 0..40),
        ) {
            let bytes = frame(kind, flags, stream, &payload);
            let head = Head::parse(&bytes).expect("a header");
            if let Ok(Frame::Data { data, flow, .. }) = Frame::parse(&head, &bytes[HEAD_LEN..]) {
                prop_assert!(data.len() <= flow && flow == payload.len());
            }
        }
    }
}
