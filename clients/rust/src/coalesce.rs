//! One TCP segment per request: write coalescing for the HTTP/2 connection.
//!
//! hyper's HTTP/2 client (under tonic) writes a request's HEADERS frame
//! before the request's body task has had a chance to queue its DATA frame,
//! and after a DATA frame of more than 256 bytes h2 writes before it takes
//! the next frame (the empty DATA frame that ends the request), so a call
//! left in two or three TCP segments. The server's kernel answers two small
//! segments read together with an ACK of their own, at once: on loopback
//! that cost the server about 5 µs of CPU per `Check`, an eighth of it (see
//! `docs/benchmarks.md`). [`Coalesce`] holds what the connection writes
//! until a flush finds nothing new since the flush before, so the frames of
//! one call leave in one segment, as a call from the Python client (grpcio)
//! does.
//!
//! The rule: a flush that follows a write wakes the task and returns
//! `Pending` instead of sending. Before the task flushes again, the other
//! tasks this pass woke run (a request's body task queues its DATA frame),
//! and h2, polled again, buffers the frames it had left for after the flush
//! (the frame that ends a request after a large DATA frame). A flush that
//! finds nothing written since the flush before sends everything held in
//! one write. Four flushes in a row at most are held, so a writer that
//! never pauses still sends; more than 64 KiB held goes out at once. Any
//! writer that flushes and awaits the flush (a TLS handshake, h2, a
//! hand-written protocol) is served: the flush completes one poll later.
//!
//! [`Client`](crate::Client) connects through [`Connector`]; a tonic
//! `Channel` of your own can too:
//!
//! ```no_run
//! # async fn demo() -> Result<(), tonic::transport::Error> {
//! let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:50051")
//!     .connect_with_connector(freshd_client::coalesce::Connector)
//!     .await?;
//! # let _ = channel; Ok(()) }
//! ```

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes held before a write goes through without waiting for a flush.
const HOLD: usize = 64 * 1024;
/// Flushes in a row that may hold, before one sends whatever comes.
const HOLDS: u8 = 4;

/// An I/O stream whose writes are held until a flush finds nothing written
/// since the flush before (the rule is in the [module](self) docs). Reads
/// pass straight through; more than 64 KiB held goes out without waiting;
/// shutting down sends what is held.
#[derive(Debug)]
pub struct Coalesce<T> {
    io: T,
    held: Vec<u8>,
    /// How much of `held` the stream has taken.
    sent: usize,
    /// Whether anything was written since the last flush.
    written: bool,
    /// Flushes in a row that held.
    holds: u8,
}

impl<T> Coalesce<T> {
    /// Wraps `io`.
    pub fn new(io: T) -> Self {
        Self {
            io,
            held: Vec::new(),
            sent: 0,
            written: false,
            holds: 0,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes everything held.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.held.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.held.len() >= HOLD {
            ready!(this.poll_send_held(cx))?;
        }
        this.written = true;
        let room = HOLD.saturating_sub(this.held.len()).max(1);
        let mut taken = 0;
        for b in bufs {
            let n = b.len().min(room - taken);
            this.held.extend_from_slice(&b[..n]);
            taken += n;
            if taken == room {
                break;
            }
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.held.is_empty() {
            return Pin::new(&mut this.io).poll_flush(cx);
        }
        if this.written && this.holds < HOLDS {
            this.holds += 1;
            // Let more come: the tasks this pass woke (a request's body),
            // and the frames h2 buffers on its next poll before it flushes
            // again.
            this.written = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        // A flush with nothing written since the last (or after as many
        // holds in a row as allowed): send.
        this.written = false;
        this.holds = 0;
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Dials TCP with `TCP_NODELAY` and wraps the stream in [`Coalesce`]: a
/// connector for tonic's `Endpoint::connect_with_connector` (which still
/// applies the endpoint's connect timeout and TLS). The addresses the host
/// name resolves to are tried in order, the next one as soon as an attempt
/// fails or after [`STAGGER`] without an answer, with the earlier attempts
/// still running; the first to connect wins (a host whose first address is
/// unreachable, say IPv6 on a network without it, still connects quickly).
#[derive(Clone, Copy, Debug, Default)]
pub struct Connector;

/// What [`Connector`] connects: the coalesced stream, as hyper's I/O.
pub type Connection = TokioIo<Coalesce<TcpStream>>;

impl tower_service::Service<http::Uri> for Connector {
    type Response = Connection;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Connection>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            let Some(host) = uri.host() else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{uri} names no host"),
                ));
            };
            // An IPv6 literal comes in brackets.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let tls = uri.scheme_str() == Some("https");
            let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
            if addrs.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{host} resolves to no address"),
                ));
            }
            let tcp = connect_any(addrs).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(Coalesce::new(tcp)))
        })
    }
}

