package freshd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	pb "github.com/freshd/freshd/clients/go/freshdv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
)

// DefaultTimeout bounds a unary call whose context has no deadline, unless
// [WithTimeout] says otherwise.
const DefaultTimeout = 10 * time.Second

// Option configures a [Client]; see [New].
type Option func(*settings) error

type settings struct {
	timeout     time.Duration
	clientID    string
	token       string
	hasToken    bool
	tls         bool
	caPEM       []byte
	caFile      string
	certFile    string
	keyFile     string
	certPEM     []byte
	keyPEM      []byte
	serverName  string
	dialOptions []grpc.DialOption
}

// WithTimeout bounds every unary call whose context carries no deadline,
// and the wait for a Watch stream's started message (default
// [DefaultTimeout]; 0 means no bound). A context deadline always wins: it is
// the per-call timeout.
func WithTimeout(d time.Duration) Option {
	return func(s *settings) error {
		if d < 0 {
			return fmt.Errorf("freshd: timeout must not be negative, got %v", d)
		}
		s.timeout = d
		return nil
	}
}

// WithClientID names the client: it is sent with publishes, fills, checks,
// purges and Watch streams whose request names no client id, for no-loop
// and the server's freshness metrics.
func WithClientID(id string) Option {
	return func(s *settings) error { s.clientID = id; return nil }
}

// WithToken sends "authorization: Bearer <token>" with every call and Watch
// stream, over TLS and plaintext alike (freshd --new-token makes one).
func WithToken(token string) Option {
	return func(s *settings) error {
		token = strings.TrimSpace(token)
		if token == "" {
			return errors.New("freshd: token: the token is empty")
		}
		for _, r := range token {
			if r < 33 || r > 126 {
				return errors.New("freshd: token: the token must be visible ASCII without spaces (as freshd --new-token prints it)")
			}
		}
		s.token, s.hasToken = token, true
		return nil
	}
}

// WithTLS makes the connection TLS, trusting the system's roots unless
// [WithCAFile] or [WithCAPEM] names a CA. An https:// address, or any of
// the other TLS options, does the same.
func WithTLS() Option {
	return func(s *settings) error { s.tls = true; return nil }
}

// WithCAFile trusts the CA certificates (PEM) in a file for the server's
// certificate, instead of the system's roots.
func WithCAFile(path string) Option {
	return func(s *settings) error { s.tls, s.caFile = true, path; return nil }
}

// WithCAPEM trusts the given CA certificates (PEM) for the server's
// certificate, instead of the system's roots.
func WithCAPEM(pem []byte) Option {
	return func(s *settings) error { s.tls, s.caPEM = true, pem; return nil }
}

// WithClientCertFiles presents a client certificate and its key (PEM files),
// for a server that requires mutual TLS.
func WithClientCertFiles(certFile, keyFile string) Option {
	return func(s *settings) error {
		s.tls, s.certFile, s.keyFile = true, certFile, keyFile
		return nil
	}
}

// WithClientCertPEM presents a client certificate and its key (PEM), for a
// server that requires mutual TLS.
func WithClientCertPEM(cert, key []byte) Option {
	return func(s *settings) error {
		s.tls, s.certPEM, s.keyPEM = true, cert, key
		return nil
	}
}

// WithServerName sets the name the server's certificate must carry, when it
// is not the address's host.
func WithServerName(name string) Option {
	return func(s *settings) error { s.tls, s.serverName = true, name; return nil }
}

// WithDialOptions adds gRPC dial options, for full control (interceptors,
// keepalive, a custom dialer). They come after the ones [New] sets.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(s *settings) error {
		s.dialOptions = append(s.dialOptions, opts...)
		return nil
	}
}

// Client is a connection to one freshd server, with one method per RPC of
// the Coordinator service. It is safe for concurrent use; Close it when done.
type Client struct {
	conn     *grpc.ClientConn
	stub     pb.CoordinatorClient
	timeout  time.Duration
	clientID string
	target   string
	tls      bool
}

