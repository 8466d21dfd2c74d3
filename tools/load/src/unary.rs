//! freshd unary calls written and read straight on their socket.
//!
//! The Redis side of the notice workload writes `SET` as a few bytes of
//! RESP. Sent through the h2 crate, a `Publish` took the load tool about
//! 40 µs of its own time between the pacer's tick and the socket write at
//! 200 writes/s (`perf trace` of the load tool: the tick's wake-up, then
//! h2's request, stream and header machinery on a cold cache), against
//! about 3 µs for the `SET`: time that the write-to-notice latency counts
//! before freshd sees the write. So the notice workload's writer does what
//! its `Watch` reader does ([`crate::watch`]): HTTP/2 frames made and
//! parsed with freshd's own frame and HPACK code, in the task that times
//! them, the request's header block encoded once per method.
//!
//! It speaks what many unary calls on one connection need: a new stream
//! per call with its headers and its one message (the request side ended),
//! the answer's headers, message and trailers checked, SETTINGS and PING
//! acknowledged, the server's windows kept to and the connection's receive
//! window returned as it is used. No TLS, no compression.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use freshd::http2::frame::{self, code, setting, Frame, Head, HEAD_LEN};
use freshd::http2::hpack::{self, Decoder};
use prost::Message;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::grpc::{
    message_len, put_opening, request_head, HeaderBlocks, DEFAULT_WINDOW, PREFIX_LEN,
};
use crate::Error;

/// The receive window this side gives each stream.
const STREAM_WINDOW: u32 = 1 << 20;
/// The receive window of the connection.
const CONN_WINDOW: u32 = 4 << 20;
/// The largest answer accepted.
const MAX_MESSAGE: usize = 64 << 20;
/// What a read reserves room for.
const READ_CHUNK: usize = 16 << 10;

/// One connection to freshd for unary calls, driven by the task that owns
/// it.
pub struct UnaryConn {
    tcp: TcpStream,
    authority: String,
    input: BytesMut,
    /// Frames to write, from `written`.
    output: Vec<u8>,
    written: usize,
    hpack: Decoder,
    next_stream: u32,
    /// Request messages waiting for the server's connection window:
    /// `(stream, framed message, bytes of it sent)`.
    waiting: VecDeque<(u32, Bytes, usize)>,
    /// The server's window for this side's data on the connection, and
    /// the window each new stream starts with.
    send_window: i64,
    stream_window: i64,
    /// The largest frame the server accepts.
    max_frame: usize,
    /// The answers being read, by stream.
    open: HashMap<u32, Answer>,
    /// Header blocks being put together.
    blocks: HeaderBlocks,
    /// Flow-controlled bytes received and not yet returned.
    unreturned: u32,
    /// Streams whose answer is complete: the message bytes, or the error.
    done: Vec<(u32, Result<Bytes, Error>)>,
}

/// An answer being read.
#[derive(Default)]
struct Answer {
    headers: bool,
    body: BytesMut,
}

impl UnaryConn {
    /// Connects to `addr` and queues the connection's opening.
    pub async fn connect(addr: &str) -> Result<Self, Error> {
        let tcp = crate::connect_nodelay(addr).await?;
        let mut output = Vec::with_capacity(1024);
        put_opening(&mut output, STREAM_WINDOW, CONN_WINDOW);
        Ok(UnaryConn {
            tcp,
            authority: addr.to_string(),
            input: BytesMut::with_capacity(READ_CHUNK),
            output,
            written: 0,
            hpack: Decoder::new(hpack::DEFAULT_TABLE_SIZE),
            next_stream: 1,
            waiting: VecDeque::new(),
            send_window: i64::from(DEFAULT_WINDOW),
            stream_window: i64::from(DEFAULT_WINDOW),
            max_frame: frame::MIN_MAX_FRAME_SIZE as usize,
            open: HashMap::new(),
            blocks: HeaderBlocks::default(),
            unreturned: 0,
            done: Vec::new(),
        })
    }

