//! A minimal RESP client for the Redis peer: an encoder, an incremental reply
//! parser for RESP2 and the RESP3 types Redis 7 sends after `HELLO 3`
//! (including push messages: client-tracking `invalidate`, pub/sub
//! `message`), and blocking and tokio connections. The benches in
//! `benches/` include this file too (`benches/support/redis.rs`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

/// A RESP2 or RESP3 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:42`
    Int(i64),
    /// `$3\r\nfoo`, `None` for `$-1`.
    Bulk(Option<Vec<u8>>),
    /// `*2\r\n...`, `None` for `*-1`; also a RESP3 set (`~`).
    Array(Option<Vec<Reply>>),
    /// RESP3 `_`.
    Null,
    /// RESP3 `#t` / `#f`.
    Bool(bool),
    /// RESP3 `,3.14` and `(1234...` (big number), as written.
    Number(String),
    /// RESP3 `%2\r\n...`: key-value pairs in order.
    Map(Vec<(Reply, Reply)>),
    /// RESP3 `>3\r\n...`: an out-of-band push, such as a client-tracking
    /// `invalidate` or a pub/sub `message`.
    Push(Vec<Reply>),
}

/// Appends `args` to `out` as one RESP command (an array of bulk strings).
pub fn encode(args: &[&[u8]], out: &mut Vec<u8>) {
    write_header(out, b'*', args.len());
    for arg in args {
        write_header(out, b'$', arg.len());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

fn write_header(out: &mut Vec<u8>, kind: u8, n: usize) {
    out.push(kind);
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// Parses one reply from the front of `buf`: `Ok(None)` when `buf` does not
/// hold a whole reply yet, else the reply and the bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some((line, mut pos)) = line(buf, 0) else {
        return Ok(None);
    };
    let (&kind, rest) = line.split_first().ok_or("empty RESP line")?;
    let text = || String::from_utf8_lossy(rest).into_owned();
    let int = || -> Result<i64, String> {
        std::str::from_utf8(rest)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad RESP integer {:?}", text()))
    };
    // `n` replies in a row after the header, or `None` if not all are in.
    let items = |n: usize, pos: &mut usize| -> Result<Option<Vec<Reply>>, String> {
        let mut items = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            match parse(&buf[*pos..])? {
                Some((item, used)) => {
                    items.push(item);
                    *pos += used;
                }
                None => return Ok(None),
            }
        }
        Ok(Some(items))
    };
    let reply = match kind {
        b'+' => Reply::Simple(text()),
        b'-' => Reply::Error(text()),
        b':' => Reply::Int(int()?),
        // Bulk string, RESP3 verbatim string and blob error.
        b'$' | b'=' | b'!' => {
            let len = int()?;
            if len < 0 {
                Reply::Bulk(None)
            } else {
                let len = len as usize;
                if buf.len() < pos + len + 2 {
                    return Ok(None);
                }
                let data = buf[pos..pos + len].to_vec();
                pos += len + 2;
                if kind == b'!' {
                    Reply::Error(String::from_utf8_lossy(&data).into_owned())
                } else {
                    Reply::Bulk(Some(data))
                }
            }
        }
        b'*' | b'~' | b'>' => {
            let len = int()?;
            if len < 0 {
                Reply::Array(None)
            } else {
                let Some(items) = items(len as usize, &mut pos)? else {
                    return Ok(None);
                };
                if kind == b'>' {
                    Reply::Push(items)
                } else {
                    Reply::Array(Some(items))
                }
            }
        }
        b'%' | b'|' => {
            let len = int()?;
            let Some(flat) = items(2 * len.max(0) as usize, &mut pos)? else {
                return Ok(None);
            };
            let mut flat = flat.into_iter();
            let mut pairs = Vec::with_capacity(len.max(0) as usize);
            while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                pairs.push((k, v));
            }
            if kind == b'|' {
                // Attributes describe the reply that follows: skip them.
                return match parse(&buf[pos..])? {
                    Some((reply, used)) => Ok(Some((reply, pos + used))),
                    None => Ok(None),
                };
            }
            Reply::Map(pairs)
        }
        b'_' => Reply::Null,
        b'#' => Reply::Bool(rest == b"t"),
        b',' | b'(' => Reply::Number(text()),
        other => return Err(format!("unknown RESP type byte {other:#x}")),
    };
    Ok(Some((reply, pos)))
}

