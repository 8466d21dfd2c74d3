package dev.freshd.client;

import static dev.freshd.client.FreshdServer.waitUntil;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.ForwardingClientCall;
import io.grpc.MethodDescriptor;
import freshd.v1.CoordinatorOuterClass;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;

/**
 * The NearCache against real servers: misses and hits, invalidation by another client,
 * stale-while-revalidate, leases, batched checks, a resume after a cut connection, a repair, and a
 * server restart (new epoch).
 */
class NearCacheTest {
    private static final Duration WAIT = Duration.ofSeconds(10);

    /** The source of truth the caches read: values and their dependencies, with reads per key. */
    static final class Origin {
        private final Map<String, String> values = new HashMap<>();
        private final Map<String, List<String>> deps = new HashMap<>();
        private final Map<String, Integer> reads = new ConcurrentHashMap<>();

        synchronized void set(String key, String value, String... dependencies) {
            values.put(key, value);
            deps.put(key, List.of(dependencies));
        }

        NearCache.Loader<String> loader(String key) {
            return loader(key, () -> {});
        }

        NearCache.Loader<String> loader(String key, Runnable before) {
            return () -> {
                before.run();
                synchronized (this) {
                    reads.merge(key, 1, Integer::sum);
                    return new Loaded<>(values.get(key), deps.get(key));
                }
            };
        }

        int reads(String key) {
            return reads.getOrDefault(key, 0);
        }
    }

    private FreshdServer server;
    private FreshdClient client;
    private Origin origin;

    @BeforeEach
    void start() {
        server = FreshdServer.start();
        client = server.client();
        origin = new Origin();
        origin.set("feed:1", "feed v1", "posts:1", "follows:1");
    }

    @AfterEach
    void stop() {
        client.close();
        server.close();
    }

    private NearCache<String> cache(NearCache.Builder<String> builder) {
        return builder.endpoint("/feed").reconnectBackoff(Duration.ofMillis(20), Duration.ofMillis(300)).build();
    }

    private NearCache<String> watching() {
        NearCache<String> cache = cache(NearCache.builder(server.addr()));
        assertTrue(cache.awaitWatching(WAIT));
        return cache;
    }

    private static void await(CountDownLatch latch) {
        try {
            assertTrue(latch.await(5, TimeUnit.SECONDS));
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new AssertionError(e);
        }
    }

    @Test
    void aMissLoadsAndFillsThenAHitIsChecked() {
        try (NearCache<String> cache = watching()) {
            assertEquals("feed v1", cache.get("feed:1", origin.loader("feed:1")));
            assertEquals("feed v1", cache.get("feed:1", origin.loader("feed:1")));
            assertEquals(1, origin.reads("feed:1"));
            NearCacheStats s = cache.stats();
            assertEquals(List.of(1L, 1L, 1L, 1L), List.of(s.misses(), s.hits(), s.checks(), s.loads()));

            NearCache.CopyVersion version = cache.versionOf("feed:1").orElseThrow();
            KeyInfo info = client.inspect("feed:1");
            assertTrue(info.registered());
            assertEquals(info.version(), version.version());
            assertEquals(server.epoch(), version.epoch());
            assertEquals(List.of("follows:1", "posts:1"), info.dependencies());
            // The Watch stream tracks what is cached, under the cache's client id.
            SubscriberStats subscriber = FreshdServer.waitFor(WAIT, "the track", () -> client.stats().subscribers()
                    .stream().filter(x -> x.trackedKeys() == 1).findFirst().orElse(null));
            assertEquals(cache.clientId(), subscriber.clientId());
        }
    }

