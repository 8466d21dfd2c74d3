//! freshd `Watch` streams read straight off their socket.
//!
//! The Redis side of the notice, fan-out and dependency workloads reads
//! tracking pushes with a RESP parser over the socket ([`crate::resp`]).
//! Read through the h2 crate, a notice cost the load tool half again as
//! much CPU as a push did (h2's stream store and frame dispatch, then the
//! gRPC framing on top), and with 1,000 subscribers the load tool, not the
//! server, set how fast the last notice of a write was read. So the freshd
//! side reads the same way: HTTP/2 frames parsed with freshd's own frame
//! and HPACK code ([`freshd::http2`]), gRPC messages cut from the DATA, all
//! in the task that times them.
//!
//! It speaks what `Watch` streams on one connection need: one request
//! stream per `Watch` (streams 1, 3, 5...) whose request side stays open,
//! SETTINGS and PING acknowledged, receive windows returned as they are
//! used, each response's status and trailers checked. No TLS, no
//! compression, no requests after the first.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::Poll;

use bytes::{Buf, Bytes, BytesMut};
use freshd::http2::frame::{self, code, setting, Frame, Head, HEAD_LEN};
use freshd::http2::hpack::{self, Decoder};
use freshd::pb::watch_request::Request as WatchIn;
use freshd::pb::watch_response::Response as WatchOut;
use freshd::pb::{WatchRequest, WatchResponse, WatchStart};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

use crate::grpc::{
    message_len, put_opening, request_head, HeaderBlocks, DEFAULT_WINDOW, PREFIX_LEN,
};
use crate::Error;

/// The receive window of each stream (hyper's default for clients).
const STREAM_WINDOW: u32 = 2 << 20;
/// The receive window of the connection (hyper's default for clients).
const CONN_WINDOW: u32 = 5 << 20;
/// The largest message accepted.
const MAX_MESSAGE: usize = 64 << 20;
/// The largest header list accepted.
const MAX_HEADER_LIST: usize = 64 << 10;
/// What the first read reserves room for.
const READ_CHUNK: usize = 16 << 10;

/// Started freshd `Watch` streams on one connection of their own, read by
/// the task that owns them.
pub struct WatchStream {
    tcp: TcpStream,
    /// Bytes read and not yet parsed into frames.
    input: BytesMut,
    /// Frames to write (acknowledgements, window updates, requests), from
    /// `written`.
    output: Vec<u8>,
    written: usize,
    hpack: Decoder,
    /// The streams, the `i`th on HTTP/2 stream `2i + 1`.
    streams: Vec<Stream>,
    /// The server's window for what this side sends on the connection.
    send_window: i64,
    /// The largest frame the server accepts.
    max_frame: usize,
    /// Header blocks being put together.
    blocks: HeaderBlocks,
    /// Flow-controlled bytes received on the connection and not yet
    /// returned in a window update.
    unreturned: u32,
    /// The stream whose message [`Self::find`] looks at first:
    /// streams take turns.
    turn: usize,
    /// How the first stream to end ended, once one has: what
    /// [`Self::message`] answers when no stream holds another message.
    end: Option<Result<(), Error>>,
    /// When the last read from the socket returned.
    read_at: Option<std::time::Instant>,
}

/// One `Watch` stream of a connection.
struct Stream {
    /// gRPC message bytes (from DATA frames) not yet decoded.
    body: BytesMut,
    /// The request's message not yet sent, from `sent`: it goes out as
    /// the server's flow-control windows allow.
    request: Bytes,
    sent: usize,
    /// The server's window for what this side sends on the stream.
    send_window: i64,
    /// The response headers came.
    answered: bool,
    /// Flow-controlled bytes received and not yet returned.
    unreturned: u32,
}

/// The HTTP/2 stream of the `i`th `Watch`.
fn stream_id(i: usize) -> u32 {
    2 * i as u32 + 1
}

/// A message of one of the streams, as its bytes: the protobuf encoding of
/// a `WatchResponse`, not decoded (see [`notice_keys`]).
pub struct Raw<'a> {
    /// The stream's place in [`WatchStream::start_many`]'s list.
    pub stream: usize,
    /// The message.
    pub bytes: &'a [u8],
    /// When the read that brought the message's last bytes returned.
    pub read_at: Option<std::time::Instant>,
}

