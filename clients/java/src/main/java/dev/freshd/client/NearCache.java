package dev.freshd.client;

import io.grpc.Status;
import java.net.InetAddress;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HashSet;
import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;
import java.util.Optional;
import java.util.OptionalLong;
import java.util.Set;
import java.util.TreeSet;
import java.util.UUID;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionException;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.RejectedExecutionException;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.ThreadPoolExecutor;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.locks.Condition;
import java.util.concurrent.locks.ReentrantLock;

/**
 * An in-process cache whose copies freshd keeps right.
 *
 * <p>Values live in this process (a bounded LRU with a local TTL); freshd holds their versions and
 * dependencies. {@link #get get(key, loader)} returns a value; the loader reads the origin and
 * returns the value with the keys it depends on.
 *
 * <ul>
 *   <li><b>Miss.</b> The key is tracked on the Watch stream (confirmed with a progress round
 *       trip), the key's fill lease is taken, the loader runs, and the fill carries the lease token
 *       and the dependencies; the value is kept with its version, epoch and load time. A fill
 *       refused because the key or a dependency changed during the read (ABORTED), or whose lease
 *       ran out, is read again under a new lease ({@code fillAttempts}); a value a notice outdated
 *       during the read is returned but not kept. Concurrent misses of one key read the origin once.
 *   <li><b>Lease taken by another caller.</b> The cache serves its own copy if it has one from this
 *       epoch that is not behind the key's current version; otherwise it waits
 *       {@code retry_after_ms} (at most {@code maxLeaseWait}) and asks again, {@code leaseRetries}
 *       times, then reads the origin without the lease, with a seq observed before the read.
 *   <li><b>Hit.</b> The copy's version is checked (with its age, epoch, endpoint and client id) for
 *       the share of hits the namespace's {@code check_sample_rate} asks; concurrent checks go out
 *       as one CheckBatch. FRESH serves; REVALIDATE serves and refreshes in the background, one
 *       refresh per key at a time; REFETCH and UNKNOWN read the origin now. With
 *       {@code serveBeforeCheck} a hit is served at once and checked in the background.
 *   <li><b>Watch stream.</b> One stream tracks the cached keys: a notice drops the copy it names, a
 *       reset drops every copy under its prefix, a new epoch drops everything. Applied seqs are
 *       acknowledged; progress is requested every {@code progressInterval}. After a disconnect it
 *       resumes with its token, backing off exponentially with jitter.
 *   <li><b>freshd down.</b> With {@link OnError#ORIGIN} (the default) a get that cannot reach freshd
 *       reads the origin and returns the value uncached; {@link OnError#RAISE} throws the
 *       {@link FreshdException}. Requests freshd refuses (INVALID_ARGUMENT, ...) always throw.
 * </ul>
 *
 * <p>Thread-safe. Keep {@code maxEntries} at or below the server's {@code max_tracked_keys}.
 *
 * @param <V> the type of the cached values
 */
public final class NearCache<V> implements AutoCloseable {
    private static final System.Logger LOG = System.getLogger(NearCache.class.getName());
    /** A notice version above every real one: the load in flight must not be kept. */
    private static final long INVALID = Long.MAX_VALUE;
    private static final Set<Status.Code> OUTAGE_CODES = Set.of(
            Status.Code.UNAVAILABLE, Status.Code.DEADLINE_EXCEEDED, Status.Code.INTERNAL,
            Status.Code.UNKNOWN, Status.Code.CANCELLED);

    /**
     * Reads a value from the origin.
     *
     * @param <V> the value's type
     */
    @FunctionalInterface
    public interface Loader<V> {
        /**
         * Reads the origin.
         *
         * @return the value and the keys it depends on
         */
        Loaded<V> load();
    }

    /** What a get does when freshd cannot answer. */
    public enum OnError {
        /** Read the origin and return the value uncached. */
        ORIGIN,
        /** Throw the {@link FreshdException}. */
        RAISE
    }

    /**
     * The version of a local copy.
     *
     * @param version the version the fill returned
     * @param epoch the epoch it belongs to
     */
    public record CopyVersion(long version, long epoch) {}

    private record Entry<V>(V value, long version, long epoch, long loadedAt, long expiresAt) {}

    private record Outcome<V>(boolean ok, V value) {}

    private record Grant(long token, long observedSeq, long epoch) {}

    private record SampleRate(double rate, long learnedAt) {}

    // ------------------------------------------------------------ settings

    private final FreshdClient client;
    private final boolean ownsClient;
    private final String endpoint;
    private final String clientId;
    private final int maxEntries;
    private final Duration ttl;
    private final boolean serveBeforeCheck;
    private final int leaseRetries;
    private final Duration maxLeaseWait;
    private final int fillAttempts;
    private final Duration sampleRateRefresh;
    private final OnError onError;

    // --------------------------------------------------------------- state

    final ReentrantLock lock = new ReentrantLock();
    private final LinkedHashMap<String, Entry<V>> entries = new LinkedHashMap<>(16, 0.75f, true);
    private final Map<String, CompletableFuture<Outcome<V>>> inflight = new HashMap<>();
    /** Keys being read from the origin: the highest version a notice named meanwhile. */
    private final Map<String, Long> loading = new HashMap<>();
    private final Set<String> tracked = new HashSet<>();
    private final Map<String, SampleRate> sampleRates = new HashMap<>();
    private final Counters counters = new Counters();
    private volatile boolean closed;

    private final ExecutorService refresher;
    private final CheckBatcher batcher;
    private final Watcher watcher;

