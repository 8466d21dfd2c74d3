//! The loopback floor: the least a server can do to deliver a change to N
//! subscribers that each hold a TCP connection of their own.
//!
//! `freshd-load floor-server` accepts connections that name their role in
//! their first two bytes:
//!
//! - `S\n`: a subscriber. It is written to and never read from.
//! - `W\n`: a writer. Every line it sends (`hot:17\n`) is written, as it is,
//!   to every subscriber in turn, one `write` per subscriber, from the
//!   thread that read it.
//!
//! No parsing beyond the newline, no bookkeeping, no framing, no answer to
//! the writer: one `read` and N `write`s per change, which is what every
//! server that pushes to a connection per subscriber (freshd's Watch
//! streams, Redis tracking, etcd watches) must at least do. The notice
//! workload drives it like the servers (`--target floor`), so the floor's
//! latency and CPU per notice sit beside theirs, measured the same way on
//! the same machine in the same run.
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

/// What a connection's first two bytes say it is.
#[derive(Debug, PartialEq, Eq)]
enum Role {
    Subscriber,
    Writer,
}

/// Serves on `listener` until accepting fails. Each writer gets a thread of
/// its own; subscribers are written from the writers' threads.
pub fn serve(listener: TcpListener) -> std::io::Result<()> {
    let subscribers: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(c) => c,
            // A connection that failed before it was accepted.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e),
        };
        match role(&mut conn) {
            Ok(Role::Subscriber) => subscribers.lock().push(conn),
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
    let mut first = [0u8; 2];
    conn.read_exact(&mut first)?;
    conn.set_read_timeout(None)?;
    match &first {
        b"S\n" => Ok(Role::Subscriber),
        b"W\n" => Ok(Role::Writer),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "a connection must start with S\\n or W\\n",
        )),
    }
}

/// Writes every line `writer` sends to every subscriber, dropping those
/// whose connection fails, until the writer closes or sends a line longer
/// than [`MAX_LINE`].
fn relay(writer: TcpStream, subscribers: &Mutex<Vec<TcpStream>>) {
    let mut lines = BufReader::new(writer);
    let mut line = Vec::with_capacity(64);
    loop {
        line.clear();
        match (&mut lines)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) if line.last() != Some(&b'\n') => return,
            Ok(_) => subscribers
                .lock()
                .retain_mut(|s| s.write_all(&line).is_ok()),
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
    fn an_unknown_role_is_refused() {
        let addr = start();
        let mut c = connect(addr, b"X\n");
        let mut buf = [0u8; 1];
        // The server closes the connection: end of stream, or a reset.
        assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)));
    }
}