/// What [`WatchStream::drain_raw`] hands each message to.
type Sink<'s> = dyn FnMut(Raw<'_>) -> Result<(), Error> + 's;

/// Decodes a message, for [`WatchStream::next`].
fn decode(raw: Raw<'_>) -> Result<(usize, WatchResponse), Error> {
    WatchResponse::decode(raw.bytes)
        .map(|message| (raw.stream, message))
        .map_err(|e| format!("watch: decode: {e}"))
}

/// `WatchResponse.notices`, `NoticeBatch.notices` and `Notice.key`: the
/// fields [`notice_keys`] reads (proto/freshd/v1/coordinator.proto).
const RESPONSE_NOTICES: u64 = 2;
const BATCH_NOTICES: u64 = 1;
const NOTICE_KEY: u64 = 2;

/// Hands `each` the key of every notice in `message` (the encoding of a
/// `WatchResponse`), in order, without decoding anything else or
/// allocating; false if `message` holds no batch of notices (it is
/// `started`, a progress mark, a reset or a refusal). A subscriber of the
/// notice workload reads nothing of a notice but its key, and decoding
/// the whole message (a `Vec` and two `String`s per notice, their UTF-8
/// checked) cost the load tool more per notice than the server's write of
/// it: with 1,000 subscribers to one load tool, the tool, not the server,
/// set when the last notice was read.
pub fn notice_keys(message: &[u8], mut each: impl FnMut(&[u8])) -> Result<bool, Error> {
    let mut batch = false;
    for notices in submessages(message, RESPONSE_NOTICES) {
        let notices = notices?;
        batch = true;
        for notice in submessages(notices, BATCH_NOTICES) {
            // The first `key` (freshd writes one; a notice without one has
            // ""): the rest of the notice is not read.
            let key = submessages(notice?, NOTICE_KEY).next().transpose()?;
            each(key.unwrap_or_default());
        }
    }
    Ok(batch)
}

/// The values of field `number` in an encoded message, each itself a
/// message or a string; an error for one that is neither, or for a
/// malformed field on the way.
fn submessages(message: &[u8], number: u64) -> impl Iterator<Item = Result<&[u8], Error>> {
    Fields(message).filter_map(move |field| match field {
        Ok((n, _)) if n != number => None,
        Ok((_, Value::Bytes(bytes))) => Some(Ok(bytes)),
        Ok((_, Value::Scalar)) => Some(Err(format!(
            "watch: field {number} is not a message or a string"
        ))),
        Err(e) => Some(Err(e)),
    })
}

/// A field's value, by wire type (groups are not read).
enum Value<'a> {
    Scalar,
    Bytes(&'a [u8]),
}

/// The fields of an encoded protobuf message: `(number, value)`.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let field = self.field();
        if field.is_err() {
            // Nothing after a malformed field is read.
            self.0 = &[];
        }
        Some(field)
    }
}

impl<'a> Fields<'a> {
    fn field(&mut self) -> Result<(u64, Value<'a>), Error> {
        let tag = self.varint()?;
        let value = match tag & 7 {
            0 => self.varint().map(|_| Value::Scalar)?,
            1 => self.bytes(8).map(|_| Value::Scalar)?,
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "watch: a field too long")?;
                Value::Bytes(self.bytes(len)?)
            }
            5 => self.bytes(4).map(|_| Value::Scalar)?,
            wire => return Err(format!("watch: a field of wire type {wire}")),
        };
        Ok((tag >> 3, value))
    }

    fn varint(&mut self) -> Result<u64, Error> {
        let mut value = 0u64;
        for (i, &byte) in self.0.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        Err("watch: a bad varint".into())
    }

    fn bytes(&mut self, len: usize) -> Result<&'a [u8], Error> {
        if len > self.0.len() {
            return Err("watch: a field runs past its message".into());
        }
        let (bytes, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(bytes)
    }
}

