package freshd_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	freshd "github.com/freshd/freshd/clients/go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

func TestErrorsCarryTheCodeAndMatchTheirSentinels(t *testing.T) {
	srv := startServer(t, nil)
	client := connect(t, srv.Addr)
	ctx := context.Background()

	_, err := client.Inspect(ctx, "nothing")
	var fe *freshd.Error
	if !errors.As(err, &fe) || fe.Code != codes.NotFound || fe.Method != "Inspect" {
		t.Fatalf("inspect: %#v", err)
	}
	if !errors.Is(err, freshd.ErrNotFound) || errors.Is(err, freshd.ErrInvalidArgument) {
		t.Fatalf("inspect: sentinels do not match: %v", err)
	}
	if status.Code(err) != codes.NotFound || freshd.Code(err) != codes.NotFound {
		t.Fatalf("status code: %v", status.Code(err))
	}
	if !strings.HasPrefix(err.Error(), "Inspect: NOT_FOUND") {
		t.Fatalf("message: %q", err.Error())
	}

	_, err = client.Fill(ctx, &freshd.FillRequest{Key: "k", LeaseToken: 12345})
	if !errors.Is(err, freshd.ErrLeaseLost) || !errors.Is(err, freshd.ErrFailedPrecondition) {
		t.Fatalf("fill with a lease not held: %v", err)
	}
	if errors.Is(nil, freshd.ErrLeaseLost) || freshd.Code(nil) != codes.OK {
		t.Fatal("nil matched a sentinel")
	}

	filled, err := client.Fill(ctx, &freshd.FillRequest{Key: "feed:1", Dependencies: []string{"posts:1"}, TtlMs: 60000})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.PublishKeys(ctx, "posts:1"); err != nil {
		t.Fatal(err)
	}
	_, err = client.Fill(ctx, &freshd.FillRequest{Key: "feed:1", Dependencies: []string{"posts:1"}, ObservedSeq: filled.GetSeq()})
	if !errors.Is(err, freshd.ErrFillRaced) || errors.Is(err, freshd.ErrLeaseLost) {
		t.Fatalf("raced fill: %v", err)
	}

	_, err = client.Publish(ctx, &freshd.PublishRequest{})
	if !errors.Is(err, freshd.ErrInvalidArgument) || !strings.Contains(err.Error(), "changes must not be empty") {
		t.Fatalf("empty publish: %v", err)
	}
}

func TestADeadlineIsThePerCallTimeout(t *testing.T) {
	srv := startServer(t, nil)
	client := connect(t, srv.Addr)
	ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	_, err := client.Stats(ctx)
	if !errors.Is(err, freshd.ErrDeadlineExceeded) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("expired deadline: %v", err)
	}
}

func TestAnUnreachableServerIsUnavailable(t *testing.T) {
	srv := startServer(t, nil)
	addr := srv.Addr
	srv.kill()
	client := connect(t, addr, freshd.WithTimeout(3*time.Second))
	_, err := client.Stats(context.Background())
	if !errors.Is(err, freshd.ErrUnavailable) {
		t.Fatalf("stats of a stopped server: %v", err)
	}
}