// New connects to a freshd server. addr is "host:port" ("http://host:port"
// is accepted too); "https://host:port" means TLS. The connection is made
// lazily: the first call connects, and calls fail with [ErrUnavailable]
// while the server cannot be reached.
func New(addr string, opts ...Option) (*Client, error) {
	s := settings{timeout: DefaultTimeout}
	for _, opt := range opts {
		if err := opt(&s); err != nil {
			return nil, err
		}
	}
	target := addr
	plaintextScheme := false
	for _, scheme := range []string{"http://", "grpc://", "https://"} {
		if strings.HasPrefix(target, scheme) {
			plaintextScheme = scheme != "https://"
			if scheme == "https://" {
				s.tls = true
			}
			target = strings.TrimRight(strings.TrimPrefix(target, scheme), "/")
		}
	}
	if target == "" {
		return nil, errors.New("freshd: the address is empty")
	}
	if plaintextScheme && s.tls {
		return nil, fmt.Errorf("freshd: TLS settings are given for %s, a plaintext address: write https:// or host:port", addr)
	}
	if (s.certFile == "") != (s.keyFile == "") || (s.certPEM == nil) != (s.keyPEM == nil) {
		return nil, errors.New("freshd: a client certificate and its key go together: give both or neither")
	}

	dial := []grpc.DialOption{
		grpc.WithConnectParams(grpc.ConnectParams{
			// Reconnect quickly after a server restart.
			Backoff: backoff.Config{
				BaseDelay:  100 * time.Millisecond,
				Multiplier: 1.6,
				Jitter:     0.2,
				MaxDelay:   2 * time.Second,
			},
			MinConnectTimeout: 5 * time.Second,
		}),
	}
	if s.tls {
		config, err := tlsConfig(&s)
		if err != nil {
			return nil, err
		}
		dial = append(dial, grpc.WithTransportCredentials(credentials.NewTLS(config)))
	} else {
		dial = append(dial, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	if s.hasToken {
		dial = append(dial, grpc.WithPerRPCCredentials(bearer{"Bearer " + s.token}))
	}
	dial = append(dial, s.dialOptions...)
	conn, err := grpc.NewClient(target, dial...)
	if err != nil {
		return nil, fmt.Errorf("freshd: %w", err)
	}
	return &Client{
		conn:     conn,
		stub:     pb.NewCoordinatorClient(conn),
		timeout:  s.timeout,
		clientID: s.clientID,
		target:   target,
		tls:      s.tls,
	}, nil
}

func tlsConfig(s *settings) (*tls.Config, error) {
	config := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: s.serverName}
	ca := s.caPEM
	if s.caFile != "" {
		pem, err := os.ReadFile(s.caFile)
		if err != nil {
			return nil, fmt.Errorf("freshd: CA file: %w", err)
		}
		ca = append(append([]byte{}, ca...), pem...)
	}
	if ca != nil {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(ca) {
			return nil, errors.New("freshd: the CA holds no PEM certificate")
		}
		config.RootCAs = pool
	}
	var (
		cert tls.Certificate
		err  error
		has  bool
	)
	switch {
	case s.certFile != "":
		cert, err = tls.LoadX509KeyPair(s.certFile, s.keyFile)
		has = true
	case s.certPEM != nil:
		cert, err = tls.X509KeyPair(s.certPEM, s.keyPEM)
		has = true
	}
	if err != nil {
		return nil, fmt.Errorf("freshd: client certificate: %w", err)
	}
	if has {
		config.Certificates = []tls.Certificate{cert}
	}
	return config, nil
}

// bearer sends the token as per-RPC credentials, on TLS and plaintext.
type bearer struct{ value string }

// GetRequestMetadata returns the authorization header.
func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": b.value}, nil
}

// RequireTransportSecurity is false: the token goes over plaintext too.
func (b bearer) RequireTransportSecurity() bool { return false }

// Close closes the connection; open Watch streams end with it.
func (c *Client) Close() error { return c.conn.Close() }

// Target returns the address the client connects to, without its scheme.
func (c *Client) Target() string { return c.target }

// TLS reports whether the connection uses TLS.
func (c *Client) TLS() bool { return c.tls }

// ClientID returns the client id set with [WithClientID].
func (c *Client) ClientID() string { return c.clientID }

// Stub returns the generated gRPC client over the same connection (token
// included), for calls this package does not wrap.
func (c *Client) Stub() pb.CoordinatorClient { return c.stub }

// Conn returns the underlying gRPC connection.
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// callContext applies the default timeout when ctx has no deadline.
func (c *Client) callContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok || c.timeout <= 0 {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, c.timeout)
}

func unary[Req, Resp any](c *Client, ctx context.Context, method string, req Req,
	call func(context.Context, Req, ...grpc.CallOption) (Resp, error)) (Resp, error) {
	ctx, cancel := c.callContext(ctx)
	defer cancel()
	resp, err := call(ctx, req)
	if err != nil {
		var zero Resp
		return zero, fromRPC(err, method)
	}
	return resp, nil
}

// withID returns msg, or a copy of it whose client id is the client's when
// the request names none.
func withID[M proto.Message](c *Client, msg M, id string, set func(M)) M {
	if id != "" || c.clientID == "" {
		return msg
	}
	m := proto.Clone(msg).(M)
	set(m)
	return m
}

// Publish publishes changes: each changed key and every transitive dependent
// is bumped once. Errors: [ErrInvalidArgument] (no changes, too many, a bad
// key).
func (c *Client) Publish(ctx context.Context, req *PublishRequest) (*PublishResponse, error) {
	req = withID(c, req, req.GetClientId(), func(r *PublishRequest) { r.ClientId = c.clientID })
	return unary(c, ctx, "Publish", req, c.stub.Publish)
}

