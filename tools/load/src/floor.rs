//! The loopback floor: the least a server can do to deliver a change to N
//! subscribers that each hold a TCP connection of their own, or that share
//! connections.
//!
//! `freshd-load floor-server` accepts connections that name their role in
//! their first line:
//!
//! - `S\n`: a subscriber. It is written to and never read from.
//! - `S<n>\n` (`S100\n`): `n` subscribers sharing the connection, as Watch
//!   streams share an HTTP/2 connection. Each change is written to it `n`
//!   times over, in one `write`.
//! - `W\n`: a writer. Every line it sends (`hot:17\n`) is written, as it is,
//!   to every subscriber connection in turn, one `write` per connection,
//!   from the thread that read it.
//!
//! No parsing beyond the newline, no bookkeeping, no framing, no answer to
//! the writer: one `read` and a `write` per connection per change, which is
//! what every server that pushes to its subscribers (freshd's Watch
//! streams, Redis tracking, etcd watches) must at least do. The notice
//! workload drives it like the servers (`--target floor`, with `--per-conn`
//! for shared connections), so the floor's latency and CPU per notice sit
//! beside theirs, measured the same way on the same machine in the same
//! run.
//!
//! It is a measuring stick, not a server: its writes block, so a
//! subscriber that stops reading stalls the others.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

/// How long a new connection may take to name its role.
const ROLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest line a writer may send.
const MAX_LINE: usize = 1024;
/// The most subscribers one connection may carry.
const MAX_SHARED: usize = 100_000;

/// What a connection's first line says it is.
#[derive(Debug, PartialEq, Eq)]
enum Role {
    /// This many subscribers.
    Subscribers(usize),
    Writer,
}

/// A subscriber connection and how many subscribers share it.
struct Subscribed {
    conn: TcpStream,
    shared: usize,
}

/// Serves on `listener` until accepting fails. Each writer gets a thread of
/// its own; subscribers are written from the writers' threads.
pub fn serve(listener: TcpListener) -> std::io::Result<()> {
    let subscribers: Arc<Mutex<Vec<Subscribed>>> = Arc::default();
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(c) => c,
            // A connection that failed before it was accepted.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e),
        };
        match role(&mut conn) {
            Ok(Role::Subscribers(shared)) => subscribers.lock().push(Subscribed { conn, shared }),
            Ok(Role::Writer) => {
                let subscribers = subscribers.clone();
                std::thread::Builder::new()
                    .name("floor-writer".into())
                    .spawn(move || relay(conn, &subscribers))?;
            }
            // A connection that says nothing we know is closed.
            Err(_) => {}
        }
    }
    Ok(())
}

/// Reads a new connection's role and readies it for its part.
fn role(conn: &mut TcpStream) -> std::io::Result<Role> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(ROLE_TIMEOUT))?;
    // Byte by byte: nothing past the newline is read, and a subscriber
    // sends nothing after it anyway.
    let mut first = Vec::with_capacity(8);
    let mut byte = [0u8; 1];
    while first.len() < 8 && first.last() != Some(&b'\n') {
        conn.read_exact(&mut byte)?;
        first.push(byte[0]);
    }
    conn.set_read_timeout(None)?;
    parse_role(&first).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a connection must start with S\\n, S<1..={MAX_SHARED}>\\n or W\\n"),
        )
    })
}

/// The role a first line names.
fn parse_role(line: &[u8]) -> Option<Role> {
    match line.strip_suffix(b"\n")? {
        b"W" => Some(Role::Writer),
        b"S" => Some(Role::Subscribers(1)),
        [b'S', n @ ..] => std::str::from_utf8(n)
            .ok()?
            .parse()
            .ok()
            .filter(|n| (1..=MAX_SHARED).contains(n))
            .map(Role::Subscribers),
        _ => None,
    }
}

