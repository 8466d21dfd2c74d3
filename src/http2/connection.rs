//! The server side of one HTTP/2 connection as a state machine without I/O:
//! bytes read from the socket go in ([`Connection::receive`]), requests come
//! out as [`Event`]s, answers go in ([`Connection::respond`],
//! [`Connection::send_data`], [`Connection::send_trailers`]) and bytes to
//! write come out ([`Connection::output`]). Whoever owns the socket drives
//! it; nothing in here waits, locks or spawns.
//!
//! It keeps the rules of RFC 9113 a server must: the preface and SETTINGS
//! exchange, stream identifiers and states, the concurrency limit it
//! advertises, flow control both ways (what a stream may not send yet waits
//! in the stream, in order, until the peer's windows open), header blocks
//! split over CONTINUATION frames, PING, RST_STREAM and GOAWAY. A broken
//! rule resets its stream or, when the RFC says so, ends the connection
//! with a GOAWAY that names it ([`Connection::receive`]'s error).
//!
//! Received data counts against the windows this side gives the peer until
//! the application releases it ([`Connection::release`]); a WINDOW_UPDATE
//! goes out once half a window is released. A stream whose reader stops
//! therefore holds at most a window of data, and the connection at most
//! its own window across all streams.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::frame::{self, code, setting, Frame, FrameError, Head, HEAD_LEN, PREFACE};
use super::head::{Block, RequestHead};
use super::hpack::{self, DecodeError, Decoder};

/// The settings this side advertises, and limits of its own.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// SETTINGS_MAX_CONCURRENT_STREAMS: streams the peer may have open.
    pub max_concurrent_streams: u32,
    /// SETTINGS_INITIAL_WINDOW_SIZE, and the connection's receive window;
    /// at least 65,535, what a peer may send before it has read the
    /// settings.
    pub initial_window: u32,
    /// SETTINGS_MAX_FRAME_SIZE.
    pub max_frame_size: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    pub max_header_list: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_concurrent_streams: 1024,
            initial_window: 1024 * 1024,
            max_frame_size: frame::MIN_MAX_FRAME_SIZE,
            max_header_list: 16 * 1024,
        }
    }
}

/// What the peer sent, for the application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A new request's head is complete: read it with
    /// [`Connection::head`] before the next call to `receive`.
    Request {
        /// Its stream.
        stream: u32,
        /// The request has no body.
        end_stream: bool,
    },
    /// Some of a request's body. Hand its bytes back with
    /// [`Connection::release`] once consumed: until then they count
    /// against the peer's windows.
    Data {
        /// Its stream.
        stream: u32,
        /// The bytes.
        data: Bytes,
        /// The body is complete.
        end_stream: bool,
    },
    /// The request ended with trailers (in [`Connection::head`]).
    Trailers {
        /// Its stream.
        stream: u32,
    },
    /// The peer reset the stream, or this side did because the peer broke
    /// a rule on it: nothing more is sent on it.
    Reset {
        /// Its stream.
        stream: u32,
        /// The error code.
        code: u32,
    },
}

/// A stream's state. Small (40 bytes): a notice to a stream looks it up,
/// and with a thousand streams a publish reaches, each is a cache line
/// read cold; what is rarely there (data waiting for a window, the end
/// behind it) is kept out of line.
#[derive(Debug)]
struct Stream {
    /// The peer has ended its side.
    remote_done: bool,
    /// This side has sent its response's headers.
    responded: bool,
    /// Data handed to the application and not yet released.
    held: u32,
    /// What the peer's window for this stream allows; below 0 after the
    /// peer shrinks its initial window.
    send_window: i64,
    /// The window this side gives the peer on this stream.
    recv: RecvWindow,
    /// What waits for the windows, if anything does; `None` when nothing
    /// does and the stream's end is not begun.
    pending: Option<Box<Pending>>,
}

/// What waits for a stream's windows: data, then perhaps the end.
#[derive(Debug, Default)]
struct Pending {
    data: VecDeque<Bytes>,
    end: PendingEnd,
}

impl Stream {
    /// Nothing waits and the end is not begun: data may go straight out.
    fn idle(&self) -> bool {
        self.pending.is_none()
    }