/// The client-tracking push that names invalidated keys: `>2`, the bulk
/// string `invalidate`, then an array of bulk keys (or null: all keys).
const INVALIDATE_HEAD: &[u8] = b">2\r\n$10\r\ninvalidate\r\n";

/// An `invalidate` push at the start of `buf`, read in place: hands `each`
/// its keys in order and answers the bytes it takes, or `Ok(None)` when
/// `buf` starts with anything else or with a push not all read (which
/// [`parse`] then reads). Nothing is handed over before the whole push is
/// there. A subscriber reads nothing of a push but its keys, and building a
/// [`Reply`] for it (five allocations per key) cost as much as the reading.
pub fn invalidation(buf: &[u8], mut each: impl FnMut(&[u8])) -> Result<Option<usize>, String> {
    if !buf.starts_with(INVALIDATE_HEAD) {
        return Ok(None);
    }
    let Some((header, mut pos)) = line(buf, INVALIDATE_HEAD.len()) else {
        return Ok(None);
    };
    if header == b"_" || header == b"*-1" {
        return Ok(Some(pos));
    }
    let Some(digits) = header.strip_prefix(b"*") else {
        return Ok(None);
    };
    let count = count(digits)?;
    let first = pos;
    // Once to see that every key is in, then again to hand them over.
    for _ in 0..count {
        let Some((len, end)) = bulk(buf, pos)? else {
            return Ok(None);
        };
        pos = end + len + 2;
    }
    let used = pos;
    pos = first;
    for _ in 0..count {
        let (len, start) = bulk(buf, pos)?.expect("checked above");
        each(&buf[start..start + len]);
        pos = start + len + 2;
    }
    Ok(Some(used))
}

/// The heads of a pub/sub `message`: a push in RESP3, an array in RESP2,
/// of three bulk strings (`message`, the channel, the payload).
const MESSAGE_HEADS: [&[u8]; 2] = [b">3\r\n$7\r\nmessage\r\n", b"*3\r\n$7\r\nmessage\r\n"];

/// A pub/sub `message` at the start of `buf`, read in place: the bytes it
/// takes once all of it is there, or `Ok(None)` when `buf` starts with
/// anything else or with a message not all read (which [`parse`] then
/// reads). A subscriber of the fan-out workload counts messages and reads
/// nothing of them, as its freshd side counts notices without decoding
/// them.
pub fn message(buf: &[u8]) -> Result<Option<usize>, String> {
    let Some(head) = MESSAGE_HEADS.iter().find(|head| buf.starts_with(head)) else {
        return Ok(None);
    };
    let mut pos = head.len();
    // The channel, then the payload.
    for _ in 0..2 {
        let Some((len, start)) = bulk(buf, pos)? else {
            return Ok(None);
        };
        pos = start + len + 2;
    }
    Ok(Some(pos))
}

/// A bulk string's header at `pos` (`$<len>`): its length and where its
/// bytes start, once all of it and its `\r\n` are in `buf`.
fn bulk(buf: &[u8], pos: usize) -> Result<Option<(usize, usize)>, String> {
    let Some((header, start)) = line(buf, pos) else {
        return Ok(None);
    };
    let Some(digits) = header.strip_prefix(b"$") else {
        return Err(format!(
            "a bulk string expected, got {:?}",
            String::from_utf8_lossy(header)
        ));
    };
    let len = count(digits)?;
    match buf.get(start + len..start + len + 2) {
        Some(b"\r\n") => Ok(Some((len, start))),
        Some(_) => Err("a bulk string without its \\r\\n".into()),
        None => Ok(None),
    }
}

