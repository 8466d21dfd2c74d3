package freshd_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"

	freshd "github.com/freshd/freshd/clients/go"
)

// quickStart is the README's quick start, word for word between the
// markers (with addr for the README's address).
func quickStart(ctx context.Context, addr string) error {
	// quick start begins
	posts := map[string]string{"posts:author:77": "hello"} // the origin
	loadFeed := func(ctx context.Context) (string, []string, error) {
		return posts["posts:author:77"], []string{"posts:author:77"}, nil // value, dependencies
	}

	client, err := freshd.New(addr)
	if err != nil {
		return err
	}
	defer client.Close()
	cache := freshd.NewNearCache[string](client, freshd.NearCacheConfig{Endpoint: "/feed"})
	defer cache.Close()

	feed, err := cache.Get(ctx, "feed:user:4821", loadFeed) // miss: lease, load, fill
	fmt.Println(feed, err)
	feed, err = cache.Get(ctx, "feed:user:4821", loadFeed) // hit: checked, served
	fmt.Println(feed, err)
	posts["posts:author:77"] = "edited"
	if _, err := client.PublishKeys(ctx, "posts:author:77"); err != nil { // the writer's side
		return err
	}
	feed, err = cache.Get(ctx, "feed:user:4821", loadFeed) // changed: read again
	fmt.Println(feed, err)
	// quick start ends
	return nil
}

func TestTheReadmeQuickStartIsTheOneThatRuns(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(readme), "## Quick start")
	if !ok {
		t.Fatal("README.md has no quick start")
	}
	_, block, _ := strings.Cut(section, "```go\n")
	block, _, _ = strings.Cut(block, "```")

	source, err := os.ReadFile("quickstart_test.go")
	if err != nil {
		t.Fatal(err)
	}
	_, body, _ := strings.Cut(string(source), "\t// quick start begins\n")
	body, _, _ = strings.Cut(body, "\t// quick start ends\n")
	var lines []string
	for _, line := range strings.SplitAfter(body, "\n") {
		lines = append(lines, strings.TrimPrefix(line, "\t"))
	}
	want := strings.ReplaceAll(strings.Join(lines, ""), "freshd.New(addr)", `freshd.New("127.0.0.1:50051")`)
	if block != want {
		t.Fatalf("the README's quick start is not quickStart's body:\n%s\n---\n%s", block, want)
	}
}

func TestTheReadmeQuickStartRuns(t *testing.T) {
	srv := startServer(t, nil)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout := os.Stdout
	os.Stdout = w
	runErr := quickStart(context.Background(), srv.Addr)
	os.Stdout = stdout
	w.Close()
	out, _ := io.ReadAll(r)
	if runErr != nil {
		t.Fatal(runErr)
	}
	if got, want := string(out), "hello <nil>\nhello <nil>\nedited <nil>\n"; got != want {
		t.Fatalf("printed %q, want %q", got, want)
	}
}