    /// The stream's end is begun (it takes no more data).
    fn ending(&self) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| p.end != PendingEnd::None)
    }

    /// Bytes of data waiting for the windows.
    fn waiting(&self) -> usize {
        self.pending
            .as_ref()
            .map_or(0, |p| p.data.iter().map(Bytes::len).sum())
    }

    /// What waits, made if nothing did.
    fn pending_mut(&mut self) -> &mut Pending {
        self.pending.get_or_insert_with(Box::default)
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
enum PendingEnd {
    #[default]
    None,
    /// An empty DATA frame with END_STREAM after the pending data.
    EndStream,
    /// A trailer block, already encoded.
    Trailers(Bytes),
}

/// A window this side gives the peer: bytes it has sent since the last
/// WINDOW_UPDATE that covers them, and how many of those are released.
#[derive(Debug, Default)]
struct RecvWindow {
    used: u32,
    released: u32,
}

impl RecvWindow {
    /// Counts `n` more bytes received; false when they go past `size`.
    fn take(&mut self, n: u32, size: u32) -> bool {
        self.used = self.used.saturating_add(n);
        self.used <= size
    }

    fn release(&mut self, n: u32) {
        self.released = self.released.saturating_add(n).min(self.used);
    }

    /// The increment to announce, once at least `half` is released.
    fn update(&mut self, half: u32) -> Option<u32> {
        if self.released == 0 || self.released < half {
            return None;
        }
        let n = std::mem::take(&mut self.released);
        self.used -= n;
        Some(n)
    }
}

/// A header block still waiting for its CONTINUATION frames.
#[derive(Debug)]
struct Partial {
    stream: u32,
    end_stream: bool,
    /// Its priority names the stream itself (a stream error).
    self_dependent: bool,
    block: BytesMut,
}

/// One connection's state.
#[derive(Debug)]
pub struct Connection {
    config: Config,
    preface: bool,
    /// The peer's first frame, SETTINGS, has come.
    peer_settings: bool,
    decoder: Decoder,
    head: RequestHead,
    /// By identifier, which the peer picks: a keyed hash, but a fast one
    /// (every frame and every notice looks its stream up).
    streams: hashbrown::HashMap<u32, Stream, foldhash::fast::RandomState>,
    /// The highest stream identifier the peer opened.
    last_stream: u32,
    partial: Option<Partial>,
    /// The peer's settings.
    peer_initial_window: u32,
    peer_max_frame: usize,
    /// The connection's send window.
    send_window: i64,
    /// The window this side gives the peer on the connection.
    recv: RecvWindow,
    /// GOAWAY sent: the last stream this side will process.
    going_away: Option<u32>,
    /// Streams with something waiting for a window, in the order they
    /// began to wait.
    waiting: VecDeque<u32>,
    out: BytesMut,
    scratch: Vec<u8>,
    /// The connection error that ended it: nothing more is read.
    broken: Option<FrameError>,
}

/// Default SETTINGS_INITIAL_WINDOW_SIZE, and every connection's first
/// window.
const DEFAULT_WINDOW: u32 = 65_535;

impl Connection {
    /// A connection that has not read the preface yet. Its SETTINGS (and
    /// the window update that brings its connection window to
    /// `config.initial_window`) are already in the output.
    pub fn new(mut config: Config) -> Self {
        config.initial_window = config
            .initial_window
            .clamp(DEFAULT_WINDOW, frame::MAX_WINDOW);
        config.max_frame_size = config
            .max_frame_size
            .clamp(frame::MIN_MAX_FRAME_SIZE, frame::MAX_MAX_FRAME_SIZE);
        let mut out = BytesMut::with_capacity(16 * 1024);
        frame::put_settings(
            &mut out,
            &[
                (
                    setting::MAX_CONCURRENT_STREAMS,
                    config.max_concurrent_streams,
                ),
                (setting::INITIAL_WINDOW_SIZE, config.initial_window),
                (setting::MAX_FRAME_SIZE, config.max_frame_size),
                (setting::MAX_HEADER_LIST_SIZE, config.max_header_list),
                (setting::ENABLE_PUSH, 0),
            ],
            false,
        );
        if config.initial_window > DEFAULT_WINDOW {
            frame::put_window_update(&mut out, 0, config.initial_window - DEFAULT_WINDOW);
        }
        Connection {
            config,
            preface: false,
            peer_settings: false,
            decoder: Decoder::new(hpack::DEFAULT_TABLE_SIZE),
            head: RequestHead::default(),
            streams: Default::default(),
            last_stream: 0,
            partial: None,
            peer_initial_window: DEFAULT_WINDOW,
            peer_max_frame: frame::MIN_MAX_FRAME_SIZE as usize,
            send_window: i64::from(DEFAULT_WINDOW),
            recv: RecvWindow::default(),
            going_away: None,
            waiting: VecDeque::new(),
            out,
            scratch: Vec::new(),
            broken: None,
        }
    }

    /// The head of the request (or trailers) the last [`Event::Request`]
    /// (or [`Event::Trailers`]) announced.
    pub fn head(&self) -> &RequestHead {
        &self.head
    }

    /// Bytes to write to the socket; write them and clear it.
    pub fn output(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// Streams open: the peer's side, this side's, or both.
    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// A GOAWAY was sent and no stream is left: the connection may close
    /// once the output is written.
    pub fn is_done(&self) -> bool {
        self.going_away.is_some() && self.streams.is_empty()
    }

    /// Reads the complete frames at the front of `input` (and leaves a
    /// partial one there), pushing what they mean onto `events`. After
    /// an [`Event::Request`] the head stays readable only until the next
    /// call, so `events` is returned after each request; call again while
    /// `input` holds a whole frame. An error means the connection is
    /// over: its GOAWAY is in the output, and every later call answers
    /// the same error without reading.
    pub fn receive(
        &mut self,
        input: &mut BytesMut,
        events: &mut Vec<Event>,
    ) -> Result<(), FrameError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let result = self.read(input, events);
        if let Err(e) = &result {
            self.fail(e);
            self.broken = Some(e.clone());
            return result;
        }
        self.hand_back();
        result
    }

    fn read(&mut self, input: &mut BytesMut, events: &mut Vec<Event>) -> Result<(), FrameError> {
        if !self.preface {
            if input.len() < PREFACE.len() {
                return if PREFACE.starts_with(input) {
                    Ok(())
                } else {
                    Err(protocol("not an HTTP/2 client preface"))
                };
            }
            if &input[..PREFACE.len()] != PREFACE {
                return Err(protocol("not an HTTP/2 client preface"));
            }
            input.advance(PREFACE.len());
            self.preface = true;
        }
        while let Some(head) = Head::parse(input) {
            if head.len > self.config.max_frame_size as usize {
                return Err(FrameError {
                    code: code::FRAME_SIZE_ERROR,
                    stream: None,
                    what: "a frame larger than SETTINGS_MAX_FRAME_SIZE",
                });
            }
            if input.len() < HEAD_LEN + head.len {
                break;
            }
            input.advance(HEAD_LEN);
            let payload = input.split_to(head.len).freeze();
            let request = self.frame(&head, payload, events)?;
            if request {
                // The head is only good until the next request's.
                return Ok(());
            }
        }
        Ok(())
    }

    /// Handles one frame; true when it completed a request's head.
    fn frame(
        &mut self,
        head: &Head,
        payload: Bytes,
        events: &mut Vec<Event>,
    ) -> Result<bool, FrameError> {
        if !self.peer_settings && head.kind != frame::kind::SETTINGS {
            return Err(protocol("the first frame is not SETTINGS"));
        }
        if let Some(partial) = &self.partial {
            if head.kind != frame::kind::CONTINUATION || head.stream != partial.stream {
                return Err(protocol("a frame between a header block's frames"));
            }
        }
        let parsed = match Frame::parse(head, &payload) {
            Ok(frame) => frame,
            Err(e) => match e.stream {
                Some(stream) => {
                    self.reset(stream, e.code, events);
                    return Ok(false);
                }
                None => return Err(e),
            },
        };
        match parsed {
            Frame::Settings { ack: true, .. } => {}
            Frame::Settings {
                ack: false,
                payload,
            } => {
                self.peer_settings = true;
                for (id, value) in frame::settings(payload) {
                    self.setting(id, value)?;
                }
                frame::put_settings(&mut self.out, &[], true);
                self.flush_waiting();
            }
            Frame::Ping { ack: false, data } => frame::put_ping(&mut self.out, data, true),
            Frame::Ping { ack: true, .. } => {}
            Frame::GoAway { .. } => {
                // The peer opens no more streams; those open run to their end.
                self.going_away.get_or_insert(self.last_stream);
            }
            Frame::WindowUpdate {
                stream: 0,
                increment,
            } => {
                self.send_window += i64::from(increment);
                if self.send_window > i64::from(frame::MAX_WINDOW) {
                    return Err(FrameError {
                        code: code::FLOW_CONTROL_ERROR,
                        stream: None,
                        what: "the connection's window above 2^31-1",
                    });
                }
                self.flush_waiting();
            }
            Frame::WindowUpdate { stream, increment } => {
                self.idle_is_an_error(stream, "WINDOW_UPDATE on an idle stream")?;
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.send_window += i64::from(increment);
                    if s.send_window > i64::from(frame::MAX_WINDOW) {
                        self.reset(stream, code::FLOW_CONTROL_ERROR, events);
                    } else {
                        self.flush_waiting();
                    }
                }
            }
            Frame::Priority { .. } | Frame::Unknown { .. } => {}
            Frame::RstStream { stream, code } => {
                self.idle_is_an_error(stream, "RST_STREAM on an idle stream")?;
                if self.remove(stream) {
                    events.push(Event::Reset { stream, code });
                }
            }
            Frame::Data {
                stream,
                data,
                end_stream,
                flow,
            } => self.data(stream, payload.slice_ref(data), end_stream, flow, events)?,
            Frame::Headers {
                stream,
                block,
                end_stream,
                end_headers,
                priority,
            } => {
                let block = payload.slice_ref(block);
                let self_dependent = priority.is_some_and(|p| p.depends_on == stream);
                if !end_headers {
                    self.partial = Some(Partial {
                        stream,
                        end_stream,
                        self_dependent,
                        block: BytesMut::from(&block[..]),
                    });
                    return Ok(false);
                }
                return self.headers(stream, &block, end_stream, self_dependent, events);
            }
            Frame::Continuation {
                stream,
                block,
                end_headers,
            } => {
                let Some(partial) = self.partial.as_mut() else {
                    return Err(protocol("CONTINUATION without a header block to continue"));
                };
                partial.block.extend_from_slice(block);
                if partial.block.len() > 4 * self.config.max_header_list as usize {
                    return Err(FrameError {
                        code: code::ENHANCE_YOUR_CALM,
                        stream: None,
                        what: "a header block over four times SETTINGS_MAX_HEADER_LIST_SIZE",
                    });
                }
                if end_headers {
                    let partial = self.partial.take().expect("checked above");
                    return self.headers(
                        stream,
                        &partial.block,
                        partial.end_stream,
                        partial.self_dependent,
                        events,
                    );
                }
            }
        }
        Ok(false)
    }

    fn setting(&mut self, id: u16, value: u32) -> Result<(), FrameError> {
        match id {
            setting::INITIAL_WINDOW_SIZE => {
                let delta = i64::from(value) - i64::from(self.peer_initial_window);
                self.peer_initial_window = value;
                for stream in self.streams.values_mut() {
                    stream.send_window += delta;
                    if stream.send_window > i64::from(frame::MAX_WINDOW) {
                        return Err(FrameError {
                            code: code::FLOW_CONTROL_ERROR,
                            stream: None,
                            what: "a stream's window above 2^31-1",
                        });
                    }
                }
            }
            setting::MAX_FRAME_SIZE => self.peer_max_frame = value as usize,
            // This side keeps no dynamic table for what it sends, pushes
            // nothing and opens no streams: the other settings bind it to
            // nothing.
            _ => {}
        }
        Ok(())
    }

    /// A stream the peer has not opened yet is idle; a frame that needs an
    /// opened one is then a connection error.
    fn idle_is_an_error(&self, stream: u32, what: &'static str) -> Result<(), FrameError> {
        if stream > self.last_stream {
            return Err(protocol(what));
        }
        Ok(())
    }

    fn headers(
        &mut self,
        stream: u32,
        block: &[u8],
        end_stream: bool,
        self_dependent: bool,
        events: &mut Vec<Event>,
    ) -> Result<bool, FrameError> {
        if self.streams.contains_key(&stream) {
            // Trailers: they must end the request.
            let (decoded, checked) = self.read_head(block, Block::Trailers)?;
            let remote_done = self.streams.get(&stream).is_some_and(|s| s.remote_done);
            if remote_done {
                self.reset(stream, code::STREAM_CLOSED, events);
            } else if !end_stream || !decoded || !checked {
                self.reset(stream, code::PROTOCOL_ERROR, events);
            } else {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.remote_done = true;
                }
                events.push(Event::Trailers { stream });
                return Ok(true);
            }
            return Ok(false);
        }
        if stream % 2 == 0 {
            return Err(protocol("a client opened an even-numbered stream"));
        }
        if stream <= self.last_stream {
            // Trailers on a stream this side has closed: decoded, for the
            // table, and ignored (RFC 9113 section 5.1).
            let max_list = self.config.max_header_list as usize;
            compression(&self.decoder.decode(block, max_list, |_, _| {}))?;
            return Ok(false);
        }
        self.last_stream = stream;
        let (decoded, checked) = self.read_head(block, Block::Request)?;
        if self.going_away.is_some_and(|last| stream > last) {
            // Past the GOAWAY: not processed (the peer may retry it).
            return Ok(false);
        }
        if self.streams.len() >= self.config.max_concurrent_streams as usize {
            frame::put_rst_stream(&mut self.out, stream, code::REFUSED_STREAM);
            return Ok(false);
        }
        if !decoded {
            // Over the header list limit: 431, as the RFC suggests.
            self.open(stream, end_stream);
            self.respond(stream, 431, &[], true);
            return Ok(false);
        }
        if !checked || self_dependent {
            frame::put_rst_stream(&mut self.out, stream, code::PROTOCOL_ERROR);
            return Ok(false);
        }
        self.open(stream, end_stream);
        events.push(Event::Request { stream, end_stream });
        Ok(true)
    }

    /// Decodes a header block into the head as `kind`: whether the fields
    /// fit the header list limit, and whether the head keeps the rules. A
    /// block that does not decode ends the connection.
    fn read_head(&mut self, block: &[u8], kind: Block) -> Result<(bool, bool), FrameError> {
        let mut reader = self.head.reader(kind);
        let max_list = self.config.max_header_list as usize;
        let decoded = self
            .decoder
            .decode(block, max_list, |n, v| reader.field(n, v));
        let checked = reader.finish();
        compression(&decoded)?;
        Ok((decoded.is_ok(), checked.is_ok()))
    }

    fn open(&mut self, stream: u32, end_stream: bool) {
        self.streams.insert(
            stream,
            Stream {
                remote_done: end_stream,
                responded: false,
                send_window: i64::from(self.peer_initial_window),
                recv: RecvWindow::default(),
                held: 0,
                pending: None,
            },
        );
    }

    fn data(
        &mut self,
        stream: u32,
        data: Bytes,
        end_stream: bool,
        flow: usize,
        events: &mut Vec<Event>,
    ) -> Result<(), FrameError> {
        self.idle_is_an_error(stream, "DATA on an idle stream")?;
        // Every DATA frame counts against the connection's window, even on
        // a stream that is gone; its padding is released at once.
        let flow = flow as u32;
        let size = self.config.initial_window;
        if !self.recv.take(flow, size) {
            return Err(FrameError {
                code: code::FLOW_CONTROL_ERROR,
                stream: None,
                what: "DATA beyond the connection's window",
            });
        }
        let padding = flow - data.len() as u32;
        let Some(s) = self.streams.get_mut(&stream) else {
            // A closed stream: this side may have reset it while the peer
            // was still sending (RFC 9113 section 5.1 says to ignore what
            // follows), or answered it in full.
            self.recv.release(flow);
            return Ok(());
        };
        if s.remote_done {
            self.recv.release(flow);
            self.reset(stream, code::STREAM_CLOSED, events);
            return Ok(());
        }
        if !s.recv.take(flow, size) {
            self.recv.release(flow);
            self.reset(stream, code::FLOW_CONTROL_ERROR, events);
            return Ok(());
        }
        s.remote_done = end_stream;
        s.held += data.len() as u32;
        if !data.is_empty() || end_stream {
            events.push(Event::Data {
                stream,
                data,
                end_stream,
            });
        }
        self.recv.release(padding);
        self.release_stream(stream, padding);
        Ok(())
    }

    /// Hands `n` bytes of `stream`'s data, delivered in [`Event::Data`],
    /// back to the peer's windows: the application has consumed them.
    /// Until it does, they count against the windows, which bounds what a
    /// stream (and the connection) can make this side hold. A stream that
    /// ends gives back what it held.
    pub fn release(&mut self, stream: u32, n: usize) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        let n = (n.min(u32::MAX as usize) as u32).min(s.held);
        s.held -= n;
        self.release_stream(stream, n);
        self.recv.release(n);
        self.hand_back();
    }

    /// Releases `n` bytes of the stream's window, with a WINDOW_UPDATE once
    /// half a window is released (none once the peer has ended its side).
    fn release_stream(&mut self, stream: u32, n: u32) {
        let half = self.config.initial_window / 2;
        if let Some(s) = self.streams.get_mut(&stream) {
            s.recv.release(n);
            if let Some(update) = s.recv.update(half) {
                if !s.remote_done {
                    frame::put_window_update(&mut self.out, stream, update);
                }
            }
        }
    }

    /// Sends the connection's WINDOW_UPDATE once half its window is
    /// released.
    fn hand_back(&mut self) {
        if let Some(update) = self.recv.update(self.config.initial_window / 2) {
            frame::put_window_update(&mut self.out, 0, update);
        }
    }

    /// Forgets a stream, giving back the connection window its data held.
    fn remove(&mut self, stream: u32) -> bool {
        match self.streams.remove(&stream) {
            Some(s) => {
                self.recv.release(s.held);
                true
            }
            None => false,
        }
    }

    /// Resets `stream` from this side.
    fn reset(&mut self, stream: u32, code: u32, events: &mut Vec<Event>) {
        frame::put_rst_stream(&mut self.out, stream, code);
        if self.remove(stream) {
            events.push(Event::Reset { stream, code });
        }
    }

    /// Writes the response's headers: `:status`, then `fields`. With
    /// `end_stream` the response is headers alone (a trailers-only gRPC
    /// answer). Nothing is written for a stream that is gone.
    pub fn respond(
        &mut self,
        stream: u32,
        status: u16,
        fields: &[(&[u8], &[u8])],
        end_stream: bool,
    ) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if s.responded {
            return;
        }
        s.responded = true;
        self.scratch.clear();
        hpack::encode_field(b":status", &status_digits(status), &mut self.scratch);
        for (name, value) in fields {
            hpack::encode_field(name, value, &mut self.scratch);
        }
        frame::put_headers(
            &mut self.out,
            stream,
            &self.scratch,
            end_stream,
            self.peer_max_frame,
        );
        if end_stream {
            self.local_done(stream);
        }
    }

    /// Sends `data` on the stream, after [`Connection::respond`], as far
    /// as the windows allow now; the rest waits in the stream, in order,
    /// and goes out as the peer opens its windows. Bytes waiting per
    /// stream: [`Connection::waiting`]. Nothing is sent on a stream that
    /// is gone or has no response headers yet.
    pub fn send_data(&mut self, stream: u32, data: Bytes) {
        match self.take_windows(stream, data.len()) {
            Some(true) => frame::put_data(&mut self.out, stream, &data, false),
            Some(false) => self.wait_with(stream, data),
            None => {}
        }
    }

    /// Writes one DATA frame on `stream` whose payload `encode` appends
    /// straight to the output, in one lookup of the stream: a message costs
    /// no buffer of its own and no copy. `encode` is given the bytes already
    /// waiting for the stream's windows ([`Connection::waiting`]) and the
    /// output, after room left for the frame's head; it appends the payload,
    /// or answers false having appended nothing. The payload goes out at
    /// once when nothing of the stream waits and the windows cover it, and
    /// otherwise waits behind what does, as [`Connection::send_data`]'s
    /// does. `None` for a stream that takes no data (see
    /// [`Connection::open_for_data`]); otherwise whether `encode` wrote.
    pub fn send_data_in_place(
        &mut self,
        stream: u32,
        encode: impl FnOnce(usize, &mut BytesMut) -> bool,
    ) -> Option<bool> {
        let s = self
            .streams
            .get_mut(&stream)
            .filter(|s| s.responded && !s.ending())?;
        let start = self.out.len();
        self.out.put_bytes(0, frame::HEAD_LEN);
        if !encode(s.waiting(), &mut self.out) {
            self.out.truncate(start);
            return Some(false);
        }
        debug_assert!(self.out.len() >= start + frame::HEAD_LEN, "the head kept");
        let len = self.out.len() - start - frame::HEAD_LEN;
        let n = len as i64;
        if s.idle() && n <= s.send_window && n <= self.send_window && len <= self.peer_max_frame {
            // (A stream still waiting for the connection's window would
            // mean that window is spent.)
            s.send_window -= n;
            self.send_window -= n;
            let mut head = &mut self.out[start..start + frame::HEAD_LEN];
            frame::put_head(&mut head, len, frame::kind::DATA, 0, stream);
        } else {
            let data = Bytes::copy_from_slice(&self.out[start + frame::HEAD_LEN..]);
            self.out.truncate(start);
            self.wait_with(stream, data);
        }
        Some(true)
    }

    /// For `len` bytes of data on `stream`: `Some(true)` when nothing of
    /// the stream waits and the windows cover them, which are then taken
    /// (the caller writes one frame, at once); `Some(false)` when they must
    /// wait; `None` when the stream is gone or has no response headers.
    fn take_windows(&mut self, stream: u32, len: usize) -> Option<bool> {
        let s = self.streams.get_mut(&stream).filter(|s| s.responded)?;
        let n = len as i64;
        if s.idle() && n <= s.send_window && n <= self.send_window && len <= self.peer_max_frame {
            // (A stream still waiting for the connection's window would
            // mean that window is spent.)
            s.send_window -= n;
            self.send_window -= n;
            return Some(true);
        }
        Some(false)
    }

    /// Queues `data` behind what `stream` already holds, and sends what the
    /// windows allow.
    fn wait_with(&mut self, stream: u32, data: Bytes) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if s.idle() {
            self.waiting.push_back(stream);
        }
        s.pending_mut().data.push_back(data);
        self.flush_waiting();
    }

    /// Ends the stream, after [`Connection::respond`], with `fields` as
    /// trailers (after the data before them), or with an empty DATA frame
    /// when `fields` is empty.
    pub fn send_trailers(&mut self, stream: u32, fields: &[(&[u8], &[u8])]) {
        let Some(s) = self.streams.get_mut(&stream).filter(|s| s.responded) else {
            return;
        };
        if s.ending() {
            return;
        }
        self.scratch.clear();
        for (name, value) in fields {
            hpack::encode_field(name, value, &mut self.scratch);
        }
        let was_idle = s.idle();
        s.pending_mut().end = if fields.is_empty() {
            PendingEnd::EndStream
        } else {
            PendingEnd::Trailers(Bytes::copy_from_slice(&self.scratch))
        };
        if was_idle {
            self.waiting.push_back(stream);
        }
        self.flush_waiting();
    }

    /// Bytes waiting for the windows on `stream`.
    pub fn waiting(&self, stream: u32) -> usize {
        self.streams.get(&stream).map_or(0, Stream::waiting)
    }

    /// The bytes waiting for the peer's windows on a stream that takes data
    /// now: one whose response headers are sent and whose end is not
    /// begun. `None` for any other (gone, reset, ending, or without
    /// headers).
    pub fn open_for_data(&self, stream: u32) -> Option<usize> {
        self.streams
            .get(&stream)
            .filter(|s| s.responded && !s.ending())
            .map(Stream::waiting)
    }

    /// Resets a stream from this side (the application gave up on it).
    pub fn cancel(&mut self, stream: u32, code: u32) {
        if self.remove(stream) {
            frame::put_rst_stream(&mut self.out, stream, code);
        }
    }

    /// Starts a graceful end: a GOAWAY naming the last stream the peer
    /// opened; those run to their end, new ones are not processed.
    pub fn go_away(&mut self, code: u32) {
        if self.going_away.is_none() {
            self.going_away = Some(self.last_stream);
            frame::put_goaway(&mut self.out, self.last_stream, code, b"");
        }
    }

    fn fail(&mut self, error: &FrameError) {
        self.going_away = Some(self.last_stream);
        self.streams.clear();
        frame::put_goaway(
            &mut self.out,
            self.last_stream,
            error.code,
            error.what.as_bytes(),
        );
    }

    /// Writes what the windows allow of each waiting stream, in turn.
    fn flush_waiting(&mut self) {
        let mut rounds = self.waiting.len();
        while rounds > 0 && self.send_window > 0 {
            rounds -= 1;
            let Some(id) = self.waiting.pop_front() else {
                break;
            };
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            let Some(pending) = s.pending.as_deref_mut() else {
                continue;
            };
            // What waited goes out in frames as large as the windows and
            // the peer's frame size allow, not a frame per piece of data:
            // a stream's waiting messages (a Watch stream's notices, tens
            // of bytes each) would otherwise reach a slow reader as many
            // small frames, which h2 clients count against a budget and
            // end the connection past it.
            loop {
                while pending.data.front().is_some_and(Bytes::is_empty) {
                    pending.data.pop_front();
                }
                if pending.data.is_empty() {
                    break;
                }
                let room = s
                    .send_window
                    .min(self.send_window)
                    .min(self.peer_max_frame as i64);
                if room <= 0 {
                    break;
                }
                let room = room as usize;
                let mut len = 0;
                for chunk in &pending.data {
                    len += chunk.len().min(room - len);
                    if len == room {
                        break;
                    }
                }
                frame::put_head(&mut self.out, len, frame::kind::DATA, 0, id);
                let mut left = len;
                while let Some(chunk) = pending.data.front_mut() {
                    let n = chunk.len().min(left);
                    self.out.extend_from_slice(&chunk[..n]);
                    left -= n;
                    if n == chunk.len() {
                        pending.data.pop_front();
                    } else {
                        chunk.advance(n);
                    }
                    if left == 0 {
                        break;
                    }
                }
                s.send_window -= len as i64;
                self.send_window -= len as i64;
            }
            if !pending.data.is_empty() {
                self.waiting.push_back(id);
                continue;
            }
            // All sent: the stream is idle again, or ends now.
            let end = s.pending.take().map_or(PendingEnd::None, |p| p.end);
            match end {
                PendingEnd::None => {}
                PendingEnd::EndStream => {
                    frame::put_data(&mut self.out, id, &[], true);
                    self.local_done(id);
                }
                PendingEnd::Trailers(block) => {
                    frame::put_headers(&mut self.out, id, &block, true, self.peer_max_frame);
                    self.local_done(id);
                }
            }
        }
    }

    /// This side ended the stream.
    fn local_done(&mut self, stream: u32) {
        if let Some(s) = self.streams.get_mut(&stream) {
            if !s.remote_done {
                // The answer is complete before the request: the rest of
                // the request is not wanted (RFC 9113 section 8.1).
                frame::put_rst_stream(&mut self.out, stream, code::NO_ERROR);
            }
            self.remove(stream);
        }
    }
}

