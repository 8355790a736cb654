// Command go-client calls the lab's service B the way a Go service would:
// grpc-go finds every B through etcd's own resolver
// (go.etcd.io/etcd/clientv3/naming/resolver) and spreads calls over them with
// grpc-go's round_robin balancer. It prints, as JSON lines, which B served
// each window of calls, so you can watch a B appear, disappear or take all
// the traffic.
//
// It uses no generated code: the lab.v1 messages are two or three fields
// each, written and read with protowire (see README.md for why).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/clientv3/naming/resolver"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	gresolver "google.golang.org/grpc/resolver"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// roundRobin asks grpc-go for a subchannel per address and a pick per call,
// instead of pick_first's single connection.
const roundRobin = `{"loadBalancingConfig": [{"round_robin": {}}]}`

const getItem = "/lab.v1.Backend/GetItem"

// options are the command-line flags.
type options struct {
	etcd, target, authority string
	calls, report           int
	timeout, ready          time.Duration
	idMax                   int64
}

func main() {
	var o options
	flag.StringVar(&o.etcd, "etcd", "http://127.0.0.1:2379", "etcd client endpoints, comma-separated")
	// Ending the target with '/' (etcd:///lab/services/backend/) also keeps
	// out keys under sibling prefixes such as lab/services/backend-old/.
	flag.StringVar(&o.target, "target", "etcd:///lab/services/backend", "gRPC target: etcd:///<etcd.prefix>")
	// grpc-go sends the target's path (lab/services/backend) as :authority.
	// Rust's HTTP/2 server (the h2 crate, under tonic) refuses an authority
	// with a '/' in it (RST_STREAM PROTOCOL_ERROR), so name any host here.
	flag.StringVar(&o.authority, "authority", "lab-backend", "the :authority sent to B (must not contain '/')")
	flag.IntVar(&o.calls, "calls", 100, "calls to make; 0 calls until SIGINT or SIGTERM")
	flag.IntVar(&o.report, "report", 0, "print one line per this many calls (0: one line at the end)")
	flag.DurationVar(&o.timeout, "timeout", 2*time.Second, "deadline of each call")
	flag.DurationVar(&o.ready, "ready-timeout", 10*time.Second, "how long to wait for etcd and a first connected B")
	flag.Int64Var(&o.idMax, "id-max", 100, "items asked for cycle through 1..id-max")
	flag.Parse()
	if err := o.check(); err != nil {
		fmt.Fprintln(os.Stderr, "go-client:", err)
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "go-client:", err)
		os.Exit(1)
	}
}

func (o options) check() error {
	switch {
	case o.calls < 0:
		return fmt.Errorf("-calls must be 0 (until a signal) or more, got %d", o.calls)
	case o.report < 0:
		return fmt.Errorf("-report must be 0 (one line at the end) or more, got %d", o.report)
	case o.idMax < 1:
		return fmt.Errorf("-id-max must be at least 1, got %d", o.idMax)
	case o.timeout <= 0 || o.ready <= 0:
		return fmt.Errorf("-timeout and -ready-timeout must be positive, got %s and %s", o.timeout, o.ready)
	case strings.Contains(o.authority, "/"):
		return fmt.Errorf("-authority %q contains '/': B's HTTP/2 server resets such calls", o.authority)
	}
	return nil
}

func run(o options) error {
	// SIGINT or SIGTERM ends the run, with its summary.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	etcd, err := clientv3.New(clientv3.Config{
		Endpoints:   strings.Split(o.etcd, ","),
		DialTimeout: 5 * time.Second,
	})
	if err != nil {
		return fmt.Errorf("etcd client: %w", err)
	}
	defer etcd.Close()
	conn, err := connect(ctx, etcd, o)
	if err != nil {
		return err
	}
	total := newTally()
	if conn != nil {
		defer conn.Close()
		if total, err = callAll(ctx, conn, o); err != nil {
			return err
		}
	}
	total.Summary = true
	if err := json.NewEncoder(os.Stdout).Encode(total); err != nil {
		return err
	}
	if len(total.ServedBy) == 0 && total.Calls > 0 {
		return fmt.Errorf("none of %d calls succeeded", total.Calls)
	}
	return nil
}

