//! Hostile input: 10,000 malformed requests (random bytes, oversized, deeply
//! nested, invalid UTF-8, truncated) leave the server serving, with no state
//! change.

use freshd::config::Config;
use freshd::pb;
use prost::bytes::{Buf, BufMut, Bytes};
use rand::{Rng, SeedableRng};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

use crate::harness::{fill_req, start_with};

/// Sends raw bytes as the request message and ignores the response body.
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

const METHODS: &[&str] = &[
    "Publish",
    "Fill",
    "Check",
    "CheckBatch",
    "Inspect",
    "Lease",
    "Purge",
    "GetPolicy",
    "SetPolicy",
    "DeletePolicy",
];

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A malformed message of kind `kind`.
fn malformed(kind: usize, rng: &mut rand::rngs::StdRng) -> Vec<u8> {
    match kind {
        // Random bytes behind a field number 0 tag, which no decoder accepts.
        0 => {
            let mut b = vec![0u8];
            let n = rng.random_range(0..256);
            b.extend((0..n).map(|_| rng.random::<u8>()));
            b
        }
        // A length-delimited field 1 claiming more bytes than follow.
        1 => {
            let mut b = vec![0x0a];
            varint(rng.random_range(1_000..1_000_000), &mut b);
            b.extend((0..rng.random_range(0..64)).map(|_| rng.random::<u8>()));
            b
        }
        // A string field (key = 1) that is not UTF-8.
        2 => {
            let bad = [0xff, 0xfe, 0xc3, 0x28, 0xa0, 0xa1];
            let mut b = vec![0x0a];
            varint(bad.len() as u64, &mut b);
            b.extend_from_slice(&bad);
            b
        }
        // Deeply nested messages in field 1, far past the decoder's limit.
        3 => {
            let mut inner: Vec<u8> = Vec::new();
            for _ in 0..200 {
                let mut outer = vec![0x0a];
                varint(inner.len() as u64, &mut outer);
                outer.extend_from_slice(&inner);
                inner = outer;
            }
            inner
        }
        // A truncated varint.
        4 => vec![0x10, 0xff, 0xff, 0xff],
        // An oversized message (above max_message_bytes).
        _ => {
            let mut b = vec![0x0a];
            varint(9_000, &mut b);
            b.extend(std::iter::repeat_n(b'x', 9_000));
            b
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_requests_change_nothing() {
    let mut config = Config::ephemeral();
    config.max_message_bytes = 8_192;
    let mut t = start_with(config).await;
    let filled = t
        .client
        .fill(fill_req("feed:1", &["posts:1"], 0))
        .await
        .unwrap()
        .into_inner();
    let before = t
        .client
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner();

    let channel = tonic::transport::Channel::from_shared(t.server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for worker in 0..4u64 {
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(worker);
            let mut grpc = tonic::client::Grpc::new(channel);
            let mut codes = std::collections::BTreeMap::new();
            for n in 0..2_500usize {
                let method = METHODS[n % METHODS.len()];
                let body = malformed(n % 6, &mut rng);
                grpc.ready()
                    .await
                    .expect("the server keeps accepting requests");
                let path = format!("/freshd.v1.Coordinator/{method}").parse().unwrap();
                let status = grpc
                    .unary(tonic::Request::new(Bytes::from(body)), path, RawCodec)
                    .await
                    .expect_err("malformed input must be refused");
                *codes.entry(status.code() as i32).or_insert(0u64) += 1;
            }
            codes
        }));
    }
    let mut codes = std::collections::BTreeMap::new();
    for task in tasks {
        for (code, n) in task.await.unwrap() {
            *codes.entry(code).or_insert(0) += n;
        }
    }
    assert_eq!(codes.values().sum::<u64>(), 10_000);
    for code in codes.keys() {
        let code = tonic::Code::from(*code);
        assert!(
            matches!(code, tonic::Code::InvalidArgument | tonic::Code::OutOfRange),
            "unexpected {code:?} in {codes:?}"
        );
    }

    // Still serving, and nothing changed.
    let after = t
        .client
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (after.keys, after.edges, after.seq),
        (before.keys, before.edges, before.seq)
    );
    let check = t
        .client
        .check(pb::CheckRequest {
            key: "feed:1".into(),
            version: filled.version,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(check.freshness(), pb::Freshness::Fresh);
}