    @Test
    void concurrentMissesReadTheOriginOnce() throws Exception {
        CountDownLatch gate = new CountDownLatch(1);
        NearCache.Loader<String> loader = origin.loader("feed:1", () -> await(gate));
        ExecutorService pool = Executors.newFixedThreadPool(8);
        try (NearCache<String> cache = watching()) {
            List<Future<String>> results = new ArrayList<>();
            for (int i = 0; i < 8; i++) {
                results.add(pool.submit(() -> cache.get("feed:1", loader)));
            }
            waitUntil(WAIT, "eight misses", () -> cache.stats().misses() == 8);
            gate.countDown();
            for (Future<String> r : results) {
                assertEquals("feed v1", r.get(10, TimeUnit.SECONDS));
            }
            assertEquals(1, origin.reads("feed:1"));
        } finally {
            pool.shutdownNow();
        }
    }

    @Test
    void aPublishFromAnotherClientInvalidatesWithinABoundedWait() {
        try (NearCache<String> reader = watching();
                FreshdClient writer = FreshdClient.builder(server.addr()).build()) {
            assertEquals("feed v1", reader.get("feed:1", origin.loader("feed:1")));
            origin.set("feed:1", "feed v2", "posts:1", "follows:1");
            assertTrue(writer.publish("posts:1").seq() > 0);
            // The notice drops the copy: no get, no check needed.
            waitUntil(WAIT, "the notice to drop the copy", () -> !reader.contains("feed:1"));
            NearCacheStats s = reader.stats();
            assertTrue(s.noticesApplied() >= 1);
            assertEquals(1, s.invalidations());
            assertEquals("feed v2", reader.get("feed:1", origin.loader("feed:1")));
            assertEquals(2, origin.reads("feed:1"));
        }
    }

    @Test
    void twoCachesOneWrites() {
        try (NearCache<String> reader = watching(); NearCache<String> writer = watching()) {
            assertEquals("feed v1", reader.get("feed:1", origin.loader("feed:1")));
            origin.set("feed:1", "feed v2", "posts:1");
            writer.client().publish("follows:1");
            waitUntil(WAIT, "the reader's copy to go", () -> reader.peek("feed:1").isEmpty());
            assertEquals("feed v2", reader.get("feed:1", origin.loader("feed:1")));
        }
    }

    @Test
    void aChangeDuringTheOriginReadIsNotCached() {
        List<Long> writes = new CopyOnWriteArrayList<>();
        NearCache.Loader<String> plain = origin.loader("feed:1");
        NearCache.Loader<String> racing = () -> {
            Loaded<String> loaded = plain.load();
            if (writes.isEmpty()) { // the origin changes right after the first read
                origin.set("feed:1", "feed v2", loaded.dependencies().toArray(String[]::new));
                writes.add(client.publish("posts:1").seq());
            }
            return loaded;
        };
        try (NearCache<String> cache = watching()) {
            // The first read (v1) raced the write: its fill is refused, and the cache reads again
            // rather than keep a stale value.
            assertEquals("feed v2", cache.get("feed:1", racing));
            assertEquals(2, origin.reads("feed:1"));
            assertEquals(1, cache.stats().fillRaces());
            assertEquals("feed v2", cache.peek("feed:1").orElseThrow());
            assertTrue(cache.versionOf("feed:1").orElseThrow().version() >= writes.get(0));
        }
    }

    @Test
    void aCriticalChangeRefetchesAtOnce() {
        // Without the Watch stream the check alone must catch it.
        try (NearCache<String> cache = cache(NearCache.<String>builder(server.addr()).watch(false))) {
            assertEquals("feed v1", cache.get("feed:1", origin.loader("feed:1")));
            origin.set("feed:1", "feed v2", "posts:1");
            client.publish(List.of(Change.of("posts:1").withCritical(true)));
            assertEquals("feed v2", cache.get("feed:1", origin.loader("feed:1")));
            assertEquals(1, cache.stats().refetches());
        }
    }

