//! A freshd `Watch` stream read straight off its socket.
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
//! It speaks what one `Watch` stream on its own connection needs: one
//! request stream (stream 1) whose request side stays open, SETTINGS and
//! PING acknowledged, receive windows returned as they are used, the
//! response's status and trailers checked. No TLS, no compression, no
//! requests after the first.

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

use crate::grpc::{message_len, put_opening, DEFAULT_WINDOW, PREFIX_LEN};
use crate::Error;

/// The receive window of the stream (hyper's default for clients).
const STREAM_WINDOW: u32 = 2 << 20;
/// The receive window of the connection (hyper's default for clients).
const CONN_WINDOW: u32 = 5 << 20;
/// The largest message accepted.
const MAX_MESSAGE: usize = 64 << 20;
/// The largest header list accepted.
const MAX_HEADER_LIST: usize = 64 << 10;
/// The one stream.
const STREAM: u32 = 1;
/// What the first read reserves room for.
const READ_CHUNK: usize = 16 << 10;

/// A started freshd `Watch` stream on a connection of its own, read by the
/// task that owns it.
pub struct WatchStream {
    tcp: TcpStream,
    /// Bytes read and not yet parsed into frames.
    input: BytesMut,
    /// gRPC message bytes (from DATA frames) not yet decoded.
    body: BytesMut,
    /// Frames to write (acknowledgements, window updates), from `written`.
    output: Vec<u8>,
    written: usize,
    hpack: Decoder,
    /// The request's message not yet sent, from `sent`: it goes out as
    /// the server's flow-control windows allow.
    request: Bytes,
    sent: usize,
    /// The server's windows for what this side sends: the stream's and the
    /// connection's.
    send_window: (i64, i64),
    /// The largest frame the server accepts.
    max_frame: usize,
    /// A header block whose CONTINUATIONs are still to come, and whether
    /// it ends the stream.
    block: Option<(Vec<u8>, bool)>,
    /// The response headers came.
    answered: bool,
    /// Flow-controlled bytes received and not yet returned in a window
    /// update.
    unreturned: u32,
    /// How the stream ended, once it has: what [`Self::message`] answers
    /// when the body holds no more messages.
    end: Option<Result<(), Error>>,
}

impl WatchStream {
    /// Connects to `addr`, opens a `Watch` stream as `client_id` tracking
    /// `track`, and waits for `started`.
    pub async fn start(addr: &str, client_id: String, track: Vec<String>) -> Result<Self, Error> {
        let tcp = crate::connect_nodelay(addr).await?;
        let start = WatchRequest {
            request: Some(WatchIn::Start(WatchStart {
                client_id,
                track,
                ..Default::default()
            })),
        };
        let mut stream = WatchStream {
            tcp,
            input: BytesMut::with_capacity(READ_CHUNK),
            body: BytesMut::new(),
            output: opening(addr),
            written: 0,
            request: crate::grpc::frame(&start),
            sent: 0,
            send_window: (i64::from(DEFAULT_WINDOW), i64::from(DEFAULT_WINDOW)),
            max_frame: frame::MIN_MAX_FRAME_SIZE as usize,
            hpack: Decoder::new(hpack::DEFAULT_TABLE_SIZE),
            block: None,
            answered: false,
            unreturned: 0,
            end: None,
        };
        stream.send_request();
        match stream.message().await? {
            Some(WatchResponse {
                response: Some(WatchOut::Started(_)),
            }) => Ok(stream),
            other => Err(format!("watch: expected `started`, got {other:?}")),
        }
    }

    /// The next message; `None` when the server ends the stream with OK.
    /// Cancel-safe: what has arrived stays buffered for the next call, and
    /// what is owed the server stays queued.
    pub async fn message(&mut self) -> Result<Option<WatchResponse>, Error> {
        loop {
            if let Some(message) = self.next_message()? {
                return Ok(Some(message));
            }
            if let Some(end) = self.end.take() {
                if !self.body.is_empty() {
                    return Err("watch: the stream ended inside a message".into());
                }
                return end.map(|()| None);
            }
            if self.parse_frames()? {
                continue;
            }
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
        }
    }

    /// A whole message from the body, if it holds one.
    fn next_message(&mut self) -> Result<Option<WatchResponse>, Error> {
        let len = match message_len(&self.body, MAX_MESSAGE) {
            Ok(Some(len)) if self.body.len() >= PREFIX_LEN + len => len,
            Ok(_) => return Ok(None),
            Err(e) => return Err(format!("watch: {e}")),
        };
        let message = WatchResponse::decode(&self.body[PREFIX_LEN..PREFIX_LEN + len])
            .map_err(|e| format!("watch: decode: {e}"))?;
        self.body.advance(PREFIX_LEN + len);
        Ok(Some(message))
    }

