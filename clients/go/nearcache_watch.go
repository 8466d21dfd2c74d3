package freshd

import (
	"context"
	"math/rand/v2"
	"sort"
	"sync"
	"time"

	pb "github.com/freshd/freshd/clients/go/freshdv1"
	"google.golang.org/protobuf/proto"
)

// watcher is the state of a NearCache's Watch stream, under the cache's mu.
type watcher struct {
	connected         bool
	epoch             uint64
	token             *ResumeToken
	acked             uint64
	epochResetPending bool
	generation        uint64
	progressAsked     uint64
	progressSeen      uint64
	out               *outbox
	changed           chan struct{} // closed and replaced on every change
}

func (w *watcher) broadcast() {
	close(w.changed)
	w.changed = make(chan struct{})
}

func (w *watcher) queue(req *pb.WatchRequest) {
	if w.out != nil {
		w.out.put(req)
	}
}

// outbox holds the requests of one stream until its sender sends them, so
// that queueing never blocks the cache.
type outbox struct {
	mu     sync.Mutex
	items  []*pb.WatchRequest
	signal chan struct{}
}

func newOutbox() *outbox { return &outbox{signal: make(chan struct{}, 1)} }

func (o *outbox) put(req *pb.WatchRequest) {
	o.mu.Lock()
	o.items = append(o.items, req)
	o.mu.Unlock()
	select {
	case o.signal <- struct{}{}:
	default:
	}
}

func (o *outbox) take() []*pb.WatchRequest {
	o.mu.Lock()
	defer o.mu.Unlock()
	items := o.items
	o.items = nil
	return items
}

// runWatch keeps the Watch stream connected, resuming with its token after
// a disconnect and backing off with jitter.
func (c *NearCache[V]) runWatch() {
	defer c.wg.Done()
	failures := 0
	for c.ctx.Err() == nil {
		if c.connectAndRead() {
			failures = 0
		}
		if c.ctx.Err() != nil {
			return
		}
		failures++
		delay := c.cfg.ReconnectMin << min(failures-1, 16)
		if delay > c.cfg.ReconnectMax || delay <= 0 {
			delay = c.cfg.ReconnectMax
		}
		delay = time.Duration(float64(delay) * (0.5 + 0.5*rand.Float64()))
		select {
		case <-time.After(delay):
		case <-c.ctx.Done():
			return
		}
	}
}

// connectAndRead runs one stream until it ends; true when it got as far as
// started.
func (c *NearCache[V]) connectAndRead() bool {
	w := c.watcher
	c.mu.Lock()
	start := &WatchStart{ClientId: c.clientID}
	for key := range c.tracked {
		start.Track = append(start.Track, key)
	}
	sort.Strings(start.Track)
	if w.token != nil {
		start.Resume = proto.Clone(w.token).(*ResumeToken)
	}
	out := newOutbox()
	w.out = out
	w.progressAsked, w.progressSeen, w.acked = 0, 0, 0
	c.mu.Unlock()

	ctx, cancel := context.WithCancel(c.ctx)
	senderDone := make(chan struct{})
	defer func() {
		cancel()
		<-senderDone
		c.mu.Lock()
		w.connected = false
		w.out = nil
		w.generation++
		w.broadcast()
		c.mu.Unlock()
	}()

	stream, err := c.client.Watch(ctx, start)
	if err != nil {
		close(senderDone)
		if c.ctx.Err() == nil {
			c.log.Info("Watch stream failed to start; retrying", "err", err)
		}
		return false
	}
	go func() {
		defer close(senderDone)
		for {
			select {
			case <-out.signal:
			case <-ctx.Done():
				return
			}
			for _, req := range out.take() {
				if _, err := stream.send(req); err != nil {
					return
				}
			}
		}
	}()
	c.onStarted(stream.Started())
	for {
		ev, err := stream.Recv(ctx)
		if err != nil {
			if c.ctx.Err() == nil {
				c.log.Info("Watch stream ended; resuming", "err", err)
			}
			return true
		}
		switch r := ev.Response.(type) {
		case *pb.WatchResponse_Notices:
			c.onNotices(r.Notices)
		case *pb.WatchResponse_Progress:
			c.onProgress(r.Progress)
		case *pb.WatchResponse_Reset_:
			c.onReset(r.Reset_)
		}
	}
}