    private NearCache(Builder<V> b) {
        this.ownsClient = b.client == null;
        this.client = b.client != null ? b.client : FreshdClient.builder(b.target).build();
        this.endpoint = b.endpoint;
        String id = b.clientId != null ? b.clientId : !client.clientId().isEmpty() ? client.clientId() : defaultClientId();
        this.clientId = id;
        this.maxEntries = b.maxEntries;
        this.ttl = b.ttl;
        this.serveBeforeCheck = b.serveBeforeCheck;
        this.leaseRetries = b.leaseRetries;
        this.maxLeaseWait = b.maxLeaseWait;
        this.fillAttempts = Math.max(1, b.fillAttempts);
        this.sampleRateRefresh = b.sampleRateRefresh;
        this.onError = b.onError;
        AtomicInteger threads = new AtomicInteger();
        int workers = Math.max(1, b.refreshWorkers);
        this.refresher = new ThreadPoolExecutor(workers, workers, 30, TimeUnit.SECONDS, new LinkedBlockingQueue<>(), r -> {
            Thread t = new Thread(r, "freshd-refresh-" + threads.incrementAndGet());
            t.setDaemon(true);
            return t;
        });
        this.batcher = b.batchChecks ? new CheckBatcher() : null;
        this.watcher = b.watch ? new Watcher(b.progressInterval, b.backoffMin, b.backoffMax) : null;
        if (batcher != null) {
            batcher.start();
        }
        if (watcher != null) {
            watcher.start();
        }
    }

    private static String defaultClientId() {
        String host;
        try {
            host = InetAddress.getLocalHost().getHostName();
        } catch (java.io.IOException e) {
            host = "host";
        }
        return host + "-" + ProcessHandle.current().pid() + "-" + UUID.randomUUID().toString().substring(0, 8);
    }

    /**
     * A builder for a cache over a client (which the cache does not close).
     *
     * @param client the client
     * @param <V> the type of the cached values
     * @return a new builder
     */
    public static <V> Builder<V> builder(FreshdClient client) {
        return new Builder<>(Objects.requireNonNull(client, "client"), null);
    }

    /**
     * A builder for a cache with a client of its own (closed with the cache).
     *
     * @param target the server's address, as for {@link FreshdClient#builder}
     * @param <V> the type of the cached values
     * @return a new builder
     */
    public static <V> Builder<V> builder(String target) {
        return new Builder<>(null, Objects.requireNonNull(target, "target"));
    }

    // ------------------------------------------------------------ lifecycle

    /** Stops the Watch stream and the background threads (and closes the client it made). */
    @Override
    public void close() {
        lock.lock();
        try {
            if (closed) {
                return;
            }
            closed = true;
        } finally {
            lock.unlock();
        }
        if (watcher != null) {
            watcher.stop();
        }
        if (batcher != null) {
            batcher.stop();
        }
        refresher.shutdown();
        try {
            if (!refresher.awaitTermination(10, TimeUnit.SECONDS)) {
                refresher.shutdownNow();
            }
        } catch (InterruptedException e) {
            refresher.shutdownNow();
            Thread.currentThread().interrupt();
        }
        if (ownsClient) {
            client.close();
        }
    }

    // ------------------------------------------------------------- reading

    /**
     * The client id the cache sends with its checks, fills and Watch stream.
     *
     * @return the id
     */
    public String clientId() {
        return clientId;
    }

    /**
     * The client the cache calls through.
     *
     * @return the client
     */
    public FreshdClient client() {
        return client;
    }

    /**
     * A snapshot of the counters.
     *
     * @return the counters
     */
    public NearCacheStats stats() {
        lock.lock();
        try {
            return counters.snapshot();
        } finally {
            lock.unlock();
        }
    }

    /**
     * Local copies held.
     *
     * @return the count
     */
    public int size() {
        lock.lock();
        try {
            return entries.size();
        } finally {
            lock.unlock();
        }
    }

    /**
     * Whether a live local copy of the key is held (without checking or counting anything).
     *
     * @param key the key
     * @return true when held and within the local TTL
     */
    public boolean contains(String key) {
        lock.lock();
        try {
            Entry<V> e = entries.get(key);
            return e != null && e.expiresAt - System.nanoTime() > 0;
        } finally {
            lock.unlock();
        }
    }

    /**
     * The local copy, if any, without checking or counting anything.
     *
     * @param key the key
     * @return the value, empty when not held (or held as null)
     */
    public Optional<V> peek(String key) {
        lock.lock();
        try {
            Entry<V> e = entries.get(key);
            return e == null ? Optional.empty() : Optional.ofNullable(e.value);
        } finally {
            lock.unlock();
        }
    }

    /**
     * The version and epoch of the local copy, if any.
     *
     * @param key the key
     * @return the copy's version
     */
    public Optional<CopyVersion> versionOf(String key) {
        lock.lock();
        try {
            Entry<V> e = entries.get(key);
            return e == null ? Optional.empty() : Optional.of(new CopyVersion(e.version, e.epoch));
        } finally {
            lock.unlock();
        }
    }

    /**
     * Whether the Watch stream is connected.
     *
     * @return true when connected
     */
    public boolean watching() {
        return watcher != null && watcher.connected;
    }

    /**
     * The epoch the Watch stream last started in.
     *
     * @return the epoch, empty before the first start
     */
    public OptionalLong watchEpoch() {
        if (watcher == null) {
            return OptionalLong.empty();
        }
        lock.lock();
        try {
            return watcher.epoch == 0 ? OptionalLong.empty() : OptionalLong.of(watcher.epoch);
        } finally {
            lock.unlock();
        }
    }

    /**
     * The token the Watch stream resumes with after a disconnect.
     *
     * @return the token, empty before the first start
     */
    public Optional<ResumeToken> resumeToken() {
        if (watcher == null) {
            return Optional.empty();
        }
        lock.lock();
        try {
            return Optional.ofNullable(watcher.token);
        } finally {
            lock.unlock();
        }
    }