/// A RESP length.
fn count(digits: &[u8]) -> Result<usize, String> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad RESP length {:?}", String::from_utf8_lossy(digits)))
}

/// The line starting at `from` (without its CRLF) and where the next begins.
fn line(buf: &[u8], from: usize) -> Option<(&[u8], usize)> {
    let end = buf[from..].windows(2).position(|w| w == b"\r\n")? + from;
    Some((&buf[from..end], end + 2))
}

/// Bytes read from a connection: `data[start..end]` is not parsed yet, and
/// `data[end..]` is room for the next read.
struct ReadBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for ReadBuf {
    fn default() -> Self {
        Self {
            data: vec![0; 64 << 10],
            start: 0,
            end: 0,
        }
    }
}

impl ReadBuf {
    /// Takes what `read` reads in place off the front (`read` answers the
    /// bytes it took, as [`invalidation`] and [`message`] do); false if it
    /// took nothing.
    fn take_in_place(
        &mut self,
        read: impl FnOnce(&[u8]) -> Result<Option<usize>, String>,
    ) -> io::Result<bool> {
        match read(&self.data[self.start..self.end]) {
            Ok(Some(used)) => {
                self.consume(used);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }

    fn consume(&mut self, used: usize) {
        self.start += used;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn next(&mut self) -> io::Result<Option<Reply>> {
        match parse(&self.data[self.start..self.end]) {
            Ok(Some((reply, used))) => {
                self.consume(used);
                Ok(Some(reply))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }

    /// Room to read into: moves unparsed bytes to the front, or doubles the
    /// buffer when they fill it.
    fn room(&mut self) -> &mut [u8] {
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                self.data.resize(self.data.len() * 2, 0);
            }
        }
        &mut self.data[self.end..]
    }

    /// Notes `n` bytes read into [`ReadBuf::room`]; 0 is end of stream.
    fn filled(&mut self, n: usize) -> io::Result<()> {
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.end += n;
        Ok(())
    }
}

/// A blocking connection.
pub struct SyncConn {
    stream: TcpStream,
    buf: ReadBuf,
    out: Vec<u8>,
}

impl SyncConn {
    /// Connects to `addr`.
    pub fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: ReadBuf::default(),
            out: Vec::new(),
        })
    }

    /// Sends one command and reads its reply.
    pub fn command(&mut self, args: &[&[u8]]) -> io::Result<Reply> {
        self.out.clear();
        encode(args, &mut self.out);
        self.stream.write_all(&self.out)?;
        self.read_reply()
    }

    /// Reads the next reply.
    pub fn read_reply(&mut self) -> io::Result<Reply> {
        loop {
            if let Some(reply) = self.buf.next()? {
                return Ok(reply);
            }
            let n = self.stream.read(self.buf.room())?;
            self.buf.filled(n)?;
        }
    }

    /// A field of `INFO section`, such as `used_memory` of `memory`.
    pub fn info_field(&mut self, section: &str, field: &str) -> io::Result<u64> {
        let Reply::Bulk(Some(text)) = self.command(&[b"INFO", section.as_bytes()])? else {
            return Err(io::Error::other("INFO did not answer with a bulk string"));
        };
        let text = String::from_utf8_lossy(&text);
        text.lines()
            .find_map(|l| {
                l.strip_prefix(field)?
                    .strip_prefix(':')?
                    .trim()
                    .parse()
                    .ok()
            })
            .ok_or_else(|| io::Error::other(format!("INFO {section} has no {field}")))
    }
}

/// Pipelined commands on a [`SyncConn`]: sent in rounds of `depth` commands,
/// and every reply is checked not to be an error.
pub struct Pipeline<'a> {
    conn: &'a mut SyncConn,
    buf: Vec<u8>,
    pending: usize,
    depth: usize,
}

impl<'a> Pipeline<'a> {
    /// A pipeline that sends a round every `depth` commands.
    pub fn new(conn: &'a mut SyncConn, depth: usize) -> Self {
        Self {
            conn,
            buf: Vec::new(),
            pending: 0,
            depth,
        }
    }

