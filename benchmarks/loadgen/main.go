// Command loadgen drives Resolve calls at a broker for benchmarks/suite.py's workers benchmark
// (--go-loadgen): a lean client so that less of a 2-core machine goes to generating load. It
// sends pre-encoded ResolveRequest bytes (a raw codec, no generated stubs) for users user-0..N-1
// of upstream "bench" over several connections, so SO_REUSEPORT spreads them across workers,
// and prints "<calls/s> calls/s errors <n>".
package main

import (
	"context"
	"flag"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/metadata"
)

type raw struct{}

func (raw) Marshal(v any) ([]byte, error)   { return *(v.(*[]byte)), nil }
func (raw) Unmarshal(d []byte, v any) error { *(v.(*[]byte)) = append([]byte(nil), d...); return nil }
func (raw) Name() string                    { return "proto" }

// field is one length-delimited protobuf field (values shorter than 128 bytes).
func field(n int, s string) []byte { return append([]byte{byte(n<<3 | 2), byte(len(s))}, s...) }

func main() {
	target := flag.String("target", "", "")
	conns := flag.Int("conns", 16, "")
	conc := flag.Int("c", 64, "")
	users := flag.Int("users", 1000, "")
	secs := flag.Float64("seconds", 5, "")
	flag.Parse()
	encoding.RegisterCodec(raw{})
	var cs []*grpc.ClientConn
	for i := 0; i < *conns; i++ {
		c, err := grpc.NewClient(*target, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			panic(err)
		}
		cs = append(cs, c)
	}
	reqs := make([][]byte, *users)
	for i := range reqs {
		reqs[i] = append(field(1, fmt.Sprintf("user-%d", i)), field(2, "bench")...)
	}
	ctx := metadata.AppendToOutgoingContext(context.Background(), "x-credential-broker-request", "true")
	var n, errs int64
	deadline := time.Now().Add(time.Duration(*secs * float64(time.Second)))
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < *conc; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			c := cs[w%len(cs)]
			i := w
			for time.Now().Before(deadline) {
				in := reqs[i%len(reqs)]
				var out []byte
				if err := c.Invoke(ctx, "/credentialbroker.v1.CredentialBroker/Resolve", &in, &out); err != nil {
					atomic.AddInt64(&errs, 1)
				} else {
					atomic.AddInt64(&n, 1)
				}
				i += *conc
			}
		}(w)
	}
	wg.Wait()
	fmt.Printf("%.0f calls/s errors %d\n", float64(n)/time.Since(start).Seconds(), errs)
}
