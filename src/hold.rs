//! One write per answer: holds the HTTP/2 frames a response leaves open.
//!
//! h2 writes a DATA frame of more than 256 bytes from the message's own
//! buffer and sends it before it takes the next frame, so a unary answer of
//! that size (a `CheckBatch` of 64 keys and more) left in two writes: the
//! DATA frame, then the trailers a moment later. Each write is a TCP segment
//! the client's kernel acknowledges on its own. [`Hold`] keeps such a write
//! back: when what h2 wrote ends with a DATA frame of more than
//! [`OPEN_DATA`] bytes that does not end its stream, the bytes are held and
//! the flush after them reports done without sending and wakes the
//! connection's task; h2 writes what comes next (the trailers) on its next
//! poll, and the flush after that sends everything in one write. Anything
//! else passes straight through, so a small answer or a Watch stream's notice
//! is written as soon as h2 flushes it, as before.
//!
//! This relies on h2 flushing on every poll of its connection, which is what
//! it does; the TLS handshake runs before a connection is wrapped.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A DATA frame with more payload than this, left open, is held: h2 sends
/// those from the message's buffer, before the frame that follows them.
pub const OPEN_DATA: usize = 256;
/// Bytes held before they go out whatever comes.
const HOLD: usize = 64 * 1024;
/// Flushes in a row that may hold (an answer of more than one DATA frame
/// holds once per frame).
const WAITS: u8 = 4;
/// HTTP/2 frame header: length (3), type, flags, stream id (4).
const HEADER: usize = 9;
const DATA: u8 = 0x0;
const END_STREAM: u8 = 0x1;

/// Where a run of bytes stands in the HTTP/2 frame sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Frames {
    /// Header bytes of the frame being read, and how many there are.
    header: [u8; HEADER],
    have: usize,
    /// Payload bytes of the current frame still to come.
    payload: usize,
    /// Whether the last complete frame is a large DATA frame without
    /// END_STREAM.
    open_data: bool,
}

impl Frames {
    /// Follows `bytes`.
    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload > 0 {
                let n = self.payload.min(bytes.len());
                self.payload -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (HEADER - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == HEADER {
                let h = self.header;
                let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                self.payload = len;
                self.have = 0;
                self.open_data = h[3] == DATA && h[4] & END_STREAM == 0 && len > OPEN_DATA;
            }
        }
    }

    /// Whether the bytes so far end on a frame boundary after a large open
    /// DATA frame.
    fn ends_open(&self) -> bool {
        self.open_data && self.payload == 0 && self.have == 0
    }
}

/// A server connection's I/O that holds the writes a large open DATA frame
/// ends (the [module](self) docs say when and why). Reads pass through.
#[derive(Debug)]
pub struct Hold<T> {
    io: T,
    frames: Frames,
    held: Vec<u8>,
    /// How much of `held` the stream has taken.
    sent: usize,
    /// Bytes were held since the last flush.
    fresh: bool,
    /// Flushes in a row that held.
    waits: u8,
}

impl<T> Hold<T> {
    /// Wraps `io`, whose writes are HTTP/2 frames from the first byte (a
    /// server's side of the connection).
    pub fn new(io: T) -> Self {
        Self {
            io,
            frames: Frames::default(),
            held: Vec::new(),
            sent: 0,
            fresh: false,
            waits: 0,
        }
    }

    /// The wrapped I/O.
    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncWrite + Unpin> Hold<T> {
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
        self.fresh = false;
        self.waits = 0;
        Poll::Ready(Ok(()))
    }

