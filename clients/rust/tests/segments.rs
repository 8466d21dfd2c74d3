//! The client sends each request in one write: a relay between a `Client`
//! and a real freshd counts the reads that carry the client's bytes.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use freshd_client::pb::{CheckBatchRequest, CheckItem, CheckRequest};
use freshd_client::Client;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

/// Relays one connection to `server` on threads of its own (blocking
/// sockets, so each write of the client's is read as soon as it lands);
/// returns its address and the number of reads that have carried client
/// bytes so far.
fn relay(server: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reads = Arc::new(AtomicUsize::new(0));
    let counted = reads.clone();
    std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let mut upstream = TcpStream::connect(server).unwrap();
        upstream.set_nodelay(true).unwrap();
        client.set_nodelay(true).unwrap();
        let (mut client_tx, mut up_rx) =
            (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n @ 1..) = up_rx.read(&mut buf) {
                if client_tx.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        });
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n @ 1..) = client.read(&mut buf) {
            counted.fetch_add(1, Ordering::SeqCst);
            if upstream.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    });
    (addr, reads)
}

#[tokio::test]
async fn each_check_and_each_batch_leaves_in_one_write() {
    let server = common::start().await;
    let (addr, reads) = relay(server.addr);
    let client = Client::connect(format!("http://{addr}")).await.unwrap();
    // The connection's preface and settings first.
    client.check(CheckRequest::new("warm:up", 0)).await.unwrap();

    const CALLS: usize = 50;
    let before = reads.load(Ordering::SeqCst);
    for i in 0..CALLS {
        client
            .check(CheckRequest::new(format!("feed:{i}"), 0))
            .await
            .unwrap();
    }
    let checks = reads.load(Ordering::SeqCst) - before;

    // A batch of 64 keys is over 256 bytes: h2 writes its DATA frame
    // before it takes the frame that ends the request.
    let before = reads.load(Ordering::SeqCst);
    for i in 0..CALLS {
        let items = (0..64).map(|k| CheckItem::new(format!("feed:{i}:{k}"), 0));
        let answer = client
            .check_batch(CheckBatchRequest::new(items))
            .await
            .unwrap();
        assert_eq!(answer.results.len(), 64);
    }
    let batches = reads.load(Ordering::SeqCst) - before;

    // Without coalescing these are two and three writes per call; a few
    // connection-level frames (WINDOW_UPDATE) may travel on their own.
    assert!(checks <= CALLS + 3, "{checks} reads for {CALLS} checks");
    assert!(batches <= CALLS + 5, "{batches} reads for {CALLS} batches");
    assert!(checks >= CALLS && batches >= CALLS);
}
