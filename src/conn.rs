//! One HTTP/2 connection, served with freshd's own HTTP/2 state machine
//! ([`crate::http2::connection`]): the task that owns the socket, the
//! requests' bodies, their answers, and the outbox a Watch stream's task
//! writes its messages through.
//!
//! The connection's state sits behind one short lock (`Shared`). Its task
//! (the driver) reads from the socket, hands the bytes to the state machine
//! under the lock, and then, outside it, runs what the frames asked for;
//! it writes the state machine's output with the lock released. Every
//! other task that answers on the connection (a Watch stream's, an answer
//! that had to wait, a body copied from tonic) takes the lock, adds its
//! frames to the output and wakes the driver when it is parked. No lock is
//! held across an `.await`, and the answers that one read brought in leave
//! in one write.
//!
//! A publish writes the notices of a parked Watch stream itself
//! (the connection's [`Express`] writing, driven by a [`crate::fanout::Delivery`]): under the
//! lock it adds the message to the output and, on plain TCP, writes the
//! output to the socket with one non-blocking write, as long as the driver
//! holds nothing of its own to write (so the bytes keep their order). What
//! the socket does not take is left to the driver, which is woken for it.
//! A notice then costs no wake-up of the stream's task or of the driver.
//!
//! The unary calls the router serves itself (`Check`, `CheckBatch`,
//! `Publish`, `Fill`, `Lease`) are admitted from their head (deadline,
//! encoding, token), their one message is collected as its DATA frames
//! come, and the call is run in place by the driver once the message is
//! whole: an answer from memory costs no task, channel or body of its own.
//! One that waits is spawned. A Watch stream, and a call to any other
//! service (tonic's handlers: health, reflection, the rest of the
//! Coordinator), gets its body as a [`RequestBody`] fed by the driver.
//!
//! Flow control: received data holds the peer's windows until it is
//! consumed (a collected message at once, a streamed body when read). An
//! answer's data goes out as the peer's windows allow, and what they do not
//! cover waits in the stream; a writer whose stream holds more than
//! [`ConnLimits::stream_buffer`] waits for room, and so does every writer
//! while the connection holds more than [`ConnLimits::connection_buffer`]
//! the socket has not taken:
//! a Watch stream whose reader stops leaves its notices to its queue in the
//! hub (where a slow consumer overflows into a repair).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, Request};
use http_body::{Body as HttpBody, Frame, SizeHint};
use parking_lot::{Mutex, MutexGuard};
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tonic::body::Body;
use tonic::Status;

use crate::auth::Principal;
use crate::fanout::{Express, ExpressWriter, Flush, StreamWrites, Wrote};
use crate::http2::connection::{Config, Connection, Event};
use crate::http2::frame::code;
use crate::http2::head::RequestHead;
use crate::pb;
use crate::routes::{Answer, Deadline, Routes, Unary};
use crate::tls::ConnInfo;
use crate::watch::{Gone, Outbox};

/// What one connection may hold: its streams, and the answers its client
/// has not taken yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Most streams open at once (`max_concurrent_streams`); one past it is
    /// refused with `REFUSED_STREAM`.
    pub max_streams: u32,
    /// Bytes one stream's answer may hold beyond what the peer's windows
    /// let out before its writer waits (`stream_send_buffer_bytes`).
    pub stream_buffer: usize,
    /// Bytes the connection may hold that the socket has not taken before
    /// every writer waits (`connection_send_buffer_bytes`).
    pub connection_buffer: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_streams: 10_000,
            stream_buffer: 64 * 1024,
            connection_buffer: 1024 * 1024,
        }
    }
}

/// The HTTP/2 settings freshd offers: a 1 MiB window per stream and for the
/// connection, 16 KiB frames and header lists, and `max_streams` streams
/// open at once (`max_concurrent_streams`).
fn settings(max_streams: u32) -> Config {
    Config {
        max_concurrent_streams: max_streams,
        initial_window: 1024 * 1024,
        max_frame_size: 16 * 1024,
        max_header_list: 16 * 1024,
    }
}

/// Bytes read from the socket at a time.
const READ_BYTES: usize = 32 * 1024;

thread_local! {
    /// Where a connection's socket is read into, shared by the connections
    /// a thread drives (a read copies what it got into the connection's
    /// input at once), so an idle connection holds no read buffer.
    static READ: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; READ_BYTES].into_boxed_slice());
}

/// A connection's state, shared by its driver and the tasks answering on
/// it.
pub(crate) struct Shared {
    state: Mutex<State>,
}

struct State {
    conn: Connection,
    /// The streams this side still answers or reads, by identifier.
    slots: hashbrown::HashMap<u32, Slot, foldhash::fast::RandomState>,
    /// The driver, while it is parked.
    driver: Option<Waker>,
    /// Streams whose writer waits for room in the peer's windows or in
    /// the socket.
    room: Vec<u32>,
    /// Bytes the driver took from the output and has not written yet.
    unwritten: usize,
    limits: ConnLimits,
    /// The plain TCP socket, which others write while the driver holds
    /// nothing of its own to write (`unwritten` is 0): the output goes to
    /// the socket in order either way. None under TLS, and once the driver
    /// is done.
    socket: Option<Arc<tokio::net::TcpStream>>,
}

impl State {
    /// Whether a writer of `stream` must wait: the stream holds more than
    /// its buffer of what the windows do not cover, or the connection more
    /// than its buffer of what the socket has not taken: a client that
    /// opens its windows wide and stops reading holds about that much in
    /// the server, not its windows' worth.
    fn full(&mut self, stream: u32) -> bool {
        let waiting = self.conn.waiting(stream);
        self.over_limits(waiting)
    }

    /// Whether a stream holding `waiting` bytes, on this connection, is
    /// past its room.
    fn over_limits(&mut self, waiting: usize) -> bool {
        let pending = self.pending();
        past_room(&self.limits, waiting, pending)
    }

    /// What the connection holds that the socket has not taken, the bytes
    /// `connection_buffer` bounds.
    fn pending(&mut self) -> usize {
        self.unwritten + self.conn.output().len()
    }

    /// Wakes the writers that have room again.
    fn wake_room(&mut self) {
        let mut i = 0;
        while i < self.room.len() {
            let stream = self.room[i];
            if self.slots.contains_key(&stream) && self.full(stream) {
                i += 1;
                continue;
            }
            self.room.swap_remove(i);
            if let Some(writer) = self.slots.get_mut(&stream).and_then(|s| s.writer.take()) {
                writer.wake();
            }
        }
    }

    /// Writes the output to the socket here, if the driver holds nothing
    /// of its own to write, as much as the socket takes without waiting;
    /// wakes the driver for the rest.
    fn write_through(&mut self) {
        if self.unwritten == 0 {
            if let Some(socket) = &self.socket {
                let out = self.conn.output();
                let before = out.len();
                // Straight to the (non-blocking) socket, past the runtime's
                // readiness record: that is one more cache miss per write,
                // and a write refused here leaves the record saying
                // "writable", which costs the driver at most one try.
                let socket = socket2::SockRef::from(socket.as_ref());
                while !out.is_empty() {
                    match socket.send_with_flags(out, SEND_FLAGS) {
                        Ok(n) if n > 0 => out.advance(n),
                        // The driver meets the error (or the would-block)
                        // on its own write.
                        _ => break,
                    }
                }
                if out.len() < before && !self.room.is_empty() {
                    self.wake_room();
                }
            }
        }
        self.wake_driver();
    }

    /// Wakes the driver if it is parked and there is output to write.
    fn wake_driver(&mut self) {
        if !self.conn.output().is_empty() {
            if let Some(driver) = self.driver.take() {
                driver.wake();
            }
        }
    }

