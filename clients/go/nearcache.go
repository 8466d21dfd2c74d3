package freshd

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"time"

	pb "github.com/freshd/freshd/clients/go/freshdv1"
	"google.golang.org/grpc/codes"
)

// Loader reads a value from the origin and returns it with the keys it
// depends on (a change of any of them invalidates the copy).
type Loader[V any] func(ctx context.Context) (value V, dependencies []string, err error)

// ErrClosed is returned by a [NearCache] used after Close.
var ErrClosed = errors.New("freshd: the NearCache is closed")

// NearCacheConfig configures a [NearCache]; the zero value of every field
// means its default.
type NearCacheConfig struct {
	// Endpoint names what serves the copies (the API route, say) in the
	// server's hit-age metric.
	Endpoint string
	// ClientID names the cache on its Watch stream and in checks and fills.
	// Default: the client's id, else host-pid-random.
	ClientID string
	// MaxEntries bounds the LRU (default 10,000). Keep it at or below the
	// server's max_tracked_keys.
	MaxEntries int
	// TTL bounds a copy's local life and is the fill's TTL (default 5m).
	TTL time.Duration
	// NoWatch runs without a Watch stream: copies are only checked.
	NoWatch bool
	// NoBatchChecks sends every check on its own instead of gathering the
	// checks of concurrent gets into one CheckBatch.
	NoBatchChecks bool
	// ServeBeforeCheck serves a hit at once and checks it in the background
	// (served=true); the decision applies to the next get.
	ServeBeforeCheck bool
	// LeaseRetries is how often a miss asks again for a lease another caller
	// holds before it reads the origin without one (default 10).
	LeaseRetries int
	// MaxLeaseWait caps the wait between lease requests (default 500ms).
	MaxLeaseWait time.Duration
	// FillAttempts bounds the origin reads of one miss whose fills race with
	// changes (default 3); the last read is then returned uncached.
	FillAttempts int
	// ProgressInterval is how often the Watch stream asks for progress, which
	// moves its resume token (default 5s).
	ProgressInterval time.Duration
	// ReconnectMin and ReconnectMax bound the Watch stream's reconnect
	// backoff (defaults 50ms and 5s), doubled per failure, with jitter.
	ReconnectMin, ReconnectMax time.Duration
	// SampleRateRefresh is how long a namespace's check_sample_rate is
	// trusted before a single Check learns it again (default 10s).
	SampleRateRefresh time.Duration
	// RaiseErrors returns freshd's failures from Get. By default a get whose
	// freshd call fails for an outage (UNAVAILABLE, DEADLINE_EXCEEDED,
	// INTERNAL, UNKNOWN) reads the origin and returns the value uncached.
	RaiseErrors bool
	// Logger receives the cache's warnings (default: slog.Default()).
	Logger *slog.Logger
}

// NearCacheStats are the counters of a [NearCache] since it was created.
type NearCacheStats struct {
	// Hits are gets served from the local copy (checked or not).
	Hits uint64
	// Misses are gets that found no local copy.
	Misses uint64
	// StaleServes are copies served although known to be behind: a stale
	// copy with a REVALIDATE decision, or a copy served while another caller
	// held the key's lease.
	StaleServes uint64
	// Revalidations are background refreshes started by REVALIDATE.
	Revalidations uint64
	// Refetches are hits whose check said REFETCH or UNKNOWN.
	Refetches uint64
	// NoticesApplied are notices received on the Watch stream and applied.
	NoticesApplied uint64
	// Resets are resets applied (a prefix dropped) and new epochs seen.
	Resets uint64
	// Repairs are repair notices applied: changes the stream had missed (a
	// resume older than the server's history, or a queue overflow).
	Repairs uint64
	// Checks are version checks sent (single or in a batch).
	Checks uint64
	// UncheckedHits are hits served without a check (check_sample_rate < 1).
	UncheckedHits uint64
	// Loads are origin reads (loader calls).
	Loads uint64
	// FillRaces are fills refused because the key or a dependency changed
	// during the read, or because the lease ran out.
	FillRaces uint64
	// LeaseWaits are lease requests that found another filler.
	LeaseWaits uint64
	// Invalidations are copies dropped because a notice, a reset, a new epoch
	// or a check said so.
	Invalidations uint64
	// Evictions are copies dropped for room (LRU) or age (local TTL).
	Evictions uint64
	// WatchConnects are Watch stream (re)connections.
	WatchConnects uint64
	// Bypasses are gets answered from the origin, uncached, because freshd
	// failed.
	Bypasses uint64
}

