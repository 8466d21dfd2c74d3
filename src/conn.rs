//! One HTTP/2 connection, served with h2 directly: its requests' bodies,
//! their answers written back, and the outbox a Watch stream's task writes
//! its messages through.
//!
//! A request's answer is a future that first waits for the service's
//! response and then copies its body to the HTTP/2 stream
//! (`Exchange`). It is polled once in the connection's task and spawned
//! only if it is not done then, so an answer from memory (a `Check`, a
//! `Publish`) costs no task of its own. A Watch stream's task writes to its
//! HTTP/2 stream itself (`GrpcOutbox`), with no body, channel or task in
//! between.
//!
//! Flow control: h2 sends what the peer's window allows and queues the
//! rest. Every `UNCHECKED_BYTES` handed to it, a stream reserves room for
//! its next chunk and waits until the window gives it some, so a stream
//! whose reader stops holds at most about a window and that much more in
//! memory, and a Watch stream's writer stops taking notices, which leaves
//! them to its queue in the hub (where a slow consumer overflows into a
//! repair). Asking h2 for room takes its lock and its flow-control
//! bookkeeping, as much as a send; most answers and notices are far smaller
//! than the budget, so they go out with a send alone.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use prost::Message;
use tokio::sync::watch;
use tonic::body::Body;
use tonic::Status;

use crate::pb;
use crate::routes::Routes;
use crate::tls::{Conn, ConnInfo};
use crate::watch::{Gone, Outbox};

/// The HTTP/2 settings freshd offers: hyper's server defaults, which the
/// server used before it drove h2 itself, with no cap on concurrent streams
/// (as tonic's server).
fn builder() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(1024 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_frame_size(16 * 1024)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(400 * 1024)
        .max_local_error_reset_streams(Some(1024));
    builder
}

/// Serves `io` until the peer closes it, it fails, or `finishing` fires; then
/// tells the peer to finish (GOAWAY: streams in flight complete, new ones are
/// refused) and returns once the last stream has ended.
pub(crate) async fn serve(
    io: Conn,
    routes: Routes,
    info: ConnInfo,
    mut finishing: watch::Receiver<()>,
) {
    let mut conn = tokio::select! {
        biased;
        _ = finishing.changed() => return,
        handshake = builder().handshake::<_, Bytes>(io) => match handshake {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "HTTP/2 handshake failed");
                return;
            }
        },
    };
    let mut closing = false;
    // One wait for the signal, kept across requests: a new one per request
    // would register with the channel and leave it again each time.
    let mut finish = std::pin::pin!(finishing.changed());
    loop {
        tokio::select! {
            biased;
            _ = &mut finish, if !closing => {
                conn.graceful_shutdown();
                closing = true;
            }
            next = conn.accept() => match next {
                Some(Ok((request, reply))) => {
                    let (parts, recv) = request.into_parts();
                    let request = Request::from_parts(parts, RequestBody::new(recv));
                    routes.dispatch(request, reply, &info);
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "connection ended with an error");
                    break;
                }
                None => break,
            },
        }
    }
}

/// A request's body, read from its HTTP/2 stream. Each chunk read gives
/// its bytes back to the peer's window at once: the services decode as they
/// read, and a Watch stream's requests are small.
pub struct RequestBody {
    recv: RecvStream,
    /// The data frames are done; trailers, if any, come next.
    data_done: bool,
    /// The trailers were read.
    done: bool,
}

impl RequestBody {
    fn new(recv: RecvStream) -> Self {
        let done = recv.is_end_stream();
        RequestBody {
            recv,
            data_done: done,
            done,
        }
    }