    /**
     * Waits until the Watch stream is connected.
     *
     * @param timeout how long to wait
     * @return whether it is connected
     */
    public boolean awaitWatching(Duration timeout) {
        if (watcher == null) {
            return false;
        }
        long deadline = System.nanoTime() + timeout.toNanos();
        lock.lock();
        try {
            while (!watcher.connected) {
                long left = deadline - System.nanoTime();
                if (left <= 0) {
                    return false;
                }
                watcher.changed.awaitNanos(left);
            }
            return true;
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            return watcher.connected;
        } finally {
            lock.unlock();
        }
    }

    /**
     * Drops the local copy of a key.
     *
     * @param key the key
     */
    public void invalidate(String key) {
        lock.lock();
        try {
            if (entries.remove(key) != null) {
                untrackIfUnused(key);
            }
        } finally {
            lock.unlock();
        }
    }

    /** Drops every local copy. */
    public void clear() {
        lock.lock();
        try {
            List<String> keys = new ArrayList<>(entries.keySet());
            entries.clear();
            keys.forEach(this::untrackIfUnused);
        } finally {
            lock.unlock();
        }
    }

    // ------------------------------------------------------------------ get

    /**
     * The value of {@code key}: the local copy when freshd says it may be served, else the loader's
     * value (see the class documentation).
     *
     * @param key the key
     * @param loader reads the origin
     * @return the value
     * @throws FreshdException when freshd refuses a request, or fails with {@link OnError#RAISE}
     * @throws IllegalStateException when the cache is closed
     */
    public V get(String key, Loader<V> loader) {
        Objects.requireNonNull(key, "key");
        Objects.requireNonNull(loader, "loader");
        if (closed) {
            throw new IllegalStateException("the NearCache is closed");
        }
        long now = System.nanoTime();
        Entry<V> entry;
        lock.lock();
        try {
            entry = entries.get(key); // moves it to the LRU's young end
            if (entry != null && entry.expiresAt - now <= 0) {
                drop(key, true, true);
                entry = null;
            }
            if (entry == null) {
                counters.misses++;
            }
        } finally {
            lock.unlock();
        }
        if (entry == null) {
            return load(key, loader, null);
        }
        if (!shouldCheck(key)) {
            lock.lock();
            try {
                counters.hits++;
                counters.uncheckedHits++;
            } finally {
                lock.unlock();
            }
            return entry.value;
        }
        if (serveBeforeCheck) {
            lock.lock();
            try {
                counters.hits++;
            } finally {
                lock.unlock();
            }
            Entry<V> served = entry;
            submit(() -> checkAfterServe(key, served, loader));
            return entry.value;
        }
        CheckItemResult result;
        try {
            result = check(key, entry, false);
        } catch (FreshdException e) {
            return bypass(key, loader, e);
        }
        return act(key, entry, result, loader);
    }

    private V act(String key, Entry<V> entry, CheckItemResult result, Loader<V> loader) {
        Decision decision = result.decision();
        if (decision == Decision.FRESH) {
            lock.lock();
            try {
                counters.hits++;
            } finally {
                lock.unlock();
            }
            return entry.value;
        }
        if (decision == Decision.REVALIDATE) {
            lock.lock();
            try {
                counters.hits++;
                if (result.freshness() == Freshness.STALE) {
                    counters.staleServes++;
                }
            } finally {
                lock.unlock();
            }
            refreshInBackground(key, loader);
            return entry.value;
        }
        // REFETCH, UNKNOWN (or a decision this client does not know). The key stays tracked: it is
        // read again at once.
        lock.lock();
        try {
            counters.refetches++;
            if (entries.get(key) == entry) {
                drop(key, false, false);
            }
        } finally {
            lock.unlock();
        }
        return load(key, loader, entry);
    }

    private void checkAfterServe(String key, Entry<V> entry, Loader<V> loader) {
        CheckItemResult result;
        try {
            result = check(key, entry, true);
        } catch (FreshdException | IllegalStateException e) { // freshd failed, or the cache closed
            LOG.log(System.Logger.Level.WARNING, "freshd check of {0} failed: {1}", key, e.getMessage());
            return;
        }
        if (result.decision() == Decision.FRESH) {
            return;
        }
        if (result.decision() == Decision.REVALIDATE) {
            lock.lock();
            try {
                if (result.freshness() == Freshness.STALE) {
                    counters.staleServes++;
                }
            } finally {
                lock.unlock();
            }
            refreshInBackground(key, loader);
            return;
        }
        lock.lock();
        try {
            counters.refetches++;
            if (result.freshness() == Freshness.STALE) {
                counters.staleServes++;
            }
            if (entries.get(key) == entry) {
                drop(key, false, true);
            }
        } finally {
            lock.unlock();
        }
    }

    private boolean shouldCheck(String key) {
        lock.lock();
        try {
            SampleRate known = sampleRates.get(namespace(key));
            double rate = known == null ? 1.0 : known.rate;
            return rate >= 1.0 || ThreadLocalRandom.current().nextDouble() < rate;
        } finally {
            lock.unlock();
        }
    }

    private V bypass(String key, Loader<V> loader, FreshdException error) {
        if (onError == OnError.RAISE || !isOutage(error)) {
            throw error;
        }
        LOG.log(System.Logger.Level.WARNING, "freshd failed ({0}); reading {1} from the origin uncached",
                error.getMessage(), key);
        lock.lock();
        try {
            counters.bypasses++;
            counters.loads++;
        } finally {
            lock.unlock();
        }
        return loader.load().value();
    }

    private static boolean isOutage(FreshdException e) {
        return OUTAGE_CODES.contains(e.code());
    }

    /**
     * The part of a key before its first {@code :} (the whole key without one).
     *
     * @param key the key
     * @return its namespace
     */
    static String namespace(String key) {
        int i = key.indexOf(':');
        return i < 0 ? key : key.substring(0, i);
    }

    // --------------------------------------------------------------- checks