type entry[V any] struct {
	key     string
	value   V
	version uint64
	epoch   uint64
	// loadedAt is when the origin read began: the copy's age starts there.
	loadedAt  time.Time
	expiresAt time.Time
}

// call is one load, shared with every get waiting on it.
type call[V any] struct {
	done  chan struct{}
	ok    bool // false: a background refresh gave up; read it yourself
	value V
	err   error
}

type sampleRate struct {
	rate    float64
	learned time.Time
}

// NearCache is an in-process cache whose copies freshd keeps right.
//
// [NearCache.Get] returns a key's value:
//
//   - A miss tracks the key on the Watch stream, takes the key's fill lease,
//     runs the loader (the origin read), fills with the lease token and the
//     dependencies the loader returned, and keeps the value, its version and
//     epoch, and the load time. When another caller holds the lease, it
//     serves its own copy if that is not behind the key's current version,
//     else waits the suggested time and asks again. Concurrent misses of one
//     key in this process read the origin once.
//   - A hit checks the copy's version (sampled at the check_sample_rate the
//     server returns for the namespace) and acts on the decision: FRESH
//     serves it; REVALIDATE serves it and refreshes it in the background;
//     REFETCH and UNKNOWN read the origin now. Checks of concurrent gets go
//     out together as one CheckBatch.
//   - One Watch stream tracks the cached keys: a notice drops the copy it
//     names, a reset drops every copy under its prefix, a new epoch drops
//     everything. It acknowledges what it applied, asks for progress now and
//     then, and resumes with its token after a disconnect, backing off with
//     jitter.
//
// Copies live in a bounded LRU, each for at most the configured TTL. A
// NearCache is safe for concurrent use; Close it when done.
type NearCache[V any] struct {
	client   *Client
	cfg      NearCacheConfig
	clientID string
	log      *slog.Logger

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu          sync.Mutex
	lru         *list.List // of *entry[V], most recent first
	entries     map[string]*list.Element
	inflight    map[string]*call[V]
	loading     map[string]uint64 // keys being loaded -> the highest version a notice named
	tracked     map[string]bool
	sampleRates map[string]sampleRate
	stats       NearCacheStats
	closed      bool

	checks  chan *pendingCheck
	watcher *watcher
}

// NewNearCache makes a NearCache over a client (which it does not close).
// Unless cfg.NoWatch, it opens its Watch stream in the background at once.
func NewNearCache[V any](client *Client, cfg NearCacheConfig) *NearCache[V] {
	if cfg.MaxEntries <= 0 {
		cfg.MaxEntries = 10000
	}
	if cfg.TTL <= 0 {
		cfg.TTL = 5 * time.Minute
	}
	if cfg.LeaseRetries <= 0 {
		cfg.LeaseRetries = 10
	}
	if cfg.MaxLeaseWait <= 0 {
		cfg.MaxLeaseWait = 500 * time.Millisecond
	}
	if cfg.FillAttempts <= 0 {
		cfg.FillAttempts = 3
	}
	if cfg.ProgressInterval <= 0 {
		cfg.ProgressInterval = 5 * time.Second
	}
	if cfg.ReconnectMin <= 0 {
		cfg.ReconnectMin = 50 * time.Millisecond
	}
	if cfg.ReconnectMax <= 0 {
		cfg.ReconnectMax = 5 * time.Second
	}
	if cfg.SampleRateRefresh <= 0 {
		cfg.SampleRateRefresh = 10 * time.Second
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	id := cfg.ClientID
	if id == "" {
		id = client.ClientID()
	}
	if id == "" {
		host, _ := os.Hostname()
		id = fmt.Sprintf("%s-%d-%08x", host, os.Getpid(), rand.Uint32())
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &NearCache[V]{
		client:      client,
		cfg:         cfg,
		clientID:    id,
		log:         logger.With("component", "freshd.nearcache"),
		ctx:         ctx,
		cancel:      cancel,
		lru:         list.New(),
		entries:     map[string]*list.Element{},
		inflight:    map[string]*call[V]{},
		loading:     map[string]uint64{},
		tracked:     map[string]bool{},
		sampleRates: map[string]sampleRate{},
	}
	if !cfg.NoBatchChecks {
		c.checks = make(chan *pendingCheck, maxBatch)
		c.wg.Add(1)
		go c.batchChecks()
	}
	if !cfg.NoWatch {
		c.watcher = &watcher{changed: make(chan struct{})}
		c.wg.Add(2)
		go c.runWatch()
		go c.tickProgress()
	}
	return c
}

// Close stops the Watch stream and the background work, and waits for them.
func (c *NearCache[V]) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
	return nil
}

// ClientID returns the id the cache uses on its Watch stream, checks and
// fills.
func (c *NearCache[V]) ClientID() string { return c.clientID }

// Stats returns a snapshot of the counters.
func (c *NearCache[V]) Stats() NearCacheStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stats
}