    /// Forgets a stream, waking whoever waits on it: they find it gone.
    fn forget(&mut self, stream: u32) {
        if let Some(slot) = self.slots.remove(&stream) {
            slot.wake();
        }
    }

    /// Answers `stream` with `status` in the headers alone.
    fn refuse(&mut self, stream: u32, status: &Status) {
        let mut fields = HeaderMap::with_capacity(3);
        fields.insert(http::header::CONTENT_TYPE, GRPC);
        if status.add_header(&mut fields).is_err() {
            self.conn.cancel(stream, code::INTERNAL_ERROR);
        } else {
            self.conn.respond(stream, 200, &pairs(&fields), true);
        }
        self.forget(stream);
    }
}

/// Flags of a write-through's `send`: a peer that has gone away is an
/// error, not a SIGPIPE.
#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_FLAGS: i32 = libc::MSG_NOSIGNAL;
/// Flags of a write-through's `send` (Rust programs ignore SIGPIPE).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_FLAGS: i32 = 0;

/// What this side holds for one stream.
struct Slot {
    inbound: Inbound,
    /// The task answering the stream, waiting for room or for the end.
    writer: Option<Waker>,
}

impl Slot {
    /// A stream whose body a task reads (`end`: it has none).
    fn body(end: bool) -> Self {
        Slot {
            inbound: Inbound::Body {
                queue: VecDeque::new(),
                end,
                reader: None,
            },
            writer: None,
        }
    }

    /// A stream whose body nobody reads.
    fn ignored() -> Self {
        Slot {
            inbound: Inbound::Ignored,
            writer: None,
        }
    }

    /// Wakes whoever waits on the stream.
    fn wake(self) {
        if let Some(writer) = self.writer {
            writer.wake();
        }
        if let Inbound::Body {
            reader: Some(reader),
            ..
        } = self.inbound
        {
            reader.wake();
        }
    }
}

/// A stream's request body, as this side takes it.
enum Inbound {
    /// A unary call the router serves itself: its message, collected.
    Unary(Box<Collecting>),
    /// A body read by a task, through a [`RequestBody`].
    Body {
        queue: VecDeque<Bytes>,
        end: bool,
        reader: Option<Waker>,
    },
    /// Nothing more is read: what comes is handed back at once.
    Ignored,
}

/// A unary call admitted from its head, its message still coming.
pub(crate) struct Collecting {
    pub(crate) method: Unary,
    pub(crate) who: Option<Arc<Principal>>,
    pub(crate) deadline: Deadline,
    message: OneMessage,
}

impl Collecting {
    pub(crate) fn new(method: Unary, who: Option<Arc<Principal>>, deadline: Deadline) -> Self {
        Collecting {
            method,
            who,
            deadline,
            message: OneMessage::default(),
        }
    }
}

/// A unary call's one message, collected from its DATA frames.
#[derive(Default)]
struct OneMessage {
    /// The first piece: most requests come in one frame, with no copy.
    first: Bytes,
    /// The pieces joined, once there is more than one.
    joined: BytesMut,
}

impl OneMessage {
    fn have(&self) -> &[u8] {
        if self.joined.is_empty() {
            &self.first
        } else {
            &self.joined
        }
    }

    /// Adds a piece; refused as soon as the prefix announces more than
    /// `max` bytes or the body holds more than one message, so a body that
    /// never ends is not buffered.
    fn push(&mut self, data: Bytes, max: usize) -> Result<(), Status> {
        if self.first.is_empty() && self.joined.is_empty() {
            self.first = data;
        } else {
            if self.joined.is_empty() {
                self.joined.extend_from_slice(&self.first);
            }
            self.joined.extend_from_slice(&data);
        }
        let have = self.have();
        if have.len() >= 5 {
            let len = message_len(have, max)?;
            if have.len() > 5 + len {
                return Err(more_than_one(have.len() - 5 - len));
            }
        }
        Ok(())
    }

    /// The message, without its 5-byte prefix, once the body has ended.
    fn finish(self, max: usize) -> Result<Bytes, Status> {
        let mut body = if self.joined.is_empty() {
            self.first
        } else {
            self.joined.freeze()
        };
        if body.len() < 5 {
            return Err(Status::invalid_argument(
                "a unary call's request must be one message; the body held none",
            ));
        }
        let len = message_len(&body, max)?;
        let held = body.len() - 5;
        if held < len {
            return Err(Status::invalid_argument(format!(
                "the request's body ended inside its message: {held} of {len} bytes"
            )));
        }
        body.advance(5);
        Ok(body)
    }
}

/// The status of a unary call's body with `extra` bytes after its message.
fn more_than_one(extra: usize) -> Status {
    Status::invalid_argument(format!(
        "a unary call's request must be one message; the body held {extra} bytes after it"
    ))
}

/// The length a gRPC message prefix (at the start of `have`) announces;
/// refused when it is compressed (freshd accepts none) or above `max`.
fn message_len(have: &[u8], max: usize) -> Result<usize, Status> {
    if have[0] != 0 {
        // The gRPC spec: a compressed flag without a grpc-encoding (the
        // router refuses any but identity) is INTERNAL.
        return Err(Status::internal(format!(
            "protocol error: a message with compressed-flag {} but no grpc-encoding",
            have[0]
        )));
    }
    let len = u32::from_be_bytes([have[1], have[2], have[3], have[4]]) as usize;
    if len > max {
        return Err(Status::out_of_range(format!(
            "a request message of {len} bytes exceeds the limit of {max} (max_message_bytes)"
        )));
    }
    Ok(len)
}