    @Test
    void staleWhileRevalidateServesTheStaleCopyOnceAndRefreshesBehind() {
        client.setPolicy("feed", Policy.builder().staleWhileRevalidateMs(60_000).build());
        try (NearCache<String> cache = cache(NearCache.<String>builder(server.addr()).watch(false))) {
            assertEquals("feed v1", cache.get("feed:1", origin.loader("feed:1")));
            origin.set("feed:1", "feed v2", "posts:1");
            client.publish("posts:1");
            // Stale, within stale_while_revalidate: served once, refreshed behind.
            assertEquals("feed v1", cache.get("feed:1", origin.loader("feed:1")));
            NearCacheStats s = cache.stats();
            assertEquals(1, s.staleServes());
            assertEquals(1, s.revalidations());
            waitUntil(WAIT, "the background refresh", () -> cache.peek("feed:1").equals(java.util.Optional.of("feed v2")));
            assertEquals("feed v2", cache.get("feed:1", origin.loader("feed:1")));
            assertEquals(2, origin.reads("feed:1"));
            assertEquals(1, cache.stats().staleServes());
        }
    }

    @Test
    void oneBackgroundRefreshPerKey() {
        client.setPolicy("feed", Policy.builder().staleWhileRevalidateMs(60_000).build());
        CountDownLatch gate = new CountDownLatch(1);
        try (NearCache<String> cache = cache(NearCache.<String>builder(server.addr()).watch(false))) {
            assertEquals("feed v1", cache.get("feed:1", origin.loader("feed:1")));
            client.publish("posts:1");
            NearCache.Loader<String> slow = origin.loader("feed:1", () -> await(gate));
            for (int i = 0; i < 5; i++) {
                assertEquals("feed v1", cache.get("feed:1", slow));
            }
            assertEquals(1, cache.stats().revalidations());
            gate.countDown();
            waitUntil(WAIT, "the refresh", () -> origin.reads("feed:1") == 2);
        }
    }

    @Test
    void aMissWaitsForTheOtherFiller() {
        try (FreshdServer shortLease = FreshdServer.start(Map.of("lease_ttl", "300ms"));
                FreshdClient other = shortLease.client();
                NearCache<String> cache = cache(NearCache.<String>builder(shortLease.addr()).watch(false))) {
            assertTrue(other.lease("feed:1").granted());
            assertEquals("feed v1", cache.get("feed:1", origin.loader("feed:1")));
            assertTrue(cache.stats().leaseWaits() >= 1);
            assertEquals("feed v1", cache.peek("feed:1").orElseThrow());
        }
    }

    @Test
    void aMissStopsWaitingForALeaseThatIsNeverReleased() {
        assertTrue(client.lease("feed:1").granted()); // a filler that went away (10 s lease)
        try (NearCache<String> cache = cache(NearCache.<String>builder(server.addr()).watch(false)
                .leaseRetries(2).maxLeaseWait(Duration.ofMillis(50)))) {
            assertEquals("feed v1", cache.get("feed:1", origin.loader("feed:1")));
            assertEquals(3, cache.stats().leaseWaits());
            // Filled with a seq observed before the read: cached and checkable.
            assertEquals("feed v1", cache.get("feed:1", origin.loader("feed:1")));
            assertEquals(1, origin.reads("feed:1"));
            assertEquals(1, cache.stats().hits());
        }
    }

    @Test
    void lruEvictionUntracks() {
        try (NearCache<String> cache = cache(NearCache.<String>builder(server.addr()).maxEntries(2))) {
            assertTrue(cache.awaitWatching(WAIT));
            for (String key : List.of("a:1", "a:2", "a:3")) {
                assertEquals(key.toUpperCase(java.util.Locale.ROOT),
                        cache.get(key, () -> Loaded.of(key.toUpperCase(java.util.Locale.ROOT))));
            }
            assertEquals(2, cache.size());
            assertFalse(cache.contains("a:1"));
            assertEquals(1, cache.stats().evictions());
            waitUntil(WAIT, "the untrack", () -> client.stats().subscribers().stream()
                    .map(SubscriberStats::trackedKeys).toList().equals(List.of(2L)));
        }
    }