impl WatchStream {
    /// Connects to `addr`, opens a `Watch` stream as `client_id` tracking
    /// `track`, and waits for `started`.
    pub async fn start(addr: &str, client_id: String, track: Vec<String>) -> Result<Self, Error> {
        Self::start_many(addr, vec![(client_id, track)]).await
    }

    /// Connects to `addr`, opens one `Watch` stream per `(client_id,
    /// track)` on that one connection, and waits for every `started`.
    /// [`Self::next`] then says which stream each message is from, by its
    /// place in `starts`.
    pub async fn start_many(addr: &str, starts: Vec<(String, Vec<String>)>) -> Result<Self, Error> {
        if starts.is_empty() {
            return Err("watch: no stream to start".into());
        }
        let tcp = crate::connect_nodelay(addr).await?;
        let mut output = Vec::with_capacity(256 + 64 * starts.len());
        put_opening(&mut output, STREAM_WINDOW, CONN_WINDOW);
        let head = request_head(addr, "/freshd.v1.Coordinator/Watch");
        let mut streams = Vec::with_capacity(starts.len());
        for (i, (client_id, track)) in starts.into_iter().enumerate() {
            frame::put_headers(&mut output, stream_id(i), &head, false, 0);
            let start = WatchRequest {
                request: Some(WatchIn::Start(WatchStart {
                    client_id,
                    track,
                    ..Default::default()
                })),
            };
            streams.push(Stream {
                body: BytesMut::new(),
                request: crate::grpc::frame(&start),
                sent: 0,
                send_window: i64::from(DEFAULT_WINDOW),
                answered: false,
                unreturned: 0,
            });
        }
        let mut conn = WatchStream {
            tcp,
            input: BytesMut::with_capacity(READ_CHUNK),
            output,
            written: 0,
            hpack: Decoder::new(hpack::DEFAULT_TABLE_SIZE),
            streams,
            send_window: i64::from(DEFAULT_WINDOW),
            max_frame: frame::MIN_MAX_FRAME_SIZE as usize,
            blocks: HeaderBlocks::default(),
            unreturned: 0,
            turn: 0,
            end: None,
            read_at: None,
        };
        conn.send_requests();
        let mut started = vec![false; conn.streams.len()];
        for _ in 0..started.len() {
            match conn.next().await? {
                Some((
                    i,
                    WatchResponse {
                        response: Some(WatchOut::Started(_)),
                    },
                )) if !started[i] => started[i] = true,
                other => return Err(format!("watch: expected `started`, got {other:?}")),
            }
        }
        Ok(conn)
    }

    /// The next message of any stream; `None` when a stream ends with OK.
    /// Cancel-safe: what has arrived stays buffered for the next call, and
    /// what is owed the server stays queued.
    pub async fn message(&mut self) -> Result<Option<WatchResponse>, Error> {
        Ok(self.next().await?.map(|(_, message)| message))
    }

    /// The next message and the stream it is from (its place in
    /// [`Self::start_many`]'s list); `None` when a stream ends with OK.
    /// Cancel-safe, as [`Self::message`] is.
    pub async fn next(&mut self) -> Result<Option<(usize, WatchResponse)>, Error> {
        self.next_raw(decode).await?.transpose()
    }

