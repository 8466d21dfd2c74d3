package freshd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	pb "github.com/freshd/freshd/clients/go/freshdv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
)

// ErrStreamEnded is returned by [WatchStream] methods once the stream ended
// without an error (the client closed its side and the server finished).
var ErrStreamEnded = errors.New("freshd: the Watch stream ended")

// DefaultMaxBuffered is how many events a [WatchStream] holds, read from the
// server and not yet taken with [WatchStream.Recv], before it stops reading.
const DefaultMaxBuffered = 1024

// WatchStream is one Watch stream: send filter changes, acknowledgements and
// progress requests; receive notice batches, progress, resets and refusals.
//
// A reader goroutine moves what the server sends into a buffer of
// [DefaultMaxBuffered] events. When the application does not keep up, the
// reader stops reading, flow control fills, and the server treats the stream
// as a slow consumer (it catches it up from its history, or resets what it
// cannot) rather than this process buffering without bound.
//
// Sends may be called from any goroutine; Recv and Sync from one at a time.
type WatchStream struct {
	stream  grpc.BidiStreamingClient[pb.WatchRequest, pb.WatchResponse]
	cancel  context.CancelFunc
	started *WatchStarted

	sendMu sync.Mutex
	sent   uint64
	closed bool

	events chan *WatchEvent
	done   chan struct{}
	err    error // why the reader stopped; set before done is closed

	tokenMu sync.Mutex
	token   *ResumeToken
}

// Watch opens the invalidation stream: start holds the client id, no-loop,
// a resume token, the keys to track and the prefixes to watch from the
// start, and whether refusals come in band. It returns once the server sent
// its started message (bounded by ctx's deadline, else the client's
// timeout), or the [*Error] the server refused the start with. The stream
// lives until ctx is done, [WatchStream.Cancel], or the server ends it.
func (c *Client) Watch(ctx context.Context, start *WatchStart) (*WatchStream, error) {
	if start == nil {
		start = &WatchStart{}
	}
	start = withID(c, start, start.GetClientId(), func(s *WatchStart) { s.ClientId = c.clientID })
	sctx, cancel := context.WithCancel(ctx)
	stream, err := c.stub.Watch(sctx)
	if err != nil {
		cancel()
		return nil, fromRPC(err, "Watch")
	}
	w := &WatchStream{
		stream: stream,
		cancel: cancel,
		sent:   1,
		events: make(chan *WatchEvent, DefaultMaxBuffered),
		done:   make(chan struct{}),
	}
	go w.read(sctx)
	if err := stream.Send(&pb.WatchRequest{Request: &pb.WatchRequest_Start{Start: start}}); err != nil && !errors.Is(err, io.EOF) {
		cancel()
		return nil, fromRPC(err, "Watch")
	}
	wait, stop := c.callContext(ctx)
	defer stop()
	first, err := w.Recv(wait)
	if err != nil {
		w.Cancel()
		if errors.Is(err, ErrStreamEnded) {
			return nil, &Error{Code: codes.Unknown, Message: "the stream ended before started", Method: "Watch"}
		}
		return nil, err
	}
	started := first.GetStarted()
	if started == nil {
		w.Cancel()
		return nil, &Error{Code: codes.Unknown, Message: fmt.Sprintf("expected started, got %v", first), Method: "Watch"}
	}
	w.started = started
	return w, nil
}

func (w *WatchStream) read(ctx context.Context) {
	defer close(w.done)
	defer close(w.events)
	for {
		resp, err := w.stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				w.err = ErrStreamEnded
			} else {
				w.err = fromRPC(err, "Watch")
			}
			return
		}
		select {
		case w.events <- resp:
		case <-ctx.Done():
			w.err = fromRPC(ctx.Err(), "Watch")
			return
		}
	}
}

// Started returns the stream's started message: its epoch, the seq it
// starts from and the resume outcome.
func (w *WatchStream) Started() *WatchStarted { return w.started }

// Token returns the stream's resume token: the epoch, and the seq up to which
// every matching notice was taken with Recv (the last notice or progress
// received; the start's seq before any). Pass it in [WatchStart] to resume.
func (w *WatchStream) Token() *ResumeToken {
	w.tokenMu.Lock()
	defer w.tokenMu.Unlock()
	if w.token == nil {
		return nil
	}
	return proto.Clone(w.token).(*ResumeToken)
}

func (w *WatchStream) advance(ev *WatchEvent) {
	w.tokenMu.Lock()
	defer w.tokenMu.Unlock()
	switch r := ev.Response.(type) {
	case *pb.WatchResponse_Started:
		w.token = &ResumeToken{Epoch: r.Started.GetEpoch(), Seq: r.Started.GetSeq()}
	case *pb.WatchResponse_Progress:
		w.token = &ResumeToken{Epoch: r.Progress.GetEpoch(), Seq: r.Progress.GetSeq()}
	case *pb.WatchResponse_Notices:
		if n := r.Notices.GetNotices(); len(n) > 0 && w.token != nil {
			w.token = &ResumeToken{Epoch: w.token.GetEpoch(), Seq: n[len(n)-1].GetSeq()}
		}
	}
}

