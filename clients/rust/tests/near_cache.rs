//! NearCache against real servers: invalidation by another client's publish,
//! stale-while-revalidate, sampling, fill races, single flight, a server
//! restart (new epoch) and an unreachable server.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::eventually;
use freshd_client::{pb, Client, NearCache};
use parking_lot::Mutex;

const WAIT: Duration = Duration::from_secs(10);

type LoadFuture =
    Pin<Box<dyn Future<Output = Result<(String, Vec<String>), std::io::Error>> + Send>>;

/// The origin: values by key, and a count of reads.
#[derive(Clone, Default)]
struct Origin {
    values: Arc<Mutex<HashMap<String, String>>>,
    reads: Arc<AtomicU64>,
}

impl Origin {
    fn set(&self, key: &str, value: &str) {
        self.values.lock().insert(key.to_owned(), value.to_owned());
    }

    fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    /// A loader of `key` whose value depends on `deps`.
    fn loader(&self, key: &str, deps: &[&str]) -> impl Fn() -> LoadFuture + Send + Sync + 'static {
        let origin = self.clone();
        let key = key.to_owned();
        let deps: Vec<String> = deps.iter().map(|d| d.to_string()).collect();
        move || {
            let origin = origin.clone();
            let key = key.clone();
            let deps = deps.clone();
            Box::pin(async move {
                origin.reads.fetch_add(1, Ordering::SeqCst);
                let value = origin.values.lock().get(&key).cloned().unwrap_or_default();
                Ok((value, deps))
            })
        }
    }
}

async fn client(url: &str, id: &str) -> Client {
    Client::builder(url)
        .client_id(id)
        .connect()
        .await
        .expect("connects")
}

