package freshd_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	freshd "github.com/freshd/freshd/clients/go"
)

// Tokens and TLS against real servers: principals from a config file,
// certificates made here.

type pki struct {
	name string
	key  *ecdsa.PrivateKey
	cert *x509.Certificate
	der  []byte
}

func newPKI(t *testing.T, name string) *pki {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	template := &x509.Certificate{
		SerialNumber:          big.NewInt(now.UnixNano()),
		Subject:               pkix.Name{CommonName: "freshd test CA " + name},
		NotBefore:             now.Add(-5 * time.Minute),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &pki{name: name, key: key, cert: cert, der: der}
}

func (p *pki) pem() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.der})
}

// leaf returns a certificate and its key, PEM.
func (p *pki) leaf(t *testing.T, names []string, client bool) ([]byte, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	template := &x509.Certificate{
		SerialNumber:          big.NewInt(now.UnixNano() + 1),
		Subject:               pkix.Name{CommonName: names[0]},
		NotBefore:             now.Add(-5 * time.Minute),
		NotAfter:              now.Add(24 * time.Hour),
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if client {
		template.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			template.IPAddresses = append(template.IPAddresses, ip)
		} else {
			template.DNSNames = append(template.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, template, p.cert, &key.PublicKey, p.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
}

// pkiFiles are PEM files of a server CA, the server, a client CA, a client
// and a stranger CA.
type pkiFiles struct {
	ca, serverCert, serverKey, clientCA, clientCert, clientKey, strangerCA string
}

func writePKI(t *testing.T) pkiFiles {
	t.Helper()
	dir := t.TempDir()
	servers, clients, stranger := newPKI(t, "servers"), newPKI(t, "clients"), newPKI(t, "stranger")
	serverCert, serverKey := servers.leaf(t, []string{"localhost", "127.0.0.1"}, false)
	clientCert, clientKey := clients.leaf(t, []string{"client.example"}, true)
	files := pkiFiles{}
	for path, content := range map[*string][]byte{
		&files.ca: servers.pem(), &files.serverCert: serverCert, &files.serverKey: serverKey,
		&files.clientCA: clients.pem(), &files.clientCert: clientCert, &files.clientKey: clientKey,
		&files.strangerCA: stranger.pem(),
	} {
		f, err := os.CreateTemp(dir, "*.pem")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.Write(content); err != nil {
			t.Fatal(err)
		}
		f.Close()
		*path = f.Name()
	}
	return files
}

// tokens holds each principal's token; the server's config holds only
// their hashes.
func newTokens(t *testing.T) map[string]string {
	t.Helper()
	tokens := map[string]string{}
	for _, name := range []string{"admin", "feed"} {
		raw := make([]byte, 32)
		if _, err := rand.Read(raw); err != nil {
			t.Fatal(err)
		}
		tokens[name] = "fd_" + base64.RawURLEncoding.EncodeToString(raw)
	}
	return tokens
}

var scopes = map[string]string{
	"admin": `{ "*" = ["check", "watch", "fill", "publish", "purge", "admin"] }`,
	"feed":  `{ feed = ["check", "watch", "fill"], "*" = ["check"] }`,
}

func writeConfig(t *testing.T, tokens map[string]string, quotas map[string]string) string {
	t.Helper()
	var lines []string
	for _, name := range []string{"admin", "feed"} {
		sum := sha256.Sum256([]byte(tokens[name]))
		lines = append(lines,
			"[[auth.principals]]",
			fmt.Sprintf("name = %q", name),
			fmt.Sprintf("token_sha256 = %q", hex.EncodeToString(sum[:])),
			"scopes = "+scopes[name])
		if q, ok := quotas[name]; ok {
			lines = append(lines, "quotas = "+q)
		}
		lines = append(lines, "")
	}
	path := filepath.Join(t.TempDir(), "freshd.toml")
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestAKnownTokenIsAccepted(t *testing.T) {
	tokens := newTokens(t)
	srv := startServer(t, map[string]string{"config": writeConfig(t, tokens, nil)})
	client := connect(t, srv.Addr, freshd.WithToken(tokens["admin"]))
	ctx := context.Background()
	published, err := client.PublishKeys(ctx, "feed:1")
	if err != nil {
		t.Fatal(err)
	}
	check, err := client.Check(ctx, &freshd.CheckRequest{Key: "feed:1"})
	if err != nil || check.GetVersion() != published.GetSeq() {
		t.Fatalf("check: %v %v", check, err)
	}
}

func TestAMissingOrUnknownTokenIsUnauthenticated(t *testing.T) {
	tokens := newTokens(t)
	srv := startServer(t, map[string]string{"config": writeConfig(t, tokens, nil)})
	ctx := context.Background()
	_, err := connect(t, srv.Addr).Check(ctx, &freshd.CheckRequest{Key: "feed:1"})
	if !errors.Is(err, freshd.ErrUnauthenticated) || !strings.Contains(err.Error(), "requires a token") {
		t.Fatalf("no token: %v", err)
	}
	unknown := connect(t, srv.Addr, freshd.WithToken("fd_not_a_known_token"))
	if _, err := unknown.Check(ctx, &freshd.CheckRequest{Key: "feed:1"}); !errors.Is(err, freshd.ErrUnauthenticated) || !strings.Contains(err.Error(), "unknown token") {
		t.Fatalf("unknown token: %v", err)
	}
	if _, err := unknown.Watch(ctx, &freshd.WatchStart{Subscribe: []string{"feed:"}}); !errors.Is(err, freshd.ErrUnauthenticated) {
		t.Fatalf("watch with an unknown token: %v", err)
	}
}

func TestOutOfScopeCallsArePermissionDenied(t *testing.T) {
	tokens := newTokens(t)
	srv := startServer(t, map[string]string{"config": writeConfig(t, tokens, nil)})
	client := connect(t, srv.Addr, freshd.WithToken(tokens["feed"]))
	ctx := context.Background()
	if _, err := client.Fill(ctx, &freshd.FillRequest{Key: "feed:1", Dependencies: []string{"posts:1"}}); err != nil {
		t.Fatalf("fill in scope: %v", err)
	}
	_, err := client.PublishKeys(ctx, "feed:1")
	if !errors.Is(err, freshd.ErrPermissionDenied) || !strings.Contains(err.Error(), `"feed"`) || !strings.Contains(err.Error(), `"publish"`) {
		t.Fatalf("publish out of scope: %v", err)
	}
	if _, err := client.Watch(ctx, &freshd.WatchStart{Subscribe: []string{"posts:"}}); !errors.Is(err, freshd.ErrPermissionDenied) || !strings.Contains(err.Error(), "watch") {
		t.Fatalf("watch out of scope: %v", err)
	}
}

func TestAQuotaIsResourceExhaustedNamingIt(t *testing.T) {
	tokens := newTokens(t)
	srv := startServer(t, map[string]string{"config": writeConfig(t, tokens, map[string]string{"feed": "{ streams = 1 }"})})
	client := connect(t, srv.Addr, freshd.WithToken(tokens["feed"]))
	ctx := context.Background()
	first, err := client.Watch(ctx, &freshd.WatchStart{Subscribe: []string{"feed:"}})
	if err != nil {
		t.Fatal(err)
	}
	defer first.Cancel()
	if _, err := client.Watch(ctx, &freshd.WatchStart{Subscribe: []string{"feed:"}}); !errors.Is(err, freshd.ErrResourceExhausted) || !strings.Contains(err.Error(), "quota streams") {
		t.Fatalf("a second stream: %v", err)
	}
}

func tlsServer(t *testing.T, files pkiFiles, tokens map[string]string, mutual bool) *server {
	settings := map[string]string{
		"config":   writeConfig(t, tokens, nil),
		"tls_cert": files.serverCert,
		"tls_key":  files.serverKey,
	}
	if mutual {
		settings["tls_client_ca"] = files.clientCA
	}
	return startServer(t, settings)
}

func TestTLSWithACAFileOrPEM(t *testing.T) {
	files, tokens := writePKI(t), newTokens(t)
	srv := tlsServer(t, files, tokens, false)
	caPEM, err := os.ReadFile(files.ca)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, ca := range []freshd.Option{freshd.WithCAFile(files.ca), freshd.WithCAPEM(caPEM)} {
		client := connect(t, srv.Addr, freshd.WithToken(tokens["admin"]), ca, freshd.WithServerName("localhost"))
		if !client.TLS() {
			t.Fatal("not TLS")
		}
		if _, err := client.PublishKeys(ctx, "feed:1"); err != nil {
			t.Fatal(err)
		}
	}
	// The certificate names 127.0.0.1 too: no override needed, https:// works.
	client := connect(t, "https://"+srv.Addr, freshd.WithToken(tokens["admin"]), freshd.WithCAFile(files.ca))
	if _, err := client.Check(ctx, &freshd.CheckRequest{Key: "feed:1"}); err != nil {
		t.Fatal(err)
	}
}

func TestTLSRefusesAServerFromAnotherCA(t *testing.T) {
	files, tokens := writePKI(t), newTokens(t)
	srv := tlsServer(t, files, tokens, false)
	ctx := context.Background()
	stranger := connect(t, srv.Addr, freshd.WithToken(tokens["admin"]), freshd.WithCAFile(files.strangerCA),
		freshd.WithServerName("localhost"), freshd.WithTimeout(3*time.Second))
	if _, err := stranger.Check(ctx, &freshd.CheckRequest{Key: "feed:1"}); !errors.Is(err, freshd.ErrUnavailable) {
		t.Fatalf("another CA: %v", err)
	}
	// Nor does plaintext get anywhere.
	plain := connect(t, srv.Addr, freshd.WithToken(tokens["admin"]), freshd.WithTimeout(3*time.Second))
	var fe *freshd.Error
	if _, err := plain.Check(ctx, &freshd.CheckRequest{Key: "feed:1"}); !errors.As(err, &fe) {
		t.Fatalf("plaintext to TLS: %v", err)
	}
}

func TestMutualTLSNeedsAClientCertificate(t *testing.T) {
	files, tokens := writePKI(t), newTokens(t)
	srv := tlsServer(t, files, tokens, true)
	ctx := context.Background()
	client := connect(t, srv.Addr, freshd.WithToken(tokens["admin"]), freshd.WithCAFile(files.ca),
		freshd.WithClientCertFiles(files.clientCert, files.clientKey), freshd.WithServerName("localhost"))
	if _, err := client.PublishKeys(ctx, "feed:1"); err != nil {
		t.Fatal(err)
	}
	// The handshake passes; the token is still required.
	certPEM, _ := os.ReadFile(files.clientCert)
	keyPEM, _ := os.ReadFile(files.clientKey)
	anonymous := connect(t, srv.Addr, freshd.WithCAFile(files.ca), freshd.WithClientCertPEM(certPEM, keyPEM), freshd.WithServerName("localhost"))
	if _, err := anonymous.Check(ctx, &freshd.CheckRequest{Key: "feed:1"}); !errors.Is(err, freshd.ErrUnauthenticated) {
		t.Fatalf("no token: %v", err)
	}
	noCert := connect(t, srv.Addr, freshd.WithToken(tokens["admin"]), freshd.WithCAFile(files.ca),
		freshd.WithServerName("localhost"), freshd.WithTimeout(3*time.Second))
	if _, err := noCert.Check(ctx, &freshd.CheckRequest{Key: "feed:1"}); !errors.Is(err, freshd.ErrUnavailable) {
		t.Fatalf("no client certificate: %v", err)
	}
}

func TestAWatchStreamAndANearCacheOverTLSWithAToken(t *testing.T) {
	files, tokens := writePKI(t), newTokens(t)
	srv := tlsServer(t, files, tokens, false)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	dial := func(name string) *freshd.Client {
		return connect(t, srv.Addr, freshd.WithToken(tokens[name]), freshd.WithCAFile(files.ca), freshd.WithServerName("localhost"))
	}
	reader, writer := dial("feed"), dial("admin")
	stream, err := reader.Watch(ctx, &freshd.WatchStart{ClientId: "reader", Subscribe: []string{"feed:"}})
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Cancel()
	published, err := writer.PublishKeys(ctx, "feed:user:1")
	if err != nil {
		t.Fatal(err)
	}
	synced, err := stream.Sync(ctx)
	if err != nil || len(synced.Notices) != 1 || synced.Notices[0].GetSeq() != published.GetSeq() {
		t.Fatalf("notices: %v %v", synced, err)
	}

	post := "hello"
	load := func(context.Context) (string, []string, error) { return post, []string{"posts:1"}, nil }
	cache := newCache(t, writer, freshd.NearCacheConfig{RaiseErrors: true})
	mustGet(t, cache, "feed:1", load, "hello")
	post = "edited"
	if _, err := writer.PublishKeys(ctx, "posts:1"); err != nil {
		t.Fatal(err)
	}
	mustGet(t, cache, "feed:1", load, "edited")
}