/// Writes every line `writer` sends to every subscriber (as many times
/// over as share a connection, in one write), dropping connections that
/// fail, until the writer closes or sends a line longer than [`MAX_LINE`].
fn relay(writer: TcpStream, subscribers: &Mutex<Vec<Subscribed>>) {
    let mut lines = BufReader::new(writer);
    let mut line = Vec::with_capacity(64);
    // The line repeated, for shared connections; made once per line.
    let mut repeated = Vec::new();
    loop {
        line.clear();
        match (&mut lines)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) if line.last() != Some(&b'\n') => return,
            Ok(_) => {
                repeated.clear();
                subscribers.lock().retain_mut(|s| {
                    if s.shared == 1 {
                        return s.conn.write_all(&line).is_ok();
                    }
                    let want = line.len() * s.shared;
                    while repeated.len() < want {
                        repeated.extend_from_slice(&line);
                    }
                    s.conn.write_all(&repeated[..want]).is_ok()
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || serve(listener));
        addr
    }

    fn connect(addr: std::net::SocketAddr, role: &[u8]) -> TcpStream {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(role).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    }

    /// Reads from `conn` until `want` bytes have come.
    fn read_n(conn: &mut TcpStream, want: usize) -> Vec<u8> {
        let mut got = vec![0u8; want];
        conn.read_exact(&mut got).unwrap();
        got
    }

    #[test]
    fn every_line_reaches_every_subscriber_in_order() {
        let addr = start();
        let mut subs: Vec<TcpStream> = (0..3).map(|_| connect(addr, b"S\n")).collect();
        // One thread accepts, in the order connections came: a writer that
        // connects after the subscribers finds them registered.
        let mut w = connect(addr, b"W\n");
        w.write_all(b"hot:0\nhot:1\n").unwrap();
        w.write_all(b"hot:2\n").unwrap();
        for s in &mut subs {
            assert_eq!(read_n(s, 18), b"hot:0\nhot:1\nhot:2\n");
        }
    }

    #[test]
    fn a_closed_subscriber_does_not_stop_the_others() {
        let addr = start();
        let gone = connect(addr, b"S\n");
        let mut kept = connect(addr, b"S\n");
        drop(gone);
        let mut w = connect(addr, b"W\n");
        for i in 0..50 {
            w.write_all(format!("hot:{i}\n").as_bytes()).unwrap();
        }
        let want: String = (0..50).map(|i| format!("hot:{i}\n")).collect();
        assert_eq!(read_n(&mut kept, want.len()), want.as_bytes());
    }

    #[test]
    fn a_shared_connection_gets_each_line_once_per_subscriber() {
        let addr = start();
        let mut one = connect(addr, b"S\n");
        let mut three = connect(addr, b"S3\n");
        let mut two = connect(addr, b"S2\n");
        let mut w = connect(addr, b"W\n");
        w.write_all(b"hot:0\nhot:1\n").unwrap();
        assert_eq!(read_n(&mut one, 12), b"hot:0\nhot:1\n");
        assert_eq!(
            read_n(&mut three, 36),
            b"hot:0\nhot:0\nhot:0\nhot:1\nhot:1\nhot:1\n"
        );
        assert_eq!(read_n(&mut two, 24), b"hot:0\nhot:0\nhot:1\nhot:1\n");
    }

    #[test]
    fn roles_are_read_from_the_first_line() {
        assert_eq!(parse_role(b"S\n"), Some(Role::Subscribers(1)));
        assert_eq!(parse_role(b"S100\n"), Some(Role::Subscribers(100)));
        assert_eq!(parse_role(b"W\n"), Some(Role::Writer));
        assert_eq!(parse_role(b"S0\n"), None);
        assert_eq!(parse_role(b"S100001\n"), None);
        assert_eq!(parse_role(b"Sx\n"), None);
        assert_eq!(parse_role(b"S"), None);
        assert_eq!(parse_role(b"X\n"), None);
    }

    #[test]
    fn an_unknown_role_is_refused() {
        let addr = start();
        let mut c = connect(addr, b"X\n");
        let mut buf = [0u8; 1];
        // The server closes the connection: end of stream, or a reset.
        assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)));
    }
}