func TestEveryRPC(t *testing.T) {
	srv := startServer(t, nil)
	client := connect(t, srv.Addr, freshd.WithClientID("svc"))
	ctx := context.Background()

	filled, err := client.Fill(ctx, &freshd.FillRequest{Key: "feed:1", Dependencies: []string{"posts:1"}, TtlMs: 60000})
	if err != nil {
		t.Fatal(err)
	}
	published, err := client.Publish(ctx, &freshd.PublishRequest{Changes: []*freshd.Change{{Key: "posts:1", ExternalVersion: proto.Uint64(7)}}})
	if err != nil || published.GetResults()[0].GetInvalidated() != 2 {
		t.Fatalf("publish: %v %v", published, err)
	}
	check, err := client.Check(ctx, &freshd.CheckRequest{Key: "feed:1", Version: filled.GetVersion(), Epoch: filled.GetEpoch(), MinSeq: published.GetSeq()})
	if err != nil || check.GetFreshness() != freshd.FreshnessStale || check.GetDecision() != freshd.DecisionRefetch {
		t.Fatalf("check: %v %v", check, err)
	}
	batch, err := client.CheckBatch(ctx, &freshd.CheckBatchRequest{Items: []*freshd.CheckItem{
		{Key: "feed:1", Version: published.GetSeq()}, {Key: "feed:2", Version: 1},
	}})
	if err != nil || batch.GetResults()[0].GetFreshness() != freshd.FreshnessFresh || batch.GetResults()[1].GetDecision() != freshd.DecisionUnknown {
		t.Fatalf("check batch: %v %v", batch, err)
	}
	info, err := client.Inspect(ctx, "posts:1")
	if err != nil || info.GetExternalVersion() != 7 || info.GetDependents() != 1 {
		t.Fatalf("inspect: %v %v", info, err)
	}
	lease, err := client.Lease(ctx, &freshd.LeaseRequest{Key: "feed:2"})
	if err != nil || !lease.GetGranted() {
		t.Fatalf("lease: %v %v", lease, err)
	}
	if _, err := client.Fill(ctx, &freshd.FillRequest{Key: "feed:2", LeaseToken: lease.GetToken()}); err != nil {
		t.Fatalf("fill with the lease: %v", err)
	}
	purge, err := client.Purge(ctx, &freshd.PurgeRequest{Prefix: "feed:", DryRun: true})
	if err != nil || purge.GetMatched() != 2 || purge.GetApplied() {
		t.Fatalf("purge: %v %v", purge, err)
	}
	stats, err := client.Stats(ctx)
	if err != nil || stats.GetEpoch() != srv.Epoch || stats.GetLeasesGranted() != 1 {
		t.Fatalf("stats: %v %v", stats, err)
	}

	set, err := client.SetPolicy(ctx, "feed", &freshd.FreshnessPolicy{MaxAgeMs: 5000})
	if err != nil || set.GetIsDefault() || set.GetPolicy().GetMaxAgeMs() != 5000 {
		t.Fatalf("set policy: %v %v", set, err)
	}
	got, err := client.GetPolicy(ctx, "feed")
	if err != nil || got.GetPolicy().GetMaxAgeMs() != 5000 {
		t.Fatalf("get policy: %v %v", got, err)
	}
	list, err := client.ListPolicies(ctx)
	if err != nil || len(list) != 2 || !list[0].GetIsDefault() || list[1].GetNamespace() != "feed" {
		t.Fatalf("list policies: %v %v", list, err)
	}
	if err := client.DeletePolicy(ctx, "feed"); err != nil {
		t.Fatalf("delete policy: %v", err)
	}
	if err := client.DeletePolicy(ctx, "feed"); !errors.Is(err, freshd.ErrNotFound) {
		t.Fatalf("delete a policy twice: %v", err)
	}
	if err := client.DeletePolicy(ctx, ""); !errors.Is(err, freshd.ErrInvalidArgument) {
		t.Fatalf("delete the default: %v", err)
	}
}