    private CheckItemResult check(String key, Entry<V> entry, boolean served) {
        long ageMs = Math.max(0, TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - entry.loadedAt));
        lock.lock();
        try {
            counters.checks++;
        } finally {
            lock.unlock();
        }
        if (batcher != null) {
            return batcher.check(key, entry.version, ageMs, entry.epoch, served);
        }
        return checkOne(key, entry.version, ageMs, entry.epoch, served);
    }

    private CheckItemResult checkOne(String key, long version, long ageMs, long epoch, boolean served) {
        CheckResult r = client.check(key, version, CheckOptions.builder()
                .ageMs(ageMs).epoch(epoch).endpoint(endpoint).served(served).clientId(clientId).build());
        learnSampleRate(key, r.checkSampleRate());
        return new CheckItemResult(r.freshness(), r.version(), r.critical(), r.decision(), r.checkSampleRate(), null);
    }

    private void learnSampleRate(String key, double rate) {
        lock.lock();
        try {
            sampleRates.put(namespace(key), new SampleRate(rate, System.nanoTime()));
        } finally {
            lock.unlock();
        }
    }

    private boolean sampleRateStale(String key) {
        lock.lock();
        try {
            SampleRate known = sampleRates.get(namespace(key));
            return known == null || System.nanoTime() - known.learnedAt > sampleRateRefresh.toNanos();
        } finally {
            lock.unlock();
        }
    }

    // ---------------------------------------------------------------- loads

    private void submit(Runnable task) {
        try {
            refresher.execute(task);
        } catch (RejectedExecutionException closedMeanwhile) {
            // closed
        }
    }

    private void refreshInBackground(String key, Loader<V> loader) {
        CompletableFuture<Outcome<V>> future = new CompletableFuture<>();
        lock.lock();
        try {
            if (inflight.containsKey(key) || closed) {
                return;
            }
            inflight.put(key, future);
            counters.revalidations++;
        } finally {
            lock.unlock();
        }
        try {
            refresher.execute(() -> runLoad(key, loader, null, true, future));
        } catch (RejectedExecutionException e) {
            lock.lock();
            try {
                inflight.remove(key);
            } finally {
                lock.unlock();
            }
            future.complete(new Outcome<>(false, null));
        }
    }

    private V load(String key, Loader<V> loader, Entry<V> previous) {
        while (true) {
            CompletableFuture<Outcome<V>> future;
            boolean owner;
            lock.lock();
            try {
                future = inflight.get(key);
                owner = future == null;
                if (owner) {
                    future = new CompletableFuture<>();
                    inflight.put(key, future);
                }
            } finally {
                lock.unlock();
            }
            if (owner) {
                runLoad(key, loader, previous, false, future);
            }
            Outcome<V> outcome;
            try {
                outcome = future.join();
            } catch (CompletionException e) {
                Throwable cause = e.getCause();
                if (cause instanceof RuntimeException r) {
                    throw r;
                }
                if (cause instanceof Error err) {
                    throw err;
                }
                throw e;
            }
            if (outcome.ok) {
                return outcome.value;
            }
            // A background refresh gave up (another caller holds the lease): read the origin here.
        }
    }

    private void runLoad(String key, Loader<V> loader, Entry<V> previous, boolean background,
            CompletableFuture<Outcome<V>> future) {
        Outcome<V> outcome;
        try {
            outcome = fetch(key, loader, previous, background);
        } catch (RuntimeException | Error e) {
            lock.lock();
            try {
                inflight.remove(key);
                untrackIfUnused(key);
            } finally {
                lock.unlock();
            }
            if (background) {
                LOG.log(System.Logger.Level.WARNING, "background refresh of {0} failed: {1}", key, e.toString());
                future.complete(new Outcome<>(false, null));
            } else {
                future.completeExceptionally(e);
            }
            return;
        }
        lock.lock();
        try {
            inflight.remove(key);
            untrackIfUnused(key);
        } finally {
            lock.unlock();
        }
        future.complete(outcome);
    }

    private Outcome<V> fetch(String key, Loader<V> loader, Entry<V> previous, boolean background) {
        lock.lock();
        try {
            track(key);
        } finally {
            lock.unlock();
        }
        if (watcher != null) {
            // The track is in force before the origin read: a change after it is then either
            // refused at fill time or noticed.
            watcher.sync(Duration.ofSeconds(1));
        }
        V value = null;
        Entry<V> prev = previous;
        for (int attempt = 0; attempt < fillAttempts; attempt++) {
            Object grant;
            try {
                grant = acquire(key, prev, background);
            } catch (FreshdException e) {
                if (background) {
                    throw e;
                }
                return new Outcome<>(true, bypass(key, loader, e));
            }
            if (grant == null) { // background, and another caller is filling
                return new Outcome<>(false, null);
            }
            if (grant instanceof Entry<?>) { // serve our own copy meanwhile
                lock.lock();
                try {
                    counters.staleServes++;
                } finally {
                    lock.unlock();
                }
                return new Outcome<>(true, prev.value);
            }
            Grant g = (Grant) grant;
            lock.lock();
            try {
                loading.put(key, 0L);
            } finally {
                lock.unlock();
            }
            try {
                long loadedAt = System.nanoTime();
                lock.lock();
                try {
                    counters.loads++;
                } finally {
                    lock.unlock();
                }
                Loaded<V> loaded = loader.load();
                value = loaded.value();
                FillResult fill;
                try {
                    fill = client.fill(key, loaded.dependencies(), FillOptions.builder()
                            .ttlMs(ttl.toMillis())
                            .observedSeq(g.observedSeq)
                            .epoch(g.epoch)
                            .leaseToken(g.token)
                            .clientId(clientId)
                            .build());
                } catch (FreshdException.FillRaced | FreshdException.FailedPrecondition e) {
                    // Changed during the read, or the lease ran out: read again under a new lease.
                    lock.lock();
                    try {
                        counters.fillRaces++;
                    } finally {
                        lock.unlock();
                    }
                    prev = null;
                    continue;
                } catch (FreshdException e) {
                    if (background || onError == OnError.RAISE || !isOutage(e)) {
                        throw e;
                    }
                    LOG.log(System.Logger.Level.WARNING, "freshd fill of {0} failed: {1}; serving it uncached",
                            key, e.getMessage());
                    lock.lock();
                    try {
                        counters.bypasses++;
                    } finally {
                        lock.unlock();
                    }
                    return new Outcome<>(true, value);
                }
                lock.lock();
                try {
                    long noticed = loading.getOrDefault(key, 0L);
                    if (noticed <= fill.version() && !closed) {
                        long ttlNanos = fill.ttlMs() == 0 ? ttl.toNanos()
                                : Math.min(ttl.toNanos(), TimeUnit.MILLISECONDS.toNanos(fill.ttlMs()));
                        store(key, new Entry<>(value, fill.version(), fill.epoch(), loadedAt, loadedAt + ttlNanos));
                    }
                } finally {
                    lock.unlock();
                }
                return new Outcome<>(true, value);
            } finally {
                lock.lock();
                try {
                    loading.remove(key);
                } finally {
                    lock.unlock();
                }
            }
        }
        // Every attempt raced with a change: return the last read uncached.
        return new Outcome<>(true, value);
    }

    /**
     * The key's lease: a {@link Grant} to fill with, the previous entry to serve meanwhile, or null
     * (background: give up).
     */
    private Object acquire(String key, Entry<V> previous, boolean background) {
        for (int i = 0; i <= leaseRetries; i++) {
            LeaseResult lease = client.lease(key);
            if (lease.granted()) {
                return new Grant(lease.token(), 0, lease.epoch());
            }
            lock.lock();
            try {
                counters.leaseWaits++;
            } finally {
                lock.unlock();
            }
            if (background) {
                return null;
            }
            if (previous != null && previous.epoch == lease.epoch() && lease.version() != 0
                    && previous.version >= lease.version()) {
                return previous;
            }
            long waitMs = lease.retryAfterMs() != 0 ? lease.retryAfterMs() : 50;
            long capped = Math.min(waitMs, maxLeaseWait.toMillis());
            sleep((long) (capped * ThreadLocalRandom.current().nextDouble(0.8, 1.2)));
        }
        // The other filler takes too long: read without the lease, with a seq observed before the
        // read. (No client id: this asks for a seq, it checks no copy.)
        CheckResult check = client.check(key, 0, CheckOptions.builder().clientId("").build());
        return new Grant(0, check.seq(), check.epoch());
    }

    private static void sleep(long ms) {
        try {
            Thread.sleep(Math.max(0, ms));
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw FreshdException.of(Status.Code.CANCELLED, "interrupted", "Lease", e);
        }
    }

    // ---------------------------------------------------- the local copies
    // Everything below runs under the lock.

    private void store(String key, Entry<V> entry) {
        entries.put(key, entry);
        track(key);
        Iterator<Map.Entry<String, Entry<V>>> it = entries.entrySet().iterator();
        while (entries.size() > maxEntries && it.hasNext()) {
            String old = it.next().getKey();
            it.remove();
            counters.evictions++;
            untrackIfUnused(old);
        }
    }

    private void drop(String key, boolean evicted, boolean untrack) {
        if (entries.remove(key) != null) {
            if (evicted) {
                counters.evictions++;
            } else {
                counters.invalidations++;
            }
            if (untrack) {
                untrackIfUnused(key);
            }
        }
    }

    private void track(String key) {
        if (tracked.add(key) && watcher != null) {
            watcher.send(w -> w.track(List.of(key)));
        }
    }

    private void untrackIfUnused(String key) {
        if (tracked.contains(key) && !entries.containsKey(key) && !inflight.containsKey(key)) {
            tracked.remove(key);
            if (watcher != null) {
                watcher.send(w -> w.untrack(List.of(key)));
            }
        }
    }

    private void applyNotice(Notice notice, long epoch) {
        counters.noticesApplied++;
        if (notice.isRepair()) {
            counters.repairs++;
        }
        Long noticed = loading.get(notice.key());
        if (noticed != null) {
            loading.put(notice.key(), Math.max(noticed, notice.version()));
        }
        Entry<V> entry = entries.get(notice.key());
        if (entry != null && (entry.epoch != epoch || notice.version() > entry.version)) {
            drop(notice.key(), false, true);
        }
    }

    private void applyReset(String prefix) {
        counters.resets++;
        List<String> keys = new ArrayList<>();
        for (String k : entries.keySet()) {
            if (k.startsWith(prefix)) {
                keys.add(k);
            }
        }
        keys.forEach(k -> drop(k, false, true));
        loading.replaceAll((k, v) -> k.startsWith(prefix) ? INVALID : v);
    }

    // ---------------------------------------------------------- the batcher

    /** Checks waiting for the batcher (for tests). */
    int pendingChecks() {
        return batcher == null ? 0 : batcher.pending();
    }

    /** A check waiting for the batcher. */
    private record Pending(String key, long version, long ageMs, long epoch, boolean served,
            CompletableFuture<CheckItemResult> answer) {}

    /**
     * Sends the checks of concurrent gets together: while one call is in flight the next ones
     * queue, and go out as one CheckBatch. A namespace whose sample rate is unknown or old gets a
     * single Check, which carries it.
     */
    private final class CheckBatcher {
        private static final int MAX_BATCH = 1000;
        private final ReentrantLock queueLock = new ReentrantLock();
        private final Condition waiting = queueLock.newCondition();
        private final List<Pending> pending = new ArrayList<>();
        private boolean stopped;
        private final Thread thread = new Thread(this::run, "freshd-checks");

        void start() {
            thread.setDaemon(true);
            thread.start();
        }

        int pending() {
            queueLock.lock();
            try {
                return pending.size();
            } finally {
                queueLock.unlock();
            }
        }

        CheckItemResult check(String key, long version, long ageMs, long epoch, boolean served) {
            CompletableFuture<CheckItemResult> answer = new CompletableFuture<>();
            queueLock.lock();
            try {
                if (stopped) {
                    throw new IllegalStateException("the NearCache is closed");
                }
                pending.add(new Pending(key, version, ageMs, epoch, served, answer));
                waiting.signal();
            } finally {
                queueLock.unlock();
            }
            Duration timeout = client.timeout();
            try {
                return timeout == null ? answer.get() : answer.get(timeout.toNanos() * 2, TimeUnit.NANOSECONDS);
            } catch (TimeoutException e) {
                throw FreshdException.of(Status.Code.DEADLINE_EXCEEDED, "no check answer in time", "Check", e);
            } catch (ExecutionException e) {
                if (e.getCause() instanceof RuntimeException r) {
                    throw r;
                }
                throw FreshdException.from(e.getCause(), "Check");
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                throw FreshdException.of(Status.Code.CANCELLED, "interrupted", "Check", e);
            }
        }

        void stop() {
            queueLock.lock();
            try {
                stopped = true;
                waiting.signal();
            } finally {
                queueLock.unlock();
            }
            try {
                thread.join(5000);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
            queueLock.lock();
            try {
                for (Pending p : pending) {
                    p.answer.completeExceptionally(new IllegalStateException("the NearCache is closed"));
                }
                pending.clear();
            } finally {
                queueLock.unlock();
            }
        }

        private void run() {
            while (true) {
                List<Pending> taken;
                queueLock.lock();
                try {
                    while (pending.isEmpty() && !stopped) {
                        waiting.awaitUninterruptibly();
                    }
                    if (stopped) {
                        return;
                    }
                    int n = Math.min(MAX_BATCH, pending.size());
                    taken = new ArrayList<>(pending.subList(0, n));
                    pending.subList(0, n).clear();
                } finally {
                    queueLock.unlock();
                }
                send(taken);
            }
        }

        private void send(List<Pending> taken) {
            List<Pending> singles = new ArrayList<>();
            Map<Long, List<Pending>> byEpoch = new LinkedHashMap<>();
            Set<String> learning = new HashSet<>();
            for (Pending item : taken) {
                String ns = namespace(item.key);
                if (taken.size() == 1 || (!learning.contains(ns) && sampleRateStale(item.key))) {
                    learning.add(ns);
                    singles.add(item);
                } else {
                    byEpoch.computeIfAbsent(item.epoch, e -> new ArrayList<>()).add(item);
                }
            }
            for (Pending p : singles) {
                try {
                    p.answer.complete(checkOne(p.key, p.version, p.ageMs, p.epoch, p.served));
                } catch (RuntimeException e) {
                    p.answer.completeExceptionally(e);
                }
            }
            for (Map.Entry<Long, List<Pending>> group : byEpoch.entrySet()) {
                List<Pending> items = group.getValue();
                CheckBatchResult answer;
                try {
                    answer = client.checkBatch(
                            items.stream().map(p -> new CheckItem(p.key, p.version, p.ageMs, p.served)).toList(),
                            CheckBatchOptions.builder().epoch(group.getKey()).endpoint(endpoint).clientId(clientId).build());
                } catch (RuntimeException e) {
                    items.forEach(p -> p.answer.completeExceptionally(e));
                    continue;
                }
                for (int i = 0; i < items.size(); i++) {
                    items.get(i).answer.complete(answer.results().get(i));
                }
            }
        }
    }

    // ---------------------------------------------------------- the watcher

    /** A send to the Watch stream. */
    @FunctionalInterface
    private interface Send {
        void to(WatchStream stream);
    }

    /**
     * The Watch stream of the cache: a reader thread that (re)connects and applies what arrives,
     * and a ticker that requests progress. Its fields are guarded by the cache's lock.
     */
    private final class Watcher {
        private final Duration progressInterval;
        private final Duration backoffMin;
        private final Duration backoffMax;
        final Condition changed = lock.newCondition();
        private final Thread reader = new Thread(this::run, "freshd-watch");
        private final Thread ticker = new Thread(this::tick, "freshd-watch-tick");
        private volatile boolean stopping;
        private WatchStream stream;
        /** Sends made while a stream is starting: flushed once it has started. */
        private List<Send> held;
        volatile boolean connected;
        long epoch;
        ResumeToken token;
        private long acked;
        private boolean epochResetPending;
        private long generation;
        private long progressAsked;
        private long progressSeen;

        Watcher(Duration progressInterval, Duration backoffMin, Duration backoffMax) {
            this.progressInterval = progressInterval;
            this.backoffMin = backoffMin;
            this.backoffMax = backoffMax;
        }

        void start() {
            reader.setDaemon(true);
            ticker.setDaemon(true);
            reader.start();
            ticker.start();
        }

        void stop() {
            stopping = true;
            WatchStream s;
            lock.lock();
            try {
                s = stream;
                changed.signalAll();
            } finally {
                lock.unlock();
            }
            if (s != null) {
                s.cancel();
            }
            reader.interrupt();
            ticker.interrupt();
            try {
                reader.join(5000);
                ticker.join(5000);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }

        /** Sends to the current stream, or holds the send for the one starting (under the lock). */
        void send(Send send) {
            if (held != null) {
                held.add(send);
                return;
            }
            if (stream != null) {
                try {
                    send.to(stream);
                } catch (StreamEndedException e) {
                    // the stream is gone; the next one starts from the tracked set
                }
            }
        }

        /**
         * Asks for progress and waits for it: every filter change sent before is then in force.
         * False when not connected or on timeout.
         */
        boolean sync(Duration timeout) {
            long deadline = System.nanoTime() + timeout.toNanos();
            lock.lock();
            try {
                if (!connected || stream == null) {
                    return false;
                }
                long gen = generation;
                progressAsked++;
                long wanted = progressAsked;
                try {
                    stream.requestProgress();
                } catch (StreamEndedException e) {
                    return false;
                }
                while (generation == gen && progressSeen < wanted) {
                    long left = deadline - System.nanoTime();
                    if (left <= 0 || stopping) {
                        return false;
                    }
                    changed.awaitNanos(left);
                }
                return generation == gen;
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                return false;
            } finally {
                lock.unlock();
            }
        }

        private void tick() {
            while (!stopping) {
                try {
                    Thread.sleep(progressInterval.toMillis());
                } catch (InterruptedException e) {
                    return;
                }
                lock.lock();
                try {
                    if (connected && stream != null) {
                        progressAsked++;
                        stream.requestProgress();
                    }
                } catch (StreamEndedException e) {
                    // reconnecting
                } finally {
                    lock.unlock();
                }
            }
        }

        private void run() {
            int failures = 0;
            while (!stopping) {
                try {
                    if (connectAndRead()) {
                        failures = 0;
                    }
                } catch (RuntimeException e) {
                    LOG.log(System.Logger.Level.WARNING, "Watch stream: unexpected error", e);
                }
                if (stopping) {
                    return;
                }
                failures++;
                long low = backoffMin.toNanos();
                long delay = Math.min(backoffMax.toNanos(), low << Math.min(failures - 1, 16));
                long jittered = (long) (delay * ThreadLocalRandom.current().nextDouble(0.5, 1.0));
                try {
                    TimeUnit.NANOSECONDS.sleep(jittered);
                } catch (InterruptedException e) {
                    return;
                }
                // The channel may be waiting out its own backoff: let it reconnect now.
                client.resetConnectBackoff();
            }
        }

        /** One stream, until it ends. True when it got as far as {@code started}. */
        private boolean connectAndRead() {
            WatchOptions.Builder options = WatchOptions.builder().clientId(clientId);
            lock.lock();
            try {
                options.track(new ArrayList<>(new TreeSet<>(tracked)));
                if (token != null) {
                    options.resume(token);
                }
                held = new ArrayList<>();
                progressAsked = 0;
                progressSeen = 0;
                acked = 0;
            } finally {
                lock.unlock();
            }
            WatchStream s = null;
            boolean started = false;
            try {
                s = client.watch(options.build());
                lock.lock();
                try {
                    stream = s;
                    List<Send> sends = held;
                    held = null;
                    for (Send send : sends) {
                        send.to(s);
                    }
                    onStarted(s.started());
                    started = true;
                } finally {
                    lock.unlock();
                }
                if (stopping) {
                    s.cancel();
                }
                while (!stopping) {
                    WatchEvent event = s.take();
                    if (event instanceof NoticeBatch b) {
                        onNotices(b);
                    } else if (event instanceof Progress p) {
                        onProgress(p);
                    } else if (event instanceof Reset r) {
                        onReset(r);
                    }
                }
            } catch (StreamEndedException e) {
                // closed
            } catch (FreshdException e) {
                if (!stopping) {
                    LOG.log(System.Logger.Level.INFO, "Watch stream ended ({0}); resuming with {1}", e.codeName(), token);
                }
            } finally {
                if (s != null) {
                    s.cancel();
                }
                lock.lock();
                try {
                    held = null;
                    connected = false;
                    stream = null;
                    generation++;
                    changed.signalAll();
                } finally {
                    lock.unlock();
                }
            }
            return started;
        }

        private void ack(long seq) {
            if (seq > acked && stream != null) {
                acked = seq;
                try {
                    stream.ack(seq);
                } catch (StreamEndedException e) {
                    // reconnecting
                }
            }
        }

        private void onStarted(WatchStarted started) {
            if (epoch != 0 && started.epoch() != epoch) {
                // The server lost its history: versions from the old one mean nothing. (Its
                // NEW_EPOCH reset follows; it finds nothing left to drop and is not counted again.)
                applyReset("");
                token = null;
                epochResetPending = true;
            }
            epoch = started.epoch();
            if (token == null || token.epoch() != started.epoch()) {
                token = new ResumeToken(started.epoch(), started.seq());
            }
            connected = true;
            counters.watchConnects++;
            changed.signalAll();
        }

        private void onNotices(NoticeBatch batch) {
            if (batch.notices().isEmpty()) {
                return;
            }
            lock.lock();
            try {
                epochResetPending = false;
                for (Notice notice : batch.notices()) {
                    applyNotice(notice, epoch);
                }
                long last = batch.notices().get(batch.notices().size() - 1).seq();
                token = new ResumeToken(epoch, last);
                ack(last);
            } finally {
                lock.unlock();
            }
        }

        private void onProgress(Progress progress) {
            lock.lock();
            try {
                epochResetPending = false;
                token = new ResumeToken(progress.epoch(), progress.seq());
                ack(progress.seq());
                progressSeen++;
                changed.signalAll();
            } finally {
                lock.unlock();
            }
        }

        private void onReset(Reset reset) {
            lock.lock();
            try {
                if (epochResetPending && reset.prefix().isEmpty() && reset.reason() == ResetReason.NEW_EPOCH) {
                    epochResetPending = false;
                    return;
                }
                applyReset(reset.prefix());
            } finally {
                lock.unlock();
            }
        }
    }

    // ------------------------------------------------------------ counters

    /** The counters, mutated under the lock. */
    private static final class Counters {
        long hits;
        long misses;
        long staleServes;
        long revalidations;
        long refetches;
        long noticesApplied;
        long resets;
        long repairs;
        long checks;
        long uncheckedHits;
        long loads;
        long fillRaces;
        long leaseWaits;
        long invalidations;
        long evictions;
        long watchConnects;
        long bypasses;

        NearCacheStats snapshot() {
            return new NearCacheStats(hits, misses, staleServes, revalidations, refetches, noticesApplied, resets,
                    repairs, checks, uncheckedHits, loads, fillRaces, leaseWaits, invalidations, evictions,
                    watchConnects, bypasses);
        }
    }

    // ------------------------------------------------------------- builder

    /**
     * Builds a {@link NearCache}.
     *
     * @param <V> the type of the cached values
     */
    public static final class Builder<V> {
        private final FreshdClient client;
        private final String target;
        private String endpoint = "";
        private String clientId;
        private int maxEntries = 10_000;
        private Duration ttl = Duration.ofMinutes(5);
        private boolean watch = true;
        private boolean batchChecks = true;
        private boolean serveBeforeCheck;
        private int leaseRetries = 10;
        private Duration maxLeaseWait = Duration.ofMillis(500);
        private int fillAttempts = 3;
        private int refreshWorkers = 2;
        private Duration progressInterval = Duration.ofSeconds(5);
        private Duration backoffMin = Duration.ofMillis(50);
        private Duration backoffMax = Duration.ofSeconds(5);
        private Duration sampleRateRefresh = Duration.ofSeconds(10);
        private OnError onError = OnError.ORIGIN;

        private Builder(FreshdClient client, String target) {
            this.client = client;
            this.target = target;
        }

        /**
         * What serves the copies (the API route, say), for the server's hit-age metric.
         *
         * @param value the endpoint
         * @return this builder
         */
        public Builder<V> endpoint(String value) {
            endpoint = Objects.requireNonNull(value, "endpoint");
            return this;
        }

        /**
         * The client id of checks, fills and the Watch stream (default: the client's, else
         * host-pid-random).
         *
         * @param value the id
         * @return this builder
         */
        public Builder<V> clientId(String value) {
            clientId = value;
            return this;
        }

        /**
         * The LRU bound (default 10,000).
         *
         * @param value copies, at least 1
         * @return this builder
         */
        public Builder<V> maxEntries(int value) {
            if (value < 1) {
                throw new IllegalArgumentException("maxEntries must be at least 1");
            }
            maxEntries = value;
            return this;
        }

        /**
         * A copy's local life, also the fill's TTL (default 5 minutes).
         *
         * @param value the TTL
         * @return this builder
         */
        public Builder<V> ttl(Duration value) {
            ttl = Objects.requireNonNull(value, "ttl");
            return this;
        }

        /**
         * Whether to keep a Watch stream (default true).
         *
         * @param value whether to watch
         * @return this builder
         */
        public Builder<V> watch(boolean value) {
            watch = value;
            return this;
        }

        /**
         * Whether concurrent checks go out as one CheckBatch (default true).
         *
         * @param value whether to batch
         * @return this builder
         */
        public Builder<V> batchChecks(boolean value) {
            batchChecks = value;
            return this;
        }

        /**
         * Serve a hit at once and check it in the background; the decision applies to the next get.
         *
         * @param value whether to serve before checking
         * @return this builder
         */
        public Builder<V> serveBeforeCheck(boolean value) {
            serveBeforeCheck = value;
            return this;
        }

        /**
         * Lease requests to retry while another caller fills (default 10).
         *
         * @param value retries
         * @return this builder
         */
        public Builder<V> leaseRetries(int value) {
            leaseRetries = value;
            return this;
        }

        /**
         * The longest wait between lease requests (default 500 ms).
         *
         * @param value the wait
         * @return this builder
         */
        public Builder<V> maxLeaseWait(Duration value) {
            maxLeaseWait = Objects.requireNonNull(value, "maxLeaseWait");
            return this;
        }

        /**
         * Origin reads per miss when fills race with changes (default 3).
         *
         * @param value attempts
         * @return this builder
         */
        public Builder<V> fillAttempts(int value) {
            fillAttempts = value;
            return this;
        }

        /**
         * Threads for background refreshes and checks (default 2).
         *
         * @param value threads
         * @return this builder
         */
        public Builder<V> refreshWorkers(int value) {
            refreshWorkers = value;
            return this;
        }

        /**
         * How often the Watch stream asks for progress (default 5 s).
         *
         * @param value the interval
         * @return this builder
         */
        public Builder<V> progressInterval(Duration value) {
            progressInterval = Objects.requireNonNull(value, "progressInterval");
            return this;
        }

        /**
         * The Watch stream's reconnect backoff: doubling from {@code min} up to {@code max}, each
         * wait jittered down to half (default 50 ms to 5 s).
         *
         * @param min the first wait
         * @param max the longest wait
         * @return this builder
         */
        public Builder<V> reconnectBackoff(Duration min, Duration max) {
            backoffMin = Objects.requireNonNull(min, "min");
            backoffMax = Objects.requireNonNull(max, "max");
            return this;
        }

        /**
         * How long a namespace's learned sample rate is used before a single Check refreshes it
         * (default 10 s).
         *
         * @param value the age
         * @return this builder
         */
        public Builder<V> sampleRateRefresh(Duration value) {
            sampleRateRefresh = Objects.requireNonNull(value, "sampleRateRefresh");
            return this;
        }

        /**
         * What a get does when freshd cannot answer (default {@link OnError#ORIGIN}).
         *
         * @param value the behaviour
         * @return this builder
         */
        public Builder<V> onError(OnError value) {
            onError = Objects.requireNonNull(value, "onError");
            return this;
        }

        /**
         * The cache, its Watch stream connecting in the background.
         *
         * @return the cache
         */
        public NearCache<V> build() {
            return new NearCache<>(this);
        }
    }
}
