package freshd_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"time"

	freshd "github.com/freshd/freshd/clients/go"
)

func Example() {
	ctx := context.Background()
	client, err := freshd.New("127.0.0.1:50051", freshd.WithClientID("feed-service"))
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	cache := freshd.NewNearCache[string](client, freshd.NearCacheConfig{Endpoint: "/feed"})
	defer cache.Close()
	feed, err := cache.Get(ctx, "feed:user:4821", func(ctx context.Context) (string, []string, error) {
		// Read the origin; report the keys the value depends on.
		return "the feed", []string{"posts:author:77", "follows:4821"}, nil
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(feed)

	// A write elsewhere: every cache holding a dependent copy drops it.
	if _, err := client.PublishKeys(ctx, "posts:author:77"); err != nil {
		log.Fatal(err)
	}
}

func ExampleNew_tls() {
	client, err := freshd.New("https://freshd.internal:50051",
		freshd.WithToken(os.Getenv("FRESHD_TOKEN")),
		freshd.WithCAFile("/etc/freshd/ca.pem"),
		freshd.WithTimeout(5*time.Second))
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	if _, err := client.Stats(context.Background()); errors.Is(err, freshd.ErrUnauthenticated) {
		log.Fatal("set FRESHD_TOKEN")
	}
}

func ExampleClient_Fill() {
	ctx := context.Background()
	client, err := freshd.New("127.0.0.1:50051")
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	lease, err := client.Lease(ctx, &freshd.LeaseRequest{Key: "feed:1"})
	if err != nil || !lease.GetGranted() {
		return // another caller is filling: serve what you have, or wait
	}
	// ... read the origin ...
	_, err = client.Fill(ctx, &freshd.FillRequest{
		Key:          "feed:1",
		Dependencies: []string{"posts:1"},
		TtlMs:        60000,
		LeaseToken:   lease.GetToken(),
	})
	if errors.Is(err, freshd.ErrFillRaced) {
		log.Print("changed during the read: read again and fill with a newer seq")
	}
}

func ExampleClient_Watch() {
	ctx := context.Background()
	client, err := freshd.New("127.0.0.1:50051")
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	stream, err := client.Watch(ctx, &freshd.WatchStart{ClientId: "svc", Subscribe: []string{"users:"}})
	if err != nil {
		log.Fatal(err)
	}
	defer stream.Cancel()
	for {
		ev, err := stream.Recv(ctx)
		if err != nil {
			// Resume later with stream.Token() in WatchStart.Resume.
			return
		}
		for _, n := range ev.GetNotices().GetNotices() {
			fmt.Println("changed:", n.GetKey(), n.GetVersion())
		}
		if r := ev.GetReset_(); r != nil {
			fmt.Println("revalidate everything under", r.GetPrefix())
		}
		if p := ev.GetProgress(); p != nil {
			_, _ = stream.Ack(p.GetSeq())
		}
	}
}
