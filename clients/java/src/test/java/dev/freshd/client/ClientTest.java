package dev.freshd.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.grpc.Status;
import java.net.ServerSocket;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;

/** The typed client against a real server: every RPC, errors, deadlines and Watch streams. */
class ClientTest {
    private FreshdServer server;
    private FreshdClient client;

    @BeforeEach
    void start() {
        server = FreshdServer.start();
        client = server.client();
    }

    @AfterEach
    void stop() {
        client.close();
        server.close();
    }

    @Test
    void publishFillCheckRoundTrip() {
        CheckResult before = client.check("feed:user:1", 0);
        assertEquals(Freshness.UNKNOWN, before.freshness());
        assertEquals(Decision.UNKNOWN, before.decision());
        FillResult fill = client.fill("feed:user:1", List.of("follows:1", "posts:author:7"),
                FillOptions.builder().ttlMs(60_000).observedSeq(before.seq()).build());
        assertEquals(60_000, fill.ttlMs());
        assertEquals(server.epoch(), fill.epoch());
        CheckResult fresh = client.check("feed:user:1", fill.version(),
                CheckOptions.builder().ageMs(10).epoch(fill.epoch()).build());
        assertEquals(Freshness.FRESH, fresh.freshness());
        assertEquals(Decision.FRESH, fresh.decision());

        PublishResult published = client.publish("posts:author:7");
        assertEquals(1, published.results().size());
        assertEquals(2, published.results().get(0).invalidated());
        CheckResult stale = client.check("feed:user:1", fill.version());
        assertEquals(Freshness.STALE, stale.freshness());
        assertEquals(Decision.REFETCH, stale.decision());
        assertEquals(published.seq(), stale.version());

        KeyInfo info = client.inspect("feed:user:1");
        assertEquals(List.of("follows:1", "posts:author:7"), info.dependencies());
        assertTrue(info.registered());
        assertEquals(published.seq(), info.lastChangeSeq());
        Stats stats = client.stats();
        assertEquals(3, stats.keys());
        assertEquals(2, stats.edges());
        assertEquals(published.seq(), stats.seq());
    }

    @Test
    void externalVersionsMakeDuplicates() {
        PublishResult first = client.publish(List.of(Change.of("posts:1").withExternalVersion(10).withCritical(true)));
        assertFalse(first.results().get(0).duplicate());
        PublishResult again = client.publish(List.of(Change.of("posts:1").withExternalVersion(10)));
        assertTrue(again.results().get(0).duplicate());
        assertEquals(first.seq(), again.seq());
        KeyInfo info = client.inspect("posts:1");
        assertEquals(10, info.externalVersion().orElseThrow());
        assertTrue(info.critical());
    }

    @Test
    void checkBatchAnswersInOrder() {
        FillResult a = client.fill("feed:1", List.of("posts:1"));
        FillResult b = client.fill("feed:2", List.of("posts:2"));
        client.publish("posts:2");
        CheckBatchResult result = client.checkBatch(List.of(
                CheckItem.of("feed:1", a.version()), CheckItem.of("feed:2", b.version()).withAgeMs(5),
                CheckItem.of("feed:3", 1)));
        assertEquals(List.of(Freshness.FRESH, Freshness.STALE, Freshness.UNKNOWN),
                result.results().stream().map(CheckItemResult::freshness).toList());
        assertEquals(server.epoch(), result.epoch());
    }

    @Test
    void policies() {
        Policy policy = Policy.builder().maxAgeMs(5000).revalidateAfterMs(2000).staleWhileRevalidateMs(1000)
                .checkSampleRate(0.5).build();
        NamespacePolicy set = client.setPolicy("feed", policy);
        assertEquals("feed", set.namespace());
        assertFalse(set.isDefault());
        assertEquals(policy, set.policy());
        assertEquals(policy, client.getPolicy("feed").policy());
        assertTrue(client.getPolicy("posts").isDefault());
        List<NamespacePolicy> all = client.listPolicies();
        assertEquals(List.of("", "feed"), all.stream().map(NamespacePolicy::namespace).toList());
        client.deletePolicy("feed");
        assertTrue(client.getPolicy("feed").isDefault());
        assertThrows(FreshdException.NotFound.class, () -> client.deletePolicy("feed"));
        assertThrows(FreshdException.InvalidArgument.class, () -> client.deletePolicy(""));
    }

