"""NearCache against real servers: misses and hits, invalidation by another
process, stale-while-revalidate, leases, resume after a disconnect, and a
server restart (new epoch)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
from harness import FreshdServer, TcpProxy, wait_until

import freshd
from freshd import NearCache, Policy


class Origin:
    """The source of truth the caches read: values and their dependencies,
    with a count of reads per key."""

    def __init__(self) -> None:
        self.values: Dict[str, Any] = {}
        self.deps: Dict[str, List[str]] = {}
        self.reads: Dict[str, int] = {}
        self.lock = threading.Lock()

    def set(self, key: str, value: Any, deps: List[str]) -> None:
        with self.lock:
            self.values[key] = value
            self.deps[key] = deps

    def loader(
        self, key: str, before: Callable[[], None] = lambda: None
    ) -> Callable[[], Tuple[Any, List[str]]]:
        def load() -> Tuple[Any, List[str]]:
            before()
            with self.lock:
                self.reads[key] = self.reads.get(key, 0) + 1
                return self.values[key], list(self.deps[key])

        return load


@pytest.fixture
def origin() -> Origin:
    o = Origin()
    o.set("feed:1", "feed v1", ["posts:1", "follows:1"])
    return o


@pytest.fixture
def cache(server: FreshdServer) -> Iterator[NearCache[Any]]:
    with NearCache(server.addr, endpoint="/feed", reconnect_backoff=(0.02, 0.5)) as c:
        assert c.wait_watching(10)
        yield c


def test_a_miss_loads_and_fills_then_hits_check(
    cache: NearCache[Any], client: freshd.Client, origin: Origin
) -> None:
    assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
    assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
    assert origin.reads["feed:1"] == 1
    s = cache.stats
    assert (s.misses, s.hits, s.checks, s.loads) == (1, 1, 1, 1)

    version, epoch = cache.version_of("feed:1") or (0, 0)
    info = client.inspect("feed:1")
    assert info.registered and info.version == version and epoch == client.stats().epoch
    assert info.dependencies == ("follows:1", "posts:1")
    # The Watch stream tracks what is cached, under the cache's client id.
    subscribers = wait_until(lambda: [x for x in client.stats().subscribers if x.tracked_keys == 1])
    assert subscribers[0].client_id == cache.client_id


def test_concurrent_misses_read_the_origin_once(cache: NearCache[Any], origin: Origin) -> None:
    gate = threading.Event()
    results: List[Any] = []
    loader = origin.loader("feed:1", before=lambda: gate.wait(5))
    threads = [
        threading.Thread(target=lambda: results.append(cache.get("feed:1", loader)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    wait_until(lambda: cache.stats.misses == 8)
    gate.set()
    for t in threads:
        t.join(10)
    assert results == ["feed v1"] * 8
    assert origin.reads["feed:1"] == 1


PUBLISHER = """
import sys, freshd
with freshd.Client(sys.argv[1]) as client:
    print(client.publish(sys.argv[2:]).seq)