func (c *NearCache[V]) onStarted(started *WatchStarted) {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := c.watcher
	if w.epoch != 0 && started.GetEpoch() != w.epoch {
		// The server lost its history: versions from the old one mean
		// nothing. (Its NEW_EPOCH reset follows; it finds nothing left to
		// drop and is not counted again.)
		c.applyReset("")
		w.token = nil
		w.epochResetPending = true
	}
	w.epoch = started.GetEpoch()
	if w.token == nil || w.token.GetEpoch() != started.GetEpoch() {
		w.token = &ResumeToken{Epoch: started.GetEpoch(), Seq: started.GetSeq()}
	}
	w.connected = true
	c.stats.WatchConnects++
	w.broadcast()
}

func (c *NearCache[V]) ack(seq uint64) {
	w := c.watcher
	if seq > w.acked {
		w.acked = seq
		w.queue(&pb.WatchRequest{Request: &pb.WatchRequest_Ack{Ack: &pb.Ack{Seq: seq}}})
	}
}

func (c *NearCache[V]) onNotices(batch *NoticeBatch) {
	notices := batch.GetNotices()
	if len(notices) == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	w := c.watcher
	w.epochResetPending = false
	for _, n := range notices {
		c.applyNotice(n, w.epoch)
	}
	last := notices[len(notices)-1].GetSeq()
	w.token = &ResumeToken{Epoch: w.epoch, Seq: last}
	c.ack(last)
}

func (c *NearCache[V]) onProgress(p *Progress) {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := c.watcher
	w.epochResetPending = false
	w.token = &ResumeToken{Epoch: p.GetEpoch(), Seq: p.GetSeq()}
	c.ack(p.GetSeq())
	w.progressSeen++
	w.broadcast()
}

func (c *NearCache[V]) onReset(r *Reset) {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := c.watcher
	if w.epochResetPending && r.GetPrefix() == "" && r.GetReason() == ResetNewEpoch {
		w.epochResetPending = false
		return
	}
	c.applyReset(r.GetPrefix())
}

// tickProgress asks for progress now and then, which moves the token.
func (c *NearCache[V]) tickProgress() {
	defer c.wg.Done()
	ticker := time.NewTicker(c.cfg.ProgressInterval)
	defer ticker.Stop()
	for {
		select {
		case <-ticker.C:
		case <-c.ctx.Done():
			return
		}
		c.mu.Lock()
		if w := c.watcher; w.connected && w.out != nil {
			w.progressAsked++
			w.queue(&pb.WatchRequest{Request: &pb.WatchRequest_Progress{Progress: &pb.ProgressRequest{}}})
		}
		c.mu.Unlock()
	}
}

// syncWatch asks for progress and waits for it: every filter change queued
// before is then in force. False when not connected or on timeout.
func (c *NearCache[V]) syncWatch(timeout time.Duration) bool {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	c.mu.Lock()
	w := c.watcher
	if !w.connected || w.out == nil {
		c.mu.Unlock()
		return false
	}
	generation := w.generation
	w.progressAsked++
	wanted := w.progressAsked
	w.queue(&pb.WatchRequest{Request: &pb.WatchRequest_Progress{Progress: &pb.ProgressRequest{}}})
	for w.generation == generation && w.progressSeen < wanted {
		changed := w.changed
		c.mu.Unlock()
		select {
		case <-changed:
		case <-timer.C:
			return false
		case <-c.ctx.Done():
			return false
		}
		c.mu.Lock()
	}
	ok := w.generation == generation
	c.mu.Unlock()
	return ok
}

// WaitWatching waits until the Watch stream is connected, or ctx is done.
func (c *NearCache[V]) WaitWatching(ctx context.Context) bool {
	if c.watcher == nil {
		return false
	}
	for {
		c.mu.Lock()
		connected, changed := c.watcher.connected, c.watcher.changed
		c.mu.Unlock()
		if connected {
			return true
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return false
		}
	}
}