async fn watching_cache(client: Client) -> NearCache<String> {
    let cache = NearCache::builder(client)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .build();
    assert!(
        cache.wait_until_watching(WAIT).await,
        "the Watch stream starts"
    );
    cache
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_by_another_client_invalidates_the_cached_copy() {
    let server = common::start().await;
    let publisher = client(&server.url(), "writer").await;
    let cache = watching_cache(client(&server.url(), "feed-svc").await).await;
    let origin = Origin::default();
    origin.set("feed:1", "v1");
    let load = || origin.loader("feed:1", &["posts:1", "follows:1"]);

    assert_eq!(cache.get("feed:1", load()).await.unwrap(), "v1");
    assert_eq!(cache.get("feed:1", load()).await.unwrap(), "v1");
    assert_eq!(origin.reads(), 1, "the second get is a hit");
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.hits), (1, 1));

    // The writer changes the origin, then publishes the dependency.
    origin.set("feed:1", "v2");
    let published = publisher.publish_keys(["posts:1"]).await.unwrap();
    assert!(
        eventually(WAIT, || async { !cache.contains("feed:1") }).await,
        "the notice drops the copy"
    );
    assert!(cache.stats().notices_applied >= 1);
    assert_eq!(cache.get("feed:1", load()).await.unwrap(), "v2");
    assert_eq!(origin.reads(), 2);

    // The stream acknowledged the publish: the server's Stats show it.
    let acked = eventually(WAIT, || async {
        publisher
            .stats()
            .await
            .unwrap()
            .subscribers
            .iter()
            .any(|s| {
                s.client_id == "feed-svc" && s.acked_seq >= published.seq && s.tracked_keys == 1
            })
    })
    .await;
    assert!(
        acked,
        "the cache's stream tracks the key and acknowledged the notice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revalidate_after_serves_the_old_copy_once_and_refreshes_in_the_background() {
    let server = common::start().await;
    let admin = client(&server.url(), "admin").await;
    let revalidate_after = Duration::from_millis(200);
    admin
        .set_policy(
            "swr",
            pb::FreshnessPolicy::default()
                .with_max_age(Duration::from_secs(60))
                .with_revalidate_after(revalidate_after),
        )
        .await
        .unwrap();
    let cache = watching_cache(client(&server.url(), "swr-svc").await).await;
    let origin = Origin::default();
    origin.set("swr:1", "old");
    let load = || origin.loader("swr:1", &["src:1"]);

    assert_eq!(cache.get("swr:1", load()).await.unwrap(), "old");
    assert_eq!(cache.get("swr:1", load()).await.unwrap(), "old");
    assert_eq!(cache.stats().revalidations, 0, "a young copy is FRESH");

    // The origin moves on without a publish; the copy ages past
    // revalidate_after (the policy decides on the age, so time must pass).
    origin.set("swr:1", "new");
    tokio::time::sleep(revalidate_after + Duration::from_millis(50)).await;
    assert_eq!(
        cache.get("swr:1", load()).await.unwrap(),
        "old",
        "REVALIDATE serves the copy at once"
    );
    assert_eq!(cache.stats().revalidations, 1);
    assert!(
        eventually(WAIT, || async {
            cache.peek("swr:1").as_deref() == Some("new")
        })
        .await,
        "the background refresh replaces the copy"
    );
    assert_eq!(cache.get("swr:1", load()).await.unwrap(), "new");
    let stats = cache.stats();
    assert_eq!(stats.revalidations, 1, "the refreshed copy is FRESH again");
    assert_eq!(origin.reads(), 2, "one refresh");
    assert_eq!(
        stats.stale_serves, 0,
        "the copy served was current, only old"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_zero_sample_rate_hits_skip_checks_and_the_watch_keeps_them_right() {
    let server = common::start().await;
    let admin = client(&server.url(), "admin").await;
    admin
        .set_policy(
            "dash",
            pb::FreshnessPolicy::default().with_check_sample_rate(0.0),
        )
        .await
        .unwrap();
    let cache = watching_cache(client(&server.url(), "dash-svc").await).await;
    let origin = Origin::default();
    origin.set("dash:1", "a");
    let load = || origin.loader("dash:1", &["sales:1"]);

    assert_eq!(cache.get("dash:1", load()).await.unwrap(), "a");
    assert!(
        eventually(WAIT, || async { cache.sample_rate("dash:1") == Some(0.0) }).await,
        "the cache reads the namespace's policy"
    );
    for _ in 0..5 {
        assert_eq!(cache.get("dash:1", load()).await.unwrap(), "a");
    }
    origin.set("dash:1", "b");
    admin.publish_keys(["sales:1"]).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let value = cache.get("dash:1", load()).await.unwrap();
        if value == "b" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {value:?}: the notice did not reach the cache"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(origin.reads(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_raced_a_change_is_read_again() {
    let server = common::start().await;
    let writer = client(&server.url(), "writer").await;
    let cache = watching_cache(client(&server.url(), "race-svc").await).await;
    let values = Arc::new(Mutex::new(vec!["second", "first"]));
    let reads = Arc::new(AtomicU64::new(0));
    let loader = {
        let values = values.clone();
        let reads = reads.clone();
        move || {
            let values = values.clone();
            let reads = reads.clone();
            let writer = writer.clone();
            async move {
                let value = values.lock().pop().unwrap_or("second");
                if reads.fetch_add(1, Ordering::SeqCst) == 0 {
                    // A write lands between this read and the fill.
                    writer.publish_keys(["orders:1"]).await.expect("publishes");
                }
                Ok::<_, std::io::Error>((value.to_owned(), vec!["orders:1".to_owned()]))
            }
        }
    };
    assert_eq!(cache.get("cart:1", loader).await.unwrap(), "second");
    assert_eq!(reads.load(Ordering::SeqCst), 2);
    let stats = cache.stats();
    assert_eq!(stats.fill_races, 1);
    assert_eq!(cache.peek("cart:1").as_deref(), Some("second"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_share_one_origin_read() {
    let server = common::start().await;
    let cache = watching_cache(client(&server.url(), "flight-svc").await).await;
    let reads = Arc::new(AtomicU64::new(0));
    let mut gets = Vec::new();
    for _ in 0..20 {
        let cache = cache.clone();
        let reads = reads.clone();
        gets.push(tokio::spawn(async move {
            cache
                .get("slow:1", move || {
                    let reads = reads.clone();
                    async move {
                        reads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<_, std::io::Error>(("value".to_owned(), vec![]))
                    }
                })
                .await
        }));
    }
    for get in gets {
        assert_eq!(get.await.unwrap().unwrap(), "value");
    }
    assert_eq!(reads.load(Ordering::SeqCst), 1);

    // Many keys hit at once: every answer is right, checks are batched.
    let origin = Origin::default();
    for i in 0..50 {
        origin.set(&format!("k:{i}"), &format!("v{i}"));
        let key = format!("k:{i}");
        cache.get(&key, origin.loader(&key, &[])).await.unwrap();
    }
    let mut hits = Vec::new();
    for i in 0..50 {
        let cache = cache.clone();
        let origin = origin.clone();
        hits.push(tokio::spawn(async move {
            let key = format!("k:{i}");
            let value = cache.get(&key, origin.loader(&key, &[])).await.unwrap();
            assert_eq!(value, format!("v{i}"));
        }));
    }
    for hit in hits {
        hit.await.unwrap();
    }
    assert_eq!(origin.reads(), 50, "every concurrent get was a hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_drops_the_copies_and_the_cache_keeps_working() {
    let server = common::start().await;
    let addr: SocketAddr = server.addr;
    let first_epoch = server.store.epoch();
    let cache = watching_cache(client(&server.url(), "restart-svc").await).await;
    let origin = Origin::default();
    origin.set("feed:9", "before");
    let load = || origin.loader("feed:9", &["posts:9"]);
    assert_eq!(cache.get("feed:9", load()).await.unwrap(), "before");
    assert_eq!(cache.epoch(), first_epoch);

    server.stop().await.expect("stops");
    let server = common::start_on(addr).await;
    let second_epoch = server.store.epoch();
    assert_ne!(
        first_epoch, second_epoch,
        "a memory-only server starts a new epoch"
    );

    // The stream resumes with its token, learns of the new epoch and drops
    // every copy from the old history. The start message carries the epoch;
    // the NEW_EPOCH reset that counts comes in the next message, so both are
    // waited for.
    let caught_up = eventually(WAIT, || async {
        cache.is_watching()
            && cache.epoch() == second_epoch
            && !cache.contains("feed:9")
            && cache.stats().resets >= 1
    })
    .await;
    assert!(
        caught_up,
        "the cache follows the new epoch and counts its reset: {:?}",
        cache.stats()
    );

    origin.set("feed:9", "after");
    assert_eq!(cache.get("feed:9", load()).await.unwrap(), "after");
    assert_eq!(cache.get("feed:9", load()).await.unwrap(), "after");
    assert_eq!(origin.reads(), 2, "filled in the new epoch, then a hit");
    let admin = client(&server.url(), "admin").await;
    let tracked = eventually(WAIT, || async {
        admin
            .stats()
            .await
            .unwrap()
            .subscribers
            .iter()
            .any(|s| s.client_id == "restart-svc" && s.tracked_keys == 1)
    })
    .await;
    assert!(tracked, "the new stream tracks the refilled key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_means_origin_reads_without_caching() {
    // A port nobody listens on.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let client = Client::builder(format!("http://{addr}"))
        .client_id("offline")
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy()
        .unwrap();
    let cache: NearCache<String> = NearCache::new(client);
    let origin = Origin::default();
    origin.set("feed:1", "v");
    for _ in 0..2 {
        assert_eq!(
            cache
                .get("feed:1", origin.loader("feed:1", &[]))
                .await
                .unwrap(),
            "v"
        );
    }
    assert_eq!(origin.reads(), 2);
    assert!(cache.is_empty());
    assert_eq!(cache.stats().bypasses, 2);
    assert!(!cache.is_watching());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_loader_is_an_error_and_caches_nothing() {
    let server = common::start().await;
    let cache = watching_cache(client(&server.url(), "fail-svc").await).await;
    let err = cache
        .get("feed:1", || async {
            Err::<(String, Vec<String>), _>(std::io::Error::other("the database is down"))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, freshd_client::Error::Load(_)), "{err}");
    assert!(err.to_string().contains("the database is down"));
    assert!(cache.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_no_older_than_the_current_version_is_served_while_another_filler_holds_the_lease() {
    let server = common::start().await;
    let other = client(&server.url(), "other-filler").await;
    other
        .set_policy(
            "pf",
            pb::FreshnessPolicy::default().with_max_age(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    let cache = NearCache::builder(client(&server.url(), "pf-svc").await)
        .lease_wait(Duration::from_millis(300))
        .build();
    assert!(cache.wait_until_watching(WAIT).await);
    let origin = Origin::default();
    origin.set("pf:1", "v1");
    let load = || origin.loader("pf:1", &["balances:1"]);
    assert_eq!(cache.get("pf:1", load()).await.unwrap(), "v1");

    // The copy outlives max_age (REFETCH) while another service refills
    // the key: its version is still the current one, so it is served.
    let lease = other.lease("pf:1").await.unwrap();
    assert!(lease.granted);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(cache.get("pf:1", load()).await.unwrap(), "v1");
    let stats = cache.stats();
    assert_eq!((stats.refetches, stats.stale_serves), (1, 1));
    assert_eq!(origin.reads(), 1);

    // A change makes the copy stale: it is not served; after waiting for
    // the lease the cache reads the origin itself.
    origin.set("pf:1", "v2");
    other.publish_keys(["balances:1"]).await.unwrap();
    assert_eq!(cache.get("pf:1", load()).await.unwrap(), "v2");
    assert_eq!(origin.reads(), 2);
    assert_eq!(
        cache.peek("pf:1").as_deref(),
        Some("v2"),
        "filled with the observed seq"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_keys_are_untracked() {
    let server = common::start().await;
    let admin = client(&server.url(), "admin").await;
    let cache = NearCache::builder(client(&server.url(), "small-svc").await)
        .capacity(2)
        .build();
    assert!(cache.wait_until_watching(WAIT).await);
    let origin = Origin::default();
    for key in ["a:1", "a:2", "a:3"] {
        origin.set(key, key);
        assert_eq!(cache.get(key, origin.loader(key, &[])).await.unwrap(), key);
    }
    assert_eq!(cache.len(), 2);
    assert!(!cache.contains("a:1"), "the least recently used goes first");
    assert_eq!(cache.stats().evictions, 1);
    let untracked = eventually(WAIT, || async {
        admin
            .stats()
            .await
            .unwrap()
            .subscribers
            .iter()
            .any(|s| s.client_id == "small-svc" && s.tracked_keys == 2)
    })
    .await;
    assert!(untracked, "the stream tracks the two cached keys only");
}