    @Test
    void theCheckSampleRateIsFollowed() {
        client.setPolicy("dash", Policy.builder().checkSampleRate(0.0).build());
        try (NearCache<String> cache = cache(NearCache.<String>builder(server.addr()).watch(false))) {
            for (int i = 0; i < 4; i++) {
                assertEquals("d", cache.get("dash:1", () -> Loaded.of("d")));
            }
            NearCacheStats s = cache.stats();
            // The first hit's check taught the rate: the next ones are not checked.
            assertEquals(List.of(3L, 1L, 2L), List.of(s.hits(), s.checks(), s.uncheckedHits()));
        }
    }

    /** Holds Check calls at a gate and counts the items of CheckBatch calls. */
    static final class Gate implements ClientInterceptor {
        final CountDownLatch open = new CountDownLatch(1);
        final List<Integer> batches = new CopyOnWriteArrayList<>();
        volatile boolean holding;

        @Override
        public <Q, R> ClientCall<Q, R> interceptCall(MethodDescriptor<Q, R> method, CallOptions options, Channel next) {
            return new ForwardingClientCall.SimpleForwardingClientCall<>(next.newCall(method, options)) {
                @Override
                public void sendMessage(Q message) {
                    if (holding && message instanceof CoordinatorOuterClass.CheckRequest) {
                        await(open);
                    }
                    if (message instanceof CoordinatorOuterClass.CheckBatchRequest b) {
                        batches.add(b.getItemsCount());
                    }
                    super.sendMessage(message);
                }
            };
        }
    }

    @Test
    void concurrentChecksGoOutInOneBatch() throws Exception {
        Gate gate = new Gate();
        ExecutorService pool = Executors.newFixedThreadPool(10);
        try (FreshdClient gated = FreshdClient.builder(server.addr()).intercept(gate).build();
                NearCache<String> cache = cache(NearCache.<String>builder(gated).watch(false))) {
            List<String> keys = new ArrayList<>();
            for (int i = 0; i < 10; i++) {
                String key = "feed:" + i;
                keys.add(key);
                cache.get(key, () -> Loaded.of(key.toUpperCase(java.util.Locale.ROOT), "posts:" + key));
            }
            // Hold the first check in flight; the others queue behind it.
            gate.holding = true;
            Map<String, Future<String>> results = new HashMap<>();
            results.put(keys.get(0), pool.submit(() -> cache.get(keys.get(0), () -> Loaded.of("reloaded"))));
            waitUntil(WAIT, "the first check in flight", () -> cache.stats().checks() == 1 && cache.pendingChecks() == 0);
            for (String key : keys.subList(1, keys.size())) {
                results.put(key, pool.submit(() -> cache.get(key, () -> Loaded.of("reloaded"))));
            }
            waitUntil(WAIT, "the queued checks", () -> cache.pendingChecks() == keys.size() - 1);
            gate.open.countDown();
            for (String key : keys) {
                assertEquals(key.toUpperCase(java.util.Locale.ROOT), results.get(key).get(10, TimeUnit.SECONDS));
            }
            assertEquals(List.of(keys.size() - 1), gate.batches);
            assertEquals(keys.size(), cache.stats().hits());
        } finally {
            pool.shutdownNow();
        }
    }

    @Test
    void serveBeforeCheck() {
        try (NearCache<String> cache = cache(NearCache.<String>builder(server.addr()).watch(false).serveBeforeCheck(true))) {
            assertEquals("feed v1", cache.get("feed:1", origin.loader("feed:1")));
            origin.set("feed:1", "feed v2", "posts:1");
            client.publish("posts:1");
            // Served at once; the check after it finds the copy stale and drops it.
            assertEquals("feed v1", cache.get("feed:1", origin.loader("feed:1")));
            waitUntil(WAIT, "the check after serving", () -> !cache.contains("feed:1"));
            assertEquals("feed v2", cache.get("feed:1", origin.loader("feed:1")));
        }
    }

