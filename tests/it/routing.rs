//! How requests reach the services: unknown paths, the `grpc-timeout`
//! deadline, and how a Watch stream opens and ends, seen through a bare
//! HTTP/2 client (a gRPC client would enforce the deadline itself and hide
//! the server's answer).

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use freshd::config::Config;
use freshd::pb;
use freshd::server::RunningServer;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;

/// A bare HTTP/2 client connection to `server`, its requests' bodies of
/// type `B`.
async fn connect<B>(server: &RunningServer) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(socket))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// What a bare HTTP/2 POST of `message` to `path` got back: the gRPC status
/// code and message, from the trailers or a trailers-only answer.
async fn post(
    server: &RunningServer,
    path: &str,
    message: &impl Message,
    headers: &[(&str, &str)],
) -> (i32, String) {
    let mut sender = connect(server).await;
    let encoded = message.encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + encoded.len());
    framed.put_u8(0);
    framed.put_u32(encoded.len() as u32);
    framed.put_slice(&encoded);
    let mut request = http::Request::post(format!("http://{}{path}", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(framed))).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), async {
        let response = sender.send_request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let collected = body.collect().await.unwrap();
        (parts.headers, collected.trailers().cloned())
    })
    .await
    .expect("an answer within 5 s");
    let (headers, trailers) = response;
    status(&headers, trailers.as_ref())
}

/// The gRPC status code and message of an answer: from its trailers, or
/// from its headers when it is trailers-only.
fn status(headers: &http::HeaderMap, trailers: Option<&http::HeaderMap>) -> (i32, String) {
    let status = trailers.unwrap_or(headers);
    let code = status
        .get("grpc-status")
        .expect("a grpc-status")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let message = status
        .get("grpc-message")
        .map(|m| percent_decode(m.to_str().unwrap()))
        .unwrap_or_default();
    (code, message)
}