// Len returns the number of local copies.
func (c *NearCache[V]) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Len()
}

// Contains reports whether a live local copy of key is held.
func (c *NearCache[V]) Contains(key string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.entries[key]
	return ok && el.Value.(*entry[V]).expiresAt.After(time.Now())
}

// Peek returns the local copy of key, if any, without checking or counting.
func (c *NearCache[V]) Peek(key string) (V, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.entries[key]; ok {
		return el.Value.(*entry[V]).value, true
	}
	var zero V
	return zero, false
}

// VersionOf returns the version and epoch of the local copy of key, if any.
func (c *NearCache[V]) VersionOf(key string) (version, epoch uint64, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.entries[key]; ok {
		e := el.Value.(*entry[V])
		return e.version, e.epoch, true
	}
	return 0, 0, false
}

// Watching reports whether the Watch stream is connected.
func (c *NearCache[V]) Watching() bool {
	if c.watcher == nil {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.watcher.connected
}

// WatchEpoch returns the epoch the Watch stream last started in (0 before).
func (c *NearCache[V]) WatchEpoch() uint64 {
	if c.watcher == nil {
		return 0
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.watcher.epoch
}

// Invalidate drops the local copy of key.
func (c *NearCache[V]) Invalidate(key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.entries[key]; ok {
		c.remove(el)
		c.untrackIfUnused(key)
	}
}

// Clear drops every local copy.
func (c *NearCache[V]) Clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for key, el := range c.entries {
		c.remove(el)
		c.untrackIfUnused(key)
	}
}

// Get returns the value of key: the local copy when freshd says it may be
// served, else the loader's value (see the type's documentation). The
// loader's error is returned as is; freshd's errors are returned only with
// RaiseErrors or when they are not an outage (a refused request).
func (c *NearCache[V]) Get(ctx context.Context, key string, loader Loader[V]) (V, error) {
	var zero V
	now := time.Now()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return zero, ErrClosed
	}
	var e *entry[V]
	if el, ok := c.entries[key]; ok {
		e = el.Value.(*entry[V])
		if !e.expiresAt.After(now) {
			c.drop(key, true, true)
			e = nil
		} else {
			c.lru.MoveToFront(el)
		}
	}
	if e == nil {
		c.stats.Misses++
	}
	c.mu.Unlock()
	if e == nil {
		return c.load(ctx, key, loader, nil)
	}

	if !c.shouldCheck(key) {
		c.mu.Lock()
		c.stats.Hits++
		c.stats.UncheckedHits++
		c.mu.Unlock()
		return e.value, nil
	}
	if c.cfg.ServeBeforeCheck {
		c.mu.Lock()
		c.stats.Hits++
		c.mu.Unlock()
		c.background(func(ctx context.Context) { c.checkAfterServe(ctx, key, e, loader) })
		return e.value, nil
	}
	result, err := c.check(ctx, key, e, false)
	if err != nil {
		return c.bypass(ctx, key, loader, err)
	}
	return c.act(ctx, key, e, result, loader)
}

func (c *NearCache[V]) act(ctx context.Context, key string, e *entry[V], result *CheckResult, loader Loader[V]) (V, error) {
	switch result.GetDecision() {
	case DecisionFresh:
		c.mu.Lock()
		c.stats.Hits++
		c.mu.Unlock()
		return e.value, nil
	case DecisionRevalidate:
		c.mu.Lock()
		c.stats.Hits++
		if result.GetFreshness() == FreshnessStale {
			c.stats.StaleServes++
		}
		c.mu.Unlock()
		c.refreshInBackground(key, loader)
		return e.value, nil
	}
	// REFETCH, UNKNOWN (or a decision this client does not know). The key
	// stays tracked: it is read again at once.
	c.mu.Lock()
	c.stats.Refetches++
	if el, ok := c.entries[key]; ok && el.Value.(*entry[V]) == e {
		c.drop(key, false, false)
	}
	c.mu.Unlock()
	return c.load(ctx, key, loader, e)
}