    /// A unary call's one message, without its 5-byte gRPC prefix: the body
    /// is read to its end (trailers aside) and must hold exactly one
    /// uncompressed message of at most `max` bytes. A message above `max` is
    /// refused from its prefix, before the rest is read.
    pub(crate) async fn unary_message(&mut self, max: usize) -> Result<Bytes, Status> {
        let mut body = Bytes::new();
        let mut more = BytesMut::new();
        while !self.data_done {
            let data = match self.recv.data().await {
                Some(Ok(data)) => data,
                Some(Err(e)) => {
                    self.done = true;
                    return Err(Status::cancelled(format!(
                        "the request's stream failed: {e}"
                    )));
                }
                None => {
                    self.data_done = true;
                    break;
                }
            };
            let _ = self.recv.flow_control().release_capacity(data.len());
            if body.is_empty() && more.is_empty() {
                // Most requests come in one frame: no copy.
                body = data;
            } else {
                if more.is_empty() {
                    more.extend_from_slice(&body);
                }
                more.extend_from_slice(&data);
            }
            let have = if more.is_empty() { &body } else { &more[..] };
            if have.len() >= 5 {
                let len = message_len(have, max)?;
                // Refused as soon as it is more than one message: a body
                // that never ends is not buffered.
                if have.len() > 5 + len {
                    return Err(more_than_one(have.len() - 5 - len));
                }
            }
        }
        if !more.is_empty() {
            body = more.freeze();
        }
        if body.len() < 5 {
            return Err(Status::invalid_argument(
                "a unary call's request must be one message; the body held none",
            ));
        }
        // Anything past the message was refused as it came.
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

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.done = true;
        match trailers {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
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

/// One request's answer: the service's response, then its body copied to
/// the HTTP/2 stream.
pub(crate) struct Exchange<F> {
    stage: Stage<F>,
}

enum Stage<F> {
    Answering {
        answer: F,
        reply: SendResponse<Bytes>,
    },
    Writing(Writer),
    Done,
}

impl<F> Exchange<F> {
    pub(crate) fn new(answer: F, reply: SendResponse<Bytes>) -> Self {
        Exchange {
            stage: Stage::Answering { answer, reply },
        }
    }
}

impl<F> Future for Exchange<F>
where
    F: Future<Output = Response<Body>> + Unpin,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match &mut self.stage {
                Stage::Answering { answer, reply } => {
                    let response = match Pin::new(answer).poll(cx) {
                        Poll::Ready(response) => response,
                        Poll::Pending => {
                            // The client may give up (RST_STREAM) while the
                            // answer waits: then the answer is dropped.
                            if reply.poll_reset(cx).is_ready() {
                                self.stage = Stage::Done;
                                return Poll::Ready(());
                            }
                            return Poll::Pending;
                        }
                    };
                    let (parts, body) = response.into_parts();
                    let end = body.is_end_stream();
                    let sent = reply.send_response(Response::from_parts(parts, ()), end);
                    self.stage = match sent {
                        Ok(send) if !end => Stage::Writing(Writer {
                            body,
                            send,
                            held: None,
                            unchecked: 0,
                        }),
                        // Done, or the stream is gone.
                        _ => Stage::Done,
                    };
                }
                Stage::Writing(writer) => {
                    ready!(writer.poll(cx));
                    self.stage = Stage::Done;
                    return Poll::Ready(());
                }
                Stage::Done => return Poll::Ready(()),
            }
        }
    }
}

/// Copies a response body to its HTTP/2 stream. Like a Watch stream's
/// outbox, it looks at the peer's window only every [`UNCHECKED_BYTES`]:
/// h2 queues what the window does not cover.
struct Writer {
    body: Body,
    send: SendStream<Bytes>,
    /// A chunk waiting for room in the peer's window.
    held: Option<Bytes>,
    /// Bytes handed to h2 since the window was last checked.
    unchecked: usize,
}

impl Writer {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some(chunk) = self.held.take() {
                match poll_room(&mut self.send, cx) {
                    Poll::Pending => {
                        self.held = Some(chunk);
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(Gone)) => return Poll::Ready(()),
                    Poll::Ready(Ok(())) => {}
                }
                if self.send.send_data(chunk, false).is_err() {
                    return Poll::Ready(());
                }
                continue;
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => {
                    // Waiting for the body: a reset ends the copy.
                    if self.send.poll_reset(cx).is_ready() {
                        return Poll::Ready(());
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    let _ = self.send.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Err(status))) => {
                    tracing::debug!(%status, "a response body failed; its stream is reset");
                    self.send.send_reset(Reason::INTERNAL_ERROR);
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(chunk) if chunk.is_empty() => {}
                    Ok(chunk) if self.unchecked + chunk.len() <= UNCHECKED_BYTES => {
                        // A small answer (most are) goes out without a
                        // look at the window.
                        self.unchecked += chunk.len();
                        if self.send.send_data(chunk, false).is_err() {
                            return Poll::Ready(());
                        }
                    }
                    Ok(chunk) => {
                        self.send.reserve_capacity(chunk.len());
                        self.unchecked = chunk.len();
                        self.held = Some(chunk);
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let _ = self.send.send_trailers(trailers);
                        }
                        return Poll::Ready(());
                    }
                },
            }
        }
    }
}

/// Ready when the stream has room in the peer's window for some of what it
/// reserved; `Gone` when the stream can no longer send.
fn poll_room(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> Poll<Result<(), Gone>> {
    while send.capacity() == 0 {
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Poll::Ready(Err(Gone)),
        }
    }
    Poll::Ready(Ok(()))
}

/// `message` framed for the wire (the 5-byte gRPC prefix, then the
/// message); refused when above `max` bytes, as `what`.
pub(crate) fn frame(message: &impl Message, max: usize, what: &str) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    if len > max {
        return Err(Status::out_of_range(format!(
            "{what} of {len} bytes exceeds the limit of {max} (max_message_bytes)"
        )));
    }
    let mut frame = Vec::with_capacity(5 + len);
    frame.put_u8(0);
    frame.put_u32(len as u32);
    message.encode(&mut frame).expect("a Vec grows as needed");
    Ok(Bytes::from(frame))
}