func TestAWatchStreamTracksSubscribesAcksAndResumes(t *testing.T) {
	srv := startServer(t, nil)
	client := connect(t, srv.Addr)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	stream, err := client.Watch(ctx, &freshd.WatchStart{ClientId: "reader", Track: []string{"feed:1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Cancel()
	if stream.Started().GetOutcome() != freshd.ResumeNew || stream.Started().GetEpoch() != srv.Epoch {
		t.Fatalf("started: %v", stream.Started())
	}
	if n, err := stream.Subscribe("users:"); err != nil || n != 2 {
		t.Fatalf("subscribe: %d %v", n, err)
	}
	if _, err := stream.Track("feed:2"); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Untrack("feed:2"); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Sync(ctx); err != nil { // the filters are in force
		t.Fatal(err)
	}
	p1, err := client.PublishKeys(ctx, "feed:1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.PublishKeys(ctx, "feed:2"); err != nil {
		t.Fatal(err)
	}
	p3, err := client.PublishKeys(ctx, "users:9")
	if err != nil {
		t.Fatal(err)
	}
	// A publish from the reader itself, with no_loop unset, is seen too.
	synced, err := stream.Sync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, n := range synced.Notices {
		keys = append(keys, n.GetKey())
	}
	if !slices.Equal(keys, []string{"feed:1", "users:9"}) || synced.Notices[0].GetSeq() != p1.GetSeq() {
		t.Fatalf("notices: %v", synced.Notices)
	}
	if synced.Progress.GetSeq() < p3.GetSeq() || stream.Token().GetSeq() != synced.Progress.GetSeq() {
		t.Fatalf("progress %v, token %v", synced.Progress, stream.Token())
	}
	if _, err := stream.Ack(synced.Progress.GetSeq()); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Unsubscribe("users:"); err != nil {
		t.Fatal(err)
	}
	token := stream.Token()
	if err := stream.Close(); err != nil {
		t.Fatal(err)
	}
	if err := stream.Wait(ctx); !errors.Is(err, freshd.ErrStreamEnded) {
		t.Fatalf("after close: %v", err)
	}
	if _, err := stream.Track("x"); !errors.Is(err, freshd.ErrStreamEnded) {
		t.Fatalf("send after close: %v", err)
	}

	missed, err := client.PublishKeys(ctx, "feed:1")
	if err != nil {
		t.Fatal(err)
	}
	resumed, err := client.Watch(ctx, &freshd.WatchStart{ClientId: "reader", Track: []string{"feed:1"}, Resume: token})
	if err != nil {
		t.Fatal(err)
	}
	defer resumed.Cancel()
	if resumed.Started().GetOutcome() != freshd.ResumeFromHistory {
		t.Fatalf("resumed: %v", resumed.Started())
	}
	synced, err = resumed.Sync(ctx)
	if err != nil || len(synced.Notices) != 1 || synced.Notices[0].GetSeq() != missed.GetSeq() {
		t.Fatalf("resumed notices: %v %v", synced, err)
	}
}

func TestNoLoopHidesTheClientsOwnPublishes(t *testing.T) {
	srv := startServer(t, nil)
	client := connect(t, srv.Addr, freshd.WithClientID("svc"))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream, err := client.Watch(ctx, &freshd.WatchStart{NoLoop: true, Subscribe: []string{""}})
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Cancel()
	if _, err := client.PublishKeys(ctx, "a"); err != nil { // as "svc"
		t.Fatal(err)
	}
	other, err := client.Publish(ctx, &freshd.PublishRequest{Changes: freshd.Keys("b"), ClientId: "other"})
	if err != nil {
		t.Fatal(err)
	}
	synced, err := stream.Sync(ctx)
	if err != nil || len(synced.Notices) != 1 || synced.Notices[0].GetSeq() != other.GetSeq() {
		t.Fatalf("notices: %v %v", synced, err)
	}
}

func TestRefusalsInBandAndOutOfBand(t *testing.T) {
	srv := startServer(t, map[string]string{"max_tracked_keys": "2"})
	client := connect(t, srv.Addr)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	inband, err := client.Watch(ctx, &freshd.WatchStart{Track: []string{"a"}, RefusalsInBand: true})
	if err != nil {
		t.Fatal(err)
	}
	defer inband.Cancel()
	n, err := inband.Track("b", "c")
	if err != nil {
		t.Fatal(err)
	}
	synced, err := inband.Sync(ctx)
	if err != nil || len(synced.Refused) != 1 || synced.Refused[0].GetRequest() != n ||
		freshd.RefusedCode(synced.Refused[0]) != codes.ResourceExhausted {
		t.Fatalf("refused: %v %v", synced, err)
	}
	// A refused start fails Watch itself.
	if _, err := client.Watch(ctx, &freshd.WatchStart{Track: []string{""}}); !errors.Is(err, freshd.ErrInvalidArgument) {
		t.Fatalf("bad start: %v", err)
	}
	strict, err := client.Watch(ctx, &freshd.WatchStart{Track: []string{"a"}})
	if err != nil {
		t.Fatal(err)
	}
	defer strict.Cancel()
	if _, err := strict.Track("b", "c"); err != nil {
		t.Fatal(err)
	}
	if _, err := strict.Sync(ctx); !errors.Is(err, freshd.ErrResourceExhausted) {
		t.Fatalf("strict stream: %v", err)
	}
}

func TestUnusableSettingsAreRefusedBeforeConnecting(t *testing.T) {
	for _, bad := range []string{"", "two words", "caf\u00e9"} {
		if _, err := freshd.New("127.0.0.1:1", freshd.WithToken(bad)); err == nil || !strings.Contains(err.Error(), "token") {
			t.Errorf("token %q: %v", bad, err)
		}
	}
	if _, err := freshd.New("http://127.0.0.1:1", freshd.WithTLS()); err == nil || !strings.Contains(err.Error(), "https://") {
		t.Errorf("http:// with TLS: %v", err)
	}
	if _, err := freshd.New("127.0.0.1:1", freshd.WithCAFile("/nonexistent/ca.pem")); err == nil {
		t.Error("a missing CA file was accepted")
	}
	if _, err := freshd.New("127.0.0.1:1", freshd.WithClientCertFiles("cert.pem", "")); err == nil || !strings.Contains(err.Error(), "both") {
		t.Errorf("a certificate without its key: %v", err)
	}
	if _, err := freshd.New(""); err == nil {
		t.Error("an empty address was accepted")
	}
	c, err := freshd.New("https://freshd.example:50051/")
	if err != nil || !c.TLS() || c.Target() != "freshd.example:50051" {
		t.Fatalf("https:// address: %v %v", c, err)
	}
	c.Close()
}
