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
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// roundRobin asks grpc-go for a subchannel per address and a pick per call,
// instead of pick_first's single connection.
const roundRobin = `{"loadBalancingConfig": [{"round_robin": {}}]}`

const getItem = "/lab.v1.Backend/GetItem"

func main() {
	etcdEndpoints := flag.String("etcd", "http://127.0.0.1:2379", "etcd client endpoints, comma-separated")
	target := flag.String("target", "etcd:///lab/services/backend", "gRPC target: etcd:///<prefix without its trailing slash>")
	// grpc-go sends the target's path (lab/services/backend) as :authority.
	// Rust's HTTP/2 server (the h2 crate, under tonic) refuses an authority
	// with a '/' in it (RST_STREAM PROTOCOL_ERROR), so name any host here.
	authority := flag.String("authority", "lab-backend", "the :authority sent to B (must not contain '/')")
	calls := flag.Int("calls", 100, "calls to make; 0 calls until SIGINT or SIGTERM")
	report := flag.Int("report", 0, "print one line per this many calls (0: one line at the end)")
	timeout := flag.Duration("timeout", 2*time.Second, "deadline of each call")
	ready := flag.Duration("ready-timeout", 10*time.Second, "how long to wait for a first B")
	idMax := flag.Int64("id-max", 100, "items asked for cycle through 1..id-max")
	flag.Parse()

	if err := run(*etcdEndpoints, *target, *authority, *calls, *report, *timeout, *ready, *idMax); err != nil {
		fmt.Fprintln(os.Stderr, "go-client:", err)
		os.Exit(1)
	}
}

func run(etcdEndpoints, target, authority string, calls, report int, timeout, ready time.Duration, idMax int64) error {
	etcd, err := clientv3.New(clientv3.Config{
		Endpoints:   strings.Split(etcdEndpoints, ","),
		DialTimeout: 5 * time.Second,
	})
	if err != nil {
		return fmt.Errorf("etcd client: %w", err)
	}
	defer etcd.Close()

	builder, err := resolver.NewBuilder(etcd)
	if err != nil {
		return fmt.Errorf("etcd resolver: %w", err)
	}
	conn, err := grpc.Dial(target,
		grpc.WithResolvers(builder),
		grpc.WithDefaultServiceConfig(roundRobin),
		grpc.WithAuthority(authority),
		grpc.WithInsecure(),
	)
	if err != nil {
		return fmt.Errorf("dial %s: %w", target, err)
	}
	defer conn.Close()
	if err := waitReady(conn, ready); err != nil {
		return err
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	out := json.NewEncoder(os.Stdout)
	window, total := newTally(), newTally()
	for i := 0; calls == 0 || i < calls; i++ {
		select {
		case <-stop:
			calls = i
		default:
		}
		if calls != 0 && i >= calls {
			break
		}
		servedBy, err := callGetItem(conn, int64(i)%idMax+1, timeout)
		window.add(servedBy, err)
		total.add(servedBy, err)
		if report > 0 && window.Calls == report {
			if err := out.Encode(window); err != nil {
				return err
			}
			window = newTally()
		}
	}
	total.Summary = true
	if err := out.Encode(total); err != nil {
		return err
	}
	if len(total.ServedBy) == 0 && total.Calls > 0 {
		return fmt.Errorf("none of %d calls succeeded", total.Calls)
	}
	return nil
}

// waitReady returns once round_robin has a connected B, so the first calls
// are not spent waiting for etcd and the first connection.
func waitReady(conn *grpc.ClientConn, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	for {
		state := conn.GetState()
		if state == connectivity.Ready {
			return nil
		}
		if !conn.WaitForStateChange(ctx, state) {
			return fmt.Errorf("no B became ready within %s (last state %s): is one registered in etcd?", limit, state)
		}
	}
}

// callGetItem sends lab.v1.GetItemRequest{id} and returns the reply's
// served_by, the instance id of the B that answered.
func callGetItem(conn *grpc.ClientConn, id int64, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
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