/// Answers a unary call: the headers, the framed message and the OK
/// trailers; or, for an error, its status in the headers alone.
pub(crate) fn answer_unary(reply: &mut SendResponse<Bytes>, answer: Result<Bytes, Status>) {
    let frame = match answer {
        Ok(frame) => frame,
        Err(status) => {
            let _ = reply.send_response(status.into_http::<()>(), true);
            return;
        }
    };
    // A stream the client has left fails these; there is no one to tell.
    let Ok(mut send) = reply.send_response(grpc_response(), false) else {
        return;
    };
    if send.send_data(frame, false).is_ok() {
        let mut trailers = HeaderMap::with_capacity(1);
        trailers.insert(GRPC_STATUS, GRPC_OK);
        let _ = send.send_trailers(trailers);
    }
}

/// `grpc-status`.
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The `grpc-status` of OK.
const GRPC_OK: HeaderValue = HeaderValue::from_static("0");

/// `content-type: application/grpc`.
const GRPC: HeaderValue = HeaderValue::from_static("application/grpc");

/// A gRPC response's headers, before its first message.
pub(crate) fn grpc_response() -> Response<()> {
    let mut response = Response::new(());
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, GRPC);
    response
}

/// Bytes a Watch stream hands to h2 between two checks of the peer's
/// window. Asking h2 for room takes its lock and its flow-control
/// bookkeeping, as much as a send; a notice is tens of bytes, so the check
/// is made per this many bytes instead of per message, and a stream whose
/// reader stopped holds at most this much more than the window in h2.
const UNCHECKED_BYTES: usize = 16 * 1024;

/// A Watch stream's messages, written to its HTTP/2 stream by the stream's
/// own task: each message is framed (the 5-byte gRPC prefix) and handed to
/// h2, which sends what the peer's window allows and queues the rest; every
/// [`UNCHECKED_BYTES`] the task waits until the window has room. Its end,
/// an error or the drop of the outbox, writes the trailers with the stream's
/// status.
pub(crate) struct GrpcOutbox {
    send: SendStream<Bytes>,
    /// Most bytes one message may take.
    max_message: usize,
    /// Bytes handed to h2 since the window was last checked.
    unchecked: usize,
    ended: bool,
}

impl GrpcOutbox {
    pub(crate) fn new(send: SendStream<Bytes>, max_message: usize) -> Self {
        GrpcOutbox {
            send,
            max_message,
            unchecked: 0,
            ended: false,
        }
    }

    fn end(&mut self, status: &Status) {
        self.ended = true;
        let mut trailers = HeaderMap::new();
        if status.add_header(&mut trailers).is_ok() {
            let _ = self.send.send_trailers(trailers);
        } else {
            self.send.send_reset(Reason::INTERNAL_ERROR);
        }
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
        if self.unchecked + frame.len() > UNCHECKED_BYTES {
            self.send.reserve_capacity(frame.len());
            std::future::poll_fn(|cx| poll_room(&mut self.send, cx)).await?;
            self.unchecked = 0;
        }
        self.unchecked += frame.len();
        self.send.send_data(frame, false).map_err(|_| Gone)
    }
}

impl Drop for GrpcOutbox {
    fn drop(&mut self) {
        if !self.ended {
            // The stream's task ended without an error: the client closed
            // its side, or went away (then this is not sent).
            self.end(&Status::ok(""));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A unary body whose message comes in pieces is read to its end. Time
    /// is paused and the connection is in memory, so a timeout fires only
    /// once every task is idle: by then each piece has been read, and the
    /// message must still be waiting for the next.
    #[tokio::test(start_paused = true)]
    async fn a_unary_body_in_pieces_is_read_to_its_end() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = builder()
                .handshake::<_, Bytes>(server_io)
                .await
                .expect("a handshake");
            let (request, reply) = conn.accept().await.expect("a request").expect("a request");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            (RequestBody::new(request.into_body()), reply)
        });
        let (client, connection) = h2::client::handshake(client_io).await.expect("a handshake");
        tokio::spawn(connection);
        let mut client = client.ready().await.expect("ready");
        let request = Request::post("http://freshd/p")
            .body(())
            .expect("a request");
        let (_response, mut send) = client.send_request(request, false).expect("sent");
        let (mut body, _reply) = server.await.expect("the server");

        let whole = b"\0\0\0\0\x05hello";
        let mut message = std::pin::pin!(body.unary_message(1024));
        for piece in [&whole[..3], &whole[3..7]] {
            send.send_data(Bytes::copy_from_slice(piece), false)
                .expect("a piece");
            let early = tokio::time::timeout(Duration::from_secs(1), &mut message).await;
            assert!(early.is_err(), "answered before its last piece: {early:?}");
        }
        send.send_data(Bytes::copy_from_slice(&whole[7..]), true)
            .expect("the end");
        assert_eq!(message.await.expect("the message"), &b"hello"[..]);
    }
}
