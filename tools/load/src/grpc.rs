//! gRPC over one HTTP/2 connection that the task using it drives itself.
//!
//! The Redis side of every workload reads and writes its own socket from the
//! task that times it ([`crate::resp`]). A tonic `Channel` puts two tasks
//! between a call and the socket (its request queue's worker and hyper's
//! connection task), and a tonic `Streaming` body decodes through a third
//! layer; each hop is a wake-up on the load tool's one core, paid per
//! notice or check, and the load tool then spends as much CPU per call as
//! the server does (at 50,000 checks a second it was the bottleneck). The
//! workloads that time calls use this module instead, so that both peers
//! are driven the same way: [`Conn::calls`] sends calls and reads answers
//! from the task that times them. `Watch` streams are read straight off
//! their sockets ([`crate::watch`]).
//!
//! It speaks only what those workloads need: no compression, no TLS, no
//! reconnection, a fixed window. Real clients use a `Channel`.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::client::{Connection, ResponseFuture, SendRequest};
use h2::{RecvStream, SendStream};
use prost::Message;
use tokio::net::TcpStream;

use crate::Error;

/// Per-stream receive window (hyper's default for clients).
const STREAM_WINDOW: u32 = 2 << 20;
/// Connection receive window (hyper's default for clients).
const CONN_WINDOW: u32 = 5 << 20;
/// The largest response message accepted.
const MAX_MESSAGE: usize = 64 << 20;

/// An HTTP/2 connection: the handle that opens streams and the connection
/// itself, which must be polled for anything to move.
pub struct Conn {
    send: SendRequest<Bytes>,
    conn: Connection<TcpStream, Bytes>,
    authority: String,
    closed: bool,
}

impl Conn {
    /// Connects to `host:port` over TCP with `TCP_NODELAY`.
    pub async fn connect(addr: &str) -> Result<Self, Error> {
        let tcp = crate::connect_nodelay(addr).await?;
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(|e| format!("HTTP/2 handshake with {addr}: {e}"))?;
        Ok(Self {
            send,
            conn,
            authority: addr.to_string(),
            closed: false,
        })
    }

    /// Polls the connection: reads what arrived (waking the streams it is
    /// for) and writes what is queued. An error once it has ended.
    fn poll(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        if self.closed {
            return Err("the connection is closed".into());
        }
        match Pin::new(&mut self.conn).poll(cx) {
            Poll::Pending => Ok(()),
            Poll::Ready(result) => {
                self.closed = true;
                Err(match result {
                    Ok(()) => "the server closed the connection".into(),
                    Err(e) => format!("connection: {e}"),
                })
            }
        }
    }

    /// The URI of `method` (`/package.Service/Method`) on this connection:
    /// made once per method, and cloned per call.
    fn uri(&self, method: &str) -> Result<http::Uri, Error> {
        format!("http://{}{method}", self.authority)
            .parse()
            .map_err(|e| format!("{method}: {e}"))
    }

    /// Opens a call to `uri` (a [`Conn::uri`]) and queues `message` as its
    /// first request; `end` closes the request side.
    fn open(
        &mut self,
        uri: &http::Uri,
        message: &impl Message,
        end: bool,
    ) -> Result<(ResponseFuture, SendStream<Bytes>), Error> {
        let mut request = http::Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri.clone();
        let headers = request.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, GRPC);
        headers.insert(http::header::TE, TRAILERS);
        let (response, mut body) = self
            .send
            .send_request(request, false)
            .map_err(|e| format!("{}: {e}", uri.path()))?;
        body.send_data(frame(message), end)
            .map_err(|e| format!("{}: {e}", uri.path()))?;
        Ok((response, body))
    }
}

/// `content-type: application/grpc`.
const GRPC: http::HeaderValue = http::HeaderValue::from_static("application/grpc");
/// `te: trailers`.
const TRAILERS: http::HeaderValue = http::HeaderValue::from_static("trailers");

/// The HTTP/2 default window, which a connection and its streams start
/// with.
pub(crate) const DEFAULT_WINDOW: u32 = 65_535;
/// gRPC's message prefix: a compressed flag and a 4-byte length.
pub(crate) const PREFIX_LEN: usize = 5;

/// Queues what an HTTP/2 client sends first on `out`: the preface, its
/// settings (no push, `stream_window` for each stream it receives on) and
/// the connection's receive window raised to `conn_window`.
pub(crate) fn put_opening(out: &mut Vec<u8>, stream_window: u32, conn_window: u32) {
    use freshd::http2::frame::{self, setting, PREFACE};
    out.extend_from_slice(PREFACE);
    frame::put_settings(
        out,
        &[
            (setting::ENABLE_PUSH, 0),
            (setting::INITIAL_WINDOW_SIZE, stream_window),
        ],
        false,
    );
    frame::put_window_update(out, 0, conn_window - DEFAULT_WINDOW);
}