    /// Handles every whole frame read; true if any was.
    fn parse_frames(&mut self) -> Result<bool, Error> {
        // Out of `self` while frames borrow from it.
        let mut input = std::mem::take(&mut self.input);
        let parsed = self.parse_from(&input);
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
    fn parse_from(&mut self, input: &[u8]) -> Result<usize, Error> {
        let mut used = 0;
        while self.end.is_none() {
            let rest = &input[used..];
            let Some(head) = Head::parse(rest) else {
                break;
            };
            let Some(payload) = rest.get(HEAD_LEN..HEAD_LEN + head.len) else {
                break;
            };
            let parsed = Frame::parse(&head, payload)
                .map_err(|e| format!("watch: a bad frame from the server: {e}"))?;
            self.handle(parsed)?;
            used += HEAD_LEN + head.len;
        }
        Ok(used)
    }

    fn handle(&mut self, parsed: Frame<'_>) -> Result<(), Error> {
        match parsed {
            Frame::Data {
                stream,
                data,
                end_stream,
                flow,
            } => {
                self.returned(flow);
                if stream != STREAM {
                    return Ok(());
                }
                if !self.answered {
                    return Err("watch: data before the response headers".into());
                }
                self.body.extend_from_slice(data);
                if end_stream {
                    self.end = Some(Err("watch: the stream ended without trailers".into()));
                }
            }
            Frame::Headers {
                stream,
                block,
                end_stream,
                end_headers,
                ..
            } if stream == STREAM => {
                if end_headers {
                    self.headers(block, end_stream)?;
                } else {
                    self.block = Some((block.to_vec(), end_stream));
                }
            }
            Frame::Continuation {
                stream,
                block,
                end_headers,
            } if stream == STREAM => {
                let Some((mut whole, end_stream)) = self.block.take() else {
                    return Err("watch: a CONTINUATION with no header block open".into());
                };
                whole.extend_from_slice(block);
                if end_headers {
                    self.headers(&whole, end_stream)?;
                } else {
                    self.block = Some((whole, end_stream));
                }
            }
            Frame::RstStream { stream, code } if stream == STREAM => {
                return Err(format!(
                    "watch: the server reset the stream (code {code:#x})"
                ));
            }
            Frame::Settings {
                ack: false,
                payload,
            } => {
                for (id, value) in frame::settings(payload) {
                    match id {
                        setting::INITIAL_WINDOW_SIZE => {
                            // Applies to the open stream by the difference
                            // (RFC 9113 section 6.9.2).
                            self.send_window.0 += i64::from(value) - i64::from(DEFAULT_WINDOW);
                        }
                        setting::MAX_FRAME_SIZE => self.max_frame = value as usize,
                        _ => {}
                    }
                }
                frame::put_settings(&mut self.output, &[], true);
                self.send_request();
            }
            Frame::WindowUpdate { stream, increment } => {
                match stream {
                    0 => self.send_window.1 += i64::from(increment),
                    STREAM => self.send_window.0 += i64::from(increment),
                    _ => {}
                }
                self.send_request();
            }
            Frame::Ping { ack: false, data } => frame::put_ping(&mut self.output, data, true),
            Frame::GoAway {
                last_stream, code, ..
            } if code != code::NO_ERROR || last_stream < STREAM => {
                return Err(format!(
                    "watch: the server ended the connection (GOAWAY code {code:#x})"
                ));
            }
            // Acknowledgements, a graceful GOAWAY (the stream goes on to
            // its trailers), priority, other streams, unknown types.
            _ => {}
        }
        Ok(())
    }

    /// A complete header block: the response's headers, or its trailers
    /// when it ends the stream.
    fn headers(&mut self, block: &[u8], end_stream: bool) -> Result<(), Error> {
        let (status, grpc) = response_head(&mut self.hpack, block)
            .map_err(|e| format!("watch: bad headers from the server: {e}"))?;
        if !self.answered {
            self.answered = true;
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

    /// Queues as much of the request's message as the windows allow, in
    /// frames the server accepts.
    fn send_request(&mut self) {
        while self.sent < self.request.len() {
            let room = self.send_window.0.min(self.send_window.1);
            if room <= 0 {
                return;
            }
            let n = (self.request.len() - self.sent)
                .min(room as usize)
                .min(self.max_frame);
            let chunk = &self.request[self.sent..self.sent + n];
            frame::put_data(&mut self.output, STREAM, chunk, false);
            self.sent += n;
            self.send_window.0 -= n as i64;
            self.send_window.1 -= n as i64;
        }
    }

    /// Notes `flow` bytes received, and returns them to both windows once
    /// half the stream's window is used.
    fn returned(&mut self, flow: usize) {
        self.unreturned += flow as u32;
        if self.unreturned >= STREAM_WINDOW / 2 {
            frame::put_window_update(&mut self.output, STREAM, self.unreturned);
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

/// What a client sends first: the preface, its settings (no push, the
/// stream window) and the connection's window, then the `Watch` request's
/// headers (its message follows as the windows allow; the request side
/// stays open).
fn opening(authority: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    put_opening(&mut out, STREAM_WINDOW, CONN_WINDOW);
    let mut block = Vec::with_capacity(128);
    for (name, value) in [
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"http"),
        (b":path", b"/freshd.v1.Coordinator/Watch"),
        (b":authority", authority.as_bytes()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ] {
        hpack::encode_field(name, value, &mut block);
    }
    frame::put_headers(&mut out, STREAM, &block, false, 0);
    out
}