func (c *NearCache[V]) checkAfterServe(ctx context.Context, key string, e *entry[V], loader Loader[V]) {
	result, err := c.check(ctx, key, e, true)
	if err != nil {
		c.log.Warn("check failed", "key", key, "err", err)
		return
	}
	switch result.GetDecision() {
	case DecisionFresh:
		return
	case DecisionRevalidate:
		if result.GetFreshness() == FreshnessStale {
			c.mu.Lock()
			c.stats.StaleServes++
			c.mu.Unlock()
		}
		c.refreshInBackground(key, loader)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stats.Refetches++
	if result.GetFreshness() == FreshnessStale {
		c.stats.StaleServes++
	}
	if el, ok := c.entries[key]; ok && el.Value.(*entry[V]) == e {
		c.drop(key, false, true)
	}
}

func namespaceOf(key string) string {
	ns, _, _ := strings.Cut(key, ":")
	return ns
}

func (c *NearCache[V]) shouldCheck(key string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	known, ok := c.sampleRates[namespaceOf(key)]
	if !ok || known.rate >= 1 {
		return true
	}
	return rand.Float64() < known.rate
}

func isOutage(err error) bool {
	switch Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Internal, codes.Unknown, codes.Canceled:
		return true
	}
	return false
}

func (c *NearCache[V]) bypass(ctx context.Context, key string, loader Loader[V], err error) (V, error) {
	var zero V
	if c.cfg.RaiseErrors || !isOutage(err) || ctx.Err() != nil {
		return zero, err
	}
	c.log.Warn("freshd failed; reading from the origin uncached", "key", key, "err", err)
	c.mu.Lock()
	c.stats.Bypasses++
	c.stats.Loads++
	c.mu.Unlock()
	value, _, lerr := loader(ctx)
	return value, lerr
}

// background runs fn on a goroutine that Close waits for.
func (c *NearCache[V]) background(fn func(ctx context.Context)) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		fn(c.ctx)
	}()
	return true
}

// ---------------------------------------------------------------- checks

func (c *NearCache[V]) check(ctx context.Context, key string, e *entry[V], served bool) (*CheckResult, error) {
	age := time.Since(e.loadedAt).Milliseconds()
	if age < 0 {
		age = 0
	}
	item := &CheckItem{Key: key, Version: e.version, AgeMs: uint64(age), Served: served}
	if c.checks != nil {
		return c.checkBatched(ctx, item, e.epoch)
	}
	c.mu.Lock()
	c.stats.Checks++
	c.mu.Unlock()
	return c.checkOne(ctx, item, e.epoch)
}

func (c *NearCache[V]) checkOne(ctx context.Context, item *CheckItem, epoch uint64) (*CheckResult, error) {
	r, err := c.client.Check(ctx, &CheckRequest{
		Key:      item.GetKey(),
		Version:  item.GetVersion(),
		AgeMs:    item.GetAgeMs(),
		Epoch:    epoch,
		Endpoint: c.cfg.Endpoint,
		Served:   item.GetServed(),
		ClientId: c.clientID,
	})
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.sampleRates[namespaceOf(item.GetKey())] = sampleRate{r.GetCheckSampleRate(), time.Now()}
	c.mu.Unlock()
	return &CheckResult{
		Freshness:       r.GetFreshness(),
		Version:         r.GetVersion(),
		Critical:        r.GetCritical(),
		Decision:        r.GetDecision(),
		CheckSampleRate: r.GetCheckSampleRate(),
	}, nil
}

func (c *NearCache[V]) sampleRateStale(key string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	known, ok := c.sampleRates[namespaceOf(key)]
	return !ok || time.Since(known.learned) > c.cfg.SampleRateRefresh
}

// maxBatch bounds one CheckBatch of the batcher.
const maxBatch = 1000

type checkAnswer struct {
	result *CheckResult
	err    error
}

type pendingCheck struct {
	ctx    context.Context
	item   *CheckItem
	epoch  uint64
	answer chan checkAnswer
}