// connect dials the target through etcd's resolver with round_robin and
// returns once a B is connected, all within -ready-timeout. A signal
// meanwhile returns no connection and no error: the run ends with no calls.
func connect(ctx context.Context, etcd *clientv3.Client, o options) (*grpc.ClientConn, error) {
	readyCtx, cancel := context.WithTimeout(ctx, o.ready)
	defer cancel()
	// etcd's resolver reads the registry inside grpc.Dial with no deadline,
	// so an etcd that does not answer would hang the dial: ask it first.
	err := checkRegistry(readyCtx, etcd, o)
	if err == nil {
		var builder gresolver.Builder
		if builder, err = resolver.NewBuilder(etcd); err != nil {
			return nil, fmt.Errorf("etcd resolver: %w", err)
		}
		var conn *grpc.ClientConn
		conn, err = grpc.Dial(o.target,
			grpc.WithResolvers(builder),
			grpc.WithDefaultServiceConfig(roundRobin),
			grpc.WithAuthority(o.authority),
			grpc.WithInsecure(),
		)
		if err != nil {
			return nil, fmt.Errorf("dial %s: %w", o.target, err)
		}
		if err = waitReady(readyCtx, conn); err == nil {
			return conn, nil
		}
		conn.Close()
	}
	if ctx.Err() != nil {
		return nil, nil // a signal, not a failure
	}
	return nil, err
}

// checkRegistry makes sure etcd answers and holds at least one key under the
// target's prefix (what follows etcd://[authority]/ in the target).
func checkRegistry(ctx context.Context, etcd *clientv3.Client, o options) error {
	prefix := o.target
	if i := strings.Index(prefix, "://"); i >= 0 {
		prefix = prefix[i+len("://"):]
		if j := strings.Index(prefix, "/"); j >= 0 {
			prefix = prefix[j+1:]
		}
	}
	answer, err := etcd.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return fmt.Errorf("reading %q from etcd at %s: %w", prefix, o.etcd, err)
	}
	if answer.Count == 0 {
		return fmt.Errorf("no B is registered under %q in etcd at %s", prefix, o.etcd)
	}
	return nil
}

// waitReady returns once round_robin has a connected B, so the first calls
// are not spent waiting for etcd and the first connection.
func waitReady(ctx context.Context, conn *grpc.ClientConn) error {
	for {
		state := conn.GetState()
		if state == connectivity.Ready {
			return nil
		}
		if !conn.WaitForStateChange(ctx, state) {
			return fmt.Errorf("no B became ready (last state %s): %w", state, ctx.Err())
		}
	}
}

// callAll calls GetItem -calls times (0: until a signal), printing a line
// every -report calls, and returns the tally of every call.
func callAll(ctx context.Context, conn *grpc.ClientConn, o options) (*tally, error) {
	out := json.NewEncoder(os.Stdout)
	window, total := newTally(), newTally()
	for i := 0; (o.calls == 0 || i < o.calls) && ctx.Err() == nil; i++ {
		servedBy, err := callGetItem(ctx, conn, int64(i)%o.idMax+1, o.timeout)
		if err != nil && ctx.Err() != nil {
			break // cut short by the signal: not B's failure
		}
		window.add(servedBy, err)
		total.add(servedBy, err)
		if o.report > 0 && window.Calls == o.report {
			if err := out.Encode(window); err != nil {
				return nil, err
			}
			window = newTally()
		}
	}
	return total, nil
}

// callGetItem sends lab.v1.GetItemRequest{id} and returns the reply's
// served_by, the instance id of the B that answered.
func callGetItem(ctx context.Context, conn *grpc.ClientConn, id int64, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	request := protowire.AppendTag(nil, 1, protowire.VarintType)
	request = protowire.AppendVarint(request, uint64(id))
	var reply []byte
	if err := conn.Invoke(ctx, getItem, request, &reply, grpc.ForceCodec(rawCodec{})); err != nil {
		return "", err
	}
	return stringField(reply, 2)
}

// stringField finds field `number` (a string) in an encoded message.
func stringField(message []byte, number protowire.Number) (string, error) {
	for len(message) > 0 {
		num, typ, n := protowire.ConsumeTag(message)
		if n < 0 {
			return "", protowire.ParseError(n)
		}
		message = message[n:]
		if num == number && typ == protowire.BytesType {
			value, n := protowire.ConsumeBytes(message)
			if n < 0 {
				return "", protowire.ParseError(n)
			}
			return string(value), nil
		}
		n = protowire.ConsumeFieldValue(num, typ, message)
		if n < 0 {
			return "", protowire.ParseError(n)
		}
		message = message[n:]
	}
	return "", errors.New("the reply has no served_by")
}

// rawCodec passes already-encoded protobuf bytes through. Its name is
// "proto", so the call's content-type is application/grpc+proto as with
// generated stubs.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	b, ok := v.([]byte)
	if !ok {
		return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
	}
	return b, nil
}

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

// tally is one printed line: calls, successes by the B that served them, and
// failures by gRPC status code.
type tally struct {
	Summary  bool           `json:"summary,omitempty"`
	Calls    int            `json:"calls"`
	ServedBy map[string]int `json:"served_by"`
	Errors   map[string]int `json:"errors"`
}

func newTally() *tally {
	return &tally{ServedBy: map[string]int{}, Errors: map[string]int{}}
}

func (t *tally) add(servedBy string, err error) {
	t.Calls++
	if err != nil {
		t.Errors[status.Code(err).String()]++
		return
	}
	t.ServedBy[servedBy]++
}