    fn hold(&mut self, bufs: &[io::IoSlice<'_>]) -> usize {
        let mut taken = 0;
        for b in bufs {
            self.held.extend_from_slice(b);
            self.frames.advance(b);
            taken += b.len();
        }
        self.fresh = true;
        taken
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Hold<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Hold<T> {
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
        if !this.held.is_empty() {
            // Joins what is held: the frames that close it.
            return Poll::Ready(Ok(this.hold(bufs)));
        }
        // Where these bytes leave the frames, read once: kept as is when
        // they are held or written whole, re-read only after a short write.
        let mut ahead = this.frames;
        let mut total = 0;
        for b in bufs {
            ahead.advance(b);
            total += b.len();
        }
        if ahead.ends_open() {
            for b in bufs {
                this.held.extend_from_slice(b);
            }
            this.frames = ahead;
            this.fresh = true;
            return Poll::Ready(Ok(total));
        }
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        if n == total {
            this.frames = ahead;
        } else {
            let mut left = n;
            for b in bufs {
                let k = left.min(b.len());
                this.frames.advance(&b[..k]);
                left -= k;
                if left == 0 {
                    break;
                }
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.held.is_empty() {
            if std::mem::take(&mut this.fresh) && this.frames.ends_open() && this.waits < WAITS {
                // h2 writes the frame that follows on its next poll, and
                // flushes again then.
                this.waits += 1;
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_send_held(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = joined.len();
            self.0.push(joined);
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    const HEADERS: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;

    fn frame(kind: u8, flags: u8, len: usize) -> Vec<u8> {
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        f.resize(HEADER + len, 0xab);
        f
    }

    fn write(h: &mut Hold<Writes>, bufs: &[&[u8]]) {
        let slices: Vec<io::IoSlice<'_>> = bufs.iter().map(|b| io::IoSlice::new(b)).collect();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(h).poll_write_vectored(&mut cx, &slices) {
            Poll::Ready(Ok(n)) => assert_eq!(n, total),
            other => panic!("write: {other:?}"),
        }
    }

    fn flush(h: &mut Hold<Writes>) {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(h).poll_flush(&mut cx) {
            Poll::Ready(Ok(())) => {}
            other => panic!("flush: {other:?}"),
        }
    }

    #[test]
    fn a_small_answer_goes_out_at_once() {
        let mut h = Hold::new(Writes::default());
        let answer = [
            frame(HEADERS, END_HEADERS, 20),
            frame(DATA, 0, 40),
            frame(HEADERS, END_HEADERS | END_STREAM, 15),
        ]
        .concat();
        write(&mut h, &[&answer]);
        assert_eq!(h.io.0, vec![answer.clone()], "written, not held");
        flush(&mut h);
        assert_eq!(h.io.0.len(), 1);
    }

    #[test]
    fn a_large_open_data_frame_waits_for_the_trailers() {
        let mut h = Hold::new(Writes::default());
        let (head, data) = (frame(HEADERS, END_HEADERS, 20), frame(DATA, 0, 1_200));
        // h2 writes its buffer and the DATA frame's payload together.
        write(
            &mut h,
            &[
                &[head.clone(), data[..HEADER].to_vec()].concat(),
                &data[HEADER..],
            ],
        );
        flush(&mut h);
        assert!(h.io.0.is_empty(), "held over the flush");
        let trailers = frame(HEADERS, END_HEADERS | END_STREAM, 15);
        write(&mut h, &[&trailers]);
        assert!(h.io.0.is_empty(), "the trailers join what is held");
        flush(&mut h);
        assert_eq!(h.io.0, vec![[head, data, trailers].concat()], "one write");
        // Nothing is held any more.
        let small = frame(DATA, 0, 10);
        write(&mut h, &[&small]);
        assert_eq!(h.io.0.len(), 2);
    }

    #[test]
    fn what_nothing_follows_goes_out_on_the_next_flush() {
        let mut h = Hold::new(Writes::default());
        let data = frame(DATA, 0, 600);
        write(&mut h, &[&data]);
        flush(&mut h);
        assert!(h.io.0.is_empty());
        flush(&mut h);
        assert_eq!(h.io.0, vec![data]);
    }

    #[test]
    fn a_held_flush_wakes_the_connection() {
        let mut h = Hold::new(Writes::default());
        write(&mut h, &[&frame(DATA, 0, 600)]);
        let woken = std::sync::Arc::new(Woken::default());
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(
            Pin::new(&mut h).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert!(woken.0.load(std::sync::atomic::Ordering::SeqCst));
        assert!(h.io.0.is_empty());
    }

    #[derive(Default)]
    struct Woken(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Woken {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn data_that_ends_its_stream_or_is_small_is_not_held() {
        let mut h = Hold::new(Writes::default());
        write(&mut h, &[&frame(DATA, END_STREAM, 5_000)]);
        write(&mut h, &[&frame(DATA, 0, OPEN_DATA)]);
        assert_eq!(h.io.0.len(), 2);
    }

    #[test]
    fn a_writer_that_never_closes_is_held_a_bounded_number_of_flushes() {
        let mut h = Hold::new(Writes::default());
        let mut flushes = 0;
        while h.io.0.is_empty() {
            write(&mut h, &[&frame(DATA, 0, 1_000)]);
            flush(&mut h);
            flushes += 1;
            assert!(flushes <= 10, "never sent");
        }
        assert_eq!(flushes, usize::from(WAITS) + 1);
        assert_eq!(h.io.0[0].len(), flushes * (HEADER + 1_000));
    }

    #[test]
    fn frames_split_anywhere_are_followed() {
        // Byte by byte: a small frame, then a large open DATA frame.
        let small = frame(HEADERS, END_HEADERS, 3);
        let data = frame(DATA, 0, 300);
        let all = [small.clone(), data.clone()].concat();
        let mut frames = Frames::default();
        for (i, b) in all.iter().enumerate() {
            frames.advance(std::slice::from_ref(b));
            let boundary = i + 1 == small.len() || i + 1 == all.len();
            assert_eq!(frames.payload == 0 && frames.have == 0, boundary, "at {i}");
        }
        assert!(frames.ends_open());
        frames.advance(&frame(HEADERS, END_HEADERS | END_STREAM, 2));
        assert!(!frames.ends_open());
    }

    #[test]
    fn more_than_the_hold_goes_out() {
        let mut h = Hold::new(Writes::default());
        let data = frame(DATA, 0, HOLD);
        write(&mut h, &[&data]);
        assert!(h.io.0.is_empty());
        write(&mut h, &[&frame(DATA, 0, 400)]);
        assert_eq!(h.io.0, vec![data], "the full hold was written first");
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_held() {
        let mut h = Hold::new(Writes::default());
        let data = frame(DATA, 0, 600);
        write(&mut h, &[&data]);
        std::future::poll_fn(|cx| Pin::new(&mut h).poll_shutdown(cx))
            .await
            .unwrap();
        assert_eq!(h.io.0, vec![data]);
    }

    /// A sink that takes at most 5 bytes per write.
    #[derive(Default)]
    struct Short(Vec<u8>);

    impl AsyncWrite for Short {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(5);
            self.0.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn short_writes_keep_the_frames_in_step() {
        let mut h = Hold::new(Short::default());
        let mut cx = Context::from_waker(Waker::noop());
        let small = frame(HEADERS, END_HEADERS, 20);
        let mut at = 0;
        while at < small.len() {
            match Pin::new(&mut h).poll_write(&mut cx, &small[at..]) {
                Poll::Ready(Ok(n)) => at += n,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(h.io.0, small, "passed through, five bytes at a time");
        // On a frame boundary again: a large open DATA frame is held.
        let data = frame(DATA, 0, 600);
        assert!(matches!(
            Pin::new(&mut h).poll_write(&mut cx, &data),
            Poll::Ready(Ok(n)) if n == data.len()
        ));
        assert_eq!(h.io.0.len(), small.len(), "held");
    }
}