"""


def test_a_publish_from_another_process_invalidates_within_a_bounded_wait(
    server: FreshdServer, cache: NearCache[Any], origin: Origin
) -> None:
    assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
    origin.set("feed:1", "feed v2", ["posts:1", "follows:1"])
    # The writer: another process changes the origin's post and publishes.
    out = subprocess.run(
        [sys.executable, "-c", PUBLISHER, server.addr, "posts:1"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert int(out.stdout) > 0
    # The notice drops the copy: no get, no check needed.
    wait_until(lambda: "feed:1" not in cache, timeout=5, what="the notice to drop the copy")
    assert cache.stats.notices_applied >= 1 and cache.stats.invalidations == 1
    assert cache.get("feed:1", origin.loader("feed:1")) == "feed v2"
    assert origin.reads["feed:1"] == 2


def test_two_caches_one_writes(server: FreshdServer, origin: Origin) -> None:
    with NearCache(server.addr) as reader, NearCache(server.addr) as writer:
        assert reader.wait_watching(10) and writer.wait_watching(10)
        assert reader.get("feed:1", origin.loader("feed:1")) == "feed v1"
        origin.set("feed:1", "feed v2", ["posts:1"])
        writer.client.publish(["follows:1"])
        wait_until(lambda: reader.peek("feed:1") is None, what="the reader's copy to go")
        assert reader.get("feed:1", origin.loader("feed:1")) == "feed v2"


def test_a_change_during_the_origin_read_is_not_cached(
    cache: NearCache[Any], client: freshd.Client, origin: Origin
) -> None:
    writes: List[int] = []
    plain = origin.loader("feed:1")

    def racing_read() -> Tuple[Any, List[str]]:
        value, deps = plain()
        if not writes:  # the origin changes right after the first read
            origin.set("feed:1", "feed v2", deps)
            writes.append(client.publish(["posts:1"]).seq)
        return value, deps

    # The first read (v1) raced the write: its fill is refused, and the
    # cache reads again rather than keep a stale value.
    assert cache.get("feed:1", racing_read) == "feed v2"
    assert origin.reads["feed:1"] == 2 and cache.stats.fill_races == 1
    assert cache.peek("feed:1") == "feed v2"
    version, _ = cache.version_of("feed:1") or (0, 0)
    assert version >= writes[0]


def test_a_critical_change_refetches_at_once(
    server: FreshdServer, client: freshd.Client, origin: Origin
) -> None:
    # Without the Watch stream the check alone must catch it.
    with NearCache(server.addr, watch=False) as cache:
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
        origin.set("feed:1", "feed v2", ["posts:1"])
        client.publish([freshd.Change("posts:1", critical=True)])
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v2"
        assert cache.stats.refetches == 1


def test_stale_while_revalidate_serves_the_stale_copy_once(
    server: FreshdServer, client: freshd.Client, origin: Origin
) -> None:
    client.set_policy("feed", Policy(stale_while_revalidate_ms=60000))
    with NearCache(server.addr, watch=False) as cache:
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
        origin.set("feed:1", "feed v2", ["posts:1"])
        client.publish(["posts:1"])
        # Stale, within stale_while_revalidate: served once, refreshed behind.
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
        s = cache.stats
        assert (s.stale_serves, s.revalidations) == (1, 1)
        wait_until(lambda: cache.peek("feed:1") == "feed v2", what="the background refresh")
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v2"
        assert origin.reads["feed:1"] == 2


def test_revalidate_after_serves_and_refreshes_in_the_background(
    server: FreshdServer, client: freshd.Client, origin: Origin
) -> None:
    client.set_policy("feed", Policy(revalidate_after_ms=100))
    with NearCache(server.addr) as cache:
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
        origin.set("feed:1", "feed v2", ["posts:1", "follows:1"])  # no publish
        time.sleep(0.15)  # the copy's age is the input: past revalidate_after
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
        assert cache.stats.revalidations == 1 and cache.stats.stale_serves == 0
        wait_until(lambda: cache.peek("feed:1") == "feed v2", what="the background refresh")
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v2"


def test_one_background_refresh_per_key(
    server: FreshdServer, client: freshd.Client, origin: Origin
) -> None:
    client.set_policy("feed", Policy(stale_while_revalidate_ms=60000))
    gate = threading.Event()
    with NearCache(server.addr, watch=False) as cache:
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
        client.publish(["posts:1"])
        slow = origin.loader("feed:1", before=lambda: gate.wait(5))
        for _ in range(5):
            assert cache.get("feed:1", slow) == "feed v1"
        assert cache.stats.revalidations == 1
        gate.set()
        wait_until(lambda: origin.reads["feed:1"] == 2)


def test_a_copy_is_served_while_another_caller_holds_the_lease(
    start_server: Callable[..., FreshdServer], origin: Origin
) -> None:
    server = start_server({"lease_ttl": "300ms"})
    with freshd.Client(server.addr) as other, NearCache(server.addr, watch=False) as cache:
        other.set_policy("feed", Policy(max_age_ms=50))
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
        assert other.lease("feed:1").granted  # another process is filling
        time.sleep(0.1)  # the copy's age is the input: past max_age
        # REFETCH, but the lease is taken and the copy is the current
        # version: serve it rather than pile onto the origin.
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
        s = cache.stats
        assert (s.refetches, s.stale_serves, s.lease_waits) == (1, 1, 1)
        assert origin.reads["feed:1"] == 1


def test_a_miss_waits_for_the_other_filler(
    start_server: Callable[..., FreshdServer], origin: Origin
) -> None:
    server = start_server({"lease_ttl": "300ms"})
    with freshd.Client(server.addr) as other, NearCache(server.addr, watch=False) as cache:
        assert other.lease("feed:1").granted
        started = time.monotonic()
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
        assert cache.stats.lease_waits >= 1
        assert time.monotonic() - started < 5
        assert cache.peek("feed:1") == "feed v1"


def test_lru_eviction_untracks(server: FreshdServer, client: freshd.Client) -> None:
    with NearCache(server.addr, max_entries=2) as cache:
        assert cache.wait_watching(10)
        for key in ("a:1", "a:2", "a:3"):
            assert cache.get(key, lambda key=key: (key.upper(), [])) == key.upper()
        assert len(cache) == 2 and "a:1" not in cache and cache.stats.evictions == 1
        wait_until(
            lambda: [s.tracked_keys for s in client.stats().subscribers] == [2],
            what="the untrack",
        )


def test_check_sample_rate_is_followed(server: FreshdServer, client: freshd.Client) -> None:
    client.set_policy("dash", Policy(check_sample_rate=0.0))
    with NearCache(server.addr, watch=False) as cache:
        for _ in range(4):
            assert cache.get("dash:1", lambda: ("d", [])) == "d"
        s = cache.stats
        # The first hit's check taught the rate: the next ones are not checked.
        assert (s.hits, s.checks, s.unchecked_hits) == (3, 1, 2)


def test_concurrent_checks_go_out_in_one_batch(server: FreshdServer) -> None:
    with NearCache(server.addr, watch=False) as cache:
        keys = [f"feed:{i}" for i in range(10)]
        for key in keys:
            cache.get(key, lambda key=key: (key.upper(), [f"posts:{key}"]))
        # Hold the first check in flight; the others queue behind it.
        gate = threading.Event()
        real_check, real_batch = cache.client.check, cache.client.check_batch
        batches: List[int] = []

        def slow_check(*a: Any, **kw: Any) -> Any:
            gate.wait(5)
            return real_check(*a, **kw)

        def counting_batch(items: Any, **kw: Any) -> Any:
            items = list(items)
            batches.append(len(items))
            return real_batch(items, **kw)

        cache.client.check = slow_check  # type: ignore[method-assign]
        cache.client.check_batch = counting_batch  # type: ignore[method-assign]
        results: Dict[str, Any] = {}

        def get(key: str) -> None:
            results[key] = cache.get(key, lambda: ("reloaded", []))

        threads = [threading.Thread(target=get, args=(k,)) for k in keys]
        assert cache._batcher is not None
        threads[0].start()
        # The batcher has taken the first check and waits on the gate.
        wait_until(lambda: cache.stats.checks == 1 and not cache._batcher._pending)
        for t in threads[1:]:
            t.start()
        wait_until(lambda: len(cache._batcher._pending) == len(keys) - 1)
        gate.set()
        for t in threads:
            t.join(10)
        assert results == {k: k.upper() for k in keys}
        assert batches == [len(keys) - 1]
        assert cache.stats.hits == len(keys)


def test_serve_before_check(server: FreshdServer, client: freshd.Client, origin: Origin) -> None:
    with NearCache(server.addr, watch=False, serve_before_check=True) as cache:
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
        origin.set("feed:1", "feed v2", ["posts:1"])
        client.publish(["posts:1"])
        # Served at once; the check after it finds the copy stale and drops it.
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
        wait_until(lambda: "feed:1" not in cache, what="the check after serving")
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v2"


def test_the_watch_resumes_after_a_disconnect_without_losing_a_notice(
    server: FreshdServer, client: freshd.Client, origin: Origin
) -> None:
    proxy = TcpProxy(server.port)
    try:
        with NearCache(proxy.addr, reconnect_backoff=(0.02, 0.2)) as cache:
            assert cache.wait_watching(10)
            assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
            proxy.blocked = True
            proxy.cut()
            wait_until(lambda: not cache.watching, what="the disconnect")
            client.publish(["posts:1"])  # while the stream is down
            assert "feed:1" in cache
            proxy.blocked = False
            wait_until(lambda: "feed:1" not in cache, what="the resumed stream's notice")
            s = cache.stats
            assert s.watch_connects == 2 and s.notices_applied >= 1 and s.repairs == 0
    finally:
        proxy.close()


def test_a_resume_older_than_the_history_is_repaired(
    start_server: Callable[..., FreshdServer], origin: Origin
) -> None:
    server = start_server({"history_notices": "1"})
    proxy = TcpProxy(server.port)
    try:
        with (
            freshd.Client(server.addr) as client,
            NearCache(proxy.addr, reconnect_backoff=(0.02, 0.2)) as cache,
        ):
            assert cache.wait_watching(10)
            assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
            proxy.blocked = True
            proxy.cut()
            wait_until(lambda: not cache.watching, what="the disconnect")
            client.publish(["posts:1"])
            client.publish(["x:1"])
            client.publish(["x:2"])  # the history now starts after posts:1
            proxy.blocked = False
            wait_until(lambda: "feed:1" not in cache, what="the repair notice")
            assert cache.stats.repairs == 1
    finally:
        proxy.close()


def test_a_server_restart_drops_everything_and_the_cache_keeps_working(
    server: FreshdServer, origin: Origin
) -> None:
    with NearCache(server.addr, reconnect_backoff=(0.02, 0.3)) as cache:
        assert cache.wait_watching(10)
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
        first_epoch = cache.watch_epoch
        assert first_epoch == server.epoch

        server.kill()
        wait_until(lambda: not cache.watching, what="the stream to notice the crash")
        # freshd is down: the origin answers, uncached.
        origin.set("feed:1", "feed v2", ["posts:1"])
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v2"
        assert cache.stats.bypasses >= 1

        server.restart()  # same port, new epoch, nothing remembered
        assert server.epoch != first_epoch
        wait_until(lambda: cache.watch_epoch == server.epoch, timeout=10, what="the new epoch")
        assert len(cache) == 0 and cache.stats.resets >= 1

        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v2"
        _, epoch = cache.version_of("feed:1") or (0, 0)
        assert epoch == server.epoch
        # And the new stream tracks it: a publish drops it again.
        with freshd.Client(server.addr) as client:
            client.publish(["posts:1"])
        wait_until(lambda: "feed:1" not in cache, what="a notice from the new server")


def test_checks_feed_the_servers_freshness_metrics(
    start_server: Callable[..., FreshdServer],
) -> None:
    import urllib.request

    from harness import free_port

    admin = free_port()
    server = start_server({"admin_listen": f"127.0.0.1:{admin}"})

    def scrape() -> Dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {
            name: float(value)
            for name, _, value in (line.rpartition(" ") for line in text.splitlines())
            if name and not name.startswith("#")
        }

    with NearCache(server.addr, endpoint="/feed", watch=False) as cache:
        cache.get("feed:1", lambda: ("v", ["posts:1"]))
        cache.get("feed:1", lambda: ("v", ["posts:1"]))  # a checked hit
    with NearCache(server.addr, endpoint="/feed", watch=False, serve_before_check=True) as cache:
        cache.get("feed:2", lambda: ("v", ["posts:2"]))
        cache.client.publish(["posts:2"])
        cache.get("feed:2", lambda: ("v", ["posts:2"]))  # served, then found stale
        wait_until(lambda: "feed:2" not in cache)

    metrics = scrape()
    assert metrics['freshd_hit_age_seconds_count{namespace="feed",endpoint="/feed"}'] == 2
    assert metrics['freshd_served_checks_total{namespace="feed"}'] == 1
    assert metrics['freshd_stale_serves_total{namespace="feed",critical="false"}'] == 1


def test_a_miss_stops_waiting_for_a_lease_that_is_never_released(
    server: FreshdServer, client: freshd.Client, origin: Origin
) -> None:
    assert client.lease("feed:1").granted  # a filler that went away (10 s lease)
    with NearCache(server.addr, watch=False, lease_retries=2, max_lease_wait=0.05) as cache:
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
        assert cache.stats.lease_waits == 3
        # Filled with a seq observed before the read: cached and checkable.
        assert cache.get("feed:1", origin.loader("feed:1")) == "feed v1"
        assert origin.reads["feed:1"] == 1 and cache.stats.hits == 1