func (c *NearCache[V]) checkBatched(ctx context.Context, item *CheckItem, epoch uint64) (*CheckResult, error) {
	p := &pendingCheck{ctx: ctx, item: item, epoch: epoch, answer: make(chan checkAnswer, 1)}
	select {
	case c.checks <- p:
	case <-ctx.Done():
		return nil, fromRPC(ctx.Err(), "Check")
	case <-c.ctx.Done():
		return nil, ErrClosed
	}
	c.mu.Lock()
	c.stats.Checks++ // counted once queued
	c.mu.Unlock()
	select {
	case a := <-p.answer:
		return a.result, a.err
	case <-ctx.Done():
		return nil, fromRPC(ctx.Err(), "Check")
	case <-c.ctx.Done():
		return nil, ErrClosed
	}
}

// batchChecks sends the checks of concurrent gets together: while one call
// is in flight the next ones queue, and go out as one CheckBatch. A
// namespace whose sample rate is unknown or old gets a single Check, which
// carries it.
func (c *NearCache[V]) batchChecks() {
	defer c.wg.Done()
	for {
		var taken []*pendingCheck
		select {
		case p := <-c.checks:
			taken = append(taken, p)
		case <-c.ctx.Done():
			return
		}
	more:
		for len(taken) < maxBatch {
			select {
			case p := <-c.checks:
				taken = append(taken, p)
			default:
				break more
			}
		}
		c.sendChecks(taken)
	}
}

func (c *NearCache[V]) sendChecks(taken []*pendingCheck) {
	var singles []*pendingCheck
	byEpoch := map[uint64][]*pendingCheck{}
	var epochs []uint64
	learning := map[string]bool{}
	for _, p := range taken {
		ns := namespaceOf(p.item.GetKey())
		if len(taken) == 1 || (!learning[ns] && c.sampleRateStale(p.item.GetKey())) {
			learning[ns] = true
			singles = append(singles, p)
			continue
		}
		if _, ok := byEpoch[p.epoch]; !ok {
			epochs = append(epochs, p.epoch)
		}
		byEpoch[p.epoch] = append(byEpoch[p.epoch], p)
	}
	for _, p := range singles {
		r, err := c.checkOne(p.ctx, p.item, p.epoch)
		p.answer <- checkAnswer{r, err}
	}
	for _, epoch := range epochs {
		items := byEpoch[epoch]
		req := &CheckBatchRequest{Epoch: epoch, Endpoint: c.cfg.Endpoint, ClientId: c.clientID}
		for _, p := range items {
			req.Items = append(req.Items, p.item)
		}
		resp, err := c.client.CheckBatch(c.ctx, req)
		if err == nil && len(resp.GetResults()) != len(items) {
			err = &Error{Code: codes.Internal, Message: "CheckBatch answered a different number of items", Method: "CheckBatch"}
		}
		for i, p := range items {
			if err != nil {
				p.answer <- checkAnswer{nil, err}
			} else {
				p.answer <- checkAnswer{resp.GetResults()[i], nil}
			}
		}
	}
}

// ----------------------------------------------------------------- loads

func (c *NearCache[V]) refreshInBackground(key string, loader Loader[V]) {
	c.mu.Lock()
	if _, busy := c.inflight[key]; busy || c.closed {
		c.mu.Unlock()
		return
	}
	cl := &call[V]{done: make(chan struct{})}
	c.inflight[key] = cl
	c.stats.Revalidations++
	c.mu.Unlock()
	if !c.background(func(ctx context.Context) { c.runLoad(ctx, key, loader, nil, true, cl) }) {
		c.mu.Lock()
		delete(c.inflight, key)
		c.mu.Unlock()
		close(cl.done)
	}
}

func (c *NearCache[V]) load(ctx context.Context, key string, loader Loader[V], previous *entry[V]) (V, error) {
	var zero V
	for {
		c.mu.Lock()
		cl, busy := c.inflight[key]
		if !busy {
			cl = &call[V]{done: make(chan struct{})}
			c.inflight[key] = cl
		}
		c.mu.Unlock()
		if !busy {
			c.runLoad(ctx, key, loader, previous, false, cl)
		}
		select {
		case <-cl.done:
		case <-ctx.Done():
			return zero, fromRPC(ctx.Err(), "Get")
		}
		if cl.err != nil {
			return zero, cl.err
		}
		if cl.ok {
			return cl.value, nil
		}
		// A background refresh gave up (another caller holds the lease):
		// read the origin ourselves.
	}
}