    /// The next message of any stream, handed to `read` undecoded (see
    /// [`Raw`]); what `read` answers, or `None` when a stream ends with OK.
    /// Cancel-safe, as [`Self::message`] is: `read` runs only once a whole
    /// message is there, and the message is taken as it returns.
    pub async fn next_raw<R>(
        &mut self,
        read: impl FnOnce(Raw<'_>) -> R,
    ) -> Result<Option<R>, Error> {
        loop {
            if let Some(found) = self.find()? {
                return Ok(Some(self.take(found, read)));
            }
            if let Some(end) = self.end.take() {
                if self.streams.iter().any(|s| !s.body.is_empty()) {
                    return Err("watch: a stream ended inside a message".into());
                }
                return end.map(|()| None);
            }
            if self.parse_frames(None)? {
                continue;
            }
            self.read_more().await?;
        }
    }

    /// Writes what is owed the server, then waits for what it sends next
    /// and reads it, for [`Self::drain_raw`]. Cancel-safe, as
    /// [`Self::message`] is.
    pub async fn read_more(&mut self) -> Result<(), Error> {
        self.flush().await?;
        if self.input.capacity() - self.input.len() < READ_CHUNK / 4 {
            self.input.reserve(READ_CHUNK);
        }
        let n = self
            .tcp
            .read_buf(&mut self.input)
            .await
            .map_err(|e| format!("watch: read: {e}"))?;
        if n == 0 {
            return Err("watch: the server closed the connection".into());
        }
        self.read_at = Some(std::time::Instant::now());
        Ok(())
    }

    /// Hands `each` every whole message the bytes read so far hold, without
    /// reading or waiting: the messages of a DATA frame that holds whole
    /// ones straight from the bytes read, in the order they came, and a
    /// message split across frames once it is whole. Where
    /// [`Self::next_raw`] copies each message into its stream's body and
    /// looks through the streams for it, this costs neither: with 100
    /// streams to a connection, the copy and the look cost the load tool
    /// about a quarter of its CPU per notice. `Ok(false)` once a stream has
    /// ended with OK (nothing after it is read); an error, from the
    /// connection or from `each`, ends the call with it, and the stream is
    /// not to be read after one.
    pub fn drain_raw(
        &mut self,
        mut each: impl FnMut(Raw<'_>) -> Result<(), Error>,
    ) -> Result<bool, Error> {
        loop {
            // Messages already whole in the bodies first: a body that
            // holds anything takes the stream's next frames too, so each
            // stream's messages keep their order.
            while let Some(found) = self.find()? {
                self.take(found, &mut each)?;
            }
            if self.end.is_some() || !self.parse_frames(Some(&mut each))? {
                break;
            }
        }
        match self.end.take() {
            Some(_) if self.streams.iter().any(|s| !s.body.is_empty()) => {
                Err("watch: a stream ended inside a message".into())
            }
            Some(end) => end.map(|()| false),
            None => Ok(true),
        }
    }

    /// The next message already read, as [`Self::next`] gives it, without
    /// reading or waiting: `None` when the bytes read hold no whole message.
    pub fn buffered(&mut self) -> Result<Option<(usize, WatchResponse)>, Error> {
        self.buffered_raw(decode)?.transpose()
    }

    /// The next message already read, handed to `read` as
    /// [`Self::next_raw`] does, without reading or waiting: `None` when the
    /// bytes read hold no whole message.
    pub fn buffered_raw<R>(&mut self, read: impl FnOnce(Raw<'_>) -> R) -> Result<Option<R>, Error> {
        let mut found = self.find()?;
        if found.is_none() && self.end.is_none() && self.parse_frames(None)? {
            found = self.find()?;
        }
        Ok(found.map(|found| self.take(found, read)))
    }

    /// When the last read from the socket returned: the time the messages
    /// it brought arrived, however long they wait to be taken.
    pub fn read_at(&self) -> Option<std::time::Instant> {
        self.read_at
    }

    /// The stream whose body holds a whole message, looking from the one
    /// whose turn it is, and the message's length.
    fn find(&self) -> Result<Option<(usize, usize)>, Error> {
        let count = self.streams.len();
        for k in 0..count {
            let i = (self.turn + k) % count;
            let body = &self.streams[i].body;
            match message_len(body, MAX_MESSAGE) {
                Ok(Some(len)) if body.len() >= PREFIX_LEN + len => return Ok(Some((i, len))),
                Ok(_) => continue,
                Err(e) => return Err(format!("watch: {e}")),
            }
        }
        Ok(None)
    }

    /// Hands the message [`Self::find`] found to `read`, then takes it off
    /// its stream's body; the next stream has the next turn.
    fn take<R>(&mut self, (i, len): (usize, usize), read: impl FnOnce(Raw<'_>) -> R) -> R {
        let body = &mut self.streams[i].body;
        let answer = read(Raw {
            stream: i,
            bytes: &body[PREFIX_LEN..PREFIX_LEN + len],
            read_at: self.read_at,
        });
        body.advance(PREFIX_LEN + len);
        self.turn = (i + 1) % self.streams.len();
        answer
    }

    /// Handles every whole frame read; true if any was.
    fn parse_frames(&mut self, sink: Option<&mut Sink<'_>>) -> Result<bool, Error> {
        // Out of `self` while frames borrow from it.
        let mut input = std::mem::take(&mut self.input);
        let parsed = self.parse_from(&input, sink);
        if let Ok(used) = parsed {
            input.advance(used);
            if let Some(head) = Head::parse(&input) {
                // Room for the rest of a frame that has begun.
                input.reserve((HEAD_LEN + head.len).saturating_sub(input.len()));
            }
        }
        self.input = input;
        parsed.map(|used| used > 0)
    }

    /// Handles the whole frames at the start of `input`; the bytes used.
    /// With a `sink`, the messages of a DATA frame that holds whole ones
    /// go straight to it (see [`Self::drain_raw`]).
    fn parse_from(
        &mut self,
        input: &[u8],
        mut sink: Option<&mut Sink<'_>>,
    ) -> Result<usize, Error> {
        let mut used = 0;
        while self.end.is_none() {
            let rest = &input[used..];
            let Some(head) = Head::parse(rest) else {
                break;
            };
            let Some(payload) = rest.get(HEAD_LEN..HEAD_LEN + head.len) else {
                break;
            };
            // The frames that carry the messages, unpadded on a stream,
            // without a trip through the general parser.
            let parsed = if head.kind == frame::kind::DATA
                && head.flags & frame::flag::PADDED == 0
                && head.stream != 0
            {
                Frame::Data {
                    stream: head.stream,
                    data: payload,
                    end_stream: head.flags & frame::flag::END_STREAM != 0,
                    flow: payload.len(),
                }
            } else {
                Frame::parse(&head, payload)
                    .map_err(|e| format!("watch: a bad frame from the server: {e}"))?
            };
            self.handle(parsed, sink.as_deref_mut())?;
            used += HEAD_LEN + head.len;
        }
        Ok(used)
    }

    /// The index of the stream on HTTP/2 stream `id`, if it is one of ours.
    fn index(&self, id: u32) -> Option<usize> {
        let i = (id.checked_sub(1)? / 2) as usize;
        (id % 2 == 1 && i < self.streams.len()).then_some(i)
    }

    fn handle(&mut self, parsed: Frame<'_>, sink: Option<&mut Sink<'_>>) -> Result<(), Error> {
        match parsed {
            Frame::Data {
                stream,
                data,
                end_stream,
                flow,
            } => {
                self.returned(stream, flow);
                let Some(i) = self.index(stream) else {
                    return Ok(());
                };
                let one = &mut self.streams[i];
                if !one.answered {
                    return Err("watch: data before the response headers".into());
                }
                let mut data = data;
                if let Some(sink) = sink.filter(|_| one.body.is_empty()) {
                    // Whole messages go to the sink from the frame; what
                    // follows them (the start of one) waits in the body.
                    while let Some(len) = message_len(data, MAX_MESSAGE)
                        .map_err(|e| format!("watch: {e}"))?
                        .filter(|&len| data.len() >= PREFIX_LEN + len)
                    {
                        sink(Raw {
                            stream: i,
                            bytes: &data[PREFIX_LEN..PREFIX_LEN + len],
                            read_at: self.read_at,
                        })?;
                        data = &data[PREFIX_LEN + len..];
                    }
                }
                one.body.extend_from_slice(data);
                if end_stream {
                    self.end = Some(Err("watch: a stream ended without trailers".into()));
                }
            }
            Frame::Headers {
                stream,
                block,
                end_stream,
                end_headers,
                ..
            } => {
                if let Some((stream, block, end)) =
                    self.blocks.headers(stream, block, end_stream, end_headers)
                {
                    self.stream_headers(stream, &block, end)?;
                }
            }
            Frame::Continuation {
                stream,
                block,
                end_headers,
            } => {
                let whole = self
                    .blocks
                    .continuation(stream, block, end_headers)
                    .map_err(|e| format!("watch: {e}"))?;
                if let Some((stream, block, end)) = whole {
                    self.stream_headers(stream, &block, end)?;
                }
            }
            Frame::RstStream { stream, code } if self.index(stream).is_some() => {
                return Err(format!(
                    "watch: the server reset stream {stream} (code {code:#x})"
                ));
            }
            Frame::Settings {
                ack: false,
                payload,
            } => {
                for (id, value) in frame::settings(payload) {
                    match id {
                        setting::INITIAL_WINDOW_SIZE => {
                            // Applies to the open streams by the difference
                            // (RFC 9113 section 6.9.2).
                            for one in &mut self.streams {
                                one.send_window += i64::from(value) - i64::from(DEFAULT_WINDOW);
                            }
                        }
                        setting::MAX_FRAME_SIZE => self.max_frame = value as usize,
                        _ => {}
                    }
                }
                frame::put_settings(&mut self.output, &[], true);
                self.send_requests();
            }
            Frame::WindowUpdate { stream, increment } => {
                if stream == 0 {
                    self.send_window += i64::from(increment);
                } else if let Some(i) = self.index(stream) {
                    self.streams[i].send_window += i64::from(increment);
                }
                self.send_requests();
            }
            Frame::Ping { ack: false, data } => frame::put_ping(&mut self.output, data, true),
            Frame::GoAway {
                last_stream, code, ..
            } if code != code::NO_ERROR || last_stream < stream_id(self.streams.len() - 1) => {
                return Err(format!(
                    "watch: the server ended the connection (GOAWAY code {code:#x})"
                ));
            }
            // Acknowledgements, a graceful GOAWAY (the streams go on to
            // their trailers), priority, other streams, unknown types.
            _ => {}
        }
        Ok(())
    }

    /// A complete header block of HTTP/2 stream `stream`, if it is one of
    /// ours.
    fn stream_headers(&mut self, stream: u32, block: &[u8], end_stream: bool) -> Result<(), Error> {
        match self.index(stream) {
            Some(i) => self.headers(i, block, end_stream),
            None => Ok(()),
        }
    }

    /// A complete header block of stream `i`: the response's headers, or
    /// its trailers when it ends the stream.
    fn headers(&mut self, i: usize, block: &[u8], end_stream: bool) -> Result<(), Error> {
        let (status, grpc) = response_head(&mut self.hpack, block)
            .map_err(|e| format!("watch: bad headers from the server: {e}"))?;
        let one = &mut self.streams[i];
        if !one.answered {
            one.answered = true;
            if status.as_deref() != Some(b"200") {
                let status = status.map(|s| String::from_utf8_lossy(&s).into_owned());
                return Err(format!("watch: HTTP status {}", status.unwrap_or_default()));
            }
        }
        let outcome = match crate::grpc::status(&grpc) {
            Some(outcome) => outcome.map_err(|e| format!("watch: {e}")),
            None if end_stream => Err("watch: trailers without grpc-status".into()),
            None => return Ok(()),
        };
        if end_stream {
            self.end = Some(outcome);
            return Ok(());
        }
        // Headers with an error status and no end: an error all the same.
        outcome
    }

    /// Queues as much of each request's message as the windows allow, in
    /// frames the server accepts.
    fn send_requests(&mut self) {
        for (i, one) in self.streams.iter_mut().enumerate() {
            while one.sent < one.request.len() {
                let room = one.send_window.min(self.send_window);
                if room <= 0 {
                    break;
                }
                let n = (one.request.len() - one.sent)
                    .min(room as usize)
                    .min(self.max_frame);
                let chunk = &one.request[one.sent..one.sent + n];
                frame::put_data(&mut self.output, stream_id(i), chunk, false);
                one.sent += n;
                one.send_window -= n as i64;
                self.send_window -= n as i64;
            }
        }
    }

    /// Notes `flow` bytes received on `stream`, and returns them to its
    /// window once half of it is used, and to the connection's once half
    /// of that is.
    fn returned(&mut self, stream: u32, flow: usize) {
        if let Some(i) = self.index(stream) {
            let one = &mut self.streams[i];
            one.unreturned += flow as u32;
            if one.unreturned >= STREAM_WINDOW / 2 {
                frame::put_window_update(&mut self.output, stream, one.unreturned);
                one.unreturned = 0;
            }
        }
        self.unreturned += flow as u32;
        if self.unreturned >= CONN_WINDOW / 2 {
            frame::put_window_update(&mut self.output, 0, self.unreturned);
            self.unreturned = 0;
        }
    }

    /// Writes what is queued. Cancel-safe: what was written is recorded.
    async fn flush(&mut self) -> Result<(), Error> {
        if self.written == self.output.len() {
            return Ok(());
        }
        poll_fn(|cx| {
            while self.written < self.output.len() {
                match Pin::new(&mut self.tcp).poll_write(cx, &self.output[self.written..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err("watch: write: closed".to_string()))
                    }
                    Poll::Ready(Ok(n)) => self.written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(format!("watch: write: {e}"))),
                    Poll::Pending => return Poll::Pending,
                }
            }
            self.output.clear();
            self.written = 0;
            Poll::Ready(Ok(()))
        })
        .await
    }
}

/// Decodes a response's header block (its headers or trailers) down to
/// what a gRPC client reads: `:status`, and `grpc-status` and
/// `grpc-message` as a header map for [`crate::grpc::status`].
pub(crate) fn response_head(
    hpack: &mut Decoder,
    block: &[u8],
) -> Result<(Option<Vec<u8>>, http::HeaderMap), hpack::DecodeError> {
    let (mut status, mut grpc) = (None, http::HeaderMap::new());
    hpack.decode(block, MAX_HEADER_LIST, |name, value| match name {
        b":status" => status = Some(value.to_vec()),
        b"grpc-status" | b"grpc-message" => {
            if let Ok(value) = http::HeaderValue::from_bytes(value) {
                grpc.insert(
                    http::HeaderName::from_bytes(name).expect("a valid name"),
                    value,
                );
            }
        }
        _ => {}
    })?;
    Ok((status, grpc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use freshd::pb::{Notice, NoticeBatch, Progress, WatchStarted};

    fn encoded(response: WatchOut) -> Vec<u8> {
        WatchResponse {
            response: Some(response),
        }
        .encode_to_vec()
    }

    fn keys_of(message: &[u8]) -> Result<(bool, Vec<Vec<u8>>), Error> {
        let mut keys = Vec::new();
        let batch = notice_keys(message, |key| keys.push(key.to_vec()))?;
        Ok((batch, keys))
    }

    #[test]
    fn a_batch_hands_over_every_key_in_order() {
        let notice = |seq: u64, key: &str| Notice {
            seq,
            key: key.into(),
            version: seq * 7,
            cause: "follows:1".into(),
            critical: seq % 2 == 0,
            event_time_unix_ms: 1_700_000_000_000 + seq,
            repair: seq == 2,
        };
        let message = encoded(WatchOut::Notices(NoticeBatch::new(vec![
            notice(1, "hot:1"),
            notice(300, "feed:ä"),
            notice(2, ""),
        ])));
        let (batch, keys) = keys_of(&message).unwrap();
        assert!(batch);
        assert_eq!(keys, [&b"hot:1"[..], "feed:ä".as_bytes(), b""]);
    }

    #[test]
    fn other_messages_are_not_batches() {
        for response in [
            WatchOut::Started(WatchStarted::default()),
            WatchOut::Progress(Progress {
                epoch: 9,
                seq: 1 << 40,
            }),
        ] {
            assert_eq!(keys_of(&encoded(response)).unwrap(), (false, vec![]));
        }
        // An empty batch is a batch with no keys.
        let empty = encoded(WatchOut::Notices(NoticeBatch::default()));
        assert_eq!(keys_of(&empty).unwrap(), (true, vec![]));
    }

    #[test]
    fn a_cut_or_malformed_message_is_an_error() {
        let message = encoded(WatchOut::Notices(NoticeBatch::new(vec![Notice {
            key: "hot:12345".into(),
            ..Default::default()
        }])));
        for len in 1..message.len() {
            assert!(
                keys_of(&message[..len]).is_err(),
                "cut at {len} of {}",
                message.len()
            );
        }
        // A varint that never ends, and a group (wire type 3).
        assert!(
            keys_of(&[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err()
        );
        assert!(keys_of(&[0x0b]).is_err());
        // `notices` as a number.
        assert!(keys_of(&[0x10, 0x01]).is_err());
    }
}