impl Shared {
    fn new(limits: ConnLimits, socket: Option<Arc<tokio::net::TcpStream>>) -> Arc<Self> {
        Arc::new(Shared {
            state: Mutex::new(State {
                conn: Connection::new(settings(limits.max_streams)),
                slots: Default::default(),
                driver: None,
                room: Vec::new(),
                unwritten: 0,
                limits,
                socket,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }
}

/// What the driver runs once it has let go of the lock.
enum Job {
    /// A unary call whose message is whole.
    Unary {
        stream: u32,
        call: Box<Collecting>,
        message: Bytes,
    },
    /// A Watch stream to open.
    Watch {
        stream: u32,
        who: Option<Arc<Principal>>,
        timeout: Option<Duration>,
    },
    /// A call for tonic's handlers.
    Call {
        stream: u32,
        request: Request<RequestBody>,
    },
}

/// Serves `io` within `limits` (a stream past `max_streams` is refused
/// with `REFUSED_STREAM`) until the peer closes it, it fails, or
/// `finishing` fires; then tells the peer to finish (GOAWAY:
/// streams in flight complete, new ones are refused) and returns once the
/// last stream has ended. `socket`, when given, is the TCP socket under
/// `io`, which fan-outs then write themselves while the driver has
/// nothing to write.
pub(crate) async fn serve<IO>(
    io: IO,
    socket: Option<Arc<tokio::net::TcpStream>>,
    routes: Routes,
    limits: ConnLimits,
    info: ConnInfo,
    mut finishing: watch::Receiver<()>,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut driver = Driver {
        io,
        shared: Shared::new(limits, socket),
        calls: Calls {
            routes,
            info,
            jobs: Vec::new(),
        },
        input: BytesMut::new(),
        writing: BytesMut::new(),
        flushed: true,
        events: Vec::new(),
        read_closed: false,
        broken: false,
    };
    // One wait for the signal, kept for the connection's life. Once it is
    // registered, it is polled again only when the signal has come: polling
    // it takes a lock that every connection shares, and the driver is woken
    // for every message it writes.
    let probe = finishing.clone();
    let mut finish = std::pin::pin!(finishing.changed());
    let (mut registered, mut finished) = (false, false);
    std::future::poll_fn(|cx| {
        if !finished
            && (!registered || probe.has_changed().unwrap_or(true))
            && finish.as_mut().poll(cx).is_ready()
        {
            finished = true;
            let mut state = driver.shared.lock();
            state.conn.go_away(code::NO_ERROR);
        }
        registered = true;
        driver.poll(cx)
    })
    .await;
    driver.close();
    driver.linger().await;
}

/// How long a finished connection reads (and drops) what the peer still
/// sends after this side's GOAWAY, before it closes the socket.
const LINGER: Duration = Duration::from_secs(1);

/// The task that owns a connection's socket.
struct Driver<IO> {
    io: IO,
    shared: Arc<Shared>,
    calls: Calls,
    /// Bytes read and not yet taken as whole frames.
    input: BytesMut,
    /// Output being written.
    writing: BytesMut,
    /// Everything written has been flushed.
    flushed: bool,
    events: Vec<Event>,
    /// The peer closed its side.
    read_closed: bool,
    /// The peer broke a connection rule: the GOAWAY is written, then the
    /// connection ends.
    broken: bool,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Driver<IO> {
    /// Reads, runs and writes until nothing is ready; done when the
    /// connection is over.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut read = false;
            // Held from the calls of a read until this connection's answers
            // are written: a publisher hears back before the notices of its
            // publish go to the subscribers' sockets.
            let mut later = None;
            if !self.read_closed && !self.broken {
                let io = &mut self.io;
                let input = &mut self.input;
                let polled = READ.with_borrow_mut(|scratch| {
                    let mut buf = ReadBuf::new(scratch);
                    let polled = Pin::new(io).poll_read(cx, &mut buf);
                    input.extend_from_slice(buf.filled());
                    polled.map_ok(|()| buf.filled().len())
                });
                match polled {
                    Poll::Ready(Ok(0)) => self.read_closed = true,
                    Poll::Ready(Ok(_)) => {
                        self.receive();
                        later = Some(crate::fanout::DeliverLater::start());
                        self.calls.run_jobs(&self.shared);
                        read = true;
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(error = %e, "connection read failed");
                        return Poll::Ready(());
                    }
                    Poll::Pending => {}
                }
            }
            if let Poll::Ready(Err(e)) = self.poll_write(cx) {
                tracing::debug!(error = %e, "connection write failed");
                return Poll::Ready(());
            }
            drop(later);
            let mut state = self.shared.lock();
            let idle = self.writing.is_empty() && state.conn.output().is_empty();
            if idle && (self.read_closed || self.broken || state.conn.is_done()) {
                return Poll::Ready(());
            }
            if read || (self.writing.is_empty() && !idle) {
                continue;
            }
            state.driver = Some(cx.waker().clone());
            return Poll::Pending;
        }
    }

    /// Writes the output: what is being written, then what the state
    /// machine gathered since; flushes once all is written.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            if self.writing.is_empty() {
                let mut state = self.shared.lock();
                let written = std::mem::take(&mut state.unwritten);
                if written > 0 && !state.room.is_empty() {
                    state.wake_room();
                }
                let out = state.conn.output();
                if out.is_empty() {
                    break;
                }
                // Swapped, not copied: the state keeps the old buffer's
                // room for what comes next.
                std::mem::swap(&mut self.writing, out);
                state.unwritten = self.writing.len();
            }
            while !self.writing.is_empty() {
                let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.writing))?;
                if n == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                self.writing.advance(n);
                self.flushed = false;
            }
            self.writing.clear();
        }
        if !self.flushed {
            std::task::ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.flushed = true;
        }
        Poll::Ready(Ok(()))
    }

    /// Hands the bytes read to the state machine and takes in what they
    /// mean, under the lock; the calls they start are run after it.
    fn receive(&mut self) {
        let mut state = self.shared.lock();
        loop {
            self.events.clear();
            let result = state.conn.receive(&mut self.input, &mut self.events);
            let any = !self.events.is_empty();
            for event in self.events.drain(..) {
                self.calls.event(&self.shared, &mut state, event);
            }
            if let Err(e) = result {
                tracing::debug!(error = %e.what, "the peer broke an HTTP/2 rule");
                self.broken = true;
                break;
            }
            if !any {
                break;
            }
        }
        // Window updates may have made room for waiting writers.
        if !state.room.is_empty() {
            state.wake_room();
        }
    }

    /// Closes this side of the socket, then reads until the peer closes
    /// its side (for at most [`LINGER`]). Closing a socket with unread
    /// bytes in it resets the connection, and the peer may then lose the
    /// GOAWAY and the answers before it.
    async fn linger(&mut self) {
        let io = &mut self.io;
        let read_closed = self.read_closed;
        let _ = tokio::time::timeout(LINGER, async move {
            if tokio::io::AsyncWriteExt::shutdown(io).await.is_err() || read_closed {
                return;
            }
            let mut dropped = [0; 1024];
            while let Ok(n) = tokio::io::AsyncReadExt::read(io, &mut dropped).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }

    /// The connection is over: whoever waits on one of its streams finds
    /// it gone.
    fn close(&mut self) {
        let mut state = self.shared.lock();
        for (_, slot) in state.slots.drain() {
            slot.wake();
        }
        state.room.clear();
        state.socket = None;
    }
}

/// What a connection's requests are routed to, and the calls the last
/// read started.
struct Calls {
    routes: Routes,
    info: ConnInfo,
    jobs: Vec<Job>,
}

impl Calls {
    /// Takes in one event of the read, under the lock.
    fn event(&mut self, shared: &Arc<Shared>, state: &mut State, event: Event) {
        match event {
            Event::Request { stream, end_stream } => {
                self.request(shared, state, stream, end_stream)
            }
            Event::Data {
                stream,
                data,
                end_stream,
            } => self.data(state, stream, data, end_stream),
            Event::Trailers { stream } => self.data(state, stream, Bytes::new(), true),
            Event::Reset { stream, .. } => state.forget(stream),
        }
    }

    /// A new request: admitted (or refused) from its head, and routed.
    fn request(&mut self, shared: &Arc<Shared>, state: &mut State, stream: u32, end_stream: bool) {
        let head = state.conn.head();
        let path = head.path();
        if let Some(direct) = self.routes.direct_calls() {
            if let Some(method) = Unary::of(path) {
                match direct.admit(head, &self.info) {
                    Ok((who, timeout)) => {
                        let call = Collecting::new(method, who, Deadline::after(timeout));
                        state.slots.insert(
                            stream,
                            Slot {
                                inbound: Inbound::Unary(Box::new(call)),
                                writer: None,
                            },
                        );
                        if end_stream {
                            self.data(state, stream, Bytes::new(), true);
                        }
                    }
                    Err(status) => {
                        state.slots.insert(stream, Slot::ignored());
                        state.refuse(stream, &status);
                    }
                }
                return;
            }
            if path == crate::routes::WATCH.as_bytes() {
                match direct.admit(head, &self.info) {
                    Ok((who, timeout)) => {
                        state.slots.insert(stream, Slot::body(end_stream));
                        self.jobs.push(Job::Watch {
                            stream,
                            who,
                            timeout,
                        });
                    }
                    Err(status) => {
                        state.slots.insert(stream, Slot::ignored());
                        state.refuse(stream, &status);
                    }
                }
                return;
            }
        }
        let body = RequestBody {
            shared: shared.clone(),
            stream,
            done: end_stream,
        };
        match http_request(head, body) {
            Ok(request) => {
                state.slots.insert(stream, Slot::body(end_stream));
                self.jobs.push(Job::Call { stream, request });
            }
            Err(what) => {
                state.slots.insert(stream, Slot::ignored());
                state.refuse(stream, &Status::invalid_argument(what));
            }
        }
    }

    /// Some of a request's body (`end` when it is complete).
    fn data(&mut self, state: &mut State, stream: u32, data: Bytes, end: bool) {
        let len = data.len();
        let Some(slot) = state.slots.get_mut(&stream) else {
            state.conn.release(stream, len);
            return;
        };
        match &mut slot.inbound {
            Inbound::Ignored => state.conn.release(stream, len),
            Inbound::Body {
                queue,
                end: e,
                reader,
            } => {
                if !data.is_empty() {
                    queue.push_back(data);
                }
                *e |= end;
                if let Some(reader) = reader.take() {
                    reader.wake();
                }
            }
            Inbound::Unary(call) => {
                state.conn.release(stream, len);
                let max = self
                    .routes
                    .direct_calls()
                    .map_or(0, |d| d.max_message_bytes());
                let pushed = if data.is_empty() {
                    Ok(())
                } else {
                    call.message.push(data, max)
                };
                if let Err(status) = pushed {
                    slot.inbound = Inbound::Ignored;
                    return state.refuse(stream, &status);
                }
                if !end {
                    return;
                }
                let Inbound::Unary(mut call) =
                    std::mem::replace(&mut slot.inbound, Inbound::Ignored)
                else {
                    unreachable!("matched above")
                };
                match std::mem::take(&mut call.message).finish(max) {
                    Ok(message) => self.jobs.push(Job::Unary {
                        stream,
                        call,
                        message,
                    }),
                    Err(status) => state.refuse(stream, &status),
                }
            }
        }
    }

    /// Runs what the last read started, with the lock let go.
    fn run_jobs(&mut self, shared: &Arc<Shared>) {
        for job in self.jobs.drain(..) {
            let responder = Responder {
                shared: shared.clone(),
                stream: match &job {
                    Job::Unary { stream, .. }
                    | Job::Watch { stream, .. }
                    | Job::Call { stream, .. } => *stream,
                },
                open: true,
            };
            match job {
                Job::Unary { call, message, .. } => {
                    if let Some(direct) = self.routes.direct_calls() {
                        direct.unary(*call, message, responder);
                    }
                }
                Job::Watch { who, timeout, .. } => {
                    if let Some(direct) = self.routes.direct_calls() {
                        let body = RequestBody {
                            shared: shared.clone(),
                            stream: responder.stream,
                            done: false,
                        };
                        let deadline = timeout.map(|d| tokio::time::Instant::now() + d);
                        tokio::spawn(direct.clone().open(who, body, responder, deadline));
                    }
                }
                Job::Call { request, .. } => {
                    let answer = self.routes.call(request, &self.info);
                    run_inline_first(exchange(answer, responder));
                }
            }
        }
    }
}

/// A request for tonic's handlers, built from its head.
fn http_request(head: &RequestHead, body: RequestBody) -> Result<Request<RequestBody>, String> {
    let authority = head.authority().unwrap_or(b"localhost");
    let scheme = if head.scheme().is_empty() {
        &b"http"[..]
    } else {
        head.scheme()
    };
    let uri = http::Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(head.path())
        .build()
        .map_err(|e| format!("the request's :path or :authority is not a valid URI: {e}"))?;
    let method = http::Method::from_bytes(head.method())
        .map_err(|_| "the request's :method is not a valid method".to_string())?;
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_2;
    let headers = request.headers_mut();
    for (name, value) in head.fields() {
        let name = http::HeaderName::from_bytes(name)
            .map_err(|_| "a request header's name is not a valid header name".to_string())?;
        let value = http::HeaderValue::from_bytes(value).map_err(|_| {
            format!("the value of request header {name} is not a valid header value")
        })?;
        headers.append(name, value);
    }
    Ok(request)
}

/// `fields` as the name and value pairs the state machine encodes.
fn pairs(fields: &HeaderMap) -> Vec<(&[u8], &[u8])> {
    fields
        .iter()
        .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()))
        .collect()
}