func (c *NearCache[V]) runLoad(ctx context.Context, key string, loader Loader[V], previous *entry[V], background bool, cl *call[V]) {
	ok, value, err := c.fetch(ctx, key, loader, previous, background)
	c.mu.Lock()
	delete(c.inflight, key)
	c.untrackIfUnused(key)
	c.mu.Unlock()
	if err != nil && background {
		c.log.Warn("background refresh failed", "key", key, "err", err)
		ok, err = false, nil
	}
	cl.ok, cl.value, cl.err = ok, value, err
	close(cl.done)
}

// fetch reads the origin under the key's lease and fills. ok false: a
// background refresh found another filler and gave up.
func (c *NearCache[V]) fetch(ctx context.Context, key string, loader Loader[V], previous *entry[V], background bool) (ok bool, value V, err error) {
	c.mu.Lock()
	c.track(key)
	c.mu.Unlock()
	if c.watcher != nil {
		// Make sure the track is in force before the origin read: a change
		// after it is then either refused at fill time or noticed.
		c.syncWatch(time.Second)
	}
	for attempt := 0; attempt < c.cfg.FillAttempts; attempt++ {
		g, err := c.acquire(ctx, key, previous, background)
		if err != nil {
			if background {
				return false, value, err
			}
			v, err := c.bypass(ctx, key, loader, err)
			return err == nil, v, err
		}
		if g.giveUp {
			return false, value, nil
		}
		if g.serve != nil {
			c.mu.Lock()
			c.stats.StaleServes++
			c.mu.Unlock()
			return true, g.serve.value, nil
		}
		value, err = c.loadAndFill(ctx, key, loader, g, background)
		if errors.Is(err, errRaced) {
			previous = nil
			continue
		}
		return err == nil, value, err
	}
	// Every attempt raced with a change: return the last read uncached.
	return true, value, nil
}

var errRaced = errors.New("fill raced")

type grant[V any] struct {
	token, observedSeq, epoch uint64
	serve                     *entry[V] // serve this copy meanwhile
	giveUp                    bool      // background, and another caller is filling
}

// acquire takes the key's lease, or says what to do instead.
func (c *NearCache[V]) acquire(ctx context.Context, key string, previous *entry[V], background bool) (grant[V], error) {
	for i := 0; i <= c.cfg.LeaseRetries; i++ {
		lease, err := c.client.Lease(ctx, &LeaseRequest{Key: key})
		if err != nil {
			return grant[V]{}, err
		}
		if lease.GetGranted() {
			return grant[V]{token: lease.GetToken(), epoch: lease.GetEpoch()}, nil
		}
		c.mu.Lock()
		c.stats.LeaseWaits++
		c.mu.Unlock()
		if background {
			return grant[V]{giveUp: true}, nil
		}
		if previous != nil && previous.epoch == lease.GetEpoch() && lease.GetVersion() != 0 && previous.version >= lease.GetVersion() {
			return grant[V]{serve: previous}, nil
		}
		wait := 50 * time.Millisecond
		if ms := lease.GetRetryAfterMs(); ms > 0 {
			wait = time.Duration(ms) * time.Millisecond
		}
		wait = min(wait, c.cfg.MaxLeaseWait)
		wait = time.Duration(float64(wait) * (0.8 + 0.4*rand.Float64()))
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return grant[V]{}, fromRPC(ctx.Err(), "Lease")
		}
	}
	// The other filler takes too long: read without the lease, with a seq
	// observed before the read. (No client id: this asks for a seq, it
	// checks no copy.)
	check, err := unary(c.client, ctx, "Check", &pb.CheckRequest{Key: key}, c.client.stub.Check)
	if err != nil {
		return grant[V]{}, err
	}
	return grant[V]{observedSeq: check.GetSeq(), epoch: check.GetEpoch()}, nil
}

