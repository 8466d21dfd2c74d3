package freshd_test

import (
	"context"
	"errors"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	freshd "github.com/freshd/freshd/clients/go"
	"google.golang.org/grpc"
)

// origin is the source of truth the caches read: values and their
// dependencies, with a count of reads per key.
type origin struct {
	mu     sync.Mutex
	values map[string]string
	deps   map[string][]string
	reads  map[string]int
}

func newOrigin() *origin {
	o := &origin{values: map[string]string{}, deps: map[string][]string{}, reads: map[string]int{}}
	o.set("feed:1", "feed v1", "posts:1", "follows:1")
	return o
}

func (o *origin) set(key, value string, deps ...string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.values[key], o.deps[key] = value, deps
}

func (o *origin) readsOf(key string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.reads[key]
}

// loader reads key; before runs first (to hold or race the read).
func (o *origin) loader(key string, before func()) freshd.Loader[string] {
	return func(context.Context) (string, []string, error) {
		if before != nil {
			before()
		}
		o.mu.Lock()
		defer o.mu.Unlock()
		o.reads[key]++
		return o.values[key], slices.Clone(o.deps[key]), nil
	}
}

func connect(t *testing.T, addr string, opts ...freshd.Option) *freshd.Client {
	t.Helper()
	c, err := freshd.New(addr, append([]freshd.Option{freshd.WithTimeout(5 * time.Second)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func newCache(t *testing.T, client *freshd.Client, cfg freshd.NearCacheConfig) *freshd.NearCache[string] {
	t.Helper()
	if cfg.ReconnectMin == 0 {
		cfg.ReconnectMin, cfg.ReconnectMax = 20*time.Millisecond, 300*time.Millisecond
	}
	cache := freshd.NewNearCache[string](client, cfg)
	t.Cleanup(func() { cache.Close() })
	if !cfg.NoWatch {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if !cache.WaitWatching(ctx) {
			t.Fatal("the Watch stream did not connect")
		}
	}
	return cache
}

func mustGet(t *testing.T, cache *freshd.NearCache[string], key string, loader freshd.Loader[string], want string) {
	t.Helper()
	got, err := cache.Get(context.Background(), key, loader)
	if err != nil {
		t.Fatalf("get %s: %v", key, err)
	}
	if got != want {
		t.Fatalf("get %s: got %q, want %q", key, got, want)
	}
}

func TestNearCacheAMissLoadsAndFillsThenAHitChecks(t *testing.T) {
	srv := startServer(t, nil)
	client := connect(t, srv.Addr)
	o := newOrigin()
	cache := newCache(t, client, freshd.NearCacheConfig{Endpoint: "/feed"})
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v1")
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v1")
	if o.readsOf("feed:1") != 1 {
		t.Fatalf("reads: %d", o.readsOf("feed:1"))
	}
	s := cache.Stats()
	if s.Misses != 1 || s.Hits != 1 || s.Checks != 1 || s.Loads != 1 {
		t.Fatalf("stats: %+v", s)
	}
	ctx := context.Background()
	version, epoch, ok := cache.VersionOf("feed:1")
	info, err := client.Inspect(ctx, "feed:1")
	if err != nil {
		t.Fatal(err)
	}
	if !ok || !info.GetRegistered() || info.GetVersion() != version || epoch != srv.Epoch {
		t.Fatalf("inspect: %v; cached version %d epoch %d", info, version, epoch)
	}
	if !slices.Equal(info.GetDependencies(), []string{"follows:1", "posts:1"}) {
		t.Fatalf("dependencies: %v", info.GetDependencies())
	}
	// The Watch stream tracks what is cached, under the cache's client id.
	waitUntil(t, 5*time.Second, "the key to be tracked", func() bool {
		stats, err := client.Stats(ctx)
		if err != nil {
			return false
		}
		for _, sub := range stats.GetSubscribers() {
			if sub.GetTrackedKeys() == 1 && sub.GetClientId() == cache.ClientID() {
				return true
			}
		}
		return false
	})
}

func TestNearCacheConcurrentMissesReadTheOriginOnce(t *testing.T) {
	srv := startServer(t, nil)
	cache := newCache(t, connect(t, srv.Addr), freshd.NearCacheConfig{})
	o := newOrigin()
	gate := make(chan struct{})
	loader := o.loader("feed:1", func() { <-gate })
	var wg sync.WaitGroup
	results := make([]string, 8)
	errs := make([]error, 8)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], errs[i] = cache.Get(context.Background(), "feed:1", loader)
		}()
	}
	waitUntil(t, 5*time.Second, "eight misses", func() bool { return cache.Stats().Misses == 8 })
	close(gate)
	wg.Wait()
	for i := range results {
		if errs[i] != nil || results[i] != "feed v1" {
			t.Fatalf("get %d: %q, %v", i, results[i], errs[i])
		}
	}
	if o.readsOf("feed:1") != 1 {
		t.Fatalf("reads: %d", o.readsOf("feed:1"))
	}
}

func TestNearCacheTwoClientsOnePublishesTheOthersCopyIsInvalidated(t *testing.T) {
	srv := startServer(t, nil)
	o := newOrigin()
	reader := newCache(t, connect(t, srv.Addr), freshd.NearCacheConfig{})
	writer := connect(t, srv.Addr)
	mustGet(t, reader, "feed:1", o.loader("feed:1", nil), "feed v1")
	o.set("feed:1", "feed v2", "posts:1", "follows:1")
	published, err := writer.PublishKeys(context.Background(), "posts:1")
	if err != nil || published.GetSeq() == 0 {
		t.Fatalf("publish: %v %v", published, err)
	}
	// The notice drops the copy: no get, no check needed.
	waitUntil(t, 5*time.Second, "the notice to drop the copy", func() bool { return !reader.Contains("feed:1") })
	if s := reader.Stats(); s.NoticesApplied < 1 || s.Invalidations != 1 {
		t.Fatalf("stats: %+v", s)
	}
	mustGet(t, reader, "feed:1", o.loader("feed:1", nil), "feed v2")
	if o.readsOf("feed:1") != 2 {
		t.Fatalf("reads: %d", o.readsOf("feed:1"))
	}
}

func TestNearCacheAChangeDuringTheOriginReadIsNotCached(t *testing.T) {
	srv := startServer(t, nil)
	client := connect(t, srv.Addr)
	cache := newCache(t, client, freshd.NearCacheConfig{})
	o := newOrigin()
	var published uint64
	plain := o.loader("feed:1", nil)
	racing := func(ctx context.Context) (string, []string, error) {
		value, deps, err := plain(ctx)
		if published == 0 { // the origin changes right after the first read
			o.set("feed:1", "feed v2", deps...)
			resp, perr := client.PublishKeys(ctx, "posts:1")
			if perr != nil {
				return "", nil, perr
			}
			published = resp.GetSeq()
		}
		return value, deps, err
	}
	// The first read (v1) raced the write: its fill is refused, and the
	// cache reads again rather than keep a stale value.
	mustGet(t, cache, "feed:1", racing, "feed v2")
	if o.readsOf("feed:1") != 2 || cache.Stats().FillRaces != 1 {
		t.Fatalf("reads %d, stats %+v", o.readsOf("feed:1"), cache.Stats())
	}
	if v, ok := cache.Peek("feed:1"); !ok || v != "feed v2" {
		t.Fatalf("peek: %q %v", v, ok)
	}
	if version, _, _ := cache.VersionOf("feed:1"); version < published {
		t.Fatalf("version %d below the publish %d", version, published)
	}
}

func TestNearCacheACriticalChangeRefetchesAtOnce(t *testing.T) {
	srv := startServer(t, nil)
	client := connect(t, srv.Addr)
	// Without the Watch stream the check alone must catch it.
	cache := newCache(t, client, freshd.NearCacheConfig{NoWatch: true})
	o := newOrigin()
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v1")
	o.set("feed:1", "feed v2", "posts:1")
	if _, err := client.Publish(context.Background(), &freshd.PublishRequest{
		Changes: []*freshd.Change{{Key: "posts:1", Critical: true}},
	}); err != nil {
		t.Fatal(err)
	}
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v2")
	if cache.Stats().Refetches != 1 {
		t.Fatalf("stats: %+v", cache.Stats())
	}
}

// cachedUnderStaleWhileRevalidate starts a server whose feed namespace
// serves stale copies for a minute while they are refreshed, and a cache
// without a Watch stream holding feed:1 at "feed v1".
func cachedUnderStaleWhileRevalidate(t *testing.T) (*freshd.Client, *freshd.NearCache[string], *origin) {
	t.Helper()
	srv := startServer(t, nil)
	client := connect(t, srv.Addr)
	if _, err := client.SetPolicy(context.Background(), "feed", &freshd.FreshnessPolicy{StaleWhileRevalidateMs: 60000}); err != nil {
		t.Fatal(err)
	}
	cache := newCache(t, client, freshd.NearCacheConfig{NoWatch: true})
	o := newOrigin()
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v1")
	return client, cache, o
}

func TestNearCacheStaleWhileRevalidateServesTheStaleCopyOnce(t *testing.T) {
	ctx := context.Background()
	client, cache, o := cachedUnderStaleWhileRevalidate(t)
	o.set("feed:1", "feed v2", "posts:1")
	if _, err := client.PublishKeys(ctx, "posts:1"); err != nil {
		t.Fatal(err)
	}
	// Stale, within stale_while_revalidate: served once, refreshed behind.
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v1")
	if s := cache.Stats(); s.StaleServes != 1 || s.Revalidations != 1 {
		t.Fatalf("stats: %+v", s)
	}
	waitUntil(t, 5*time.Second, "the background refresh", func() bool {
		v, _ := cache.Peek("feed:1")
		return v == "feed v2"
	})
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v2")
	if o.readsOf("feed:1") != 2 {
		t.Fatalf("reads: %d", o.readsOf("feed:1"))
	}
}

func TestNearCacheOneBackgroundRefreshPerKey(t *testing.T) {
	ctx := context.Background()
	client, cache, o := cachedUnderStaleWhileRevalidate(t)
	if _, err := client.PublishKeys(ctx, "posts:1"); err != nil {
		t.Fatal(err)
	}
	gate := make(chan struct{})
	slow := o.loader("feed:1", func() { <-gate })
	for range 5 {
		mustGet(t, cache, "feed:1", slow, "feed v1")
	}
	if cache.Stats().Revalidations != 1 {
		t.Fatalf("stats: %+v", cache.Stats())
	}
	close(gate)
	waitUntil(t, 5*time.Second, "the refresh", func() bool { return o.readsOf("feed:1") == 2 })
}

func TestNearCacheAMissWaitsForTheOtherFiller(t *testing.T) {
	srv := startServer(t, map[string]string{"lease_ttl": "300ms"})
	other := connect(t, srv.Addr)
	lease, err := other.Lease(context.Background(), &freshd.LeaseRequest{Key: "feed:1"})
	if err != nil || !lease.GetGranted() {
		t.Fatalf("lease: %v %v", lease, err)
	}
	cache := newCache(t, connect(t, srv.Addr), freshd.NearCacheConfig{NoWatch: true})
	o := newOrigin()
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v1")
	if cache.Stats().LeaseWaits < 1 {
		t.Fatalf("stats: %+v", cache.Stats())
	}
	if v, ok := cache.Peek("feed:1"); !ok || v != "feed v1" {
		t.Fatalf("peek: %q %v", v, ok)
	}
}

func TestNearCacheLRUEvictionUntracks(t *testing.T) {
	srv := startServer(t, nil)
	client := connect(t, srv.Addr)
	cache := newCache(t, client, freshd.NearCacheConfig{MaxEntries: 2})
	for _, key := range []string{"a:1", "a:2", "a:3"} {
		mustGet(t, cache, key, func(context.Context) (string, []string, error) { return key + "!", nil, nil }, key+"!")
	}
	if cache.Len() != 2 || cache.Contains("a:1") || cache.Stats().Evictions != 1 {
		t.Fatalf("len %d, stats %+v", cache.Len(), cache.Stats())
	}
	waitUntil(t, 5*time.Second, "the untrack", func() bool {
		stats, err := client.Stats(context.Background())
		return err == nil && len(stats.GetSubscribers()) == 1 && stats.GetSubscribers()[0].GetTrackedKeys() == 2
	})
}

func TestNearCacheCheckSampleRateIsFollowed(t *testing.T) {
	srv := startServer(t, nil)
	client := connect(t, srv.Addr)
	zero := 0.0
	if _, err := client.SetPolicy(context.Background(), "dash", &freshd.FreshnessPolicy{CheckSampleRate: &zero}); err != nil {
		t.Fatal(err)
	}
	cache := newCache(t, client, freshd.NearCacheConfig{NoWatch: true})
	for range 4 {
		mustGet(t, cache, "dash:1", func(context.Context) (string, []string, error) { return "d", nil, nil }, "d")
	}
	// The first hit's check taught the rate: the next ones are not checked.
	if s := cache.Stats(); s.Hits != 3 || s.Checks != 1 || s.UncheckedHits != 2 {
		t.Fatalf("stats: %+v", s)
	}
}

func TestNearCacheConcurrentChecksGoOutInOneBatch(t *testing.T) {
	srv := startServer(t, nil)
	// Hold the first single Check in flight; count the CheckBatch items.
	var (
		mu      sync.Mutex
		batches []int
		held    = make(chan struct{}, 1)
		gate    = make(chan struct{})
		holding = false
	)
	interceptor := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		mu.Lock()
		hold := holding && method == "/freshd.v1.Coordinator/Check"
		if hold {
			holding = false
		}
		if b, ok := req.(*freshd.CheckBatchRequest); ok {
			batches = append(batches, len(b.GetItems()))
		}
		mu.Unlock()
		if hold {
			held <- struct{}{}
			<-gate
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	var once sync.Once
	release := func() { once.Do(func() { close(gate) }) }
	client := connect(t, srv.Addr, freshd.WithDialOptions(grpc.WithUnaryInterceptor(interceptor)))
	defer release() // runs before the cleanups that close the cache
	cache := newCache(t, client, freshd.NearCacheConfig{NoWatch: true})
	keys := []string{}
	for i := range 10 {
		key := "feed:" + string(rune('a'+i))
		keys = append(keys, key)
		mustGet(t, cache, key, func(context.Context) (string, []string, error) { return key + "!", []string{"posts:" + key}, nil }, key+"!")
	}
	mu.Lock()
	holding = true
	mu.Unlock()
	results := make([]string, len(keys))
	errs := make([]error, len(keys))
	var wg sync.WaitGroup
	get := func(i int) {
		defer wg.Done()
		results[i], errs[i] = cache.Get(context.Background(), keys[i], func(context.Context) (string, []string, error) {
			return "reloaded", nil, nil
		})
	}
	wg.Add(1)
	go get(0)
	<-held // the batcher sent the first check and waits on the gate
	for i := 1; i < len(keys); i++ {
		wg.Add(1)
		go get(i)
	}
	waitUntil(t, 5*time.Second, "the other checks to queue", func() bool {
		return cache.Stats().Checks == uint64(len(keys))
	})
	release()
	wg.Wait()
	for i, key := range keys {
		if errs[i] != nil || results[i] != key+"!" {
			t.Fatalf("get %s: %q %v", key, results[i], errs[i])
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(batches, []int{len(keys) - 1}) {
		t.Fatalf("batches: %v", batches)
	}
}

func TestNearCacheServeBeforeCheck(t *testing.T) {
	srv := startServer(t, nil)
	client := connect(t, srv.Addr)
	cache := newCache(t, client, freshd.NearCacheConfig{NoWatch: true, ServeBeforeCheck: true})
	o := newOrigin()
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v1")
	o.set("feed:1", "feed v2", "posts:1")
	if _, err := client.PublishKeys(context.Background(), "posts:1"); err != nil {
		t.Fatal(err)
	}
	// Served at once; the check after it finds the copy stale and drops it.
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v1")
	waitUntil(t, 5*time.Second, "the check after serving", func() bool { return !cache.Contains("feed:1") })
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v2")
}

// proxy is a loopback TCP proxy in front of a server, to cut connections:
// while blocked it accepts and closes at once.
type proxy struct {
	ln      net.Listener
	target  string
	mu      sync.Mutex
	blocked bool
	conns   []net.Conn
}

func newProxy(t *testing.T, target string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target}
	t.Cleanup(func() { ln.Close(); p.cut() })
	go func() {
		for {
			down, err := ln.Accept()
			if err != nil {
				return
			}
			p.mu.Lock()
			blocked := p.blocked
			p.mu.Unlock()
			if blocked {
				down.Close()
				continue
			}
			up, err := net.DialTimeout("tcp", target, 2*time.Second)
			if err != nil {
				down.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, down, up)
			p.mu.Unlock()
			go func() { _, _ = io.Copy(up, down); up.Close(); down.Close() }()
			go func() { _, _ = io.Copy(down, up); up.Close(); down.Close() }()
		}
	}()
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

func (p *proxy) setBlocked(b bool) {
	p.mu.Lock()
	p.blocked = b
	p.mu.Unlock()
}

// cut closes every proxied connection.
func (p *proxy) cut() {
	p.mu.Lock()
	conns := p.conns
	p.conns = nil
	p.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

func TestNearCacheTheWatchResumesAfterADisconnectWithoutLosingANotice(t *testing.T) {
	srv := startServer(t, nil)
	client := connect(t, srv.Addr)
	p := newProxy(t, srv.Addr)
	cache := newCache(t, connect(t, p.addr()), freshd.NearCacheConfig{})
	o := newOrigin()
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v1")
	p.setBlocked(true)
	p.cut()
	waitUntil(t, 5*time.Second, "the disconnect", func() bool { return !cache.Watching() })
	if _, err := client.PublishKeys(context.Background(), "posts:1"); err != nil { // while the stream is down
		t.Fatal(err)
	}
	if !cache.Contains("feed:1") {
		t.Fatal("the copy went before the stream came back")
	}
	p.setBlocked(false)
	waitUntil(t, 10*time.Second, "the resumed stream's notice", func() bool { return !cache.Contains("feed:1") })
	if s := cache.Stats(); s.WatchConnects != 2 || s.NoticesApplied < 1 || s.Repairs != 0 {
		t.Fatalf("stats: %+v", s)
	}
}

func TestNearCacheAResumeOlderThanTheHistoryIsRepaired(t *testing.T) {
	srv := startServer(t, map[string]string{"history_notices": "1"})
	client := connect(t, srv.Addr)
	p := newProxy(t, srv.Addr)
	cache := newCache(t, connect(t, p.addr()), freshd.NearCacheConfig{})
	o := newOrigin()
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v1")
	p.setBlocked(true)
	p.cut()
	waitUntil(t, 5*time.Second, "the disconnect", func() bool { return !cache.Watching() })
	for _, key := range []string{"posts:1", "x:1", "x:2"} { // the history now starts after posts:1
		if _, err := client.PublishKeys(context.Background(), key); err != nil {
			t.Fatal(err)
		}
	}
	p.setBlocked(false)
	waitUntil(t, 10*time.Second, "the repair notice", func() bool { return !cache.Contains("feed:1") })
	if s := cache.Stats(); s.Repairs != 1 {
		t.Fatalf("stats: %+v", s)
	}
}

func TestNearCacheAServerRestartDropsEverythingAndTheCacheKeepsWorking(t *testing.T) {
	srv := startServer(t, nil)
	cache := newCache(t, connect(t, srv.Addr), freshd.NearCacheConfig{})
	o := newOrigin()
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v1")
	firstEpoch := cache.WatchEpoch()
	if firstEpoch != srv.Epoch {
		t.Fatalf("watch epoch %d, server epoch %d", firstEpoch, srv.Epoch)
	}

	srv.kill()
	waitUntil(t, 5*time.Second, "the stream to notice the crash", func() bool { return !cache.Watching() })
	// freshd is down: the origin answers, uncached.
	o.set("feed:1", "feed v2", "posts:1")
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v2")
	if cache.Stats().Bypasses < 1 {
		t.Fatalf("stats: %+v", cache.Stats())
	}

	srv.restart() // same port, new epoch, nothing remembered
	if srv.Epoch == firstEpoch {
		t.Fatalf("the restarted server kept epoch %d", firstEpoch)
	}
	waitUntil(t, 10*time.Second, "the new epoch", func() bool { return cache.WatchEpoch() == srv.Epoch })
	if cache.Len() != 0 || cache.Stats().Resets < 1 {
		t.Fatalf("len %d, stats %+v", cache.Len(), cache.Stats())
	}
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v2")
	if _, epoch, _ := cache.VersionOf("feed:1"); epoch != srv.Epoch {
		t.Fatalf("cached at epoch %d, server epoch %d", epoch, srv.Epoch)
	}
	// And the new stream tracks it: a publish drops it again.
	if _, err := connect(t, srv.Addr).PublishKeys(context.Background(), "posts:1"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "a notice from the new server", func() bool { return !cache.Contains("feed:1") })
}

func TestNearCacheAMissStopsWaitingForALeaseThatIsNeverReleased(t *testing.T) {
	srv := startServer(t, nil)
	client := connect(t, srv.Addr)
	// A filler that went away (the default lease lasts seconds).
	if lease, err := client.Lease(context.Background(), &freshd.LeaseRequest{Key: "feed:1"}); err != nil || !lease.GetGranted() {
		t.Fatalf("lease: %v %v", lease, err)
	}
	cache := newCache(t, client, freshd.NearCacheConfig{NoWatch: true, LeaseRetries: 2, MaxLeaseWait: 50 * time.Millisecond})
	o := newOrigin()
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v1")
	if cache.Stats().LeaseWaits != 3 {
		t.Fatalf("stats: %+v", cache.Stats())
	}
	// Filled with a seq observed before the read: cached and checkable.
	mustGet(t, cache, "feed:1", o.loader("feed:1", nil), "feed v1")
	if o.readsOf("feed:1") != 1 || cache.Stats().Hits != 1 {
		t.Fatalf("reads %d, stats %+v", o.readsOf("feed:1"), cache.Stats())
	}
}

func TestNearCacheLoaderErrorsAreReturnedAndNothingIsCached(t *testing.T) {
	srv := startServer(t, nil)
	cache := newCache(t, connect(t, srv.Addr), freshd.NearCacheConfig{})
	boom := errors.New("origin down")
	_, err := cache.Get(context.Background(), "feed:1", func(context.Context) (string, []string, error) { return "", nil, boom })
	if !errors.Is(err, boom) {
		t.Fatalf("got %v", err)
	}
	if cache.Len() != 0 {
		t.Fatal("a failed load was cached")
	}
	if err := cache.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := cache.Get(context.Background(), "feed:1", nil); !errors.Is(err, freshd.ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
}