    /// Calls `method` once for every item `next` yields, with the message
    /// `request(&item)`, as soon as the item comes and without waiting for
    /// earlier answers, and hands each answer to `answered` with its item
    /// (as [`crate::grpc::Conn::calls`] does through h2). Returns once
    /// `next` has ended and every answer is in; an error when the
    /// connection fails.
    pub async fn calls<T, Req, Resp>(
        &mut self,
        method: &str,
        mut next: impl FnMut(&mut Context<'_>, usize) -> Poll<Option<T>>,
        request: impl Fn(&T) -> Req,
        mut answered: impl FnMut(T, Result<Resp, Error>),
    ) -> Result<(), Error>
    where
        Req: Message,
        Resp: Message + Default,
    {
        let block = request_head(&self.authority, method);
        let mut items: HashMap<u32, T> = HashMap::new();
        let mut more = true;
        poll_fn(|cx| loop {
            let mut progress = self.poll_read(cx)?;
            for (stream, outcome) in self.done.drain(..) {
                let Some(item) = items.remove(&stream) else {
                    continue;
                };
                let answer = outcome.and_then(|bytes| {
                    Resp::decode(bytes).map_err(|e| format!("{method}: decode: {e}"))
                });
                answered(item, answer);
                progress = true;
            }
            while more {
                match next(cx, items.len()) {
                    Poll::Pending => break,
                    Poll::Ready(None) => more = false,
                    Poll::Ready(Some(item)) => {
                        let stream = self.start(&block, &request(&item))?;
                        items.insert(stream, item);
                        progress = true;
                    }
                }
            }
            self.poll_flush(cx)?;
            if !more && items.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if !progress {
                return Poll::Pending;
            }
        })
        .await
    }

    /// Opens a stream with `block` and queues `message` on it; its id.
    fn start(&mut self, block: &[u8], message: &impl Message) -> Result<u32, Error> {
        let stream = self.next_stream;
        if stream > frame::MAX_WINDOW {
            return Err("out of stream identifiers".into());
        }
        self.next_stream += 2;
        let framed = crate::grpc::frame(message);
        if framed.len() as i64 > self.stream_window {
            return Err(format!(
                "a request of {} bytes exceeds the server's stream window",
                framed.len()
            ));
        }
        frame::put_headers(&mut self.output, stream, block, false, self.max_frame);
        self.open.insert(stream, Answer::default());
        self.waiting.push_back((stream, framed, 0));
        self.send_waiting();
        Ok(stream)
    }

    /// Queues as much of the waiting messages as the connection's window
    /// allows, in order, each ending its stream.
    fn send_waiting(&mut self) {
        while let Some((stream, message, sent)) = self.waiting.front_mut() {
            let room = self.send_window.min(self.max_frame as i64);
            let left = message.len() - *sent;
            if room <= 0 && left > 0 {
                return;
            }
            let n = left.min(room.max(0) as usize);
            let end = *sent + n == message.len();
            frame::put_data(&mut self.output, *stream, &message[*sent..*sent + n], end);
            *sent += n;
            self.send_window -= n as i64;
            if end {
                self.waiting.pop_front();
            }
        }
    }

    /// Reads and handles what has arrived; true if anything did.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Result<bool, Error> {
        let mut progress = false;
        loop {
            if self.input.capacity() - self.input.len() < READ_CHUNK / 4 {
                self.input.reserve(READ_CHUNK);
            }
            match self.tcp.try_read_buf(&mut self.input) {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(_) => {
                    self.parse_frames()?;
                    progress = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    match self.tcp.poll_read_ready(cx) {
                        Poll::Pending => return Ok(progress),
                        Poll::Ready(Err(e)) => return Err(format!("read: {e}")),
                        Poll::Ready(Ok(())) => {}
                    }
                }
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// Handles every whole frame read.
    fn parse_frames(&mut self) -> Result<(), Error> {
        let mut input = std::mem::take(&mut self.input);
        let mut used = 0;
        let result = loop {
            let rest = &input[used..];
            let Some(head) = Head::parse(rest) else {
                break Ok(());
            };
            let Some(payload) = rest.get(HEAD_LEN..HEAD_LEN + head.len) else {
                break Ok(());
            };
            let parsed = match Frame::parse(&head, payload) {
                Ok(parsed) => parsed,
                Err(e) => break Err(format!("a bad frame from the server: {e}")),
            };
            if let Err(e) = self.handle(parsed) {
                break Err(e);
            }
            used += HEAD_LEN + head.len;
        };
        input.advance(used);
        self.input = input;
        result
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
                let Some(answer) = self.open.get_mut(&stream) else {
                    return Ok(());
                };
                if !answer.headers {
                    return Err("data before the response headers".into());
                }
                answer.body.extend_from_slice(data);
                if answer.body.len() > MAX_MESSAGE + 5 {
                    return Err("an answer over the size limit".into());
                }
                if end_stream {
                    self.finish(stream, Err("the answer ended without trailers".into()));
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
                    self.headers(stream, &block, end)?;
                }
            }
            Frame::Continuation {
                stream,
                block,
                end_headers,
            } => {
                if let Some((stream, block, end)) =
                    self.blocks.continuation(stream, block, end_headers)?
                {
                    self.headers(stream, &block, end)?;
                }
            }
            Frame::RstStream { stream, code } => {
                self.finish(
                    stream,
                    Err(format!("the server reset the call (code {code:#x})")),
                );
            }
            Frame::Settings {
                ack: false,
                payload,
            } => {
                for (id, value) in frame::settings(payload) {
                    match id {
                        setting::INITIAL_WINDOW_SIZE => self.stream_window = i64::from(value),
                        setting::MAX_FRAME_SIZE => self.max_frame = value as usize,
                        _ => {}
                    }
                }
                frame::put_settings(&mut self.output, &[], true);
            }
            Frame::WindowUpdate {
                stream: 0,
                increment,
            } => {
                self.send_window += i64::from(increment);
                self.send_waiting();
            }
            Frame::Ping { ack: false, data } => frame::put_ping(&mut self.output, data, true),
            Frame::GoAway { code, .. } if code != code::NO_ERROR => {
                return Err(format!(
                    "the server ended the connection (GOAWAY code {code:#x})"
                ));
            }
            // Acknowledgements, stream window updates (each request fits
            // its stream's first window), a graceful GOAWAY, priority,
            // unknown types.
            _ => {}
        }
        Ok(())
    }

    /// A complete header block on `stream`: the answer's headers, or its
    /// trailers when it ends the stream.
    fn headers(&mut self, stream: u32, block: &[u8], end_stream: bool) -> Result<(), Error> {
        let (status, grpc) = crate::watch::response_head(&mut self.hpack, block)
            .map_err(|e| format!("bad headers from the server: {e}"))?;
        let Some(answer) = self.open.get_mut(&stream) else {
            return Ok(());
        };
        if !answer.headers {
            answer.headers = true;
            if status.as_deref() != Some(b"200") {
                let status = status.map(|s| String::from_utf8_lossy(&s).into_owned());
                self.finish(
                    stream,
                    Err(format!("HTTP status {}", status.unwrap_or_default())),
                );
                return Ok(());
            }
        }
        match crate::grpc::status(&grpc) {
            Some(Err(e)) => self.finish(stream, Err(e)),
            Some(Ok(())) if end_stream => {
                let outcome = message(&mut answer.body);
                self.finish(stream, outcome);
            }
            None if end_stream => self.finish(stream, Err("trailers without grpc-status".into())),
            _ => {}
        }
        Ok(())
    }

    /// Ends the call on `stream` with `outcome`.
    fn finish(&mut self, stream: u32, outcome: Result<Bytes, Error>) {
        if self.open.remove(&stream).is_some() {
            self.waiting.retain(|(s, _, _)| *s != stream);
            self.done.push((stream, outcome));
        }
    }

    /// Notes `flow` bytes received, and returns them to the connection's
    /// window once half of it is used (each stream gets a fresh window).
    fn returned(&mut self, flow: usize) {
        self.unreturned += flow as u32;
        if self.unreturned >= CONN_WINDOW / 2 {
            frame::put_window_update(&mut self.output, 0, self.unreturned);
            self.unreturned = 0;
        }
    }

    /// Writes what is queued, as far as the socket takes it now.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        while self.written < self.output.len() {
            match Pin::new(&mut self.tcp).poll_write(cx, &self.output[self.written..]) {
                Poll::Ready(Ok(0)) => return Err("write: closed".into()),
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(e)) => return Err(format!("write: {e}")),
                Poll::Pending => return Ok(()),
            }
        }
        self.output.clear();
        self.written = 0;
        Ok(())
    }
}

/// The one message of a unary answer's body.
fn message(body: &mut BytesMut) -> Result<Bytes, Error> {
    let Some(len) = message_len(body, MAX_MESSAGE)? else {
        return Err("an answer without a message".into());
    };
    if body.len() != PREFIX_LEN + len {
        return Err(format!(
            "an answer body of {} bytes for a message of {len}",
            body.len()
        ));
    }
    body.advance(PREFIX_LEN);
    Ok(body.split().freeze())
}
