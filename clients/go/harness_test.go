package freshd_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// repoRoot is the repository holding this module (clients/go/../..).
func repoRoot(t testing.TB) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	return root
}

var (
	binaryOnce sync.Once
	binaryPath string
	binaryErr  error
)

// freshdBinary is $FRESHD_BIN, else <repo>/target/debug/freshd (or under
// $CARGO_TARGET_DIR), built with `cargo build --bin freshd` when missing.
func freshdBinary(t testing.TB) string {
	t.Helper()
	binaryOnce.Do(func() {
		if configured := os.Getenv("FRESHD_BIN"); configured != "" {
			if st, err := os.Stat(configured); err != nil || st.IsDir() {
				binaryErr = fmt.Errorf("FRESHD_BIN=%s does not exist", configured)
				return
			}
			binaryPath = configured
			return
		}
		root := repoRoot(t)
		target := os.Getenv("CARGO_TARGET_DIR")
		if target == "" {
			target = filepath.Join(root, "target")
		} else if !filepath.IsAbs(target) {
			target = filepath.Join(root, target)
		}
		path := filepath.Join(target, "debug", "freshd")
		if _, err := os.Stat(path); err != nil {
			cargo, lookErr := exec.LookPath("cargo")
			if lookErr != nil {
				binaryErr = fmt.Errorf("%s is missing and cargo is not installed to build it", path)
				return
			}
			cmd := exec.Command(cargo, "build", "--bin", "freshd")
			cmd.Dir = root
			cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
			if err := cmd.Run(); err != nil {
				binaryErr = fmt.Errorf("cargo build --bin freshd: %w", err)
				return
			}
		}
		binaryPath = path
	})
	if binaryErr != nil {
		t.Fatal(binaryErr)
	}
	return binaryPath
}

// server is one freshd process on 127.0.0.1.
type server struct {
	t        testing.TB
	settings map[string]string
	port     int
	Addr     string
	Epoch    uint64

	mu   sync.Mutex
	cmd  *exec.Cmd
	exit chan struct{}
	log  []string
}

// settingFlags turns {"lease_ttl": "200ms"} into ["--lease-ttl", "200ms"].
func settingFlags(settings map[string]string) []string {
	var flags []string
	for name, value := range settings {
		flags = append(flags, "--"+strings.ReplaceAll(name, "_", "-"), value)
	}
	return flags
}

// startServer starts a fresh server with the given settings (names as in
// the configuration file), stopped when the test ends.
func startServer(t testing.TB, settings map[string]string) *server {
	t.Helper()
	s := &server{t: t, settings: settings}
	if err := s.start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.kill)
	return s
}

func (s *server) start() error {
	args := []string{"--listen", fmt.Sprintf("127.0.0.1:%d", s.port), "--log-format", "json"}
	args = append(args, settingFlags(s.settings)...)
	if _, ok := s.settings["admin_listen"]; !ok {
		args = append(args, "--admin-listen", "off")
	}
	cmd := exec.Command(freshdBinary(s.t), args...)
	cmd.Env = os.Environ()
	if os.Getenv("RUST_LOG") == "" {
		cmd.Env = append(cmd.Env, "RUST_LOG=info")
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		return err
	}
	exit := make(chan struct{})
	serving := make(chan map[string]any, 1)
	go func() {
		told := false
		scanner := bufio.NewScanner(out)
		scanner.Buffer(make([]byte, 64*1024), 4*1024*1024)
		for scanner.Scan() {
			line := scanner.Text()
			s.mu.Lock()
			s.log = append(s.log, line)
			s.mu.Unlock()
			if told {
				continue
			}
			var record map[string]any
			if json.Unmarshal([]byte(line), &record) != nil {
				continue
			}
			fields, ok := record["fields"].(map[string]any)
			if !ok {
				fields = record
			}
			if fields["message"] == "freshd serving" && fields["addr"] != nil {
				serving <- fields
				told = true
			}
		}
		_ = cmd.Wait()
		close(exit)
	}()
	s.mu.Lock()
	s.cmd, s.exit = cmd, exit
	s.mu.Unlock()
	select {
	case fields := <-serving:
		s.Addr = fmt.Sprint(fields["addr"])
		_, port, _ := net.SplitHostPort(s.Addr)
		fmt.Sscan(port, &s.port)
		if e, ok := fields["epoch"].(float64); ok {
			s.Epoch = uint64(e)
		}
		return nil
	case <-exit:
		return fmt.Errorf("freshd exited before serving: %s", s.logText())
	case <-time.After(20 * time.Second):
		s.kill()
		return fmt.Errorf("freshd did not report serving within 20s: %s", s.logText())
	}
}

func (s *server) logText() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.log, "\n")
}

// kill ends the process at once (a crash: nothing drained).
func (s *server) kill() {
	s.mu.Lock()
	cmd, exit := s.cmd, s.exit
	s.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return
	}
	_ = cmd.Process.Kill()
	<-exit
}

// restart kills the process and starts a new one on the same port: a new
// epoch, nothing remembered.
func (s *server) restart() {
	s.t.Helper()
	s.kill()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := s.start()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatal(err)
		}
		// The port may linger for a moment after the old process.
		time.Sleep(50 * time.Millisecond)
	}
}

// waitUntil polls cond until it holds, failing the test after timeout.
func waitUntil(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