/// The header block of a gRPC call to `path` (`/package.Service/Method`) at
/// `authority`: the same for every call (literals and static-table indexes
/// only, so no HPACK state).
pub(crate) fn request_head(authority: &str, path: &str) -> Vec<u8> {
    use freshd::http2::hpack;
    let mut block = Vec::with_capacity(128);
    for (name, value) in [
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"http"),
        (b":path", path.as_bytes()),
        (b":authority", authority.as_bytes()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ] {
        hpack::encode_field(name, value, &mut block);
    }
    block
}

/// Header blocks put together from a HEADERS frame and the CONTINUATIONs
/// that follow it.
#[derive(Default)]
pub(crate) struct HeaderBlocks {
    /// A block whose CONTINUATIONs are still to come: its stream, the
    /// block so far, and whether it ends the stream.
    open: Option<(u32, Vec<u8>, bool)>,
}

/// A complete header block: its stream, the block, and whether it ends the
/// stream.
pub(crate) type HeaderBlock<'a> = (u32, std::borrow::Cow<'a, [u8]>, bool);

impl HeaderBlocks {
    /// Takes a HEADERS frame: its block, if `end_headers` says it is whole.
    pub(crate) fn headers<'a>(
        &mut self,
        stream: u32,
        block: &'a [u8],
        end_stream: bool,
        end_headers: bool,
    ) -> Option<HeaderBlock<'a>> {
        if end_headers {
            return Some((stream, block.into(), end_stream));
        }
        self.open = Some((stream, block.to_vec(), end_stream));
        None
    }

    /// Takes a CONTINUATION frame: the whole block once its last part has
    /// come; an error for one that follows no HEADERS of its stream.
    pub(crate) fn continuation(
        &mut self,
        stream: u32,
        block: &[u8],
        end_headers: bool,
    ) -> Result<Option<HeaderBlock<'static>>, Error> {
        let Some((open, mut whole, end_stream)) = self.open.take() else {
            return Err("a CONTINUATION with no header block open".into());
        };
        if open != stream {
            return Err("a CONTINUATION on another stream".into());
        }
        whole.extend_from_slice(block);
        if end_headers {
            return Ok(Some((stream, whole.into(), end_stream)));
        }
        self.open = Some((stream, whole, end_stream));
        Ok(None)
    }
}

