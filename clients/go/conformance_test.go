package freshd_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	freshd "github.com/freshd/freshd/clients/go"
	pb "github.com/freshd/freshd/clients/go/freshdv1"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// The language-neutral scenarios of tests/conformance/ (the format is in
// its README), each against a fresh real server, through the typed client.

type scenario struct {
	Name   string           `json:"name"`
	Server map[string]any   `json:"server"`
	Steps  []map[string]any `json:"steps"`
}

func scenarioFiles(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(repoRoot(t), "tests", "conformance", "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(files)
	return files
}

func decodeJSON(data []byte, into any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	return dec.Decode(into)
}

func TestConformance(t *testing.T) {
	files := scenarioFiles(t)
	if len(files) == 0 {
		t.Fatalf("no scenario in %s", filepath.Join(repoRoot(t), "tests", "conformance"))
	}
	for _, path := range files {
		name := strings.TrimSuffix(filepath.Base(path), ".json")
		t.Run(name, func(t *testing.T) {
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			var sc scenario
			if err := decodeJSON(data, &sc); err != nil {
				t.Fatalf("%s: %v", path, err)
			}
			settings := map[string]string{}
			for k, v := range sc.Server {
				settings[k] = fmt.Sprint(v)
			}
			srv := startServer(t, settings)
			client, err := freshd.New(srv.Addr, freshd.WithTimeout(5*time.Second))
			if err != nil {
				t.Fatal(err)
			}
			defer client.Close()
			r := newRunner(client)
			defer r.close()
			if err := r.run(sc.Steps); err != nil {
				t.Fatalf("%s: %v", sc.Name, err)
			}
		})
	}
}

// ------------------------------------------------------------ conversion

var camel = regexp.MustCompile(`([a-z0-9])([A-Z])`)

// enumPrefix: Freshness -> FRESHNESS_, ResetReason -> RESET_REASON_.
func enumPrefix(e protoreflect.EnumDescriptor) string {
	return strings.ToUpper(camel.ReplaceAllString(string(e.Name()), "${1}_${2}")) + "_"
}

func convertValue(v any, fd protoreflect.FieldDescriptor) any {
	switch fd.Kind() {
	case protoreflect.MessageKind, protoreflect.GroupKind:
		if m, ok := v.(map[string]any); ok {
			return convertMessage(m, fd.Message())
		}
	case protoreflect.EnumKind:
		if s, ok := v.(string); ok {
			return strings.TrimPrefix(s, enumPrefix(fd.Enum()))
		}
	case protoreflect.Int64Kind, protoreflect.Uint64Kind, protoreflect.Sint64Kind,
		protoreflect.Fixed64Kind, protoreflect.Sfixed64Kind:
		if s, ok := v.(string); ok {
			return json.Number(s) // 64-bit integers come as strings
		}
	}
	return v
}

func convertMessage(m map[string]any, md protoreflect.MessageDescriptor) map[string]any {
	out := make(map[string]any, len(m))
	for name, v := range m {
		fd := md.Fields().ByName(protoreflect.Name(name))
		if fd == nil {
			out[name] = v
			continue
		}
		if list, ok := v.([]any); ok {
			converted := make([]any, len(list))
			for i, x := range list {
				converted[i] = convertValue(x, fd)
			}
			out[name] = converted
		} else {
			out[name] = convertValue(v, fd)
		}
	}
	return out
}

// toMap is a response as the scenarios see it: proto field names, every
// field without presence with its default, enums without their prefix,
// integers as numbers.
func toMap(m proto.Message) (map[string]any, error) {
	data, err := protojson.MarshalOptions{UseProtoNames: true, EmitDefaultValues: true}.Marshal(m)
	if err != nil {
		return nil, err
	}
	var raw map[string]any
	if err := decodeJSON(data, &raw); err != nil {
		return nil, err
	}
	return convertMessage(raw, m.ProtoReflect().Descriptor()), nil
}

// fromMap builds a request from a step's fields (named as in the proto).
func fromMap(fields map[string]any, into proto.Message) error {
	data, err := json.Marshal(fields)
	if err != nil {
		return err
	}
	return protojson.Unmarshal(data, into)
}

// -------------------------------------------------------------- matching

func isNumber(v any) bool {
	switch v.(type) {
	case json.Number, int, int64, uint64, float64:
		return true
	}
	return false
}

func numberOf(v any) (*big.Rat, bool) {
	r, ok := new(big.Rat).SetString(fmt.Sprint(v))
	return r, ok
}

var integer = regexp.MustCompile(`^-?\d+$`)

// match checks expected as a subset of actual: objects by their keys, lists
// element by element with the same length, numbers as numbers.
func match(expected, actual any, where string) error {
	if where == "" {
		where = "response"
	}
	switch e := expected.(type) {
	case map[string]any:
		a, ok := actual.(map[string]any)
		if !ok {
			return fmt.Errorf("%s: expected an object, got %v", where, actual)
		}
		keys := make([]string, 0, len(e))
		for k := range e {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			av, ok := a[k]
			if !ok {
				return fmt.Errorf("%s: no field %q in %v", where, k, actual)
			}
			if err := match(e[k], av, where+"."+k); err != nil {
				return err
			}
		}
		return nil
	case []any:
		a, ok := actual.([]any)
		if !ok {
			return fmt.Errorf("%s: expected a list, got %v", where, actual)
		}
		if len(e) != len(a) {
			return fmt.Errorf("%s: expected %d elements, got %d: %v", where, len(e), len(a), actual)
		}
		for i := range e {
			if err := match(e[i], a[i], fmt.Sprintf("%s[%d]", where, i)); err != nil {
				return err
			}
		}
		return nil
	}
	_, eBool := expected.(bool)
	_, aBool := actual.(bool)
	switch {
	case eBool || aBool:
		if expected != actual {
			return fmt.Errorf("%s: expected %v, got %v", where, expected, actual)
		}
		return nil
	case isNumber(expected) || isNumber(actual):
		if s, ok := expected.(string); ok && integer.MatchString(s) {
			expected = json.Number(s)
		}
		en, eok := numberOf(expected)
		an, aok := numberOf(actual)
		if !isNumber(expected) || !isNumber(actual) || !eok || !aok || en.Cmp(an) != 0 {
			return fmt.Errorf("%s: expected %v, got %v", where, expected, actual)
		}
		return nil
	}
	if expected != actual {
		return fmt.Errorf("%s: expected %q, got %q", where, fmt.Sprint(expected), fmt.Sprint(actual))
	}
	return nil
}

// lookup is a response field by name (dots and list indexes for nested ones).
func lookup(response any, path string) (any, error) {
	value := response
	for _, part := range strings.Split(path, ".") {
		switch v := value.(type) {
		case []any:
			i, err := strconv.Atoi(part)
			if err != nil || i < 0 || i >= len(v) {
				return nil, fmt.Errorf("no element %q in %v", part, v)
			}
			value = v[i]
		case map[string]any:
			x, ok := v[part]
			if !ok {
				return nil, fmt.Errorf("no field %q in %v", part, v)
			}
			value = x
		default:
			return nil, fmt.Errorf("no field %q in %v", part, value)
		}
	}
	return value, nil
}

// ----------------------------------------------------------------- runner

type runner struct {
	client  *freshd.Client
	vars    map[string]any
	streams map[string]*freshd.WatchStream
}

func newRunner(client *freshd.Client) *runner {
	return &runner{client: client, vars: map[string]any{}, streams: map[string]*freshd.WatchStream{}}
}

func (r *runner) close() {
	for _, s := range r.streams {
		s.Cancel()
	}
}

func (r *runner) run(steps []map[string]any) error {
	for i, step := range steps {
		if err := r.step(step); err != nil {
			text, _ := json.Marshal(step)
			return fmt.Errorf("step %d (%v): %v\n  step: %s", i, step["op"], err, text)
		}
	}
	return nil
}

func (r *runner) substitute(v any) (any, error) {
	switch x := v.(type) {
	case string:
		if strings.HasPrefix(x, "$") {
			value, ok := r.vars[x[1:]]
			if !ok {
				names := make([]string, 0, len(r.vars))
				for n := range r.vars {
					names = append(names, n)
				}
				sort.Strings(names)
				return nil, fmt.Errorf("variable %s is not set (have %v)", x, names)
			}
			return value, nil
		}
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, item := range x {
			s, err := r.substitute(item)
			if err != nil {
				return nil, err
			}
			out[k] = s
		}
		return out, nil
	case []any:
		out := make([]any, len(x))
		for i, item := range x {
			s, err := r.substitute(item)
			if err != nil {
				return nil, err
			}
			out[i] = s
		}
		return out, nil
	}
	return v, nil
}

func (r *runner) step(step map[string]any) error {
	args := map[string]any{}
	for k, v := range step {
		args[k] = v
	}
	op, _ := args["op"].(string)
	expect, hasExpect := args["expect"]
	expectError, _ := args["expect_error"].(string)
	errorContains, hasContains := args["expect_error_contains"].(string)
	save, _ := args["save"].(map[string]any)
	for _, k := range []string{"op", "expect", "expect_error", "expect_error_contains", "save"} {
		delete(args, k)
	}
	handler, ok := r.handlers()[op]
	if !ok {
		return fmt.Errorf("unknown op %q", op)
	}
	substituted, err := r.substitute(args)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	response, err := handler(ctx, substituted.(map[string]any))
	if err != nil {
		var fe *freshd.Error
		if !errors.As(err, &fe) {
			return err
		}
		if expectError == "" {
			return fmt.Errorf("failed with %s: %s", freshd.CodeName(fe.Code), fe.Message)
		}
		if got := freshd.CodeName(fe.Code); got != expectError {
			return fmt.Errorf("expected %s, got %s: %s", expectError, got, fe.Message)
		}
		if hasContains && !strings.Contains(fe.Message, errorContains) {
			return fmt.Errorf("expected the message to contain %q: %q", errorContains, fe.Message)
		}
		return nil
	}
	if expectError != "" {
		return fmt.Errorf("expected %s, got success: %v", expectError, response)
	}
	if epoch, ok := response["epoch"].(json.Number); ok && epoch != "0" {
		r.vars["epoch"] = epoch
	}
	if hasExpect {
		want, err := r.substitute(expect)
		if err != nil {
			return err
		}
		if err := match(want, response, ""); err != nil {
			return err
		}
	}
	for name, field := range save {
		if response == nil {
			return fmt.Errorf("nothing to save from %s", op)
		}
		value, err := lookup(response, fmt.Sprint(field))
		if err != nil {
			return err
		}
		r.vars[name] = value
	}
	return nil
}

type handler func(ctx context.Context, args map[string]any) (map[string]any, error)

// unaryOp builds the request from the step's fields, calls, converts.
func unaryOp[Req proto.Message, Resp proto.Message](newReq func() Req, call func(context.Context, Req) (Resp, error)) handler {
	return func(ctx context.Context, args map[string]any) (map[string]any, error) {
		req := newReq()
		if err := fromMap(args, req); err != nil {
			return nil, fmt.Errorf("bad request fields: %v", err)
		}
		resp, err := call(ctx, req)
		if err != nil {
			return nil, err
		}
		return toMap(resp)
	}
}

func (r *runner) handlers() map[string]handler {
	c := r.client
	return map[string]handler{
		"publish":     unaryOp(func() *pb.PublishRequest { return &pb.PublishRequest{} }, c.Publish),
		"fill":        unaryOp(func() *pb.FillRequest { return &pb.FillRequest{} }, c.Fill),
		"check":       unaryOp(func() *pb.CheckRequest { return &pb.CheckRequest{} }, c.Check),
		"check_batch": unaryOp(func() *pb.CheckBatchRequest { return &pb.CheckBatchRequest{} }, c.CheckBatch),
		"lease":       unaryOp(func() *pb.LeaseRequest { return &pb.LeaseRequest{} }, c.Lease),
		"purge":       unaryOp(func() *pb.PurgeRequest { return &pb.PurgeRequest{} }, c.Purge),
		"inspect": unaryOp(func() *pb.InspectRequest { return &pb.InspectRequest{} },
			func(ctx context.Context, req *pb.InspectRequest) (*pb.InspectResponse, error) {
				return c.Inspect(ctx, req.GetKey())
			}),
		"get_policy": unaryOp(func() *pb.GetPolicyRequest { return &pb.GetPolicyRequest{} },
			func(ctx context.Context, req *pb.GetPolicyRequest) (*pb.NamespacePolicy, error) {
				return c.GetPolicy(ctx, req.GetNamespace())
			}),
		"set_policy": unaryOp(func() *pb.SetPolicyRequest { return &pb.SetPolicyRequest{} },
			func(ctx context.Context, req *pb.SetPolicyRequest) (*pb.NamespacePolicy, error) {
				return c.SetPolicy(ctx, req.GetNamespace(), req.GetPolicy())
			}),
		"stats": func(ctx context.Context, args map[string]any) (map[string]any, error) {
			if len(args) != 0 {
				return nil, fmt.Errorf("stats takes no fields: %v", args)
			}
			resp, err := c.Stats(ctx)
			if err != nil {
				return nil, err
			}
			return toMap(resp)
		},
		"sleep": func(ctx context.Context, args map[string]any) (map[string]any, error) {
			ms, err := strconv.ParseFloat(fmt.Sprint(args["ms"]), 64)
			if err != nil {
				return nil, fmt.Errorf("sleep: bad ms %v", args["ms"])
			}
			time.Sleep(time.Duration(ms * float64(time.Millisecond)))
			return nil, nil
		},
		"watch_open":  r.watchOpen,
		"watch_send":  r.watchSend,
		"watch_sync":  r.watchSync,
		"watch_close": r.watchClose,
	}
}

func (r *runner) stream(args map[string]any) (*freshd.WatchStream, error) {
	name := fmt.Sprint(args["stream"])
	delete(args, "stream")
	s, ok := r.streams[name]
	if !ok {
		return nil, fmt.Errorf("no open stream %q", name)
	}
	return s, nil
}

func (r *runner) watchOpen(ctx context.Context, args map[string]any) (map[string]any, error) {
	name := fmt.Sprint(args["stream"])
	delete(args, "stream")
	if _, ok := r.streams[name]; ok {
		return nil, fmt.Errorf("stream %q is already open", name)
	}
	start := &pb.WatchStart{}
	if err := fromMap(args, start); err != nil {
		return nil, fmt.Errorf("bad request fields: %v", err)
	}
	// The stream outlives the step: it ends with the runner.
	s, err := r.client.Watch(context.Background(), start)
	if err != nil {
		return nil, err
	}
	r.streams[name] = s
	return toMap(s.Started())
}

func (r *runner) watchSend(ctx context.Context, args map[string]any) (map[string]any, error) {
	s, err := r.stream(args)
	if err != nil {
		return nil, err
	}
	if len(args) != 1 {
		return nil, fmt.Errorf("watch_send takes one request: %v", args)
	}
	for kind, value := range args {
		if kind == "ack" {
			seq, err := strconv.ParseUint(fmt.Sprint(value), 10, 64)
			if err != nil {
				return nil, fmt.Errorf("ack: bad seq %v", value)
			}
			_, err = s.Ack(seq)
			return nil, err
		}
		list, ok := value.([]any)
		if !ok {
			return nil, fmt.Errorf("%s: expected a list, got %v", kind, value)
		}
		keys := make([]string, len(list))
		for i, k := range list {
			keys[i] = fmt.Sprint(k)
		}
		switch kind {
		case "track":
			_, err = s.Track(keys...)
		case "untrack":
			_, err = s.Untrack(keys...)
		case "subscribe":
			_, err = s.Subscribe(keys...)
		case "unsubscribe":
			_, err = s.Unsubscribe(keys...)
		default:
			return nil, fmt.Errorf("watch_send: unknown request %q", kind)
		}
	}
	return nil, err
}

func (r *runner) watchSync(ctx context.Context, args map[string]any) (map[string]any, error) {
	s, err := r.stream(args)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	synced, err := s.Sync(ctx)
	if err != nil {
		return nil, err
	}
	notices, resets, refused := []any{}, []any{}, []any{}
	for _, n := range synced.Notices {
		m, err := toMap(n)
		if err != nil {
			return nil, err
		}
		notices = append(notices, m)
	}
	for _, x := range synced.Resets {
		m, err := toMap(x)
		if err != nil {
			return nil, err
		}
		resets = append(resets, m)
	}
	for _, x := range synced.Refused {
		refused = append(refused, map[string]any{
			"request": json.Number(strconv.FormatUint(x.GetRequest(), 10)),
			"code":    freshd.CodeName(freshd.RefusedCode(x)),
			"message": x.GetMessage(),
		})
	}
	return map[string]any{
		"notices":  notices,
		"resets":   resets,
		"refused":  refused,
		"progress": json.Number(strconv.FormatUint(synced.Progress.GetSeq(), 10)),
	}, nil
}

func (r *runner) watchClose(ctx context.Context, args map[string]any) (map[string]any, error) {
	s, err := r.stream(args)
	if err != nil {
		return nil, err
	}
	if err := s.Close(); err != nil {
		return nil, err
	}
	// The server ends the stream once it reads the close: wait for it, so
	// that the next steps find it gone.
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := s.Wait(ctx); err != nil && !errors.Is(err, freshd.ErrStreamEnded) {
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, errors.New("the server did not end the stream")
		}
		return nil, err
	}
	return nil, nil
}