    @Test
    void theWatchResumesAfterADisconnectWithoutLosingANotice() throws Exception {
        try (TcpProxy proxy = new TcpProxy(server.port());
                NearCache<String> cache = cache(NearCache.builder(proxy.addr()))) {
            assertTrue(cache.awaitWatching(WAIT));
            assertEquals("feed v1", cache.get("feed:1", origin.loader("feed:1")));
            proxy.blocked(true);
            proxy.cut();
            waitUntil(WAIT, "the disconnect", () -> !cache.watching());
            client.publish("posts:1"); // while the stream is down
            assertTrue(cache.contains("feed:1"));
            ResumeToken token = cache.resumeToken().orElseThrow();
            assertEquals(server.epoch(), token.epoch());
            proxy.blocked(false);
            waitUntil(WAIT, "the resumed stream's notice", () -> !cache.contains("feed:1"));
            NearCacheStats s = cache.stats();
            assertEquals(2, s.watchConnects());
            assertTrue(s.noticesApplied() >= 1);
            assertEquals(0, s.repairs());
        }
    }

    @Test
    void aResumeOlderThanTheHistoryIsRepaired() throws Exception {
        try (FreshdServer small = FreshdServer.start(Map.of("history_notices", "1"));
                FreshdClient writer = small.client();
                TcpProxy proxy = new TcpProxy(small.port());
                NearCache<String> cache = cache(NearCache.builder(proxy.addr()))) {
            assertTrue(cache.awaitWatching(WAIT));
            assertEquals("feed v1", cache.get("feed:1", origin.loader("feed:1")));
            proxy.blocked(true);
            proxy.cut();
            waitUntil(WAIT, "the disconnect", () -> !cache.watching());
            writer.publish("posts:1");
            writer.publish("x:1");
            writer.publish("x:2"); // the history now starts after posts:1
            proxy.blocked(false);
            waitUntil(WAIT, "the repair notice", () -> !cache.contains("feed:1"));
            assertEquals(1, cache.stats().repairs());
        }
    }

    @Test
    void aServerRestartDropsEverythingAndTheCacheKeepsWorking() {
        try (NearCache<String> cache = watching()) {
            assertEquals("feed v1", cache.get("feed:1", origin.loader("feed:1")));
            long firstEpoch = cache.watchEpoch().orElseThrow();
            assertEquals(server.epoch(), firstEpoch);

            server.kill();
            waitUntil(WAIT, "the stream to notice the crash", () -> !cache.watching());
            // freshd is down: the origin answers, uncached.
            origin.set("feed:1", "feed v2", "posts:1");
            assertEquals("feed v2", cache.get("feed:1", origin.loader("feed:1")));
            assertTrue(cache.stats().bypasses() >= 1);

            server.restart(); // same port, new epoch, nothing remembered
            assertNotEquals(firstEpoch, server.epoch());
            waitUntil(Duration.ofSeconds(20), "the new epoch",
                    () -> cache.watchEpoch().orElse(0) == server.epoch());
            assertEquals(0, cache.size());
            assertTrue(cache.stats().resets() >= 1);

            assertEquals("feed v2", cache.get("feed:1", origin.loader("feed:1")));
            assertEquals(server.epoch(), cache.versionOf("feed:1").orElseThrow().epoch());
            // And the new stream tracks it: a publish drops it again.
            try (FreshdClient writer = server.client()) {
                writer.publish("posts:1");
            }
            waitUntil(WAIT, "a notice from the new server", () -> !cache.contains("feed:1"));
        }
    }

    @Test
    void freshdRefusalsAlwaysThrow() {
        try (NearCache<String> cache = cache(NearCache.<String>builder(server.addr()).watch(false))) {
            assertThrows(FreshdException.InvalidArgument.class, () -> cache.get("", () -> Loaded.of("x")));
        }
    }

    @Test
    void aClosedCacheRefusesGets() {
        NearCache<String> cache = cache(NearCache.<String>builder(client).watch(false));
        cache.close();
        assertThrows(IllegalStateException.class, () -> cache.get("feed:1", origin.loader("feed:1")));
        // The client it was given stays open.
        assertEquals(0, client.stats().seq());
    }
}
