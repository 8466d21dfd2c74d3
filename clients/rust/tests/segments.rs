//! The client sends each request in one write, and the server each answer:
//! a relay between a `Client` and a real freshd counts the reads that carry
//! each side's bytes.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use freshd_client::pb::{CheckBatchRequest, CheckItem, CheckRequest};
use freshd_client::Client;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

/// Reads that have carried each side's bytes so far.
#[derive(Default)]
struct Reads {
    client: AtomicUsize,
    server: AtomicUsize,
}

impl Reads {
    fn now(&self) -> (usize, usize) {
        (
            self.client.load(Ordering::SeqCst),
            self.server.load(Ordering::SeqCst),
        )
    }
}

/// Relays one connection to `server` on threads of its own (blocking
/// sockets, so each write is read as soon as it lands); returns its address
/// and the reads of each side's bytes.
fn relay(server: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<Reads>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reads = Arc::new(Reads::default());
    let counted = reads.clone();
    std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let mut upstream = TcpStream::connect(server).unwrap();
        upstream.set_nodelay(true).unwrap();
        client.set_nodelay(true).unwrap();
        let (mut client_tx, mut up_rx) =
            (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        let answers = counted.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n @ 1..) = up_rx.read(&mut buf) {
                answers.server.fetch_add(1, Ordering::SeqCst);
                if client_tx.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        });
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n @ 1..) = client.read(&mut buf) {
            counted.client.fetch_add(1, Ordering::SeqCst);
            if upstream.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    });
    (addr, reads)
}

#[tokio::test]
async fn each_call_and_each_answer_leaves_in_one_write() {
    let server = common::start().await;
    let (addr, reads) = relay(server.addr);
    let client = Client::connect(format!("http://{addr}")).await.unwrap();
    // The connection's preface and settings first.
    client.check(CheckRequest::new("warm:up", 0)).await.unwrap();

    const CALLS: usize = 50;
    let before = reads.now();
    for i in 0..CALLS {
        client
            .check(CheckRequest::new(format!("feed:{i}"), 0))
            .await
            .unwrap();
    }
    let after = reads.now();
    let (checks, check_answers) = (after.0 - before.0, after.1 - before.1);

    // A batch of 64 keys is over 256 bytes, and so is its answer: h2 writes
    // such a DATA frame before it takes the frame that ends the message.
    let before = reads.now();
    for i in 0..CALLS {
        let items = (0..64).map(|k| CheckItem::new(format!("feed:{i}:{k}"), 0));
        let answer = client
            .check_batch(CheckBatchRequest::new(items))
            .await
            .unwrap();
        assert_eq!(answer.results.len(), 64);
    }
    let after = reads.now();
    let (batches, batch_answers) = (after.0 - before.0, after.1 - before.1);

    // Without coalescing the requests are two and three writes per call, a
    // batch's answer two; a few connection-level frames (WINDOW_UPDATE,
    // PING) may travel on their own.
    assert!(checks <= CALLS + 3, "{checks} reads for {CALLS} checks");
    assert!(batches <= CALLS + 5, "{batches} reads for {CALLS} batches");
    assert!(checks >= CALLS && batches >= CALLS);
    assert!(
        check_answers <= CALLS + 3,
        "{check_answers} reads for {CALLS} answers"
    );
    assert!(
        batch_answers <= CALLS + 5,
        "{batch_answers} reads for {CALLS} batch answers"
    );
    assert!(check_answers >= CALLS && batch_answers >= CALLS);
}