/// How long an attempt to connect to one address runs alone before the
/// next address is tried beside it (RFC 8305 suggests 250 ms).
pub const STAGGER: std::time::Duration = std::time::Duration::from_millis(250);

/// Connects to the first of `addrs` that answers, starting the attempts
/// [`STAGGER`] apart (at once after a failure); the error is the last
/// attempt's when all fail. The attempts still running are dropped.
async fn connect_any(addrs: Vec<SocketAddr>) -> io::Result<TcpStream> {
    let mut attempts = tokio::task::JoinSet::new();
    let mut waiting = addrs.into_iter();
    let mut last = None;
    loop {
        if let Some(addr) = waiting.next() {
            attempts.spawn(TcpStream::connect(addr));
        }
        let more = waiting.len() > 0;
        let outcome = tokio::select! {
            outcome = attempts.join_next() => outcome,
            () = tokio::time::sleep(STAGGER), if more => continue,
        };
        match outcome {
            Some(Ok(Ok(tcp))) => return Ok(tcp),
            Some(Ok(Err(e))) => last = Some(e),
            Some(Err(e)) => last = Some(io::Error::other(e)),
            None => {
                return Err(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "no address to connect to")
                }))
            }
        }
        if !more && attempts.is_empty() {
            return Err(last.expect("an attempt failed"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::task::Waker;

    /// A sink that records each write it is given.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn write(c: &mut Coalesce<Writes>, bytes: &[u8]) {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(c).poll_write(&mut cx, bytes) {
            Poll::Ready(Ok(n)) => assert_eq!(n, bytes.len()),
            other => panic!("write: {other:?}"),
        }
    }

    fn flush(c: &mut Coalesce<Writes>) -> Poll<io::Result<()>> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(c).poll_flush(&mut cx)
    }

    fn flushed(p: Poll<io::Result<()>>) -> bool {
        matches!(p, Poll::Ready(Ok(())))
    }

    fn held(p: Poll<io::Result<()>>) -> bool {
        p.is_pending()
    }

    #[test]
    fn frames_written_until_a_flush_finds_nothing_new_leave_in_one_write() {
        let mut c = Coalesce::new(Writes::default());
        write(&mut c, b"HEADERS");
        assert!(held(flush(&mut c)), "the first flush yields");
        assert!(c.io.0.is_empty(), "and sends nothing");
        // The body task queues DATA; h2 flushes, then, polled again,
        // buffers the frame that ends the request.
        write(&mut c, b"DATA");
        assert!(held(flush(&mut c)), "more was written: yield again");
        write(&mut c, b"EOS");
        assert!(held(flush(&mut c)));
        assert!(c.io.0.is_empty());
        // The next flush finds nothing new: everything goes, once.
        assert!(flushed(flush(&mut c)));
        assert_eq!(c.io.0, vec![b"HEADERSDATAEOS".to_vec()]);
        assert!(flushed(flush(&mut c)));
        assert_eq!(c.io.0.len(), 1, "nothing is sent twice");
        // The next call is held again.
        write(&mut c, b"PING");
        assert!(held(flush(&mut c)));
        assert_eq!(c.io.0.len(), 1);
        assert!(flushed(flush(&mut c)));
        assert_eq!(c.io.0, vec![b"HEADERSDATAEOS".to_vec(), b"PING".to_vec()]);
    }

    #[test]
    fn a_writer_that_never_pauses_is_held_a_bounded_number_of_flushes() {
        let mut c = Coalesce::new(Writes::default());
        let mut flushes = 0;
        while c.io.0.is_empty() {
            write(&mut c, b"f");
            let _ = flush(&mut c);
            flushes += 1;
            assert!(flushes <= 10, "never sent");
        }
        assert_eq!(flushes, usize::from(HOLDS) + 1);
        assert_eq!(c.io.0[0].len(), flushes);
    }

    #[test]
    fn a_flush_with_nothing_held_passes_through() {
        let mut c = Coalesce::new(Writes::default());
        assert!(flushed(flush(&mut c)));
        assert!(c.io.0.is_empty());
    }

    #[test]
    fn a_held_flush_wakes_the_task_so_that_it_flushes_again() {
        let mut c = Coalesce::new(Writes::default());
        write(&mut c, b"x");
        let woken = std::sync::Arc::new(Woken::default());
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        assert!(woken.0.load(std::sync::atomic::Ordering::SeqCst));
        assert!(c.io.0.is_empty());
    }

    #[derive(Default)]
    struct Woken(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Woken {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn more_than_the_hold_goes_out_without_a_flush() {
        let mut c = Coalesce::new(Writes::default());
        let big = vec![7u8; HOLD + 10];
        let mut cx = Context::from_waker(Waker::noop());
        let first = match Pin::new(&mut c).poll_write(&mut cx, &big) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("{other:?}"),
        };
        assert_eq!(first, HOLD, "takes what fits");
        let rest = match Pin::new(&mut c).poll_write(&mut cx, &big[first..]) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("{other:?}"),
        };
        assert_eq!(rest, 10);
        assert_eq!(c.io.0.len(), 1, "the full hold was written");
        assert_eq!(c.io.0[0].len(), HOLD);
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_held() {
        let mut c = Coalesce::new(Writes::default());
        write(&mut c, b"GOAWAY");
        poll_fn(|cx| Pin::new(&mut c).poll_shutdown(cx))
            .await
            .unwrap();
        assert_eq!(c.io.0, vec![b"GOAWAY".to_vec()]);
    }

    #[tokio::test]
    async fn a_request_crosses_a_real_socket_whole() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let uri: http::Uri = format!("http://{addr}").parse().unwrap();
        let (io, accepted) = tokio::join!(
            tower_service::Service::call(&mut Connector, uri),
            listener.accept()
        );
        let mut io = io.unwrap().into_inner();
        let (mut server, _) = accepted.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        io.write_all(b"one").await.unwrap();
        io.flush().await.unwrap();
        io.write_all(b"two").await.unwrap();
        io.flush().await.unwrap();
        io.flush().await.unwrap();
        let mut got = vec![0u8; 6];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"onetwo");
        server.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        io.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
    }

    #[tokio::test]
    async fn refused_and_hostless_addresses_are_errors() {
        let uri: http::Uri = "http://127.0.0.1:1".parse().unwrap();
        let e = tower_service::Service::call(&mut Connector, uri)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        let uri: http::Uri = "/no/host".parse().unwrap();
        let e = tower_service::Service::call(&mut Connector, uri)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("names no host"), "{e}");
    }

    /// A loopback listener whose accept queue is full: a connection to it
    /// gets no answer (Linux drops the SYN).
    async fn unanswering() -> (tokio::net::TcpListener, Vec<TcpStream>, SocketAddr) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..10 {
            let wait = std::time::Duration::from_secs(1);
            match tokio::time::timeout(wait, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => queued.push(tcp),
                Ok(Err(e)) => panic!("filling the queue: {e}"),
                // No answer: the queue is full.
                Err(_) => return (listener, queued, addr),
            }
        }
        panic!("the accept queue never filled");
    }

    #[tokio::test]
    async fn an_address_that_does_not_answer_does_not_hold_up_the_next() {
        let (_listener, _queued, silent) = unanswering().await;
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        // Without a second attempt beside the first this would wait for
        // the kernel to give up on the silent address (minutes).
        let limit = std::time::Duration::from_secs(30);
        let tcp = tokio::time::timeout(limit, connect_any(vec![silent, good_addr]))
            .await
            .expect("connected while the first address stays silent")
            .unwrap();
        assert_eq!(tcp.peer_addr().unwrap(), good_addr);
    }

    #[tokio::test]
    async fn a_refused_address_moves_on_at_once_and_all_refused_is_an_error() {
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let refused: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let tcp = connect_any(vec![refused, good_addr]).await.unwrap();
        assert_eq!(tcp.peer_addr().unwrap(), good_addr);
        let e = connect_any(vec![refused, refused]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    }
}