/// A status code's three digits (100 to 599; others are written as 500).
fn status_digits(status: u16) -> [u8; 3] {
    let status = if (100..600).contains(&status) {
        status
    } else {
        500
    };
    [
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]
}

fn protocol(what: &'static str) -> FrameError {
    FrameError {
        code: code::PROTOCOL_ERROR,
        stream: None,
        what,
    }
}

/// A decoding error other than an oversized list leaves the HPACK table out
/// of step: the connection ends.
fn compression(decoded: &Result<(), DecodeError>) -> Result<(), FrameError> {
    match decoded {
        Ok(()) | Err(DecodeError::ListTooLarge { .. }) => Ok(()),
        Err(_) => Err(FrameError {
            code: code::COMPRESSION_ERROR,
            stream: None,
            what: "a header block that does not decode",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http2::hpack::encode_field;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A stream's entry in the map (its key beside it) fits a cache line,
    /// so a lookup by a fan-out reads one line of it cold, not two.
    #[test]
    fn a_stream_takes_less_than_a_cache_line() {
        assert!(std::mem::size_of::<(u32, Stream)>() <= 48);
    }

    /// Serves `io` with `conn`: a request to `/big/<n>` is answered with
    /// `n` bytes, any other with its own body; each answer ends with a
    /// `grpc-status: 0` trailer. Returns the events seen.
    async fn serve(io: DuplexStream, mut conn: Connection) -> Vec<Event> {
        let (mut rd, mut wr) = tokio::io::split(io);
        let mut input = BytesMut::new();
        let mut events = Vec::new();
        let mut seen = Vec::new();
        let mut requests: std::collections::HashMap<u32, (Vec<u8>, Vec<u8>)> =
            std::collections::HashMap::new();
        loop {
            loop {
                let before = input.len();
                let result = conn.receive(&mut input, &mut events);
                let progress = input.len() != before || !events.is_empty();
                for event in events.drain(..) {
                    seen.push(event.clone());
                    let (stream, done) = match event {
                        Event::Request { stream, end_stream } => {
                            requests.insert(stream, (conn.head().path().to_vec(), Vec::new()));
                            (stream, end_stream)
                        }
                        Event::Data {
                            stream,
                            data,
                            end_stream,
                        } => {
                            if let Some((_, body)) = requests.get_mut(&stream) {
                                body.extend_from_slice(&data);
                            }
                            conn.release(stream, data.len());
                            (stream, end_stream)
                        }
                        Event::Trailers { stream } => (stream, true),
                        Event::Reset { stream, .. } => {
                            requests.remove(&stream);
                            continue;
                        }
                    };
                    if !done {
                        continue;
                    }
                    let Some((path, body)) = requests.remove(&stream) else {
                        continue;
                    };
                    let answer = match path.strip_prefix(b"/big/") {
                        Some(n) => {
                            let n: usize = std::str::from_utf8(n).unwrap().parse().unwrap();
                            (0..n).map(|i| i as u8).collect()
                        }
                        None => body,
                    };
                    conn.respond(
                        stream,
                        200,
                        &[(b"content-type", b"application/grpc")],
                        false,
                    );
                    conn.send_data(stream, Bytes::from(answer));
                    conn.send_trailers(stream, &[(b"grpc-status", b"0")]);
                }
                if result.is_err() || !progress {
                    break;
                }
            }
            if !conn.output().is_empty() {
                if wr.write_all(&conn.output()[..]).await.is_err() {
                    return seen;
                }
                conn.output().clear();
            }
            if conn.is_done() {
                return seen;
            }
            match rd.read_buf(&mut input).await {
                Ok(0) | Err(_) => return seen,
                Ok(_) => {}
            }
        }
    }

    async fn client(
        config: Config,
    ) -> (
        h2::client::SendRequest<Bytes>,
        tokio::task::JoinHandle<Vec<Event>>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(serve(b, Connection::new(config)));
        let (send, connection) = h2::client::handshake(a).await.expect("a handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        (send, server)
    }

    /// Sends a POST to `path` with `body`; returns the answer's status,
    /// body and `grpc-status` trailer.
    async fn call(
        send: &mut h2::client::SendRequest<Bytes>,
        path: &str,
        body: Vec<u8>,
    ) -> (u16, Vec<u8>, String) {
        let request = http::Request::post(format!("http://freshd{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let mut send = send.clone().ready().await.expect("ready");
        let (response, mut stream) = send.send_request(request, body.is_empty()).expect("sent");
        if !body.is_empty() {
            let mut body = Bytes::from(body);
            while !body.is_empty() {
                stream.reserve_capacity(body.len());
                let room = std::future::poll_fn(|cx| stream.poll_capacity(cx))
                    .await
                    .expect("capacity")
                    .expect("capacity");
                stream
                    .send_data(body.split_to(room.min(body.len())), false)
                    .expect("data");
            }
            stream.send_data(Bytes::new(), true).expect("end");
        }
        let response = response.await.expect("a response");
        let status = response.status().as_u16();
        let mut recv = response.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.expect("data");
            recv.flow_control().release_capacity(chunk.len()).unwrap();
            got.extend_from_slice(&chunk);
        }
        let trailers = recv.trailers().await.expect("trailers").unwrap_or_default();
        let grpc = trailers
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, got, grpc)
    }

    #[tokio::test]
    async fn an_h2_client_gets_its_answers_across_windows_and_frames() {
        // A 64 KiB window: bodies above it need this side's WINDOW_UPDATEs.
        let config = Config {
            initial_window: DEFAULT_WINDOW,
            ..Config::default()
        };
        let (send, server) = client(config).await;
        let mut calls = Vec::new();
        for i in 0..40usize {
            let mut send = send.clone();
            calls.push(tokio::spawn(async move {
                let body: Vec<u8> = (0..i * 7_919).map(|b| (b % 251) as u8).collect();
                let echoed = call(&mut send, "/echo", body.clone()).await;
                assert_eq!(echoed, (200, body, "0".to_owned()), "echo {i}");
                // The client's window is 64 KiB: a larger answer waits in the
                // stream for its WINDOW_UPDATEs.
                let n = i * 10_007;
                let big = call(&mut send, &format!("/big/{n}"), Vec::new()).await;
                assert_eq!(big.1.len(), n, "big {i}");
                assert!(big.1.iter().enumerate().all(|(k, &b)| b == k as u8));
                assert_eq!((big.0, big.2.as_str()), (200, "0"));
            }));
        }
        for c in calls {
            c.await.expect("a call");
        }
        drop(send);
        let events = server.await.expect("the server");
        let requests = events
            .iter()
            .filter(|e| matches!(e, Event::Request { .. }))
            .count();
        assert_eq!(requests, 80);
    }

    #[tokio::test]
    async fn a_client_reset_reaches_the_application() {
        let (send, server) = client(Config::default()).await;
        let request = http::Request::post("http://freshd/slow").body(()).unwrap();
        let mut ready = send.clone().ready().await.unwrap();
        let (_response, mut stream) = ready.send_request(request, false).unwrap();
        stream
            .send_data(Bytes::from_static(b"part"), false)
            .unwrap();
        stream.send_reset(h2::Reason::CANCEL);
        // Then a whole call on the same connection still works.
        let mut send2 = send.clone();
        assert_eq!(
            call(&mut send2, "/echo", b"after".to_vec()).await.1,
            b"after"
        );
        drop((send, send2, ready, _response, stream));
        let events = server.await.unwrap();
        assert!(
            events.contains(&Event::Reset {
                stream: 1,
                code: code::CANCEL
            }),
            "{events:?}"
        );
    }

    /// Raw frames from a client: the preface, SETTINGS, then `frames`.
    fn raw(frames: &[u8]) -> BytesMut {
        let mut out = BytesMut::from(&PREFACE[..]);
        frame::put_settings(&mut out, &[], false);
        out.extend_from_slice(frames);
        out
    }

    /// `fields` as a header block, by the encoder's rules.
    fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut block = Vec::new();
        for (n, v) in fields {
            encode_field(n.as_bytes(), v.as_bytes(), &mut block);
        }
        block
    }

    fn headers(stream: u32, fields: &[(&str, &str)], end_stream: bool) -> Vec<u8> {
        let mut out = Vec::new();
        frame::put_headers(&mut out, stream, &block(fields), end_stream, 16_384);
        out
    }

    const POST: &[(&str, &str)] = &[(":method", "POST"), (":scheme", "http"), (":path", "/p")];

    /// What [`run`] saw: events, the error, and the frames written.
    type Run = (Vec<Event>, Option<FrameError>, Vec<(u8, u32, u32)>);

    /// Runs `input` through a new connection; returns the events, the
    /// error, and the frames written after the connection's own SETTINGS
    /// and WINDOW_UPDATE: (type, stream, first payload word).
    fn run(config: Config, mut input: BytesMut) -> Run {
        let mut conn = Connection::new(config);
        let greeting = conn.output().len();
        let mut events = Vec::new();
        let mut error = None;
        loop {
            let before = input.len();
            let n = events.len();
            if let Err(e) = conn.receive(&mut input, &mut events) {
                error = Some(e);
                break;
            }
            if input.len() == before && events.len() == n {
                break;
            }
        }
        let out = conn.output().split_off(greeting);
        let mut frames = Vec::new();
        let mut rest = &out[..];
        while let Some(head) = Head::parse(rest) {
            let payload = &rest[HEAD_LEN..HEAD_LEN + head.len];
            let word = payload
                .first_chunk::<4>()
                .map_or(0, |w| u32::from_be_bytes(*w));
            // GOAWAY: its error code.
            let word = if head.kind == frame::kind::GOAWAY {
                u32::from_be_bytes(payload[4..8].try_into().unwrap())
            } else {
                word
            };
            frames.push((head.kind, head.stream, word));
            rest = &rest[HEAD_LEN + head.len..];
        }
        (events, error, frames)
    }

    #[test]
    fn broken_rules_reset_the_stream_or_end_the_connection() {
        use frame::kind::*;
        let ack = (SETTINGS, 0, 0);
        // A malformed head resets its stream; the connection goes on.
        let mut input = headers(
            1,
            &[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/p"),
                ("Bad", "x"),
            ],
            true,
        );
        input.extend(headers(3, POST, true));
        let (events, error, frames) = run(Config::default(), raw(&input));
        assert_eq!(error, None);
        assert_eq!(
            events,
            [Event::Request {
                stream: 3,
                end_stream: true
            }]
        );
        assert_eq!(frames, [ack, (RST_STREAM, 1, code::PROTOCOL_ERROR)]);

        // Past the concurrency limit: REFUSED_STREAM.
        let config = Config {
            max_concurrent_streams: 1,
            ..Config::default()
        };
        let mut input = headers(1, POST, false);
        input.extend(headers(3, POST, false));
        let (events, _, frames) = run(config, raw(&input));
        assert_eq!(
            events,
            [Event::Request {
                stream: 1,
                end_stream: false
            }]
        );
        assert_eq!(frames, [ack, (RST_STREAM, 3, code::REFUSED_STREAM)]);

        // Connection errors: a GOAWAY with the code.
        let mut data_on_idle = Vec::new();
        frame::put_data(&mut data_on_idle, 5, b"x", true);
        let mut even = Vec::new();
        even.extend(headers(2, POST, true));
        let mut interleaved = headers(1, POST, false);
        interleaved[4] &= !frame::flag::END_HEADERS;
        frame::put_ping(&mut interleaved, [0; 8], false);
        let cases: Vec<(BytesMut, &str, u32)> = vec![
            (
                BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]),
                "not an HTTP/2 client preface",
                code::PROTOCOL_ERROR,
            ),
            (
                raw(&data_on_idle),
                "DATA on an idle stream",
                code::PROTOCOL_ERROR,
            ),
            (
                raw(&even),
                "a client opened an even-numbered stream",
                code::PROTOCOL_ERROR,
            ),
            (
                raw(&interleaved),
                "a frame between a header block's frames",
                code::PROTOCOL_ERROR,
            ),
            (
                raw(&headers(1, POST, true)[..8]).split_to(24 + 9 + 8),
                "",
                0,
            ),
        ];
        for (input, what, code) in cases {
            let (_, error, frames) = run(Config::default(), input);
            if what.is_empty() {
                assert_eq!(error, None, "a partial frame waits for the rest");
                continue;
            }
            let error = error.expect(what);
            assert_eq!((error.what, error.code), (what, code));
            assert_eq!(frames.last(), Some(&(GOAWAY, 0, code)), "{what}");
        }

        // A first frame other than SETTINGS.
        let mut input = BytesMut::from(&PREFACE[..]);
        frame::put_ping(&mut input, [0; 8], false);
        let (_, error, _) = run(Config::default(), input);
        assert_eq!(
            error.map(|e| e.what),
            Some("the first frame is not SETTINGS")
        );
    }

    #[test]
    fn pings_are_answered_and_a_goaway_lets_open_streams_finish() {
        use frame::kind::*;
        let mut input = Vec::new();
        frame::put_ping(&mut input, *b"12345678", false);
        input.extend(headers(1, POST, false));
        let mut conn = Connection::new(Config::default());
        let mut events = Vec::new();
        let mut bytes = raw(&input);
        conn.receive(&mut bytes, &mut events).unwrap();
        assert_eq!(
            events,
            [Event::Request {
                stream: 1,
                end_stream: false
            }]
        );
        conn.go_away(code::NO_ERROR);
        assert!(!conn.is_done(), "stream 1 is still open");
        // A stream opened after the GOAWAY is not processed.
        let mut more = BytesMut::from(&headers(3, POST, true)[..]);
        frame::put_data(&mut more, 1, b"body", true);
        events.clear();
        while !more.is_empty() {
            conn.receive(&mut more, &mut events).unwrap();
        }
        assert_eq!(
            events,
            [Event::Data {
                stream: 1,
                data: Bytes::from_static(b"body"),
                end_stream: true
            }]
        );
        conn.respond(1, 200, &[], false);
        conn.send_data(1, Bytes::from_static(b"answer"));
        conn.send_trailers(1, &[(b"grpc-status", b"0")]);
        assert!(conn.is_done());
        let out = conn.output().clone();
        let kinds: Vec<u8> = {
            let mut rest = &out[..];
            let mut kinds = Vec::new();
            while let Some(head) = Head::parse(rest) {
                kinds.push(head.kind);
                rest = &rest[HEAD_LEN + head.len..];
            }
            kinds
        };
        assert_eq!(
            kinds,
            [
                SETTINGS,
                WINDOW_UPDATE,
                SETTINGS,
                PING,
                GOAWAY,
                HEADERS,
                DATA,
                HEADERS
            ]
        );
    }

    /// A connection whose peer opened stream 1 (its request ended when
    /// `end_stream`) with an initial stream window of `window` bytes; its
    /// output so far cleared.
    fn opened_with_window(end_stream: bool, window: u32) -> (Connection, Vec<Event>) {
        let mut conn = Connection::new(Config::default());
        let mut input = raw(&headers(1, POST, end_stream));
        frame::put_settings(&mut input, &[(setting::INITIAL_WINDOW_SIZE, window)], false);
        let mut events = Vec::new();
        while !input.is_empty() {
            conn.receive(&mut input, &mut events).unwrap();
        }
        conn.output().clear();
        (conn, events)
    }

    #[test]
    fn data_waits_for_the_peers_windows_in_order() {
        // The peer's initial stream window: 10 bytes.
        let (mut conn, mut events) = opened_with_window(true, 10);
        conn.respond(1, 200, &[], false);
        conn.send_data(1, Bytes::from_static(b"0123456789abcdef"));
        conn.send_trailers(1, &[(b"grpc-status", b"0")]);
        assert_eq!(conn.waiting(1), 6);
        let written = conn.output().split();
        assert!(written.ends_with(b"0123456789"));
        // Raising the initial window lets the rest go, then the trailers.
        let mut input = BytesMut::new();
        frame::put_settings(&mut input, &[(setting::INITIAL_WINDOW_SIZE, 100)], false);
        conn.receive(&mut input, &mut events).unwrap();
        assert_eq!(conn.waiting(1), 0);
        let written = conn.output().split();
        let tail = b"abcdef";
        let at = written
            .windows(tail.len())
            .position(|w| w == tail)
            .expect("the rest");
        let after = Head::parse(&written[at + tail.len()..]).expect("the trailers");
        assert_eq!(
            (after.kind, after.flags & frame::flag::END_STREAM),
            (frame::kind::HEADERS, frame::flag::END_STREAM)
        );
        assert_eq!(conn.open_streams(), 0);
    }

    /// Messages that waited for the windows leave together, in as few
    /// DATA frames as the windows allow: a slow reader of small messages
    /// gets a few large frames, not one per message.
    #[test]
    fn waiting_data_leaves_in_frames_as_large_as_the_windows_allow() {
        let (mut conn, mut events) = opened_with_window(false, 10);
        conn.respond(1, 200, &[], false);
        conn.output().clear();
        for message in [&b"0123"[..], b"4567", b"89ab", b"cdef", b"ghij"] {
            conn.send_data(1, Bytes::copy_from_slice(message));
        }
        // Two messages and a piece of the third within the 10 bytes.
        let data = |written: &[u8]| {
            let mut rest = written;
            let mut frames = Vec::new();
            while let Some(head) = Head::parse(rest) {
                if head.kind == frame::kind::DATA {
                    frames.push(rest[HEAD_LEN..HEAD_LEN + head.len].to_vec());
                }
                rest = &rest[HEAD_LEN + head.len..];
            }
            frames
        };
        let sent = data(&conn.output().split());
        assert_eq!(sent.concat(), b"0123456789");
        assert_eq!(conn.waiting(1), 10);
        // A larger window lets the rest go as one frame.
        let mut input = BytesMut::new();
        frame::put_settings(&mut input, &[(setting::INITIAL_WINDOW_SIZE, 100)], false);
        conn.receive(&mut input, &mut events).unwrap();
        assert_eq!(data(&conn.output().split()), [b"abcdefghij".to_vec()]);
        assert_eq!(conn.waiting(1), 0);
        // Past the window again, a window update lets out only what it
        // covers, in one frame, and the rest waits.
        for message in [&b"0123456789"[..]; 10] {
            conn.send_data(1, Bytes::copy_from_slice(message));
        }
        conn.output().clear();
        assert_eq!(conn.waiting(1), 20);
        let mut input = BytesMut::new();
        frame::put_window_update(&mut input, 1, 15);
        conn.receive(&mut input, &mut events).unwrap();
        assert_eq!(data(&conn.output().split()), [b"012345678901234".to_vec()]);
        assert_eq!(conn.waiting(1), 5);
    }

    #[test]
    fn encoded_data_goes_straight_out_or_waits_like_any_other() {
        let (mut conn, mut events) = opened_with_window(false, 10);
        // No headers yet: the stream takes no data.
        assert_eq!(conn.open_for_data(1), None);
        conn.respond(1, 200, &[], false);
        conn.output().clear();
        assert_eq!(conn.open_for_data(1), Some(0));
        // Within the window: one DATA frame, as send_data writes it.
        let wrote = conn.send_data_in_place(1, |waiting, out| {
            assert_eq!(waiting, 0);
            out.extend_from_slice(b"0123");
            true
        });
        assert_eq!(wrote, Some(true));
        let mut expected = BytesMut::new();
        frame::put_data(&mut expected, 1, b"0123", false);
        assert_eq!(conn.output().split(), expected);
        // Past it: the bytes wait, in order, behind nothing else.
        let wrote = conn.send_data_in_place(1, |_, out| {
            out.extend_from_slice(b"456789ab");
            true
        });
        assert_eq!(wrote, Some(true));
        assert_eq!(conn.open_for_data(1), Some(2));
        // Nothing encoded: nothing written, not even a head.
        let before = conn.output().len();
        assert_eq!(
            conn.send_data_in_place(1, |waiting, _| waiting == 0),
            Some(false)
        );
        assert_eq!(conn.output().len(), before);
        let written = conn.output().split();
        assert!(written.ends_with(b"456789"), "{written:?}");
        // Once its end is queued, the stream takes no more.
        conn.send_trailers(1, &[(b"grpc-status", b"0")]);
        assert_eq!(conn.open_for_data(1), None);
        assert_eq!(conn.send_data_in_place(1, |_, _| unreachable!()), None);
        let mut input = BytesMut::new();
        frame::put_settings(&mut input, &[(setting::INITIAL_WINDOW_SIZE, 100)], false);
        conn.receive(&mut input, &mut events).unwrap();
        let written = conn.output().split();
        let at = written
            .windows(2)
            .position(|w| w == b"ab")
            .expect("the rest");
        let after = Head::parse(&written[at + 2..]).expect("the trailers");
        assert_eq!(after.kind, frame::kind::HEADERS);
        // Its end written, the stream is gone.
        assert_eq!(conn.open_for_data(1), None);
        assert_eq!(conn.open_for_data(3), None);
    }

    #[test]
    fn windows_are_held_to_their_bounds() {
        use frame::kind::*;
        let ack = (SETTINGS, 0, 0);
        // A stream sending past its window while the connection's has
        // room: the stream is reset with FLOW_CONTROL_ERROR.
        let config = Config {
            initial_window: DEFAULT_WINDOW,
            ..Config::default()
        };
        let mut conn = Connection::new(config);
        let mut events = Vec::new();
        let mut input = headers(1, POST, false);
        input.extend(headers(3, POST, false));
        let mut input = raw(&input);
        frame::put_data(&mut input, 1, &[0; 15_000], false);
        frame::put_data(&mut input, 1, &[0; 15_000], false);
        frame::put_data(&mut input, 3, &[0; 15_000], false);
        frame::put_data(&mut input, 3, &[0; 15_000], false);
        while !input.is_empty() {
            conn.receive(&mut input, &mut events).unwrap();
        }
        // Everything is released: the connection's 60,000 bytes (over half
        // its window) are handed back, stream 1's 30,000 (under half of
        // its own) are not.
        conn.output().clear();
        conn.release(1, 30_000);
        conn.release(3, 30_000);
        let updates = conn.output().split();
        assert_eq!(
            &updates[..],
            &{
                let mut expected = Vec::new();
                frame::put_window_update(&mut expected, 0, 60_000);
                expected
            }[..]
        );
        frame::put_data(&mut input, 1, &[0; 16_000], false);
        frame::put_data(&mut input, 1, &[0; 16_000], false);
        frame::put_data(&mut input, 1, &[0; 8_000], false);
        events.clear();
        conn.receive(&mut input, &mut events).unwrap();
        assert_eq!(
            events.last(),
            Some(&Event::Reset {
                stream: 1,
                code: code::FLOW_CONTROL_ERROR
            })
        );
        assert_eq!(conn.open_streams(), 1);

        // Data not released holds the connection's window: a client that
        // keeps sending on streams nobody reads runs into it.
        let mut input = Vec::new();
        for stream in [1, 3, 5, 7, 9] {
            input.extend(headers(stream, POST, false));
            frame::put_data(&mut input, stream, &[0; 16_000], false);
        }
        let (_, error, _) = run(config, raw(&input));
        assert_eq!(
            error.map(|e| e.what),
            Some("DATA beyond the connection's window")
        );

        // A connection window pushed past 2^31-1: the connection ends.
        let mut input = Vec::new();
        frame::put_window_update(&mut input, 0, frame::MAX_WINDOW);
        let (_, error, frames) = run(Config::default(), raw(&input));
        assert_eq!(error.map(|e| e.code), Some(code::FLOW_CONTROL_ERROR));
        assert_eq!(frames.last(), Some(&(GOAWAY, 0, code::FLOW_CONTROL_ERROR)));

        // Trailers that do not end the request: the stream is reset.
        let mut input = headers(1, POST, false);
        input.extend(headers(1, &[("x-trailer", "1")], false));
        let (_, error, frames) = run(Config::default(), raw(&input));
        assert_eq!(error, None);
        assert_eq!(frames, [ack, (RST_STREAM, 1, code::PROTOCOL_ERROR)]);

        // A header list over the limit: 431, and the connection goes on.
        let config = Config {
            max_header_list: 200,
            ..Config::default()
        };
        let long = "v".repeat(300);
        let mut input = headers(
            1,
            &[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/p"),
                ("x-long", &long),
            ],
            true,
        );
        input.extend(headers(3, POST, true));
        let (events, error, frames) = run(config, raw(&input));
        assert_eq!(error, None);
        assert_eq!(
            events,
            [Event::Request {
                stream: 3,
                end_stream: true
            }]
        );
        let kinds: Vec<(u8, u32)> = frames.iter().map(|f| (f.0, f.1)).collect();
        assert_eq!(kinds, [(SETTINGS, 0), (HEADERS, 1)]);
        // :status 431 is not in the static table: a literal with the name
        // indexed (8), then "431".
        assert_eq!(frames[1].2.to_be_bytes(), [0x08, 0x03, b'4', b'3']);
    }

    #[test]
    fn an_endless_header_block_ends_the_connection() {
        let config = Config {
            max_header_list: 1024,
            ..Config::default()
        };
        let mut input = Vec::new();
        frame::put_head(&mut input, 1, frame::kind::HEADERS, 0, 1);
        input.push(0x82);
        for _ in 0..5 {
            frame::put_head(&mut input, 1000, frame::kind::CONTINUATION, 0, 1);
            input.extend_from_slice(&[0x82; 1000]);
        }
        let (_, error, frames) = run(config, raw(&input));
        assert_eq!(error.map(|e| e.code), Some(code::ENHANCE_YOUR_CALM));
        assert_eq!(frames.last().map(|f| f.0), Some(frame::kind::GOAWAY));
    }

    #[test]
    fn a_self_dependent_request_is_reset_but_feeds_the_hpack_table() {
        // Stream 1 depends on itself; its block adds "x-id: 7" to the
        // table, which stream 3's block then names by index.
        let mut first = block(POST);
        first.extend_from_slice(b"\x40\x04x-id\x017");
        let mut input = Vec::new();
        let flags = frame::flag::PRIORITY | frame::flag::END_HEADERS | frame::flag::END_STREAM;
        frame::put_head(&mut input, 5 + first.len(), frame::kind::HEADERS, flags, 1);
        input.extend_from_slice(&[0, 0, 0, 1, 16]);
        input.extend_from_slice(&first);
        let mut second = block(POST);
        second.push(0xbe);
        frame::put_headers(&mut input, 3, &second, true, 16_384);

        let mut conn = Connection::new(Config::default());
        let mut bytes = raw(&input);
        let mut events = Vec::new();
        conn.receive(&mut bytes, &mut events).unwrap();
        assert_eq!(
            events,
            [Event::Request {
                stream: 3,
                end_stream: true
            }]
        );
        assert_eq!(conn.head().get(b"x-id"), Some(&b"7"[..]));
        let out = conn.output().split();
        let rst = [0, 0, 4, frame::kind::RST_STREAM, 0, 0, 0, 0, 1, 0, 0, 0, 1];
        assert!(out.windows(rst.len()).any(|w| w == rst), "stream 1 reset");
    }

    #[test]
    fn a_broken_connection_reads_nothing_more() {
        let mut conn = Connection::new(Config::default());
        let mut events = Vec::new();
        let mut bytes = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        let error = conn.receive(&mut bytes, &mut events).unwrap_err();
        conn.output().clear();
        let mut more = raw(&headers(1, POST, true));
        assert_eq!(conn.receive(&mut more, &mut events), Err(error));
        assert!(events.is_empty() && conn.output().is_empty());
        assert!(conn.is_done());
    }
}