// loadAndFill reads the origin and fills; errRaced when the fill was
// refused for a change during the read or a lost lease.
func (c *NearCache[V]) loadAndFill(ctx context.Context, key string, loader Loader[V], g grant[V], background bool) (V, error) {
	c.mu.Lock()
	c.loading[key] = 0
	c.stats.Loads++
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.loading, key)
		c.mu.Unlock()
	}()
	loadedAt := time.Now()
	value, deps, err := loader(ctx)
	if err != nil {
		return value, err
	}
	fill, err := c.client.Fill(ctx, &FillRequest{
		Key:          key,
		Dependencies: deps,
		TtlMs:        uint64(c.cfg.TTL.Milliseconds()),
		ObservedSeq:  g.observedSeq,
		Epoch:        g.epoch,
		LeaseToken:   g.token,
		ClientId:     c.clientID,
	})
	if errors.Is(err, ErrFillRaced) || errors.Is(err, ErrFailedPrecondition) {
		// Changed during the read, or the lease ran out: read again under a
		// new lease.
		c.mu.Lock()
		c.stats.FillRaces++
		c.mu.Unlock()
		return value, errRaced
	}
	if err != nil {
		if background || c.cfg.RaiseErrors || !isOutage(err) || ctx.Err() != nil {
			return value, err
		}
		c.log.Warn("fill failed; serving the value uncached", "key", key, "err", err)
		c.mu.Lock()
		c.stats.Bypasses++
		c.mu.Unlock()
		return value, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.loading[key] > fill.GetVersion() || c.closed {
		return value, nil
	}
	ttl := c.cfg.TTL
	if granted := time.Duration(fill.GetTtlMs()) * time.Millisecond; granted > 0 && granted < ttl {
		ttl = granted
	}
	c.store(&entry[V]{
		key:       key,
		value:     value,
		version:   fill.GetVersion(),
		epoch:     fill.GetEpoch(),
		loadedAt:  loadedAt,
		expiresAt: loadedAt.Add(ttl),
	})
	return value, nil
}

// ------------------------------------------------------ the local copies
// Everything below runs under c.mu.

func (c *NearCache[V]) store(e *entry[V]) {
	if el, ok := c.entries[e.key]; ok {
		el.Value = e
		c.lru.MoveToFront(el)
	} else {
		c.entries[e.key] = c.lru.PushFront(e)
	}
	c.track(e.key)
	for c.lru.Len() > c.cfg.MaxEntries {
		old := c.lru.Back()
		c.remove(old)
		c.stats.Evictions++
		c.untrackIfUnused(old.Value.(*entry[V]).key)
	}
}

func (c *NearCache[V]) remove(el *list.Element) {
	c.lru.Remove(el)
	delete(c.entries, el.Value.(*entry[V]).key)
}

func (c *NearCache[V]) drop(key string, evicted, untrack bool) {
	el, ok := c.entries[key]
	if !ok {
		return
	}
	c.remove(el)
	if evicted {
		c.stats.Evictions++
	} else {
		c.stats.Invalidations++
	}
	if untrack {
		c.untrackIfUnused(key)
	}
}

func (c *NearCache[V]) track(key string) {
	if !c.tracked[key] {
		c.tracked[key] = true
		if c.watcher != nil {
			c.watcher.queue(&pb.WatchRequest{Request: &pb.WatchRequest_Track{Track: &pb.KeyList{Keys: []string{key}}}})
		}
	}
}

func (c *NearCache[V]) untrackIfUnused(key string) {
	if !c.tracked[key] {
		return
	}
	if _, cached := c.entries[key]; cached {
		return
	}
	if _, busy := c.inflight[key]; busy {
		return
	}
	delete(c.tracked, key)
	if c.watcher != nil {
		c.watcher.queue(&pb.WatchRequest{Request: &pb.WatchRequest_Untrack{Untrack: &pb.KeyList{Keys: []string{key}}}})
	}
}

func (c *NearCache[V]) applyNotice(n *Notice, epoch uint64) {
	c.stats.NoticesApplied++
	if n.GetRepair() {
		c.stats.Repairs++
	}
	if v, ok := c.loading[n.GetKey()]; ok && n.GetVersion() > v {
		c.loading[n.GetKey()] = n.GetVersion()
	}
	if el, ok := c.entries[n.GetKey()]; ok {
		e := el.Value.(*entry[V])
		if e.epoch != epoch || n.GetVersion() > e.version {
			c.drop(n.GetKey(), false, true)
		}
	}
}

func (c *NearCache[V]) applyReset(prefix string) {
	c.stats.Resets++
	for key := range c.entries {
		if strings.HasPrefix(key, prefix) {
			c.drop(key, false, true)
		}
	}
	for key := range c.loading {
		if strings.HasPrefix(key, prefix) {
			c.loading[key] = ^uint64(0) // above every real version
		}
	}
}