/// A request's body, as the driver receives it. Each chunk read gives its
/// bytes back to the peer's windows: the services decode as they read.
pub struct RequestBody {
    shared: Arc<Shared>,
    stream: u32,
    done: bool,
}

/// The request's stream was reset, or its connection is gone.
#[derive(Debug)]
pub struct StreamGone;

impl std::fmt::Display for StreamGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request's stream was reset or its connection closed")
    }
}

impl std::error::Error for StreamGone {}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = StreamGone;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamGone>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let stream = this.stream;
        let mut state = this.shared.lock();
        let state = &mut *state;
        let Some(Slot {
            inbound: Inbound::Body { queue, end, reader },
            ..
        }) = state.slots.get_mut(&stream)
        else {
            this.done = true;
            return Poll::Ready(Some(Err(StreamGone)));
        };
        if let Some(data) = queue.pop_front() {
            state.conn.release(stream, data.len());
            state.wake_driver();
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if *end {
            this.done = true;
            return Poll::Ready(None);
        }
        *reader = Some(cx.waker().clone());
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The answering side of one stream. Dropped before its answer is
/// complete, it resets the stream (`CANCEL`).
pub(crate) struct Responder {
    shared: Arc<Shared>,
    stream: u32,
    open: bool,
}

impl Responder {
    /// Runs `f` on the state if the stream is still there; wakes the
    /// driver for what it wrote.
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> Option<R> {
        let mut state = self.shared.lock();
        if !state.slots.contains_key(&self.stream) {
            return None;
        }
        let r = f(&mut state);
        state.wake_driver();
        Some(r)
    }

    /// Answers a unary call: the headers, the framed message and the OK
    /// trailers; or, for an error, its status in the headers alone.
    pub(crate) fn answer(mut self, answer: Result<Bytes, Status>) {
        self.open = false;
        let stream = self.stream;
        self.with(|state| {
            match answer {
                Ok(frame) => {
                    state.conn.respond(stream, 200, GRPC_HEADERS, false);
                    state.conn.send_data(stream, frame);
                    state.conn.send_trailers(stream, GRPC_OK);
                    state.forget(stream);
                }
                Err(status) => state.refuse(stream, &status),
            };
        });
    }

    /// Answers with `status` in the headers alone.
    pub(crate) fn refuse(self, status: Status) {
        self.answer(Err(status));
    }

    /// Sends the response's headers, `end` when they are the whole answer.
    fn respond(&mut self, status: u16, fields: &HeaderMap, end: bool) {
        let stream = self.stream;
        self.with(|state| {
            state.conn.respond(stream, status, &pairs(fields), end);
            if end {
                state.forget(stream);
            }
        });
        if end {
            self.open = false;
        }
    }

    /// Sends the gRPC response headers that open a stream of messages.
    pub(crate) fn open_stream(&mut self) -> Result<(), Gone> {
        let stream = self.stream;
        self.with(|state| state.conn.respond(stream, 200, GRPC_HEADERS, false))
            .ok_or(Gone)
    }

    /// Ends the answer with `trailers` (an empty DATA frame when there are
    /// none).
    fn finish(&mut self, trailers: &HeaderMap) {
        self.open = false;
        let stream = self.stream;
        self.with(|state| {
            state.conn.send_trailers(stream, &pairs(trailers));
            state.forget(stream);
        });
    }

    /// Sends `data` once the stream and the connection have room
    /// ([`ConnLimits`]); `Gone` when the stream is.
    async fn send(&self, data: Bytes) -> Result<(), Gone> {
        let mut data = Some(data);
        std::future::poll_fn(|cx| {
            let mut state = self.shared.lock();
            let state = &mut *state;
            if !state.slots.contains_key(&self.stream) {
                return Poll::Ready(Err(Gone));
            }
            if state.full(self.stream) {
                if let Some(slot) = state.slots.get_mut(&self.stream) {
                    slot.writer = Some(cx.waker().clone());
                }
                if !state.room.contains(&self.stream) {
                    state.room.push(self.stream);
                }
                return Poll::Pending;
            }
            if let Some(data) = data.take() {
                state.conn.send_data(self.stream, data);
                state.wake_driver();
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Ready once the stream is gone (the client reset it, or the
    /// connection closed).
    fn poll_gone(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.shared.lock();
        match state.slots.get_mut(&self.stream) {
            None => Poll::Ready(()),
            Some(slot) => {
                slot.writer = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// `future`'s output, or `None` if the stream goes first.
    pub(crate) async fn unless_gone<F: Future>(&self, future: F) -> Option<F::Output> {
        let mut future = std::pin::pin!(future);
        std::future::poll_fn(|cx| match future.as_mut().poll(cx) {
            Poll::Ready(out) => Poll::Ready(Some(out)),
            Poll::Pending if self.poll_gone(cx).is_ready() => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        })
        .await
    }
}

impl Responder {
    /// Resets the stream with `code`.
    fn reset(mut self, code: u32) {
        self.open = false;
        let stream = self.stream;
        self.with(|state| {
            state.conn.cancel(stream, code);
            state.forget(stream);
        });
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.open {
            self.open = false;
            let stream = self.stream;
            self.with(|state| {
                state.conn.cancel(stream, code::CANCEL);
                state.forget(stream);
            });
        }
    }
}

/// A gRPC response's headers before its first message.
const GRPC_HEADERS: &[(&[u8], &[u8])] = &[(b"content-type", b"application/grpc")];

/// The trailers of an OK answer.
const GRPC_OK: &[(&[u8], &[u8])] = &[(b"grpc-status", b"0")];

/// `content-type: application/grpc`.
const GRPC: http::HeaderValue = http::HeaderValue::from_static("application/grpc");

/// Copies a tonic handler's answer to its stream: the response's head,
/// then its body, waiting for room as the stream fills.
async fn exchange(answer: Answer, mut responder: Responder) {
    let Some(response) = responder.unless_gone(answer).await else {
        return;
    };
    let (parts, mut body): (_, Body) = response.into_parts();
    let end = body.is_end_stream();
    responder.respond(parts.status.as_u16(), &parts.headers, end);
    if end {
        return;
    }
    loop {
        let next = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx));
        let Some(frame) = responder.unless_gone(next).await else {
            return;
        };
        match frame {
            None => return responder.finish(&HeaderMap::new()),
            Some(Err(status)) => {
                tracing::debug!(%status, "a response body failed; its stream is reset");
                return responder.reset(code::INTERNAL_ERROR);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(chunk) if chunk.is_empty() => {}
                Ok(chunk) => {
                    if responder.send(chunk).await.is_err() {
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        responder.finish(&trailers);
                    }
                    return;
                }
            },
        }
    }
}

/// Runs `future` once in place, and spawns it only if it is not done: a
/// request answered from memory then costs no task of its own and no trip
/// through the scheduler; one that waits is spawned and polled again by its
/// task, which registers its waker. A panic in that first poll is caught and
/// ends that request only (its stream is reset when the future is dropped),
/// as in a task of its own.
pub(crate) fn run_inline_first<F>(future: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let mut future = Box::pin(future);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        future.as_mut().poll(&mut cx)
    }));
    match polled {
        Ok(Poll::Ready(())) => {}
        Ok(Poll::Pending) => {
            tokio::spawn(future);
        }
        Err(_) => tracing::error!("a request's handler panicked; its stream is reset"),
    }
}

/// `message` framed for the wire (the 5-byte gRPC prefix, then the
/// message); refused when above `max` bytes, as `what`.
pub(crate) fn frame(message: &impl Message, max: usize, what: &str) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    within(len, max, what)?;
    let mut frame = Vec::with_capacity(GRPC_PREFIX + len);
    put_prefix(&mut frame, len);
    message.encode(&mut frame).expect("a Vec grows as needed");
    Ok(Bytes::from(frame))
}

/// Bytes of gRPC's prefix to each message: a compression flag and the
/// length.
const GRPC_PREFIX: usize = 5;

/// Appends the gRPC prefix of an uncompressed message of `len` bytes.
fn put_prefix(out: &mut impl BufMut, len: usize) {
    out.put_u8(0);
    out.put_u32(len as u32);
}

/// Whether a stream holding `waiting` bytes, on a connection holding
/// `pending` that the socket has not taken, is past its room.
fn past_room(limits: &ConnLimits, waiting: usize, pending: usize) -> bool {
    waiting > limits.stream_buffer || pending > limits.connection_buffer
}

/// Refuses a message of `len` bytes over `max`, naming the limit.
fn within(len: usize, max: usize, what: &str) -> Result<(), Status> {
    if len > max {
        return Err(Status::out_of_range(format!(
            "{what} of {len} bytes exceeds the limit of {max} (max_message_bytes)"
        )));
    }
    Ok(())
}

/// A Watch stream's messages, written to its HTTP/2 stream by the stream's
/// own task: each message is framed (the 5-byte gRPC prefix) and added to
/// the stream, which sends what the peer's windows allow; once the stream
/// has no room ([`ConnLimits`]) the task waits. Its end, an
/// error or the drop of the outbox, writes the trailers with the stream's
/// status.
pub(crate) struct GrpcOutbox {
    responder: Responder,
    /// Most bytes one message may take.
    max_message: usize,
    ended: bool,
}

impl GrpcOutbox {
    /// An outbox on `responder`'s stream, whose headers are sent.
    pub(crate) fn new(responder: Responder, max_message: usize) -> Self {
        GrpcOutbox {
            responder,
            max_message,
            ended: false,
        }
    }

    fn end(&mut self, status: &Status) {
        self.ended = true;
        let mut trailers = HeaderMap::new();
        if status.add_header(&mut trailers).is_ok() {
            self.responder.finish(&trailers);
        }
        // Otherwise the responder's drop resets the stream.
    }
}

impl Outbox for GrpcOutbox {
    async fn send(&mut self, message: Result<pb::WatchResponse, Status>) -> Result<(), Gone> {
        if self.ended {
            return Err(Gone);
        }
        let message = match message {
            Ok(message) => message,
            Err(status) => {
                self.end(&status);
                return Ok(());
            }
        };
        let frame = match frame(&message, self.max_message, "a Watch message") {
            Ok(frame) => frame,
            Err(status) => {
                self.end(&status);
                return Err(Gone);
            }
        };
        self.responder.send(frame).await
    }

    fn express(&self) -> Option<ExpressWriter> {
        Some(ExpressWriter {
            connection: self.responder.shared.clone(),
            stream: self.responder.stream,
            max_message: u32::try_from(self.max_message).unwrap_or(u32::MAX),
        })
    }
}

/// A fan-out writes parked Watch streams' notices itself ([`Express`]):
/// the same framing and the same room as the streams' tasks' own writes,
/// under the connection's lock.
impl Express for Shared {
    fn locked(&self, flush: Flush, writes: &mut dyn FnMut(&mut dyn StreamWrites)) {
        let mut state = self.lock();
        writes(&mut *state);
        match flush {
            Flush::Through => state.write_through(),
            Flush::Driver => state.wake_driver(),
            // The fan-out sends it with a later hold.
            Flush::Hold => {}
        }
    }
}

impl StreamWrites for State {
    fn write(
        &mut self,
        stream: u32,
        max_message: usize,
        next: &mut dyn FnMut(usize, &mut BytesMut) -> bool,
    ) -> Wrote {
        let state = self;
        // What the connection holds counts against its bound whatever the
        // stream.
        let pending = state.pending();
        let limits = &state.limits;
        let mut outcome = Wrote::Written;
        // The connection's own record of the stream says whether it still
        // takes data (a finished or reset stream does not), in the one
        // lookup a notice needs; the message is encoded straight into the
        // connection's output, after room for its frame head and gRPC
        // prefix, which are filled in once its length is known.
        let wrote = state.conn.send_data_in_place(stream, |waiting, out| {
            if past_room(limits, waiting, pending) {
                outcome = Wrote::NoRoom;
                return false;
            }
            let start = out.len();
            out.put_bytes(0, GRPC_PREFIX);
            if !next(max_message, out) {
                out.truncate(start);
                outcome = Wrote::Nothing;
                return false;
            }
            let len = out.len() - start - GRPC_PREFIX;
            if let Err(status) = within(len, max_message, "a Watch message") {
                // `next` keeps within the limit, so this does not happen;
                // were it to, the notices taken would be lost to the
                // stream, so the stream is reset and the client resumes
                // from its token, which the history covers.
                tracing::error!(%status, "a fan-out's Watch message was refused; the stream is reset");
                out.truncate(start);
                outcome = Wrote::Gone;
                return false;
            }
            put_prefix(&mut &mut out[start..start + GRPC_PREFIX], len);
            true
        });
        match wrote {
            None => Wrote::Gone,
            Some(_) if outcome == Wrote::Gone => {
                state.conn.cancel(stream, code::INTERNAL_ERROR);
                state.forget(stream);
                Wrote::Gone
            }
            Some(_) => outcome,
        }
    }

    fn look_ahead(&mut self, stream: u32) {
        std::hint::black_box(self.conn.open_for_data(stream));
    }

    fn warm_output(&mut self, bytes: usize) {
        // Zeroes the room the writes will take (and moves what is pending
        // to the front of the buffer, if it must, now rather than midway);
        // not past the connection's bound, where writes are refused and
        // the buffer is not to grow for them.
        if self.pending() + bytes > self.limits.connection_buffer {
            return;
        }
        let out = self.conn.output();
        let len = out.len();
        out.resize(len + bytes, 0);
        out.truncate(len);
    }
}

impl Drop for GrpcOutbox {
    fn drop(&mut self) {
        if !self.ended {
            // The stream's task ended without an error: the client closed
            // its side, or went away (then nothing is sent).
            self.end(&Status::ok(""));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Auth, AuthConfig, Interceptor};
    use crate::log::MemoryLog;
    use crate::pb::coordinator_server::CoordinatorServer;
    use crate::routes::{Direct, Guarded};
    use crate::service::CoordinatorService;
    use crate::store::{Store, StoreConfig};
    use crate::validate::Limits;

    /// The Coordinator's routes over an in-memory store, without tokens,
    /// and the store.
    fn routes() -> (Routes, Arc<Store>) {
        routes_with(StoreConfig::default())
    }

    /// As [`routes`], over a store made with `config`.
    fn routes_with(config: StoreConfig) -> (Routes, Arc<Store>) {
        let store = Arc::new(Store::new(config, Box::new(MemoryLog::with_epoch(7))));
        let interceptor = Interceptor::new(
            Arc::new(Auth::new(&AuthConfig::default())),
            store.metrics().clone(),
        );
        let service = Arc::new(CoordinatorService::new(store.clone(), Limits::default()));
        let routes = Routes::new(Guarded::new(
            CoordinatorServer::from_arc(service.clone()),
            interceptor.clone(),
            false,
        ))
        .direct(Direct::new(service, interceptor, false, 4 << 20));
        (routes, store)
    }

    /// A connection served in memory by [`serve`] with at most
    /// `max_streams` open: the client's end, the sender that tells the
    /// connection to finish, and the connection's task.
    fn served(
        max_streams: u32,
    ) -> (
        tokio::io::DuplexStream,
        watch::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        served_with(routes().0, max_streams)
    }

    /// As [`served`], with `routes`.
    fn served_with(
        routes: Routes,
        max_streams: u32,
    ) -> (
        tokio::io::DuplexStream,
        watch::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (finish, finishing) = watch::channel(());
        let info = ConnInfo {
            remote: None,
            tls: false,
            usage: Default::default(),
        };
        let limits = ConnLimits {
            max_streams,
            ..ConnLimits::default()
        };
        let task = tokio::spawn(serve(server_io, None, routes, limits, info, finishing));
        (client_io, finish, task)
    }

    /// An h2 client on a connection served in memory by [`serve`]; the
    /// sender ends the connection when dropped.
    async fn client() -> (h2::client::SendRequest<Bytes>, watch::Sender<()>) {
        let (client_io, finish, _) = served(100);
        let (send, connection) = h2::client::handshake(client_io).await.expect("a handshake");
        tokio::spawn(connection);
        (send.ready().await.expect("ready"), finish)
    }

    fn post(path: &str) -> http::Request<()> {
        http::Request::post(format!("http://freshd{path}"))
            .header("content-type", "application/grpc")
            .body(())
            .expect("a request")
    }

    /// A unary body whose message comes in pieces is answered once its last
    /// piece is in. Time is paused and the connection is in memory, so a
    /// timeout fires only once every task is idle: by then each piece has
    /// been read, and the answer must still be waiting for the next.
    #[tokio::test(start_paused = true)]
    async fn a_unary_body_in_pieces_is_answered_at_its_end() {
        let (mut client, _finish) = client().await;
        let request = pb::CheckRequest {
            key: "feed:1".into(),
            version: 1,
            ..Default::default()
        };
        let whole = frame(&request, 1024, "a request").expect("framed");
        let (response, mut send) = client
            .send_request(post("/freshd.v1.Coordinator/Check"), false)
            .expect("sent");
        let mut response = std::pin::pin!(response);
        for piece in [&whole[..3], &whole[3..7]] {
            send.send_data(Bytes::copy_from_slice(piece), false)
                .expect("a piece");
            let early = tokio::time::timeout(Duration::from_secs(1), &mut response).await;
            assert!(early.is_err(), "answered before its last piece: {early:?}");
        }
        send.send_data(whole.slice(7..), true).expect("the end");
        let response = response.await.expect("an answer");
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut answer = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("a chunk");
            let _ = body.flow_control().release_capacity(chunk.len());
            answer.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.expect("trailers").expect("trailers");
        assert_eq!(trailers.get("grpc-status").expect("a status"), "0");
        let answer = pb::CheckResponse::decode(&answer[5..]).expect("a CheckResponse");
        assert_eq!(answer.freshness, pb::Freshness::Unknown as i32);
    }

    /// A request for tonic's handlers gets its body through a
    /// [`RequestBody`] and its answer copied back: a call the Coordinator's
    /// generated handler serves (`Stats`), then an unknown path.
    #[tokio::test]
    async fn tonic_handlers_get_their_bodies_and_answer() {
        let (mut client, _finish) = client().await;
        let (response, mut send) = client
            .send_request(post("/freshd.v1.Coordinator/Stats"), false)
            .expect("sent");
        let message = frame(&pb::StatsRequest {}, 1024, "a request").expect("framed");
        send.send_data(message, true).expect("the body");
        let response = response.await.expect("an answer");
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut answer = BytesMut::new();
        while let Some(chunk) = body.data().await {
            answer.extend_from_slice(&chunk.expect("a chunk"));
        }
        let trailers = body.trailers().await.expect("trailers").expect("trailers");
        assert_eq!(trailers.get("grpc-status").expect("a status"), "0");
        pb::StatsResponse::decode(&answer[5..]).expect("a StatsResponse");

        let (response, _) = client
            .send_request(post("/nobody.v1.Nothing/Call"), true)
            .expect("sent");
        let response = response.await.expect("an answer");
        let status = response.headers().get("grpc-status").expect("a status");
        assert_eq!(status, &(tonic::Code::Unimplemented as i32).to_string());
    }

    /// The connection ends once told to finish: a GOAWAY, then the close,
    /// which the client sees as the end of its connection.
    #[tokio::test]
    async fn finishing_sends_goaway_and_closes() {
        let (client_io, finish, served) = served(100);
        let (send, connection) = h2::client::handshake(client_io).await.expect("a handshake");
        let connection = tokio::spawn(connection);
        let mut send = send.ready().await.expect("ready");
        let (response, _) = send
            .send_request(post("/nobody.v1.Nothing/Call"), true)
            .expect("sent");
        response.await.expect("an answer");
        finish.send(()).expect("the connection listens");
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the connection ends")
            .expect("its task");
        let ended = tokio::time::timeout(Duration::from_secs(5), connection)
            .await
            .expect("the client's connection ends")
            .expect("its task");
        assert!(ended.is_ok(), "a clean end, not a reset: {ended:?}");
    }

    /// A connection advertises its stream limit, and a stream past it is
    /// refused while the ones before it stay open.
    #[tokio::test]
    async fn streams_past_the_limit_are_refused() {
        use crate::http2::frame::{self, code, kind, setting, PREFACE};
        use tokio::io::AsyncWriteExt;

        let (mut client, _finish, _) = served(2);
        let mut out = BytesMut::new();
        out.extend_from_slice(PREFACE);
        frame::put_settings(&mut out, &[], false);
        // Three Watch streams, each waiting for its first message.
        for stream in [1, 3, 5] {
            frame::put_headers(&mut out, stream, &watch_head(), false, 16_384);
        }
        client.write_all(&out).await.expect("written");

        let mut limit = None;
        let mut reset = None;
        read_frames(&mut client, |head, payload| {
            if head.kind == kind::SETTINGS && head.flags & frame::flag::ACK == 0 {
                limit = frame::settings(payload)
                    .find(|(id, _)| *id == setting::MAX_CONCURRENT_STREAMS)
                    .map(|(_, value)| value);
            }
            if head.kind == kind::RST_STREAM {
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                reset = Some((head.stream, code));
            }
            reset.is_some()
        })
        .await;
        assert_eq!(limit, Some(2));
        // The first reset is the third stream's: the two before it stay open.
        assert_eq!(reset, Some((5, code::REFUSED_STREAM)));
    }

    /// Reads the server's frames, handing each whole one to `each`, until
    /// `each` has seen what it waits for; the server has 5 s to send it.
    async fn read_frames(
        client: &mut (impl AsyncRead + Unpin),
        mut each: impl FnMut(&crate::http2::frame::Head, &[u8]) -> bool,
    ) {
        use crate::http2::frame::{Head, HEAD_LEN};
        use tokio::io::AsyncReadExt;
        let mut input = BytesMut::new();
        loop {
            let n = tokio::time::timeout(Duration::from_secs(5), client.read_buf(&mut input))
                .await
                .expect("the server answers")
                .expect("read");
            assert!(n > 0, "the connection closed");
            while let Some(head) = Head::parse(&input) {
                if input.len() < HEAD_LEN + head.len {
                    break;
                }
                let seen = each(&head, &input[HEAD_LEN..HEAD_LEN + head.len]);
                input.advance(HEAD_LEN + head.len);
                if seen {
                    return;
                }
            }
        }
    }

    /// The header block of a Watch stream's request.
    fn watch_head() -> Vec<u8> {
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "freshd"),
            (":path", crate::routes::WATCH),
            ("content-type", "application/grpc"),
        ] {
            crate::http2::hpack::encode_field(name.as_bytes(), value.as_bytes(), &mut block);
        }
        block
    }

    /// Opens a Watch stream on stream 1 that subscribes to `k:`, with
    /// `settings` and a connection window `window` above the default, and
    /// reads until its first message (it is registered).
    async fn open_watch(
        client: &mut (impl AsyncRead + AsyncWrite + Unpin),
        settings: &[(u16, u32)],
        window: u32,
    ) {
        use crate::http2::frame::{self, kind, PREFACE};
        use tokio::io::AsyncWriteExt;

        let mut out = BytesMut::new();
        out.extend_from_slice(PREFACE);
        frame::put_settings(&mut out, settings, false);
        if window > 0 {
            frame::put_window_update(&mut out, 0, window);
        }
        frame::put_headers(&mut out, 1, &watch_head(), false, 16_384);
        let start = pb::WatchRequest {
            request: Some(pb::watch_request::Request::Start(pb::WatchStart {
                client_id: "reader".into(),
                subscribe: vec!["k:".into()],
                ..Default::default()
            })),
        };
        frame::put_data(
            &mut out,
            1,
            &frame(&start, 1024, "a request").expect("framed"),
            false,
        );
        client.write_all(&out).await.expect("written");
        read_frames(client, |head, _| {
            head.kind == kind::DATA && head.stream == 1
        })
        .await;
    }

    /// `n` changes to keys `k:{round}:{i}`.
    fn changes(round: usize, n: usize) -> Vec<crate::store::PublishChange> {
        (0..n)
            .map(|i| crate::store::PublishChange {
                key: format!("k:{round}:{i}"),
                external_version: None,
                critical: false,
                event_time_ms: 0,
            })
            .collect()
    }

    /// Notices published while a stream waits are written by the
    /// publishes themselves (the connection's [`Express`] writing), interleaved with nothing:
    /// each arrives once, in seq order, and a progress mark asked for after
    /// them comes after them and covers them.
    #[tokio::test]
    async fn notices_written_by_publishes_arrive_in_order_before_progress() {
        let (routes, store) = routes();
        let (mut client, _finish, _) = served_with(routes, 100);
        open_watch(&mut client, &[], 0).await;

        // The stream's task is parked: these go out from the publishes.
        let mut last_seq = 0;
        for round in 0..20 {
            last_seq = store.publish(&changes(round, 5)).expect("a publish").seq;
        }
        ask_progress(&mut client).await;
        let through = std::sync::atomic::AtomicU64::new(last_seq);
        let (seqs, keys, progress_seq) = notices_until_progress(&mut client, &through, None).await;
        // Five keys per publish, each publish one seq. The mark comes
        // after every notice it covers.
        assert_eq!(seqs.len(), 100, "every notice, once: {seqs:?}");
        assert_eq!(keys.len(), 100, "every key, once");
        assert!(
            seqs.windows(2).all(|w| w[0] <= w[1]),
            "in seq order: {seqs:?}"
        );
        assert_eq!(seqs.last(), Some(&last_seq));
        assert!(progress_seq >= Some(last_seq), "the mark covers them");
    }

    /// Asks the Watch stream on stream 1 for a progress mark.
    async fn ask_progress(client: &mut (impl AsyncWrite + Unpin)) {
        use crate::http2::frame;
        use tokio::io::AsyncWriteExt;

        let mut out = BytesMut::new();
        let progress = pb::WatchRequest {
            request: Some(pb::watch_request::Request::Progress(pb::ProgressRequest {})),
        };
        frame::put_data(
            &mut out,
            1,
            &frame(&progress, 1024, "a request").expect("framed"),
            false,
        );
        client.write_all(&out).await.expect("written");
    }

    /// Reads the notices of the Watch stream on stream 1 until a progress
    /// mark at or past `through` (once it is set above 0), or, given
    /// `keys`, until that many keys have come: their seqs in arrival order,
    /// their keys, and the mark's seq. Fails if the server sends nothing
    /// for 5 s meanwhile.
    async fn notices_until_progress(
        client: &mut (impl AsyncRead + Unpin),
        through: &std::sync::atomic::AtomicU64,
        keys_wanted: Option<usize>,
    ) -> (Vec<u64>, std::collections::HashSet<String>, Option<u64>) {
        use crate::http2::frame::kind;
        use std::sync::atomic::Ordering;

        let mut body = BytesMut::new();
        let mut seqs = Vec::new();
        let mut keys = std::collections::HashSet::new();
        let mut progress_seq = None;
        read_frames(client, |head, payload| {
            if head.kind != kind::DATA || head.stream != 1 {
                return false;
            }
            body.extend_from_slice(payload);
            while body.len() >= 5 {
                let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
                if body.len() < 5 + len {
                    break;
                }
                let message = pb::WatchResponse::decode(&body[5..5 + len]).expect("a message");
                body.advance(5 + len);
                match message.response {
                    Some(pb::watch_response::Response::Notices(batch)) => {
                        seqs.extend(batch.notices.iter().map(|n| n.seq));
                        keys.extend(batch.notices.into_iter().map(|n| n.key));
                        if keys_wanted.is_some_and(|n| keys.len() >= n) {
                            return true;
                        }
                    }
                    Some(pb::watch_response::Response::Progress(p)) => {
                        let through = through.load(Ordering::Acquire);
                        if through > 0 && p.seq >= through {
                            progress_seq = Some(p.seq);
                            return true;
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            false
        })
        .await;
        (seqs, keys, progress_seq)
    }

    /// Over TCP, a publish from another connection writes a parked Watch
    /// stream's socket itself (`State::write_through`; `watch_coalesce` is
    /// zero), and hands what the socket does not take to the stream's
    /// driver.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishes_write_a_watch_socket_through_and_its_driver_writes_the_rest() {
        every_notice_over_tcp(Duration::ZERO).await;
    }

    /// Publishes in close succession leave their notices to the
    /// connection's driver: with a `watch_coalesce` longer than the test,
    /// every publish after the first counts as close behind the last.
    /// (A setting, not a wait: nothing sleeps.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishes_close_behind_others_leave_their_notices_to_the_driver() {
        const LONGER_THAN_THE_TEST: Duration = Duration::from_secs(3600);
        every_notice_over_tcp(LONGER_THAN_THE_TEST).await;
    }

    /// A Watch client over TCP that reads nothing while 2,500 notices are
    /// published (the socket's buffers are 4 KiB a side: it soon takes no
    /// more), then reads while 7,500 more are, gets each of them once, in
    /// seq order, without asking for anything, and then a progress mark
    /// that covers them.
    async fn every_notice_over_tcp(coalesce: Duration) {
        use crate::http2::frame::{setting, MAX_WINDOW};
        use crate::pb::coordinator_client::CoordinatorClient;

        let mut config = StoreConfig::default();
        config.hub.coalesce = coalesce;
        let (routes, _store) = routes_with(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a listener");
        let addr = listener.local_addr().expect("an address");
        let (_finish, finishing) = watch::channel(());
        tokio::spawn(async move {
            while let Ok((socket, remote)) = listener.accept().await {
                // A small send buffer, which the kernel does not grow: the
                // socket soon takes no more.
                socket2::SockRef::from(&socket)
                    .set_send_buffer_size(4096)
                    .expect("a small buffer");
                let info = ConnInfo {
                    remote: Some(remote),
                    tls: false,
                    usage: Default::default(),
                };
                let conn = crate::tls::Conn::plain(socket, info.clone());
                let socket = conn.socket();
                let (routes, limits) = (routes.clone(), ConnLimits::default());
                tokio::spawn(serve(conn, socket, routes, limits, info, finishing.clone()));
            }
        });

        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket.set_recv_buffer_size(4096).expect("a small buffer");
        let mut watcher = socket.connect(addr).await.expect("connected");
        open_watch(
            &mut watcher,
            &[(setting::INITIAL_WINDOW_SIZE, MAX_WINDOW)],
            MAX_WINDOW - 65_535,
        )
        .await;

        let mut publisher = CoordinatorClient::connect(format!("http://{addr}"))
            .await
            .expect("a publisher");
        let mut publish = async |round: usize| {
            let changes = (0..100)
                .map(|i| pb::Change {
                    key: format!("k:{round}:{i}"),
                    ..Default::default()
                })
                .collect();
            let answer = publisher
                .publish(pb::PublishRequest {
                    changes,
                    ..Default::default()
                })
                .await
                .expect("a publish");
            answer.into_inner().seq
        };
        // First the client reads nothing; then it reads as the rest come,
        // while its driver still has bytes of its own to write.
        for round in 0..25 {
            publish(round).await;
        }
        let (mut reader, mut writer) = tokio::io::split(watcher);
        let through = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reading = tokio::spawn({
            let through = through.clone();
            async move {
                let read = notices_until_progress(&mut reader, &through, Some(10_000)).await;
                (read, reader)
            }
        });
        let mut last_seq = 0;
        for round in 25..100 {
            last_seq = publish(round).await;
        }
        let ((seqs, keys, _), mut reader) = reading.await.expect("the reader");
        assert_eq!(keys.len(), 10_000, "every key");
        assert_eq!(seqs.len(), 10_000, "every notice, once");
        assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "in seq order");
        assert_eq!(seqs.last(), Some(&last_seq));

        through.store(last_seq, std::sync::atomic::Ordering::Release);
        ask_progress(&mut writer).await;
        let (more, _, progress_seq) = notices_until_progress(&mut reader, &through, None).await;
        assert_eq!(more, Vec::<u64>::new(), "nothing more");
        assert!(progress_seq >= Some(last_seq), "the mark covers them");
    }

    /// A client that opens its windows as wide as HTTP/2 allows and then
    /// stops reading holds about the connection's buffer in the server, not its
    /// windows' worth: its Watch stream stops taking notices, and its queue
    /// in the hub overflows (into a repair, once it reads again).
    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_holds_a_bounded_output() {
        use crate::http2::frame::{setting, MAX_WINDOW};

        let (routes, store) = routes();
        let (mut client, _finish, _) = served_with(routes, 100);
        open_watch(
            &mut client,
            &[(setting::INITIAL_WINDOW_SIZE, MAX_WINDOW)],
            MAX_WINDOW - 65_535,
        )
        .await;
        // Now the client reads nothing: 200,000 notices of about 40 bytes
        // are several times the bound, and 20 times the stream's queue.
        for round in 0..200 {
            store.publish(&changes(round, 1_000)).expect("a publish");
            tokio::task::yield_now().await;
        }
        // Time is paused: each sleep returns once every task is idle, so
        // the check runs after the stream's task has taken what it could.
        let overflowed = tokio::time::timeout(Duration::from_secs(10), async {
            while store.hub().totals().1 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            overflowed.is_ok(),
            "the stream kept taking notices from its queue: the output is unbounded"
        );
    }
}