// Recv returns the next event: exactly one of its GetStarted, GetNotices,
// GetProgress, GetReset and GetRefused is set. It returns ctx's error as an
// [*Error] when ctx is done first, the [*Error] the stream failed with, or
// [ErrStreamEnded] once the stream ended.
func (w *WatchStream) Recv(ctx context.Context) (*WatchEvent, error) {
	select {
	case ev, ok := <-w.events:
		if !ok {
			return nil, w.err
		}
		w.advance(ev)
		return ev, nil
	case <-ctx.Done():
		return nil, fromRPC(ctx.Err(), "Watch")
	}
}

func (w *WatchStream) send(req *pb.WatchRequest) (uint64, error) {
	w.sendMu.Lock()
	defer w.sendMu.Unlock()
	if w.closed {
		return 0, ErrStreamEnded
	}
	if err := w.stream.Send(req); err != nil {
		if errors.Is(err, io.EOF) {
			// The stream is over; Recv returns why.
			return 0, ErrStreamEnded
		}
		return 0, fromRPC(err, "Watch")
	}
	w.sent++
	return w.sent, nil
}

// The sends return the request's number on the stream (the start is 1), the
// number a [Refused] names.

// Track tracks exact keys (do it before reading them from the origin).
func (w *WatchStream) Track(keys ...string) (uint64, error) {
	return w.send(&pb.WatchRequest{Request: &pb.WatchRequest_Track{Track: &pb.KeyList{Keys: keys}}})
}

// Untrack stops tracking keys.
func (w *WatchStream) Untrack(keys ...string) (uint64, error) {
	return w.send(&pb.WatchRequest{Request: &pb.WatchRequest_Untrack{Untrack: &pb.KeyList{Keys: keys}}})
}

// Subscribe watches prefixes: every notice under them ("" is every key).
func (w *WatchStream) Subscribe(prefixes ...string) (uint64, error) {
	return w.send(&pb.WatchRequest{Request: &pb.WatchRequest_Subscribe{Subscribe: &pb.KeyList{Keys: prefixes}}})
}

// Unsubscribe stops watching prefixes.
func (w *WatchStream) Unsubscribe(prefixes ...string) (uint64, error) {
	return w.send(&pb.WatchRequest{Request: &pb.WatchRequest_Unsubscribe{Unsubscribe: &pb.KeyList{Keys: prefixes}}})
}

// Ack acknowledges every notice up to seq as applied.
func (w *WatchStream) Ack(seq uint64) (uint64, error) {
	return w.send(&pb.WatchRequest{Request: &pb.WatchRequest_Ack{Ack: &pb.Ack{Seq: seq}}})
}

// RequestProgress asks for a watermark: what is queued, then a [Progress].
func (w *WatchStream) RequestProgress() (uint64, error) {
	return w.send(&pb.WatchRequest{Request: &pb.WatchRequest_Progress{Progress: &pb.ProgressRequest{}}})
}

// SyncResult is what [WatchStream.Sync] collected up to the watermark.
type SyncResult struct {
	// Notices received, in arrival order.
	Notices []*Notice
	// Resets received.
	Resets []*Reset
	// Refused requests (start.refusals_in_band only).
	Refused []*Refused
	// Progress is the watermark.
	Progress *Progress
}

// Sync requests progress and collects every notice, reset and refusal up to
// the watermark. Not for use while another goroutine receives.
func (w *WatchStream) Sync(ctx context.Context) (*SyncResult, error) {
	if _, err := w.RequestProgress(); err != nil {
		if errors.Is(err, ErrStreamEnded) {
			// The stream may have failed: report why.
			if _, rerr := w.drainError(ctx); rerr != nil {
				return nil, rerr
			}
		}
		return nil, err
	}
	result := &SyncResult{}
	for {
		ev, err := w.Recv(ctx)
		if err != nil {
			return nil, err
		}
		switch r := ev.Response.(type) {
		case *pb.WatchResponse_Notices:
			result.Notices = append(result.Notices, r.Notices.GetNotices()...)
		case *pb.WatchResponse_Reset_:
			result.Resets = append(result.Resets, r.Reset_)
		case *pb.WatchResponse_Refused:
			result.Refused = append(result.Refused, r.Refused)
		case *pb.WatchResponse_Progress:
			result.Progress = r.Progress
			return result, nil
		}
	}
}

// drainError reads until the stream's end, returning its error.
func (w *WatchStream) drainError(ctx context.Context) (*WatchEvent, error) {
	for {
		ev, err := w.Recv(ctx)
		if err != nil {
			return ev, err
		}
	}
}

// Close closes the client side: the server then ends the stream. Events
// already sent may still be received.
func (w *WatchStream) Close() error {
	w.sendMu.Lock()
	defer w.sendMu.Unlock()
	if w.closed {
		return nil
	}
	w.closed = true
	return w.stream.CloseSend()
}

// Cancel ends the stream at once.
func (w *WatchStream) Cancel() {
	_ = w.Close()
	w.cancel()
}

// Done is closed once the stream is over (ended, failed or cancelled) and
// the reader stopped.
func (w *WatchStream) Done() <-chan struct{} { return w.done }

// Wait waits until the stream is over and returns why: [ErrStreamEnded] for
// an orderly end. Unread events are discarded.
func (w *WatchStream) Wait(ctx context.Context) error {
	for {
		select {
		case _, ok := <-w.events:
			if !ok {
				return w.err
			}
		case <-ctx.Done():
			return fromRPC(ctx.Err(), "Watch")
		}
	}
}

// RefusedCode returns a [Refused]'s status code.
func RefusedCode(r *Refused) codes.Code { return codes.Code(r.GetCode()) }