/// The length of the gRPC message `body` starts with, from its prefix:
/// `None` until the whole prefix is there; an error for a compressed
/// message or one over `max` bytes.
pub(crate) fn message_len(body: &[u8], max: usize) -> Result<Option<usize>, Error> {
    let Some(prefix) = body.first_chunk::<PREFIX_LEN>() else {
        return Ok(None);
    };
    if prefix[0] != 0 {
        return Err("a compressed message (not supported)".into());
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > max {
        return Err(format!("a message of {len} bytes, over {max}"));
    }
    Ok(Some(len))
}

/// `message` with gRPC's 5-byte prefix (not compressed, length).
pub(crate) fn frame(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut out = BytesMut::with_capacity(PREFIX_LEN + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    message.encode(&mut out).expect("room reserved");
    out.freeze()
}

/// The gRPC status of a response's headers or trailers: `Ok` for 0, an
/// error naming the code and the (percent-decoded) message otherwise,
/// `None` when absent.
pub(crate) fn status(headers: &http::HeaderMap) -> Option<Result<(), Error>> {
    let status = tonic::Status::from_header_map(headers)?;
    if status.code() == tonic::Code::Ok {
        return Some(Ok(()));
    }
    Some(Err(format!(
        "grpc-status {}: {}",
        status.code() as i32,
        status.message()
    )))
}

/// A response body: HTTP/2 data in, gRPC messages out.
struct Body {
    recv: RecvStream,
    buf: BytesMut,
}

impl Body {
    /// Starts reading `response` (an error when its headers carry one).
    fn new(response: http::Response<RecvStream>) -> Result<Self, Error> {
        if response.status() != http::StatusCode::OK {
            return Err(format!("HTTP status {}", response.status()));
        }
        if let Some(Err(e)) = status(response.headers()) {
            return Err(e);
        }
        Ok(Self {
            recv: response.into_body(),
            buf: BytesMut::new(),
        })
    }

    /// The next message, `None` at the end of the body.
    fn poll_message<M: Message + Default>(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<M>, Error>> {
        loop {
            match message_len(&self.buf, MAX_MESSAGE) {
                Err(e) => return Poll::Ready(Err(e)),
                Ok(Some(len)) if self.buf.len() >= PREFIX_LEN + len => {
                    self.buf.advance(PREFIX_LEN);
                    let bytes = self.buf.split_to(len);
                    return Poll::Ready(
                        M::decode(bytes)
                            .map(Some)
                            .map_err(|e| format!("decode: {e}")),
                    );
                }
                Ok(_) => {}
            }
            match self.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    return Poll::Ready(if self.buf.is_empty() {
                        Ok(None)
                    } else {
                        Err("the body ended inside a message".into())
                    })
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(format!("stream: {e}"))),
                Poll::Ready(Some(Ok(data))) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if self.buf.is_empty() {
                        self.buf = BytesMut::from(data);
                    } else {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// After the last message: the trailers' status.
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        match self.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(
                status(&trailers).unwrap_or_else(|| Err("trailers without grpc-status".into())),
            ),
            Poll::Ready(Ok(None)) => Poll::Ready(Err("no trailers".into())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(format!("trailers: {e}"))),
        }
    }
}

/// Reads a unary call's answer: its one message, then the trailers' status.
async fn answer<M: Message + Default>(response: ResponseFuture) -> Result<M, Error> {
    let response = response.await.map_err(|e| e.to_string())?;
    if let Some(status) = status(response.headers()) {
        // Trailers-only: a status and nothing else.
        status?;
        return Err("an answer without a message".into());
    }
    let mut body = Body::new(response)?;
    let message = poll_fn(|cx| body.poll_message::<M>(cx))
        .await?
        .ok_or("an answer without a message")?;
    if poll_fn(|cx| body.poll_message::<M>(cx)).await?.is_some() {
        return Err("a unary answer with two messages".into());
    }
    poll_fn(|cx| body.poll_end(cx)).await?;
    Ok(message)
}

/// An answer being read.
type Answer<M> = Pin<Box<dyn Future<Output = Result<M, Error>> + Send>>;

impl Conn {
    /// Calls `method` once for every item `next` yields, with the message
    /// `request(&item)`, as soon as the item comes and without waiting for
    /// earlier answers, and hands each answer to `answered` with its item.
    /// `next` is told how many calls are in flight, so that a closed loop
    /// can hold back until one is answered (it is asked again then); an
    /// open loop ignores it. Returns once `next` has ended and every answer
    /// is in; an error only when the connection fails.
    pub async fn calls<T, Req, Resp>(
        &mut self,
        method: &str,
        mut next: impl FnMut(&mut Context<'_>, usize) -> Poll<Option<T>>,
        request: impl Fn(&T) -> Req,
        mut answered: impl FnMut(T, Result<Resp, Error>),
    ) -> Result<(), Error>
    where
        Req: Message,
        Resp: Message + Default + 'static,
    {
        let uri = self.uri(method)?;
        let mut in_flight: Vec<(Option<T>, Answer<Resp>)> = Vec::new();
        let mut open = true;
        poll_fn(|cx| {
            self.poll(cx)?;
            loop {
                let mut sent = false;
                while open {
                    match self.send.poll_ready(cx) {
                        Poll::Pending => break,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(format!("{method}: {e}"))),
                        Poll::Ready(Ok(())) => {}
                    }
                    match next(cx, in_flight.len()) {
                        Poll::Pending => break,
                        Poll::Ready(None) => open = false,
                        Poll::Ready(Some(item)) => {
                            let (response, _) = self.open(&uri, &request(&item), true)?;
                            in_flight.push((Some(item), Box::pin(answer::<Resp>(response))));
                            sent = true;
                        }
                    }
                }
                if sent {
                    // Write the new calls now rather than on the next wake.
                    self.poll(cx)?;
                }
                let before = in_flight.len();
                in_flight.retain_mut(|(item, answer)| match answer.as_mut().poll(cx) {
                    Poll::Pending => true,
                    Poll::Ready(result) => {
                        answered(item.take().expect("answered once"), result);
                        false
                    }
                });
                // An answer frees a place that `next` may fill at once.
                if in_flight.len() == before || !open {
                    break;
                }
            }
            if open || !in_flight.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(Ok(()))
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_blocks_join_continuations_of_their_stream_only() {
        let mut blocks = HeaderBlocks::default();
        let whole = blocks
            .headers(1, b"abc", true, true)
            .expect("whole at once");
        assert_eq!((whole.0, &*whole.1, whole.2), (1, &b"abc"[..], true));

        assert!(blocks.headers(3, b"ab", false, false).is_none());
        assert!(blocks.continuation(3, b"cd", false).unwrap().is_none());
        let whole = blocks.continuation(3, b"ef", true).unwrap().expect("whole");
        assert_eq!((whole.0, &*whole.1, whole.2), (3, &b"abcdef"[..], false));

        let e = blocks.continuation(3, b"x", true).unwrap_err();
        assert!(e.contains("no header block open"), "{e}");
        assert!(blocks.headers(5, b"a", false, false).is_none());
        let e = blocks.continuation(7, b"b", true).unwrap_err();
        assert!(e.contains("another stream"), "{e}");
    }
}
