//! The README's walk-through as a program: fill a feed with its dependencies,
//! check it (FRESH), publish a change to one dependency, check again (STALE).
//!
//! ```sh
//! cargo run --release --bin freshd &
//! cargo run --example walkthrough -- http://127.0.0.1:50051
//! ```

use freshd::pb::{self, coordinator_client::CoordinatorClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:50051".to_owned());
    let mut client = CoordinatorClient::connect(addr).await?;
    let key = "feed:user:4821";

    // A miss: note the seq before reading the origin.
    let miss = client
        .check(pb::CheckRequest {
            key: key.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!("check on a miss: {:?}, seq {}", miss.freshness(), miss.seq);

    // Read the origin (not shown), then register the key and its dependencies.
    let fill = client
        .fill(pb::FillRequest {
            key: key.into(),
            dependencies: vec![
                "follows:4821".into(),
                "posts:author:77".into(),
                "mutes:4821".into(),
            ],
            ttl_ms: 60_000,
            observed_seq: miss.seq,
            epoch: miss.epoch,
            ..Default::default()
        })
        .await?
        .into_inner();
    println!("filled: version {}", fill.version);

    let check = |version| pb::CheckRequest {
        key: key.into(),
        version,
        epoch: fill.epoch,
        ..Default::default()
    };
    let hit = client.check(check(fill.version)).await?.into_inner();
    println!("check on a hit: {:?}", hit.freshness());

    let published = client
        .publish(pb::PublishRequest {
            changes: vec![pb::Change {
                key: "posts:author:77".into(),
                ..Default::default()
            }],
            client_id: "walkthrough".into(),
        })
        .await?
        .into_inner();
    println!(
        "published posts:author:77: seq {}, {} keys invalidated",
        published.seq, published.results[0].invalidated
    );

    let after = client.check(check(fill.version)).await?.into_inner();
    println!(
        "check after the change: {:?}, current version {}",
        after.freshness(),
        after.version
    );
    Ok(())
}