// PublishKeys publishes a plain (not critical) change of each key.
func (c *Client) PublishKeys(ctx context.Context, keys ...string) (*PublishResponse, error) {
	return c.Publish(ctx, &PublishRequest{Changes: Keys(keys...)})
}

// Fill registers a cached key with its dependencies and TTL. Errors:
// [ErrFillRaced] when the key or a dependency changed after the observed
// seq (or the lease's seq), [ErrLeaseLost] for a lease token not held,
// [ErrInvalidArgument].
func (c *Client) Fill(ctx context.Context, req *FillRequest) (*FillResponse, error) {
	req = withID(c, req, req.GetClientId(), func(r *FillRequest) { r.ClientId = c.clientID })
	return unary(c, ctx, "Fill", req, c.stub.Fill)
}

// Check asks whether a cached copy is still right: the fact (freshness) and
// what the namespace's policy decides. Errors: [ErrInvalidArgument],
// [ErrUnavailable] (min_seq not applied in time).
func (c *Client) Check(ctx context.Context, req *CheckRequest) (*CheckResponse, error) {
	req = withID(c, req, req.GetClientId(), func(r *CheckRequest) { r.ClientId = c.clientID })
	return unary(c, ctx, "Check", req, c.stub.Check)
}

// CheckBatch checks many copies at once, answered from one consistent state.
// Errors: [ErrInvalidArgument] (too many items, a bad key), [ErrUnavailable].
func (c *Client) CheckBatch(ctx context.Context, req *CheckBatchRequest) (*CheckBatchResponse, error) {
	req = withID(c, req, req.GetClientId(), func(r *CheckBatchRequest) { r.ClientId = c.clientID })
	return unary(c, ctx, "CheckBatch", req, c.stub.CheckBatch)
}

// Inspect returns everything freshd holds for one key. Errors:
// [ErrNotFound] when it holds nothing, [ErrInvalidArgument].
func (c *Client) Inspect(ctx context.Context, key string) (*InspectResponse, error) {
	return unary(c, ctx, "Inspect", &pb.InspectRequest{Key: key}, c.stub.Inspect)
}

// Stats returns the server-wide counters.
func (c *Client) Stats(ctx context.Context) (*StatsResponse, error) {
	return unary(c, ctx, "Stats", &pb.StatsRequest{}, c.stub.Stats)
}

// Lease asks for the fill lease of a key before reading the origin on a
// miss. Errors: [ErrInvalidArgument], [ErrUnavailable] (min_seq).
func (c *Client) Lease(ctx context.Context, req *LeaseRequest) (*LeaseResponse, error) {
	return unary(c, ctx, "Lease", req, c.stub.Lease)
}

// Purge invalidates every key under a prefix and their dependents (soft by
// default, hard on request, or a dry run). Errors: [ErrInvalidArgument],
// [ErrFailedPrecondition] (over max_purge_keys without confirm),
// [ErrResourceExhausted] (over purges_per_minute).
func (c *Client) Purge(ctx context.Context, req *PurgeRequest) (*PurgeResponse, error) {
	req = withID(c, req, req.GetClientId(), func(r *PurgeRequest) { r.ClientId = c.clientID })
	return unary(c, ctx, "Purge", req, c.stub.Purge)
}

// GetPolicy returns the policy in force for a namespace ("" is the default).
func (c *Client) GetPolicy(ctx context.Context, namespace string) (*NamespacePolicy, error) {
	return unary(c, ctx, "GetPolicy", &pb.GetPolicyRequest{Namespace: namespace}, c.stub.GetPolicy)
}

// SetPolicy sets a namespace's freshness policy ("" sets the default).
// Errors: [ErrInvalidArgument] (an inconsistent policy).
func (c *Client) SetPolicy(ctx context.Context, namespace string, policy *FreshnessPolicy) (*NamespacePolicy, error) {
	req := &pb.SetPolicyRequest{Namespace: namespace, Policy: policy}
	return unary(c, ctx, "SetPolicy", req, c.stub.SetPolicy)
}

// ListPolicies returns the default policy first, then every namespace's.
func (c *Client) ListPolicies(ctx context.Context) ([]*NamespacePolicy, error) {
	resp, err := unary(c, ctx, "ListPolicies", &pb.ListPoliciesRequest{}, c.stub.ListPolicies)
	if err != nil {
		return nil, err
	}
	return resp.GetPolicies(), nil
}

// DeletePolicy removes a namespace's policy; it falls back to the default.
// Errors: [ErrInvalidArgument] (the default cannot be deleted),
// [ErrNotFound] (no policy of its own).
func (c *Client) DeletePolicy(ctx context.Context, namespace string) error {
	_, err := unary(c, ctx, "DeletePolicy", &pb.DeletePolicyRequest{Namespace: namespace}, c.stub.DeletePolicy)
	return err
}