/// grpc-message is percent-encoded.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn check(min_seq: u64) -> pb::CheckRequest {
    pb::CheckRequest {
        key: "feed:1".into(),
        min_seq,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_path_no_service_serves_is_unimplemented_and_named() {
    let server = RunningServer::start(Config::ephemeral()).await.unwrap();
    let (code, message) = post(&server, "/nope.v1.Missing/Call", &check(0), &[]).await;
    assert_eq!(code, tonic::Code::Unimplemented as i32);
    assert!(message.contains("/nope.v1.Missing/Call"), "{message}");
    // A known service's unknown method: the service says so.
    let (code, _) = post(&server, "/freshd.v1.Coordinator/Nope", &check(0), &[]).await;
    assert_eq!(code, tonic::Code::Unimplemented as i32);
    // And a known one answers.
    let (code, _) = post(&server, "/freshd.v1.Coordinator/Check", &check(0), &[]).await;
    assert_eq!(code, tonic::Code::Ok as i32);
}

#[tokio::test]
async fn a_request_past_its_grpc_timeout_is_deadline_exceeded() {
    let mut config = Config::ephemeral();
    // Without the deadline, this check would wait a minute for its seq.
    config.limits.max_wait_for_seq = Duration::from_secs(60);
    let server = RunningServer::start(config).await.unwrap();
    let (code, message) = post(
        &server,
        "/freshd.v1.Coordinator/Check",
        &check(1 << 40),
        &[("grpc-timeout", "100m")],
    )
    .await;
    assert_eq!(code, tonic::Code::DeadlineExceeded as i32, "{message}");
    assert!(message.contains("grpc-timeout"), "{message}");
    // A deadline that is not reached changes nothing.
    let (code, message) = post(
        &server,
        "/freshd.v1.Coordinator/Check",
        &check(0),
        &[("grpc-timeout", "10S")],
    )
    .await;
    assert_eq!(code, tonic::Code::Ok as i32, "{message}");
}

#[tokio::test]
async fn a_malformed_grpc_timeout_is_invalid_argument() {
    let server = RunningServer::start(Config::ephemeral()).await.unwrap();
    for bad in ["soon", "100", "123456789m", "1.5S"] {
        let (code, message) = post(
            &server,
            "/freshd.v1.Coordinator/Check",
            &check(0),
            &[("grpc-timeout", bad)],
        )
        .await;
        assert_eq!(
            code,
            tonic::Code::InvalidArgument as i32,
            "{bad}: {message}"
        );
        assert!(message.contains("grpc-timeout"), "{bad}: {message}");
    }
}

fn watch_start() -> pb::WatchRequest {
    pb::WatchRequest {
        request: Some(pb::watch_request::Request::Start(pb::WatchStart {
            client_id: "bare".into(),
            track: vec!["feed:1".into()],
            ..Default::default()
        })),
    }
}

#[tokio::test]
async fn a_watch_whose_client_closes_its_side_ends_ok() {
    let server = RunningServer::start(Config::ephemeral()).await.unwrap();
    // The request body is the start message and its end: the stream starts,
    // sees the client's side close, and ends with OK in the trailers.
    let (code, message) = post(&server, "/freshd.v1.Coordinator/Watch", &watch_start(), &[]).await;
    assert_eq!(code, tonic::Code::Ok as i32, "{message}");
}

#[tokio::test]
async fn a_watch_with_a_malformed_grpc_timeout_is_invalid_argument() {
    let server = RunningServer::start(Config::ephemeral()).await.unwrap();
    let (code, message) = post(
        &server,
        "/freshd.v1.Coordinator/Watch",
        &watch_start(),
        &[("grpc-timeout", "soon")],
    )
    .await;
    assert_eq!(code, tonic::Code::InvalidArgument as i32, "{message}");
    assert!(message.contains("grpc-timeout"), "{message}");
}

#[tokio::test]
async fn a_watch_whose_first_message_misses_its_grpc_timeout_is_deadline_exceeded() {
    use http_body_util::StreamBody;
    let server = RunningServer::start(Config::ephemeral()).await.unwrap();
    let mut sender = connect(&server).await;
    // A request body that stays open and sends nothing.
    let (_keep, frames) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
    >(1);
    let request = http::Request::post(format!(
        "http://{}/freshd.v1.Coordinator/Watch",
        server.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", "100m")
    .body(StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(frames),
    ))
    .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let status = response.headers();
    assert_eq!(
        status.get("grpc-status").unwrap(),
        &(tonic::Code::DeadlineExceeded as i32).to_string()
    );
    let message = percent_decode(status.get("grpc-message").unwrap().to_str().unwrap());
    assert!(message.contains("grpc-timeout"), "{message}");
}

/// What a bare HTTP/2 POST to `path` got back when its body was `frames`,
/// each a DATA frame of its own: the gRPC status code and message, and the
/// answer's body.
async fn post_frames(
    server: &RunningServer,
    path: &str,
    frames: Vec<Vec<u8>>,
) -> (i32, String, Bytes) {
    post_body(server, path, frames, false).await
}

/// As [`post_frames`]; with `keep_open`, the request's body does not end
/// after its frames: it stays open until the answer has come.
async fn post_body(
    server: &RunningServer,
    path: &str,
    frames: Vec<Vec<u8>>,
    keep_open: bool,
) -> (i32, String, Bytes) {
    use http_body_util::StreamBody;
    let mut sender = connect(server).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
    >(frames.len().max(1));
    let (answered, answer_came) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        for frame in frames {
            let _ = tx
                .send(Ok(hyper::body::Frame::data(Bytes::from(frame))))
                .await;
        }
        if keep_open {
            // Dropped with the answer (or with the request, if it fails).
            let _ = answer_came.await;
        }
        drop(tx);
    });
    let request = http::Request::post(format!("http://{}{path}", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap();
    let (headers, trailers, body) = tokio::time::timeout(Duration::from_secs(5), async {
        let response = sender.send_request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (parts.headers, trailers, collected.to_bytes())
    })
    .await
    .expect("an answer within 5 s");
    drop(answered);
    let (code, message) = status(&headers, trailers.as_ref());
    (code, message, body)
}

/// `message` with the 5-byte gRPC prefix.
fn framed(message: &impl Message) -> Vec<u8> {
    let encoded = message.encode_to_vec();
    let mut out = Vec::with_capacity(5 + encoded.len());
    out.put_u8(0);
    out.put_u32(encoded.len() as u32);
    out.extend_from_slice(&encoded);
    out
}

#[tokio::test]
async fn a_check_whose_body_comes_in_pieces_is_answered() {
    let server = RunningServer::start(Config::ephemeral()).await.unwrap();
    let batch = pb::CheckBatchRequest {
        items: (0..3)
            .map(|i| pb::CheckItem {
                key: format!("feed:{i}"),
                version: 1,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    // The prefix split, then the message in three pieces, each its own DATA
    // frame (they may reach the server in one read; conn.rs's tests hold a
    // body's pieces apart and check the call waits for its end).
    let whole = framed(&batch);
    let frames = vec![
        whole[..3].to_vec(),
        whole[3..9].to_vec(),
        whole[9..20].to_vec(),
        whole[20..].to_vec(),
    ];
    let (code, message, body) =
        post_frames(&server, "/freshd.v1.Coordinator/CheckBatch", frames).await;
    assert_eq!(code, tonic::Code::Ok as i32, "{message}");
    assert_eq!(body[0], 0);
    let answer = pb::CheckBatchResponse::decode(&body[5..]).unwrap();
    assert_eq!(answer.results.len(), 3);
    for result in &answer.results {
        // Never filled: freshd holds no registration for them.
        assert_eq!(result.freshness, pb::Freshness::Unknown as i32);
    }
    // A single Check, its prefix and message apart.
    let whole = framed(&check(0));
    let (code, message, body) = post_frames(
        &server,
        "/freshd.v1.Coordinator/Check",
        vec![whole[..5].to_vec(), whole[5..].to_vec()],
    )
    .await;
    assert_eq!(code, tonic::Code::Ok as i32, "{message}");
    let answer = pb::CheckResponse::decode(&body[5..]).unwrap();
    assert_eq!(answer.freshness, pb::Freshness::Unknown as i32);
}

#[tokio::test]
async fn a_check_body_must_be_one_whole_uncompressed_message_within_the_limit() {
    let mut config = Config::ephemeral();
    config.max_message_bytes = 1_000;
    let server = RunningServer::start(config).await.unwrap();
    let one = framed(&check(0));
    let prefix = |flag: u8, len: u32| {
        let mut out = vec![flag];
        out.extend_from_slice(&len.to_be_bytes());
        out
    };
    let cases: Vec<(&str, Vec<Vec<u8>>, tonic::Code, &str)> = vec![
        (
            "no message",
            vec![],
            tonic::Code::InvalidArgument,
            "the body held none",
        ),
        (
            "two messages",
            vec![one.clone(), one.clone()],
            tonic::Code::InvalidArgument,
            "must be one message",
        ),
        (
            "a message cut short",
            vec![one[..one.len() - 2].to_vec()],
            tonic::Code::InvalidArgument,
            "ended inside its message",
        ),
        (
            // Compressed, with no grpc-encoding to say how: the gRPC spec
            // makes that INTERNAL.
            "a compressed message",
            vec![[&prefix(1, 3)[..], &[1, 2, 3]].concat()],
            tonic::Code::Internal,
            "compressed-flag",
        ),
        (
            // Refused from its prefix: the rest is never sent.
            "a message above max_message_bytes",
            vec![prefix(0, 5_000)],
            tonic::Code::OutOfRange,
            "5000 bytes exceeds the limit of 1000 (max_message_bytes)",
        ),
        (
            "a key that is not UTF-8",
            vec![[&prefix(0, 5)[..], &[0x0a, 0x03, 0x66, 0xff, 0xfe]].concat()],
            tonic::Code::InvalidArgument,
            "CheckRequest.key",
        ),
    ];
    for (what, frames, want, text) in cases {
        // Every unary call the router reads itself.
        for path in [
            "/freshd.v1.Coordinator/Check",
            "/freshd.v1.Coordinator/CheckBatch",
            "/freshd.v1.Coordinator/Publish",
            "/freshd.v1.Coordinator/Fill",
            "/freshd.v1.Coordinator/Lease",
        ] {
            if what == "a key that is not UTF-8" && !path.ends_with("/Check") {
                continue;
            }
            let (code, message, _) = post_frames(&server, path, frames.clone()).await;
            assert_eq!(code, want as i32, "{what} to {path}: {message}");
            assert!(message.contains(text), "{what} to {path}: {message}");
        }
    }
    // A message and more, on a body that does not end: refused at once,
    // without waiting for (or buffering) the rest.
    for path in [
        "/freshd.v1.Coordinator/Check",
        "/freshd.v1.Coordinator/CheckBatch",
    ] {
        let (code, message, _) = post_body(
            &server,
            path,
            vec![[&one[..], &[0u8; 3][..]].concat()],
            true,
        )
        .await;
        assert_eq!(
            code,
            tonic::Code::InvalidArgument as i32,
            "{path}: {message}"
        );
        assert!(message.contains("3 bytes after it"), "{path}: {message}");
    }
    // A compression the server does not speak, named in the headers.
    for path in [
        "/freshd.v1.Coordinator/Check",
        "/freshd.v1.Coordinator/Publish",
    ] {
        let (code, message) = post(&server, path, &check(0), &[("grpc-encoding", "gzip")]).await;
        assert_eq!(code, tonic::Code::Unimplemented as i32, "{path}: {message}");
        assert!(message.contains("gzip"), "{path}: {message}");
    }
    // Still serving.
    let (code, message, _) = post_frames(&server, "/freshd.v1.Coordinator/Check", vec![one]).await;
    assert_eq!(code, tonic::Code::Ok as i32, "{message}");
}