    @Test
    void errorsCarryTheStatusCode() {
        FreshdException.InvalidArgument empty =
                assertThrows(FreshdException.InvalidArgument.class, () -> client.publish(List.of()));
        assertEquals(Status.Code.INVALID_ARGUMENT, empty.code());
        assertEquals("INVALID_ARGUMENT", empty.codeName());
        assertEquals("Publish", empty.method());
        assertTrue(empty.description().contains("changes must not be empty"), empty.description());
        assertThrows(FreshdException.NotFound.class, () -> client.inspect("nothing"));
        FreshdException.FillRaced raced = assertThrows(FreshdException.FillRaced.class,
                () -> client.fill("k", List.of(), FillOptions.builder().epoch(1).build()));
        assertEquals(Status.Code.ABORTED, raced.code());
        FreshdException.LeaseLost lost = assertThrows(FreshdException.LeaseLost.class,
                () -> client.fill("k", List.of(), FillOptions.builder().leaseToken(12345).build()));
        assertInstanceOf(FreshdException.FailedPrecondition.class, lost);
    }

    @Test
    void aPerCallTimeoutIsADeadline() {
        FreshdException.DeadlineExceeded e = assertThrows(FreshdException.DeadlineExceeded.class,
                () -> client.withTimeout(Duration.ofNanos(1)).stats());
        assertEquals(Status.Code.DEADLINE_EXCEEDED, e.code());
        assertThrows(FreshdException.DeadlineExceeded.class,
                () -> client.withDeadline(io.grpc.Deadline.after(1, java.util.concurrent.TimeUnit.NANOSECONDS)).stats());
        // The view shares the connection; the client goes on.
        assertEquals(0, client.withTimeout(Duration.ofSeconds(5)).stats().seq());
    }

    @Test
    void leases() {
        LeaseResult first = client.lease("feed:1");
        assertTrue(first.granted());
        LeaseResult second = client.lease("feed:1");
        assertFalse(second.granted());
        assertEquals(0, second.token());
        client.fill("feed:1", List.of("posts:1"), FillOptions.builder().leaseToken(first.token()).build());
        assertTrue(client.lease("feed:1").granted());
    }

    @Test
    void purge() {
        client.fill("feed:1", List.of("posts:1"));
        client.fill("feed:2", List.of("posts:2"));
        PurgeResult dry = client.purge("feed:", PurgeOptions.builder().dryRun(true).build());
        assertEquals(2, dry.matched());
        assertFalse(dry.applied());
        PurgeResult hard = client.purge("feed:", PurgeOptions.builder().hard(true).build());
        assertTrue(hard.applied());
        assertEquals(1, client.stats().purges());
    }

    @Test
    void anUnreachableServerIsUnavailable() throws Exception {
        int port;
        try (ServerSocket s = new ServerSocket(0)) {
            port = s.getLocalPort();
        }
        try (FreshdClient c = FreshdClient.builder("127.0.0.1:" + port).timeout(Duration.ofSeconds(5)).build()) {
            assertThrows(FreshdException.Unavailable.class, c::stats);
        }
    }