    /// Queues one command.
    pub fn push(&mut self, args: &[&[u8]]) -> io::Result<()> {
        encode(args, &mut self.buf);
        self.pending += 1;
        if self.pending == self.depth {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends what is queued and reads all its replies.
    pub fn flush(&mut self) -> io::Result<()> {
        self.conn.stream.write_all(&self.buf)?;
        self.buf.clear();
        for _ in 0..std::mem::take(&mut self.pending) {
            if let Reply::Error(e) = self.conn.read_reply()? {
                return Err(io::Error::other(format!("redis: {e}")));
            }
        }
        Ok(())
    }
}

/// A tokio connection.
pub struct AsyncConn {
    stream: tokio::net::TcpStream,
    buf: ReadBuf,
    out: Vec<u8>,
}

impl AsyncConn {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: ReadBuf::default(),
            out: Vec::new(),
        })
    }

    /// Sends one command and reads its reply.
    pub async fn command(&mut self, args: &[&[u8]]) -> io::Result<Reply> {
        use tokio::io::AsyncWriteExt;
        self.out.clear();
        encode(args, &mut self.out);
        self.stream.write_all(&self.out).await?;
        self.read_reply().await
    }

    /// Reads the next reply, handing the keys of an `invalidate` push to
    /// `each` without building it ([`invalidation`]): `None` for such a
    /// push, and any other reply as [`Self::read_reply`] gives it.
    pub async fn read_invalidation(
        &mut self,
        mut each: impl FnMut(&[u8]),
    ) -> io::Result<Option<Reply>> {
        self.read_in_place(|buf| invalidation(buf, &mut each)).await
    }

    /// Reads the next reply, taking a pub/sub `message` without building
    /// it ([`message`]): `None` for such a message, and any other reply as
    /// [`Self::read_reply`] gives it.
    pub async fn read_message(&mut self) -> io::Result<Option<Reply>> {
        self.read_in_place(message).await
    }

    /// Reads the next reply, or takes what `read` reads in place (`None`).
    async fn read_in_place(
        &mut self,
        mut read: impl FnMut(&[u8]) -> Result<Option<usize>, String>,
    ) -> io::Result<Option<Reply>> {
        use tokio::io::AsyncReadExt;
        loop {
            if self.buf.take_in_place(&mut read)? {
                return Ok(None);
            }
            if let Some(reply) = self.buf.next()? {
                return Ok(Some(reply));
            }
            let n = self.stream.read(self.buf.room()).await?;
            self.buf.filled(n)?;
        }
    }

    /// Reads the next reply.
    pub async fn read_reply(&mut self) -> io::Result<Reply> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(reply) = self.buf.next()? {
                return Ok(reply);
            }
            let n = self.stream.read(self.buf.room()).await?;
            self.buf.filled(n)?;
        }
    }

    /// Writes bytes already encoded (one or more commands) without reading.
    pub async fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await
    }

    /// Splits the connection into a reader (which keeps any bytes already
    /// read) and the write half, for a writer that does not wait for replies.
    pub fn into_split(
        self,
    ) -> (
        AsyncReader<tokio::net::tcp::OwnedReadHalf>,
        tokio::net::tcp::OwnedWriteHalf,
    ) {
        let (read, write) = self.stream.into_split();
        (
            AsyncReader {
                stream: read,
                buf: self.buf,
            },
            write,
        )
    }
}

/// Replies read from the read half of a tokio connection.
pub struct AsyncReader<R> {
    stream: R,
    buf: ReadBuf,
}

