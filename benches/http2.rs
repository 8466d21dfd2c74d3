//! The server side of HTTP/2 for unary gRPC-shaped calls: h2's server
//! against freshd's own connection state machine (`freshd::http2`), in the
//! same run, both driven by h2's client over an in-memory duplex in one
//! thread. Each call sends a 5-byte-framed 24-byte message and gets it back
//! with `content-type: application/grpc` and a `grpc-status: 0` trailer;
//! the client is the same on both sides, so the difference between the two
//! times is the servers'.
//!
//! ```sh
//! cargo bench --bench http2
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::task::Context;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion};
use freshd::http2::connection::{Config, Connection, Event};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const MESSAGE: &[u8] = b"\0\0\0\0\x18freshd:bench:key:000001!";

/// h2's server: each request's answer is polled once in place and
/// spawned only if it waits, as freshd's router does with h2.
async fn h2_server(io: DuplexStream) {
    let Ok(mut conn) = h2::server::handshake(io).await else {
        return;
    };
    while let Some(Ok((request, mut respond))) = conn.accept().await {
        let answer = async move {
            let mut body = request.into_body();
            let mut data = BytesMut::new();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
                data.extend_from_slice(&chunk);
            }
            let response = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(())
                .expect("a response");
            if let Ok(mut send) = respond.send_response(response, false) {
                let _ = send.send_data(data.freeze(), false);
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                let _ = send.send_trailers(trailers);
            }
        };
        let mut answer = Box::pin(answer);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if answer.as_mut().poll(&mut cx).is_pending() {
            tokio::spawn(answer);
        }
    }
}

/// freshd's connection, driven by one task that owns the socket: each
/// request whose body is complete is answered at once.
async fn freshd_server(io: DuplexStream) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut conn = Connection::new(Config::default());
    let mut input = BytesMut::with_capacity(16 * 1024);
    let mut events = Vec::new();
    let mut bodies: HashMap<u32, BytesMut> = HashMap::new();
    loop {
        loop {
            let before = input.len();
            events.clear();
            let failed = conn.receive(&mut input, &mut events).is_err();
            for event in events.drain(..) {
                let (stream, done) = match event {
                    Event::Request { stream, end_stream } => {
                        bodies.insert(stream, BytesMut::new());
                        (stream, end_stream)
                    }
                    Event::Data {
                        stream,
                        data,
                        end_stream,
                    } => {
                        if let Some(body) = bodies.get_mut(&stream) {
                            body.extend_from_slice(&data);
                        }
                        conn.release(stream, data.len());
                        (stream, end_stream)
                    }
                    Event::Trailers { stream } => (stream, true),
                    Event::Reset { stream, .. } => {
                        bodies.remove(&stream);
                        continue;
                    }
                };
                if done {
                    let body = bodies.remove(&stream).unwrap_or_default();
                    conn.respond(
                        stream,
                        200,
                        &[(b"content-type", b"application/grpc")],
                        false,
                    );
                    conn.send_data(stream, body.freeze());
                    conn.send_trailers(stream, &[(b"grpc-status", b"0")]);
                }
            }
            if failed || input.len() == before {
                break;
            }
        }
        if !conn.output().is_empty() {
            if wr.write_all(&conn.output()[..]).await.is_err() {
                return;
            }
            conn.output().clear();
        }
        match rd.read_buf(&mut input).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// One call: the message out, its echo back.
async fn call(send: &mut h2::client::SendRequest<Bytes>) {
    let request = http::Request::post("http://freshd/freshd.v1.Coordinator/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("a request");
    let (response, mut stream) = send.send_request(request, false).expect("sent");
    stream
        .send_data(Bytes::from_static(MESSAGE), true)
        .expect("data");
    let response = response.await.expect("an answer");
    let mut body = response.into_body();
    let mut got = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        got += chunk.len();
    }
    let trailers = body.trailers().await.expect("trailers").expect("trailers");
    assert_eq!(got, MESSAGE.len());
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut group = c.benchmark_group("http2 unary call");
    for (name, server) in [("h2 server", 0), ("freshd::http2", 1)] {
        let mut send = runtime.block_on(async {
            let (client, server_io) = tokio::io::duplex(256 * 1024);
            if server == 0 {
                tokio::spawn(h2_server(server_io));
            } else {
                tokio::spawn(freshd_server(server_io));
            }
            let (send, connection) = h2::client::handshake(client).await.expect("a handshake");
            tokio::spawn(async move {
                let _ = connection.await;
            });
            send.ready().await.expect("ready")
        });
        group.bench_function(format!("{name}, one at a time"), |b| {
            b.iter(|| runtime.block_on(call(&mut send)))
        });
        group.bench_function(format!("{name}, 16 in flight"), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let mut calls = Vec::with_capacity(16);
                    for _ in 0..16 {
                        let mut send = send.clone();
                        calls.push(tokio::spawn(async move { call(&mut send).await }));
                    }
                    for handle in calls {
                        handle.await.expect("a call");
                    }
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