    @Test
    void unusableSettingsAreRefused() {
        for (String bad : List.of("", "two words", "caf\u00e9")) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> FreshdClient.builder(server.addr()).token(bad).build());
            assertTrue(e.getMessage().contains("token"), e.getMessage());
        }
        assertThrows(IllegalArgumentException.class,
                () -> FreshdClient.builder("http://" + server.addr()).tls(true).build());
        assertThrows(IllegalArgumentException.class,
                () -> FreshdClient.builder(server.addr()).tlsCa("not pem".getBytes(java.nio.charset.StandardCharsets.UTF_8)));
    }

    @Test
    void watchNoticesProgressAndResume() {
        client.fill("feed:1", List.of("posts:1"), FillOptions.builder().ttlMs(60_000).build());
        ResumeToken token;
        try (WatchStream stream = client.watch(WatchOptions.builder().clientId("svc")
                .track("feed:1").subscribe("users:").build())) {
            assertEquals(ResumeOutcome.NEW, stream.started().outcome());
            assertEquals(server.epoch(), stream.started().epoch());
            long p1 = client.publish("posts:1").seq();
            client.publish("other:1");
            SyncResult synced = stream.sync(Duration.ofSeconds(10));
            assertEquals(1, synced.notices().size());
            Notice notice = synced.notices().get(0);
            assertEquals("feed:1", notice.key());
            assertEquals(p1, notice.seq());
            assertEquals("posts:1", notice.cause());
            assertFalse(notice.isRepair());
            token = stream.resumeToken();
            assertEquals(new ResumeToken(server.epoch(), synced.progress().seq()), token);
            stream.ack(token.seq());
            stream.closeSend();
            assertTrue(stream.awaitTermination(Duration.ofSeconds(5)));
            assertThrows(StreamEndedException.class, () -> stream.poll(Duration.ofSeconds(5)));
            assertThrows(StreamEndedException.class, () -> stream.track(List.of("x")));
        }
        long p2 = client.publish("users:9").seq();
        try (WatchStream resumed = client.watch(WatchOptions.builder().clientId("svc")
                .track("feed:1").subscribe("users:").resume(token).build())) {
            assertEquals(ResumeOutcome.FROM_HISTORY, resumed.started().outcome());
            List<Notice> seen = resumed.sync(Duration.ofSeconds(10)).notices();
            assertEquals(List.of("users:9"), seen.stream().map(Notice::key).toList());
            assertEquals(p2, seen.get(0).seq());
            // Iterating: the events until the stream ends.
            resumed.requestProgress();
            List<WatchEvent> events = new ArrayList<>();
            for (WatchEvent event : resumed) {
                events.add(event);
                if (event instanceof Progress) {
                    resumed.closeSend();
                }
            }
            assertInstanceOf(Progress.class, events.get(events.size() - 1));
        }
    }

    @Test
    void aWatchBuffersAtMostMaxBufferedEvents() {
        try (WatchStream stream = client.watch(WatchOptions.builder().subscribe("k:").maxBuffered(2).build())) {
            for (int i = 0; i < 50; i++) {
                client.publish("k:" + i);
            }
            stream.requestProgress();
            // The stream stops reading at the bound; what it holds never grows past it.
            FreshdServer.waitUntil(Duration.ofSeconds(5), "two buffered events", () -> stream.buffered() == 2);
            assertEquals(2, stream.buffered());
            int notices = 0;
            while (true) {
                WatchEvent event = stream.poll(Duration.ofSeconds(10)).orElseThrow();
                assertTrue(stream.buffered() <= 2);
                if (event instanceof NoticeBatch b) {
                    notices += b.notices().size();
                } else if (event instanceof Progress) {
                    break;
                }
            }
            assertTrue(notices > 0);
        }
        assertThrows(IllegalArgumentException.class, () -> WatchOptions.builder().maxBuffered(0).build());
    }

    @Test
    void aRefusedStartThrows() {
        FreshdException e = assertThrows(FreshdException.InvalidArgument.class,
                () -> client.watch(WatchOptions.builder().track("").build()));
        assertEquals("Watch", e.method());
    }

    @Test
    void refusalsInBandLeaveTheStreamOpen() {
        try (WatchStream stream = client.watch(WatchOptions.builder().track("r:a").refusalsInBand(true).build())) {
            long n = stream.track(List.of("r:b", ""));
            assertEquals(2, n);
            SyncResult synced = stream.sync(Duration.ofSeconds(10));
            assertEquals(1, synced.refused().size());
            Refused refused = synced.refused().get(0);
            assertEquals(2, refused.request());
            assertEquals(Status.Code.INVALID_ARGUMENT, refused.code());
            client.publish("r:a", "r:b");
            assertEquals(List.of("r:a"), stream.sync(Duration.ofSeconds(10)).notices().stream().map(Notice::key).toList());
        }
    }

    @Test
    void withoutRefusalsInBandABadTrackEndsTheStream() {
        try (WatchStream stream = client.watch(WatchOptions.builder().track("r:a").build())) {
            stream.track(List.of(""));
            FreshdException e = assertThrows(FreshdException.InvalidArgument.class, () -> stream.sync(Duration.ofSeconds(10)));
            assertTrue(e.description().contains("track.keys[0]"), e.description());
            // The failure stays.
            assertThrows(FreshdException.InvalidArgument.class, () -> stream.poll(Duration.ofSeconds(1)));
        }
    }

    @Test
    void aTokenFromAnotherEpochResetsEverything() {
        try (WatchStream stream = client.watch(WatchOptions.builder().track("k1")
                .resume(new ResumeToken(1, 3)).build())) {
            assertEquals(ResumeOutcome.REPAIRED, stream.started().outcome());
            SyncResult synced = stream.sync(Duration.ofSeconds(10));
            assertEquals(1, synced.resets().size());
            assertEquals("", synced.resets().get(0).prefix());
            assertEquals(ResetReason.NEW_EPOCH, synced.resets().get(0).reason());
        }
    }
}