// --------------------------------------------- the runner checks for real

func TestMatchIsASubsetMatchThatFailsOnDifferences(t *testing.T) {
	var actual map[string]any
	if err := decodeJSON([]byte(`{"freshness": "FRESH", "version": 7, "results": [{"decision": "FRESH"}], "critical": false}`), &actual); err != nil {
		t.Fatal(err)
	}
	for _, good := range []string{`{"freshness": "FRESH", "version": 7}`, `{"results": [{}]}`, `{"version": "7"}`} {
		var e any
		_ = decodeJSON([]byte(good), &e)
		if err := match(e, actual, ""); err != nil {
			t.Errorf("%s should match: %v", good, err)
		}
	}
	for _, wrong := range []string{
		`{"freshness": "STALE"}`, `{"version": 8}`, `{"results": []}`,
		`{"results": [{"decision": "FRESH"}, {"decision": "FRESH"}]}`,
		`{"critical": 0}`, `{"missing": 1}`,
	} {
		var e any
		_ = decodeJSON([]byte(wrong), &e)
		if match(e, actual, "") == nil {
			t.Errorf("%s should not match", wrong)
		}
	}
}

func TestResponsesConvertEnumsAnd64BitIntegers(t *testing.T) {
	srv := startServer(t, nil)
	client, err := freshd.New(srv.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx := context.Background()
	if _, err := client.Fill(ctx, &freshd.FillRequest{Key: "feed:1", Dependencies: []string{"posts:1"}, TtlMs: 60000}); err != nil {
		t.Fatal(err)
	}
	resp, err := client.Check(ctx, &freshd.CheckRequest{Key: "feed:1", Version: 1 << 40})
	if err != nil {
		t.Fatal(err)
	}
	m, err := toMap(resp)
	if err != nil {
		t.Fatal(err)
	}
	if m["freshness"] != "STALE" || m["decision"] != "REFETCH" || m["critical"] != false {
		t.Fatalf("unexpected conversion: %v", m)
	}
	if v, ok := m["version"].(json.Number); !ok || v != "1" {
		t.Fatalf("version: %#v", m["version"])
	}
	if e, ok := m["epoch"].(json.Number); !ok || e == "0" {
		t.Fatalf("epoch: %#v", m["epoch"])
	}
}

func TestAWrongExpectationFailsTheScenario(t *testing.T) {
	srv := startServer(t, nil)
	client, err := freshd.New(srv.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	parse := func(text string) []map[string]any {
		var steps []map[string]any
		if err := decodeJSON([]byte(text), &steps); err != nil {
			t.Fatal(err)
		}
		return steps
	}
	cases := []struct{ steps, want string }{
		{`[{"op": "fill", "key": "k", "dependencies": ["d"], "ttl_ms": 60000, "observed_seq": 0, "save": {"v": "version"}},
		   {"op": "publish", "changes": [{"key": "d"}]},
		   {"op": "check", "key": "k", "version": "$v", "expect": {"freshness": "FRESH"}}]`,
			`step 2 \(check\).*expected "FRESH", got "STALE"`},
		{`[{"op": "stats", "expect_error": "ABORTED"}]`, `expected ABORTED, got success`},
		{`[{"op": "inspect", "key": "nothing"}]`, `failed with NOT_FOUND`},
		{`[{"op": "check", "key": "k", "version": "$nope"}]`, `variable \$nope is not set`},
	}
	for _, c := range cases {
		r := newRunner(client)
		err := r.run(parse(c.steps))
		r.close()
		if err == nil || !regexp.MustCompile(c.want).MatchString(err.Error()) {
			t.Errorf("want an error matching %q, got %v", c.want, err)
		}
	}
}