impl<R: tokio::io::AsyncRead + Unpin> AsyncReader<R> {
    /// Reads the next reply. Cancel-safe: dropping the future loses nothing.
    pub async fn read_reply(&mut self) -> io::Result<Reply> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(reply) = self.buf.next()? {
                return Ok(reply);
            }
            let n = self.stream.read(self.buf.room()).await?;
            self.buf.filled(n)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pub/sub `message` is taken in place, in RESP2 and RESP3 alike,
    /// as many bytes as the parser reads for it; a cut one, and any other
    /// reply, is left to the parser.
    #[test]
    fn a_message_takes_the_bytes_the_parser_does() {
        for head in [&b">3\r\n"[..], &b"*3\r\n"[..]] {
            let mut buf = head.to_vec();
            for part in [&b"message"[..], b"fan", b"12\r\n3"] {
                buf.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
                buf.extend_from_slice(part);
                buf.extend_from_slice(b"\r\n");
            }
            let whole = buf.len();
            buf.extend_from_slice(b"+OK\r\n");
            let (_, used) = parse(&buf).unwrap().unwrap();
            assert_eq!(used, whole);
            assert_eq!(message(&buf), Ok(Some(whole)));
            for cut in 0..whole {
                assert_eq!(message(&buf[..cut]), Ok(None), "cut at {cut}");
            }
        }
        let mut other = Vec::new();
        encode(&[b"subscribe", b"fan"], &mut other);
        assert_eq!(message(&other), Ok(None));
        assert_eq!(message(b"+OK\r\n"), Ok(None));
        assert_eq!(message(&push(Some(&[b"k"]))), Ok(None));
        assert!(message(b"*3\r\n$7\r\nmessage\r\n:1\r\n").is_err());
    }

    fn push(keys: Option<&[&[u8]]>) -> Vec<u8> {
        let mut out = b">2\r\n$10\r\ninvalidate\r\n".to_vec();
        match keys {
            Some(keys) => encode(keys, &mut out),
            None => out.extend_from_slice(b"_\r\n"),
        }
        out
    }

    /// The bytes an `invalidate` push takes and its keys.
    type Read = Option<(usize, Vec<Vec<u8>>)>;

    fn read(buf: &[u8]) -> Result<Read, String> {
        let mut keys = Vec::new();
        Ok(invalidation(buf, |k| keys.push(k.to_vec()))?.map(|used| (used, keys)))
    }

    #[test]
    fn an_invalidate_push_gives_the_keys_the_parser_does() {
        let keys: &[&[u8]] = &[b"hot:1", b"", b"feed:\r\n:7"];
        for shape in [Some(keys), Some(&keys[..1]), Some(&[][..]), None] {
            let mut buf = push(shape);
            let whole = buf.len();
            buf.extend_from_slice(b"+OK\r\n");
            let (reply, used) = parse(&buf).unwrap().unwrap();
            let parsed: Vec<Vec<u8>> = match reply {
                Reply::Push(items) => match &items[..] {
                    [Reply::Bulk(Some(kind)), Reply::Array(Some(keys))]
                        if kind == b"invalidate" =>
                    {
                        keys.iter()
                            .map(|k| match k {
                                Reply::Bulk(Some(k)) => k.clone(),
                                other => panic!("a key parsed as {other:?}"),
                            })
                            .collect()
                    }
                    [Reply::Bulk(Some(kind)), Reply::Null] if kind == b"invalidate" => vec![],
                    other => panic!("parsed as {other:?}"),
                },
                other => panic!("parsed as {other:?}"),
            };
            assert_eq!(used, whole);
            assert_eq!(read(&buf).unwrap(), Some((whole, parsed)));
        }
    }

    #[test]
    fn a_push_not_all_read_hands_over_nothing() {
        let buf = push(Some(&[b"hot:1", b"hot:22"]));
        for len in 0..buf.len() {
            assert_eq!(read(&buf[..len]).unwrap(), None, "cut at {len}");
        }
    }

    #[test]
    fn other_replies_are_left_to_the_parser() {
        for other in [
            &b"+OK\r\n"[..],
            b">3\r\n$7\r\nmessage\r\n$3\r\nfan\r\n$1\r\nx\r\n",
            b":1\r\n",
        ] {
            assert_eq!(read(other).unwrap(), None);
        }
        assert!(read(b">2\r\n$10\r\ninvalidate\r\n*1\r\n:5\r\n").is_err());
        assert!(read(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$2\r\nabcd\r\n").is_err());
    }
}
