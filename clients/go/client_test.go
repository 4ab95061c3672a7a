package credentialbroker

// These tests need a real broker and authorization server: tests/sdk/test_go_client.py starts
// them and runs `go test` with CB_TEST_* set. Without that environment they skip.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	cbv1 "credentialbroker/internal/gen/credentialbroker/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

type env struct {
	targetA, targetB, targetC string
	configC, python, logDir   string
	upstream, revokedUser     string
	// D (started by a test) and E share a store that keeps one connection event.
	targetD, configD, targetE string
	// F verifies user tokens (an identity: config); a token for each of two users.
	targetIdentity, identityUser, identityToken, otherUser, otherToken string
	// G (started by a test) has a store of its own and an authorization server whose access
	// tokens are valid for shortTTL seconds, which it does not refresh before they expire.
	targetG, configG, shortTTL string
}

func testEnv(t *testing.T) env {
	t.Helper()
	e := env{
		targetA: os.Getenv("CB_TEST_TARGET_A"), targetB: os.Getenv("CB_TEST_TARGET_B"),
		targetC: os.Getenv("CB_TEST_TARGET_C"), configC: os.Getenv("CB_TEST_CONFIG_C"),
		python: os.Getenv("CB_TEST_PYTHON"), logDir: os.Getenv("CB_TEST_LOG_DIR"),
		upstream: os.Getenv("CB_TEST_UPSTREAM"), revokedUser: os.Getenv("CB_TEST_REVOKED_USER"),
		targetD: os.Getenv("CB_TEST_TARGET_D"), configD: os.Getenv("CB_TEST_CONFIG_D"),
		targetE:        os.Getenv("CB_TEST_TARGET_E"),
		targetIdentity: os.Getenv("CB_TEST_TARGET_IDENTITY"), identityUser: os.Getenv("CB_TEST_IDENTITY_USER"),
		identityToken: os.Getenv("CB_TEST_IDENTITY_TOKEN"), otherUser: os.Getenv("CB_TEST_IDENTITY_OTHER_USER"),
		otherToken: os.Getenv("CB_TEST_IDENTITY_OTHER_TOKEN"),
		targetG:    os.Getenv("CB_TEST_TARGET_G"), configG: os.Getenv("CB_TEST_CONFIG_G"),
		shortTTL: os.Getenv("CB_TEST_SHORT_TTL"),
	}
	if e.targetA == "" {
		t.Skip("run through tests/sdk/test_go_client.py (needs a live broker)")
	}
	return e
}

func newClient(t *testing.T, target string, opts ...Option) *Client {
	t.Helper()
	c, err := New(target, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func uniqueUser(prefix string) string { return fmt.Sprintf("%s-%d", prefix, time.Now().UnixNano()) }

// authorize plays the user agent at the test authorization server: the callback's query.
func authorize(t *testing.T, authURL, user string, deny bool) url.Values {
	t.Helper()
	u, err := url.Parse(authURL)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set("login_hint_user", user)
	if deny {
		q.Set("test_deny", "1")
	}
	u.RawQuery = q.Encode()
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noRedirect.Get(u.String())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusFound {
		t.Fatalf("authorize: HTTP %d", resp.StatusCode)
	}
	loc, err := url.Parse(resp.Header.Get("Location"))
	if err != nil {
		t.Fatal(err)
	}
	return loc.Query()
}

func connect(t *testing.T, c *Client, user, upstream string) *CredentialInfo {
	t.Helper()
	return connectWith(t, ctx(t), c, user, upstream)
}

// connectWith connects with the calls made in cctx (which may carry a user token).
func connectWith(t *testing.T, cctx context.Context, c *Client, user, upstream string) *CredentialInfo {
	t.Helper()
	started, err := c.BuildAuthorizationURL(cctx, user, upstream, nil)
	if err != nil {
		t.Fatal(err)
	}
	cb := authorize(t, started.AuthorizationURL, user, false)
	info, err := c.Complete(cctx, CompleteRequest{State: cb.Get("state"), Code: cb.Get("code"), UserID: user})
	if err != nil {
		t.Fatal(err)
	}
	return info
}

func eventually(t *testing.T, what string, timeout time.Duration, check func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !check() {
		if time.Since(start) > timeout {
			t.Fatalf("%s: not within %s", what, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

func TestEveryRPC(t *testing.T) {
	e := testEnv(t)
	c := newClient(t, e.targetA)
	user := uniqueUser("go-every")
	info := connect(t, c, user, e.upstream)
	if info.UserID != user || info.Upstream != e.upstream {
		t.Fatalf("complete: %+v", info)
	}
	cred, err := c.Resolve(ctx(t), user, e.upstream, MinValid(120))
	if err != nil {
		t.Fatal(err)
	}
	if cred.HeaderName != "Authorization" || cred.HeaderValue != "Bearer "+cred.AccessToken || cred.ExpiresAt.IsZero() {
		t.Fatalf("resolve: %v", cred)
	}
	if strings.Contains(fmt.Sprintf("%v %+v %#v %s", cred, cred, cred, cred), cred.AccessToken) {
		t.Fatal("a credential prints its token")
	}
	if _, err := c.Refresh(ctx(t), user, e.upstream); err != nil {
		t.Fatal(err)
	}
	again, err := c.Resolve(ctx(t), user, e.upstream)
	if err != nil || again.AccessToken == cred.AccessToken {
		t.Fatalf("resolve after refresh: same token or %v", err)
	}
	conns, err := c.ListConnections(ctx(t), user)
	if err != nil || len(conns) != 1 || conns[0].Status != "connected" || conns[0].Mode != "oauth_connect" {
		t.Fatalf("list: %+v %v", conns, err)
	}
	started, err := c.BuildAuthorizationURL(ctx(t), user+"-b", e.upstream, nil)
	if err != nil {
		t.Fatal(err)
	}
	denied := authorize(t, started.AuthorizationURL, user+"-b", true)
	if err := c.Deny(ctx(t), denied.Get("state"), denied.Get("error"), ""); err != nil {
		t.Fatal(err)
	}
	var gone *FlowNotFoundError
	if _, err := c.Complete(ctx(t), CompleteRequest{State: started.State, Code: "x", UserID: user + "-b"}); !errors.As(err, &gone) {
		t.Fatalf("complete after deny: %v", err)
	}
	d, err := c.Disconnect(ctx(t), user, e.upstream)
	if err != nil || !d.Deleted {
		t.Fatalf("disconnect: %+v %v", d, err)
	}
	zero := uint64(0)
	var kinds []string
	for ev, err := range c.Watch(ctx(t), WatchRequest{UserID: user, AfterSequence: &zero}) {
		if err != nil {
			t.Fatal(err)
		}
		kinds = append(kinds, ev.Kind)
		if len(kinds) == 3 {
			break
		}
	}
	if strings.Join(kinds, ",") != "CONNECTED,REFRESHED,DISCONNECTED" {
		t.Fatalf("watch: %v", kinds)
	}
}

func TestDisconnectAll(t *testing.T) {
	e := testEnv(t)
	c := newClient(t, e.targetA)
	user := uniqueUser("go-all")
	connect(t, c, user, e.upstream)
	results, err := c.DisconnectAll(ctx(t), user)
	if err != nil {
		t.Fatal(err)
	}
	if len(results) != 1 || results[0].Upstream != e.upstream || !results[0].Deleted {
		t.Fatalf("disconnect all: %+v", results)
	}
	var nc *NotConnectedError
	if _, err := c.Resolve(ctx(t), user, e.upstream); !errors.As(err, &nc) {
		t.Fatalf("after disconnect all: %v", err)
	}
}

func TestConnectRequiredErrorsCarryTheAuthorizationURL(t *testing.T) {
	e := testEnv(t)
	c := newClient(t, e.targetA)
	_, err := c.Resolve(ctx(t), uniqueUser("go-new"), e.upstream)
	var nc *NotConnectedError
	if !errors.As(err, &nc) || !strings.HasPrefix(nc.AuthorizationURL, "http://127.0.0.1:") || nc.Upstream != e.upstream {
		t.Fatalf("want *NotConnectedError with a URL, got %v", err)
	}
	var base *BrokerError
	if !errors.As(err, &base) || base.Reason != "NOT_CONNECTED" || base.Metadata["authorization_url"] != nc.AuthorizationURL {
		t.Fatalf("want the BrokerError underneath: %v", err)
	}
	_, err = c.Refresh(ctx(t), e.revokedUser, e.upstream)
	var rr *ReconnectRequiredError
	if !errors.As(err, &rr) || !strings.HasPrefix(rr.AuthorizationURL, "http://127.0.0.1:") {
		t.Fatalf("want *ReconnectRequiredError with a URL, got %v", err)
	}
}

func TestInsufficientScope(t *testing.T) {
	e := testEnv(t)
	c := newClient(t, e.targetA)
	user := uniqueUser("go-scope")
	connect(t, c, user, e.upstream)
	if _, err := c.Resolve(ctx(t), user, e.upstream, RequiredScopes("repo")); err != nil {
		t.Fatal(err)
	}
	_, err := c.Resolve(ctx(t), user, e.upstream, RequiredScopes("repo", "admin:org"))
	var is *InsufficientScopeError
	if !errors.As(err, &is) || strings.Join(is.MissingScopes, " ") != "admin:org" || !strings.HasPrefix(is.AuthorizationURL, "http://127.0.0.1:") {
		t.Fatalf("want *InsufficientScopeError missing admin:org, got %v", err)
	}
}

func TestOtherErrorsAreTyped(t *testing.T) {
	e := testEnv(t)
	c := newClient(t, e.targetA)
	var unknown *UnknownUpstreamError
	if _, err := c.Resolve(ctx(t), "alice", "nope"); !errors.As(err, &unknown) {
		t.Fatalf("want *UnknownUpstreamError, got %v", err)
	}
	var invalid *InvalidArgumentError
	if _, err := c.Resolve(ctx(t), "alice", "bad upstream!"); !errors.As(err, &invalid) {
		t.Fatalf("want *InvalidArgumentError, got %v", err)
	}
	started, err := c.BuildAuthorizationURL(ctx(t), "go-victim", e.upstream, nil)
	if err != nil {
		t.Fatal(err)
	}
	cb := authorize(t, started.AuthorizationURL, "go-victim", false)
	var denied *PermissionDeniedError
	if _, err := c.Complete(ctx(t), CompleteRequest{State: cb.Get("state"), Code: cb.Get("code"), UserID: "mallory"}); !errors.As(err, &denied) {
		t.Fatalf("want *PermissionDeniedError, got %v", err)
	}
}

func TestOnlyUnavailableIsRetried(t *testing.T) {
	e := testEnv(t)
	closed := httptest.NewServer(http.NotFoundHandler())
	addr := strings.TrimPrefix(closed.URL, "http://")
	closed.Close() // nothing listens there now
	c := newClient(t, addr)
	cctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := c.Resolve(cctx, "alice", e.upstream)
	var un *UnavailableError
	if !errors.As(err, &un) {
		t.Fatalf("want *UnavailableError, got %v", err)
	}
	if took := time.Since(start); took < 300*time.Millisecond || took > 3*time.Second {
		t.Fatalf("retried for %s; want until about the 1.5 s deadline", took)
	}
	a := newClient(t, e.targetA)
	start = time.Now()
	var nc *NotConnectedError
	if _, err := a.Resolve(ctx(t), uniqueUser("go-once"), e.upstream); !errors.As(err, &nc) {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("a refusal took %s: retried?", took)
	}
}

type brokerProc struct {
	cmd *exec.Cmd
	log *os.File
}

func startBroker(t *testing.T, e env, name string) *brokerProc {
	t.Helper()
	return startBrokerFrom(t, e, name, e.configC, e.targetC)
}

// startBrokerFrom starts `broker serve --config config` and waits until target answers.
func startBrokerFrom(t *testing.T, e env, name, config, target string) *brokerProc {
	t.Helper()
	log, err := os.Create(filepath.Join(e.logDir, name+".log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(e.python, "-m", "broker", "serve", "--config", config)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &brokerProc{cmd, log}
	t.Cleanup(p.stop)
	probe := newClient(t, target)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := probe.ListConnections(ctx(t), "probe"); err == nil {
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("broker %s did not start", name)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (p *brokerProc) stop() {
	if p.cmd.ProcessState == nil {
		_ = p.cmd.Process.Kill()
		_ = p.cmd.Wait()
	}
	_ = p.log.Close()
}

func TestUnavailableIsRetriedWhileTheBrokerRestarts(t *testing.T) {
	e := testEnv(t)
	first := startBroker(t, e, "restart-1")
	c := newClient(t, e.targetC)
	user := uniqueUser("go-restart")
	connect(t, c, user, e.upstream)
	before, err := c.Resolve(ctx(t), user, e.upstream)
	if err != nil {
		t.Fatal(err)
	}
	first.stop()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		time.Sleep(time.Second)
		startBroker(t, e, "restart-2")
	}()
	start := time.Now()
	cctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	after, err := c.Resolve(cctx, user, e.upstream)
	wg.Wait()
	if err != nil {
		t.Fatalf("resolve across the restart: %v", err)
	}
	if time.Since(start) < 900*time.Millisecond || after.AccessToken != before.AccessToken {
		t.Fatal("the answer did not come from the restarted broker")
	}
}

func TestCacheHitsAndInvalidationFromAnotherReplica(t *testing.T) {
	e := testEnv(t)
	c := newClient(t, e.targetA, WithCache(0))
	other := newClient(t, e.targetB)
	eventually(t, "cache live", 10*time.Second, func() bool { return c.CacheStats().Live })
	user := uniqueUser("go-cache")
	connect(t, other, user, e.upstream)
	eventually(t, "CONNECTED seen", 5*time.Second, func() bool { _, ok := c.LastSequence(); return ok })
	first, err := c.Resolve(ctx(t), user, e.upstream)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		hit, err := c.Resolve(ctx(t), user, e.upstream, MinValid(60))
		if err != nil || hit != first {
			t.Fatalf("not served from the cache: %v", err)
		}
	}
	if c.CacheStats().Hits != 20 {
		t.Fatalf("hits %d", c.CacheStats().Hits)
	}
	if _, err := other.Refresh(ctx(t), user, e.upstream); err != nil {
		t.Fatal(err)
	}
	eventually(t, "refresh honoured", 5*time.Second, func() bool {
		got, err := c.Resolve(ctx(t), user, e.upstream)
		return err == nil && got.AccessToken != first.AccessToken
	})
	if _, err := other.Disconnect(ctx(t), user, e.upstream); err != nil {
		t.Fatal(err)
	}
	took := eventually(t, "disconnect honoured", 2*time.Second, func() bool {
		_, err := c.Resolve(ctx(t), user, e.upstream)
		var nc *NotConnectedError
		return errors.As(err, &nc)
	})
	t.Logf("disconnect honoured from the cache after %s", took)
}

func TestCacheDroppedWhenTheStreamBreaksAndResumed(t *testing.T) {
	e := testEnv(t)
	first := startBroker(t, e, "stream-1")
	c := newClient(t, e.targetC, WithCache(0))
	other := newClient(t, e.targetA)
	eventually(t, "cache live", 10*time.Second, func() bool { return c.CacheStats().Live })
	user := uniqueUser("go-stream")
	connect(t, other, user, e.upstream)
	eventually(t, "CONNECTED seen", 5*time.Second, func() bool { _, ok := c.LastSequence(); return ok })
	seen, _ := c.LastSequence()
	cached, err := c.Resolve(ctx(t), user, e.upstream)
	if err != nil || c.CacheStats().Entries != 1 {
		t.Fatalf("not cached: %v", err)
	}
	first.stop()
	eventually(t, "cache dropped", 5*time.Second, func() bool { s := c.CacheStats(); return !s.Live && s.Entries == 0 })
	if _, err := other.Refresh(ctx(t), user, e.upstream); err != nil { // while nobody listens
		t.Fatal(err)
	}
	startBroker(t, e, "stream-2")
	eventually(t, "resubscribed", 20*time.Second, func() bool { return c.CacheStats().Live })
	eventually(t, "missed REFRESHED replayed", 5*time.Second, func() bool { s, _ := c.LastSequence(); return s > seen })
	fresh, err := c.Resolve(ctx(t), user, e.upstream)
	if err != nil || fresh.AccessToken == cached.AccessToken {
		t.Fatalf("stale after the stream came back: %v", err)
	}
}

// The store behind D and E keeps one connection event (events.max_events 1, reaped every
// 0.2 s). The cached client's broker D dies; meanwhile E replaces the user's token and newer
// events push the client's resume point out of the store. Back up, D refuses the client's
// after_sequence with WATCH_RESYNC_REQUIRED (OUT_OF_RANGE): the client forgets it, watches
// from now on, serves nothing it held before (no stale token) and caches and invalidates again.
func TestCacheResyncsWhenTheBrokerNoLongerKeepsItsResumePoint(t *testing.T) {
	e := testEnv(t)
	if e.targetD == "" || e.targetE == "" {
		t.Fatal("CB_TEST_TARGET_D / CB_TEST_TARGET_E not set")
	}
	first := startBrokerFrom(t, e, "resync-1", e.configD, e.targetD)
	c := newClient(t, e.targetD, WithCache(0))
	other := newClient(t, e.targetE)
	eventually(t, "cache live", 10*time.Second, func() bool { return c.CacheStats().Live })
	user := uniqueUser("go-resync")
	connect(t, other, user, e.upstream)
	eventually(t, "CONNECTED seen", 5*time.Second, func() bool { _, ok := c.LastSequence(); return ok })
	old, _ := c.LastSequence()
	cached, err := c.Resolve(ctx(t), user, e.upstream)
	if err != nil || c.CacheStats().Entries != 1 {
		t.Fatalf("not cached: %v", err)
	}

	first.stop()
	eventually(t, "stream down", 5*time.Second, func() bool { return !c.CacheStats().Live })
	if _, err := other.Refresh(ctx(t), user, e.upstream); err != nil { // while nobody listens
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		connect(t, other, uniqueUser("go-resync-more"), e.upstream)
	}
	// The resume point is really gone: a watch from it is refused, typed.
	eventually(t, "resume point reaped", 10*time.Second, func() bool {
		wctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		for _, err := range other.Watch(wctx, WatchRequest{AfterSequence: &old}) {
			var resync *ResyncRequiredError
			return errors.As(err, &resync) && resync.Reason == "WATCH_RESYNC_REQUIRED"
		}
		return false
	})

	startBrokerFrom(t, e, "resync-2", e.configD, e.targetD)
	eventually(t, "resubscribed from now on", 20*time.Second, func() bool {
		_, resuming := c.LastSequence()
		return !resuming && c.CacheStats().Live
	})
	if s := c.CacheStats(); s.Entries != 0 {
		t.Fatalf("%d entries survived the resync", s.Entries)
	}
	fresh, err := c.Resolve(ctx(t), user, e.upstream)
	if err != nil || fresh.AccessToken == cached.AccessToken {
		t.Fatalf("stale token after the resync: %v", err)
	}
	hits := c.CacheStats().Hits
	if hit, err := c.Resolve(ctx(t), user, e.upstream); err != nil || hit != fresh || c.CacheStats().Hits != hits+1 {
		t.Fatalf("not served from the cache after the resync: %v", err)
	}
	// Events flow on the new subscription and still invalidate.
	if _, err := other.Refresh(ctx(t), user, e.upstream); err != nil {
		t.Fatal(err)
	}
	eventually(t, "refresh after the resync honoured", 5*time.Second, func() bool {
		got, err := c.Resolve(ctx(t), user, e.upstream)
		return err == nil && got.AccessToken != fresh.AccessToken
	})
	if seq, ok := c.LastSequence(); !ok || seq <= old {
		t.Fatalf("no event after the resync (last %d, %v; before %d)", seq, ok, old)
	}
}

// eventsApplied returns once the cached client c has applied every connection event made so far
// on target's store: it connects a marker user there and waits until c's stream has reached the
// marker's CONNECTED. Events arrive in order and each is applied before the next is read, so no
// earlier event (a CONNECTED drops its user's entry) can still remove what the test caches next.
func eventsApplied(t *testing.T, c *Client, target, upstream string) {
	t.Helper()
	other := newClient(t, target)
	marker := uniqueUser("go-marker")
	connect(t, other, marker, upstream)
	zero := uint64(0)
	var at uint64
	for ev, err := range other.Watch(ctx(t), WatchRequest{UserID: marker, AfterSequence: &zero}) {
		if err != nil {
			t.Fatal(err)
		}
		at = ev.Sequence
		break
	}
	eventually(t, "the marker's CONNECTED seen", 10*time.Second, func() bool {
		seen, ok := c.LastSequence()
		return ok && seen >= at
	})
}

// resolveCounted resolves through the cached client c: the credential, and whether it was
// served from memory (a cache hit) rather than by an RPC to the broker.
func resolveCounted(t *testing.T, c *Client, user, upstream string, opts ...ResolveOption) (*Credential, bool, error) {
	t.Helper()
	before := c.CacheStats().Hits
	cred, err := c.Resolve(ctx(t), user, upstream, opts...)
	return cred, c.CacheStats().Hits == before+1, err
}

// With WithCache(2), resolving a third user evicts the least recently used entry: resolving
// that user again is an RPC, while the two others are still answered from memory.
func TestCacheIsABoundedLRU(t *testing.T) {
	e := testEnv(t)
	c := newClient(t, e.targetA, WithCache(2))
	eventually(t, "cache live", 10*time.Second, func() bool { return c.CacheStats().Live })
	other := newClient(t, e.targetA)
	u1, u2, u3 := uniqueUser("go-lru-1"), uniqueUser("go-lru-2"), uniqueUser("go-lru-3")
	for _, user := range []string{u1, u2, u3} {
		connect(t, other, user, e.upstream)
	}
	eventsApplied(t, c, e.targetA, e.upstream)
	cached := map[string]*Credential{}
	// u1 is used again after u2, so u2 is the least recently used when u3 arrives.
	for i, user := range []string{u1, u2, u1, u3} {
		cred, hit, err := resolveCounted(t, c, user, e.upstream)
		if err != nil {
			t.Fatal(err)
		}
		if hit != (i == 2) {
			t.Fatalf("resolve %d (%s): hit %v; want a hit only for u1's second resolve", i, user, hit)
		}
		cached[user] = cred
	}
	if n := c.CacheStats().Entries; n != 2 {
		t.Fatalf("%d entries with WithCache(2)", n)
	}
	for _, user := range []string{u1, u3} {
		if cred, hit, err := resolveCounted(t, c, user, e.upstream); err != nil || !hit || cred != cached[user] {
			t.Fatalf("%s, used more recently than u2, was not served from memory (hit %v): %v", user, hit, err)
		}
	}
	if cred, hit, err := resolveCounted(t, c, u2, e.upstream); err != nil || hit || cred == cached[u2] {
		t.Fatalf("u2, the least recently used, was not evicted (hit %v): %v", hit, err)
	}
}

// A cached credential serves a call only when it holds every scope the call requires; a call
// requiring a scope it lacks goes to the broker (which answers INSUFFICIENT_SCOPE).
func TestCacheServesOnlyTheScopesItHolds(t *testing.T) {
	e := testEnv(t)
	c := newClient(t, e.targetA, WithCache(0))
	eventually(t, "cache live", 10*time.Second, func() bool { return c.CacheStats().Live })
	user := uniqueUser("go-cache-scope")
	connect(t, newClient(t, e.targetA), user, e.upstream)
	eventsApplied(t, c, e.targetA, e.upstream)
	cached, hit, err := resolveCounted(t, c, user, e.upstream)
	if err != nil || hit {
		t.Fatalf("first resolve: hit %v, %v", hit, err)
	}
	if !slices.Contains(cached.Scopes, "repo") || !slices.Contains(cached.Scopes, "read:user") || slices.Contains(cached.Scopes, "admin:org") {
		t.Fatalf("scopes %v; want repo and read:user, not admin:org", cached.Scopes)
	}
	for _, scopes := range [][]string{{"repo"}, {"read:user", "repo"}} {
		if got, hit, err := resolveCounted(t, c, user, e.upstream, RequiredScopes(scopes...)); err != nil || !hit || got != cached {
			t.Fatalf("requiring %v, which the credential holds: not served from memory (hit %v): %v", scopes, hit, err)
		}
	}
	_, hit, err = resolveCounted(t, c, user, e.upstream, RequiredScopes("repo", "admin:org"))
	var is *InsufficientScopeError
	if hit || !errors.As(err, &is) || strings.Join(is.MissingScopes, " ") != "admin:org" {
		t.Fatalf("requiring admin:org, which the credential lacks: want the broker's *InsufficientScopeError, got hit %v, %v", hit, err)
	}
	if got, hit, err := resolveCounted(t, c, user, e.upstream, RequiredScopes("repo")); err != nil || !hit || got != cached {
		t.Fatalf("the entry did not survive a call it could not serve (hit %v): %v", hit, err)
	}
}

// A cached credential serves a call only while it stays valid at least max(MinValid, 30) more
// seconds: a call asking for more than its remaining lifetime goes to the broker, and a
// credential with under 30 s left (broker G's tokens live CB_TEST_SHORT_TTL seconds) is never
// served from memory, though it is kept.
func TestCacheServesOnlyWhatStaysValidLongEnough(t *testing.T) {
	e := testEnv(t)
	if e.targetG == "" || e.configG == "" || e.shortTTL == "" {
		t.Fatal("CB_TEST_TARGET_G / CB_TEST_CONFIG_G / CB_TEST_SHORT_TTL not set")
	}
	c := newClient(t, e.targetA, WithCache(0))
	eventually(t, "cache live", 10*time.Second, func() bool { return c.CacheStats().Live })
	user := uniqueUser("go-cache-valid")
	connect(t, newClient(t, e.targetA), user, e.upstream)
	eventsApplied(t, c, e.targetA, e.upstream)
	cached, hit, err := resolveCounted(t, c, user, e.upstream)
	if err != nil || hit {
		t.Fatalf("first resolve: hit %v, %v", hit, err)
	}
	remaining := int(time.Until(cached.ExpiresAt).Seconds())
	if remaining < 600 {
		t.Fatalf("the token has %d s left; want a long-lived one", remaining)
	}
	if got, hit, err := resolveCounted(t, c, user, e.upstream, MinValid(uint32(remaining-60))); err != nil || !hit || got != cached {
		t.Fatalf("MinValid within the remaining lifetime: not served from memory (hit %v): %v", hit, err)
	}
	if got, hit, err := resolveCounted(t, c, user, e.upstream, MinValid(uint32(remaining+60))); err != nil || hit || got == cached {
		t.Fatalf("MinValid beyond the remaining lifetime was served from memory (hit %v): %v", hit, err)
	}

	startBrokerFrom(t, e, "short-lived", e.configG, e.targetG)
	g := newClient(t, e.targetG, WithCache(0))
	eventually(t, "cache live", 10*time.Second, func() bool { return g.CacheStats().Live })
	short := uniqueUser("go-cache-short")
	connect(t, newClient(t, e.targetG), short, e.upstream)
	eventsApplied(t, g, e.targetG, e.upstream)
	var tokens []string
	for i := 0; i < 3; i++ {
		cred, hit, err := resolveCounted(t, g, short, e.upstream)
		if err != nil {
			t.Fatal(err)
		}
		if left := time.Until(cred.ExpiresAt); left <= 0 || left >= MinValidSeconds*time.Second {
			t.Fatalf("the token has %s left; want under %d s (CB_TEST_SHORT_TTL %s)", left, MinValidSeconds, e.shortTTL)
		}
		if hit {
			t.Fatalf("resolve %d: a credential with under %d s left was served from memory", i, MinValidSeconds)
		}
		tokens = append(tokens, cred.AccessToken)
	}
	// Unless the broker replaced the token meanwhile (a very slow run), it was kept, not served.
	if tokens[0] == tokens[1] && tokens[1] == tokens[2] {
		if n := g.CacheStats().Entries; n != 1 {
			t.Fatalf("%d entries: the short-lived credential was not kept", n)
		}
	}
}

// upstreamAPI refuses the first token it sees (or every token) with 401.
type upstreamAPI struct {
	mu        sync.Mutex
	seen      []string
	bodies    []string
	refused   string
	refuseAll bool
}

func (a *upstreamAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	a.mu.Lock()
	defer a.mu.Unlock()
	auth := r.Header.Get("Authorization")
	a.seen = append(a.seen, auth)
	a.bodies = append(a.bodies, string(body))
	if a.refused == "" {
		a.refused = auth
	}
	if a.refuseAll || auth == "" || auth == a.refused {
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	_, _ = w.Write([]byte(`{"ok":true}`))
}

func TestRoundTripperRetriesOne401WithARefreshedToken(t *testing.T) {
	e := testEnv(t)
	c := newClient(t, e.targetA, WithCache(0))
	user := uniqueUser("go-401")
	connect(t, c, user, e.upstream)
	api := &upstreamAPI{}
	srv := httptest.NewServer(api)
	defer srv.Close()
	hc := &http.Client{Transport: &Transport{Client: c, UserID: user, Upstream: e.upstream}}
	resp, err := hc.Post(srv.URL, "text/plain", strings.NewReader("payload"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || len(api.seen) != 2 || api.seen[0] == api.seen[1] {
		t.Fatalf("status %d after %d requests (a new token on the retry: %v)", resp.StatusCode, len(api.seen), len(api.seen) == 2 && api.seen[0] != api.seen[1])
	}
	if api.bodies[0] != "payload" || api.bodies[1] != "payload" {
		t.Fatal("the body was not replayed")
	}
}

func TestRoundTripperReturnsASecond401(t *testing.T) {
	e := testEnv(t)
	c := newClient(t, e.targetA)
	user := uniqueUser("go-401x")
	connect(t, c, user, e.upstream)
	api := &upstreamAPI{refuseAll: true}
	srv := httptest.NewServer(api)
	defer srv.Close()
	hc := &http.Client{Transport: &Transport{Client: c, UserID: user, Upstream: e.upstream}}
	resp, err := hc.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized || len(api.seen) != 2 {
		t.Fatalf("status %d after %d requests; want 401 after exactly 2", resp.StatusCode, len(api.seen))
	}
	// The refused token never shows in an error: an unknown upstream's error text.
	_, err = hc.Get(srv.URL + "/x")
	if err != nil {
		t.Fatal(err)
	}
	bad := &http.Client{Transport: &Transport{Client: c, UserID: user, Upstream: "nope"}}
	_, err = bad.Get(srv.URL)
	var unknown *UnknownUpstreamError
	if !errors.As(err, &unknown) {
		t.Fatalf("want *UnknownUpstreamError through the transport, got %v", err)
	}
	for _, sent := range api.seen {
		if token := strings.TrimPrefix(sent, "Bearer "); token != "" && strings.Contains(err.Error(), token) {
			t.Fatal("a token in an error")
		}
	}
}

// refusingBroker accepts every WatchConnections stream, sends its headers and then refuses it.
type refusingBroker struct {
	cbv1.UnimplementedCredentialBrokerServer
	mu       sync.Mutex
	attempts int
}

func (b *refusingBroker) WatchConnections(_ *cbv1.WatchConnectionsRequest, stream grpc.ServerStreamingServer[cbv1.WatchConnectionsResponse]) error {
	b.mu.Lock()
	b.attempts++
	b.mu.Unlock()
	if err := stream.SendHeader(metadata.MD{}); err != nil {
		return err
	}
	return status.Error(codes.PermissionDenied, "refused after the headers")
}

// serve runs broker on a loopback gRPC server for the test; its address.
func serve(t *testing.T, broker cbv1.CredentialBrokerServer) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	cbv1.RegisterCredentialBrokerServer(server, broker)
	go func() { _ = server.Serve(lis) }()
	t.Cleanup(server.Stop)
	return lis.Addr().String()
}

func TestAWatchRefusedRightAfterItsHeadersBacksOff(t *testing.T) {
	broker := &refusingBroker{}
	newClient(t, serve(t, broker), WithCache(0))
	time.Sleep(3 * time.Second)
	broker.mu.Lock()
	attempts := broker.attempts
	broker.mu.Unlock()
	// Backing off (12-50 ms, then doubling to 1 s) gives about 8 attempts in 3 s; resetting the
	// backoff on every refused stream gives 60 or more.
	if attempts < 2 || attempts > 15 {
		t.Fatalf("%d watch attempts in 3 s; want a backoff (2-15)", attempts)
	}
}

// requestLog keeps the headers of the requests a test server received.
type requestLog struct {
	mu      sync.Mutex
	headers []http.Header
}

func (l *requestLog) add(r *http.Request) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.headers = append(l.headers, r.Header.Clone())
}

func (l *requestLog) all() []http.Header {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.headers
}

// startBrokerWithHeader starts a broker on C's store whose upstream sends "header: token"; its address.
func startBrokerWithHeader(t *testing.T, e env, header string) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	target := lis.Addr().String()
	_ = lis.Close()
	config := filepath.Join(t.TempDir(), "header.yaml")
	rewrite := `import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
doc["listen"] = [sys.argv[3]]
for upstream in doc["upstreams"]:
    upstream["auth_broker"].update(header=sys.argv[4], header_format="{token}")
yaml.safe_dump(doc, open(sys.argv[2], "w"))`
	if out, err := exec.Command(e.python, "-c", rewrite, e.configC, config, target, header).CombinedOutput(); err != nil {
		t.Fatalf("config with header %s: %v %s", header, err, out)
	}
	startBrokerFrom(t, e, "header-"+header, config, target)
	return target
}

// Server A redirects within itself, then to B (another origin), which answers 401. The
// credential goes to both of A's hops and never to B, and B's 401 is no token rejection: no
// retry, and the broker still holds the token.
func TestRoundTripperKeepsTheCredentialToTheFirstOrigin(t *testing.T) {
	e := testEnv(t)
	for _, header := range []string{"Authorization", "X-Api-Key"} {
		t.Run(header, func(t *testing.T) {
			target := e.targetA
			if header != "Authorization" {
				target = startBrokerWithHeader(t, e, header)
			}
			c := newClient(t, target)
			user := uniqueUser("go-redirect")
			connect(t, c, user, e.upstream)
			cred, err := c.Resolve(ctx(t), user, e.upstream)
			if err != nil || cred.HeaderName != header {
				t.Fatalf("resolve: %v %v", cred, err)
			}
			var seenA, seenB requestLog
			b := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				seenB.add(r)
				w.WriteHeader(http.StatusUnauthorized)
			}))
			defer b.Close()
			a := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				seenA.add(r)
				next := b.URL
				if r.URL.Path == "/" {
					next = "/hop"
				}
				http.Redirect(w, r, next, http.StatusFound)
			}))
			defer a.Close()
			hc := &http.Client{Transport: &Transport{Client: c, UserID: user, Upstream: e.upstream}}
			resp, err := hc.Get(a.URL)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized || len(seenA.all()) != 2 || len(seenB.all()) != 1 {
				t.Fatalf("status %d after %d requests to A and %d to B; want 401 after 2 and 1", resp.StatusCode, len(seenA.all()), len(seenB.all()))
			}
			for _, h := range seenA.all() {
				if h.Get(header) != cred.HeaderValue {
					t.Fatal("a hop within the first origin went without the credential")
				}
			}
			for name, values := range seenB.all()[0] {
				if strings.Contains(strings.Join(values, " "), cred.AccessToken) {
					t.Fatalf("the token went to another origin in %s", name)
				}
			}
			if again, err := c.Resolve(ctx(t), user, e.upstream); err != nil || again.AccessToken != cred.AccessToken {
				t.Fatalf("another origin's 401 was reported as a rejected token: %v", err)
			}
		})
	}
}

type closeRecorder struct {
	io.Reader
	closed bool
}

func (r *closeRecorder) Close() error { r.closed = true; return nil }

func TestRoundTripperClosesTheBodyWhenResolveFails(t *testing.T) {
	e := testEnv(t)
	body := &closeRecorder{Reader: strings.NewReader("payload")}
	req, err := http.NewRequest(http.MethodPost, "http://127.0.0.1:1/", body)
	if err != nil {
		t.Fatal(err)
	}
	tr := &Transport{Client: newClient(t, e.targetA), UserID: "alice", Upstream: "nope"}
	var unknown *UnknownUpstreamError
	if _, err := tr.RoundTrip(req); !errors.As(err, &unknown) {
		t.Fatalf("want *UnknownUpstreamError, got %v", err)
	}
	if !body.closed {
		t.Fatal("the request body was left open")
	}
}

// A body that cannot be replayed is not sent again after a 401, which is returned as is; the
// refused token is still reported, so the next request gets a fresh one.
func TestRoundTripperDoesNotResendABodyItCannotReplay(t *testing.T) {
	e := testEnv(t)
	c := newClient(t, e.targetA)
	user := uniqueUser("go-401-once")
	connect(t, c, user, e.upstream)
	sent, err := c.Resolve(ctx(t), user, e.upstream)
	if err != nil {
		t.Fatal(err)
	}
	api := &upstreamAPI{}
	srv := httptest.NewServer(api)
	defer srv.Close()
	req, err := http.NewRequest(http.MethodPost, srv.URL, io.MultiReader(strings.NewReader("payload")))
	if err != nil || req.GetBody != nil {
		t.Fatalf("want a request without GetBody: %v", err)
	}
	hc := &http.Client{Transport: &Transport{Client: c, UserID: user, Upstream: e.upstream}}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized || len(api.seen) != 1 || api.seen[0] != sent.HeaderValue {
		t.Fatalf("status %d after %d requests; want the first 401 as is", resp.StatusCode, len(api.seen))
	}
	if fresh, err := c.Resolve(ctx(t), user, e.upstream); err != nil || fresh.AccessToken == sent.AccessToken {
		t.Fatalf("the refused token was not reported: %v", err)
	}
}

// stubBroker answers WatchConnections and Complete with err and counts the calls.
type stubBroker struct {
	cbv1.UnimplementedCredentialBrokerServer
	err   error
	calls atomic.Int32
}

func (b *stubBroker) WatchConnections(*cbv1.WatchConnectionsRequest, grpc.ServerStreamingServer[cbv1.WatchConnectionsResponse]) error {
	b.calls.Add(1)
	return b.err
}

func (b *stubBroker) Complete(context.Context, *cbv1.CompleteRequest) (*cbv1.CompleteResponse, error) {
	b.calls.Add(1)
	return nil, b.err
}

func brokerStatus(t *testing.T, code codes.Code, reason string) error {
	t.Helper()
	st, err := status.New(code, reason).WithDetails(&errdetails.ErrorInfo{Domain: Domain, Reason: reason})
	if err != nil {
		t.Fatal(err)
	}
	return st.Err()
}

// A broker refuses a stream it cannot resume before its headers (trailers only): the
// subscription failed, and the client forgets its resume point.
func TestAWatchRefusedBeforeItsHeadersIsNotLive(t *testing.T) {
	c := newClient(t, serve(t, &stubBroker{err: brokerStatus(t, codes.OutOfRange, "WATCH_RESYNC_REQUIRED")}))
	c.cache = newCache(0) // one subscription by hand, not follow's loop
	c.lastSequence, c.haveSequence = 7, true
	attempt := 0
	c.watchOnce(ctx(t), &attempt)
	if c.CacheStats().Live {
		t.Fatal("a refused subscription left the cache live")
	}
	if _, resuming := c.LastSequence(); resuming {
		t.Fatal("WATCH_RESYNC_REQUIRED kept the resume point")
	}
}

// UNAVAILABLE with a reason of another family is that family's error, and Complete does not retry it.
func TestUnavailableWithAnotherReasonIsTyped(t *testing.T) {
	broker := &stubBroker{err: brokerStatus(t, codes.Unavailable, "TOKEN_REQUEST_REJECTED")}
	c := newClient(t, serve(t, broker))
	var rejected *TokenRequestRejectedError
	if _, err := c.Complete(ctx(t), CompleteRequest{State: "s", Code: "c", UserID: "alice"}); !errors.As(err, &rejected) {
		t.Fatalf("want *TokenRequestRejectedError, got %v", err)
	}
	if n := broker.calls.Load(); n != 1 {
		t.Fatalf("%d calls; want 1", n)
	}
}

func TestPrintingShowsNoSecret(t *testing.T) {
	secrets := []string{"token-secret", "state-secret", "caller-secret", "user-jwt-secret"}
	cred := Credential{AccessToken: secrets[0], TokenType: "Bearer", HeaderName: "Authorization", HeaderValue: "Bearer " + secrets[0]}
	flow := AuthorizationRequest{AuthorizationURL: "http://127.0.0.1:1/authorize?state=" + secrets[1], State: secrets[1]}
	c := newClient(t, "127.0.0.1:1", WithCallerToken(secrets[2]))
	var out strings.Builder
	uctx := WithUserTokenContext(context.Background(), secrets[3])
	tr := Transport{Client: c, UserID: "alice", Upstream: "github", UserToken: secrets[3]}
	hc := &http.Client{Transport: &tr}
	for _, v := range []any{cred, &cred, flow, &flow, c, uctx, tr, &tr, hc} {
		fmt.Fprintf(&out, "%v %+v %#v %s\n", v, v, v, v)
	}
	for _, h := range []slog.Handler{slog.NewTextHandler(&out, nil), slog.NewJSONHandler(&out, nil)} {
		slog.New(h).Info("printed", "cred", cred, "credp", &cred, "flow", flow, "flowp", &flow, "client", c,
			"ctx", uctx, "transport", tr, "transportp", &tr)
	}
	for _, secret := range secrets {
		if strings.Contains(out.String(), secret) {
			t.Errorf("%s printed", secret)
		}
	}
}

// noTokenIn fails the test when the token shows in any of the errors, however printed.
func noTokenIn(t *testing.T, token string, errs ...error) {
	t.Helper()
	for _, err := range errs {
		if err != nil && strings.Contains(fmt.Sprintf("%v %+v %#v %s", err, err, err, err.Error()), token) {
			t.Fatal("a user token in an error")
		}
	}
}

// wantUnauthenticated: a user-scoped call without a user token, to a broker that verifies them.
func wantUnauthenticated(t *testing.T, what string, err error) {
	t.Helper()
	var un *UnauthenticatedError
	if !errors.As(err, &un) || un.Reason != "USER_TOKEN_INVALID" || un.Metadata["problem"] != "missing" {
		t.Fatalf("%s without a user token: want *UnauthenticatedError (USER_TOKEN_INVALID, missing), got %v", what, err)
	}
}

// Broker F verifies user tokens. Without one every user-scoped call is refused, typed; with
// WithUserTokenContext every one of them works.
func TestUserTokenGoesWithEveryUserScopedCall(t *testing.T) {
	e := testEnv(t)
	c := newClient(t, e.targetIdentity)
	user, token := e.identityUser, e.identityToken
	var errs []error
	keep := func(err error) error { errs = append(errs, err); return err }
	defer func() { noTokenIn(t, token, errs...) }()

	_, err := c.Resolve(ctx(t), user, e.upstream)
	wantUnauthenticated(t, "Resolve", keep(err))
	_, err = c.BuildAuthorizationURL(ctx(t), user, e.upstream, nil)
	wantUnauthenticated(t, "BuildAuthorizationURL", keep(err))
	_, err = c.ListConnections(ctx(t), user)
	wantUnauthenticated(t, "ListConnections", keep(err))
	_, err = c.Refresh(ctx(t), user, e.upstream)
	wantUnauthenticated(t, "Refresh", keep(err))
	_, err = c.Disconnect(ctx(t), user, e.upstream)
	wantUnauthenticated(t, "Disconnect", keep(err))
	_, err = c.DisconnectAll(ctx(t), user)
	wantUnauthenticated(t, "DisconnectAll", keep(err))
	for _, err := range c.Watch(ctx(t), WatchRequest{UserID: user}) {
		wantUnauthenticated(t, "Watch", keep(err))
		break
	}

	uctx := WithUserTokenContext(ctx(t), token)
	info := connectWith(t, uctx, c, user, e.upstream) // BuildAuthorizationURL and Complete
	if info.UserID != user || info.Upstream != e.upstream {
		t.Fatalf("complete: %+v", info)
	}
	cred, err := c.Resolve(uctx, user, e.upstream, MinValid(120))
	if keep(err) != nil || cred.AccessToken == "" {
		t.Fatalf("resolve: %v", err)
	}
	conns, err := c.ListConnections(uctx, user)
	if keep(err) != nil || len(conns) != 1 || conns[0].Status != "connected" {
		t.Fatalf("list: %+v %v", conns, err)
	}
	if _, err := c.Refresh(uctx, user, e.upstream); keep(err) != nil {
		t.Fatal(err)
	}
	again, err := c.Resolve(uctx, user, e.upstream)
	if keep(err) != nil || again.AccessToken == cred.AccessToken {
		t.Fatalf("resolve after refresh: same token or %v", err)
	}
	d, err := c.Disconnect(uctx, user, e.upstream)
	if keep(err) != nil || !d.Deleted {
		t.Fatalf("disconnect: %+v %v", d, err)
	}
	if _, err := c.DisconnectAll(uctx, user); keep(err) != nil {
		t.Fatal(err)
	}
	zero := uint64(0)
	var kinds []string
	for ev, err := range c.Watch(uctx, WatchRequest{UserID: user, AfterSequence: &zero}) {
		if keep(err) != nil {
			t.Fatal(err)
		}
		kinds = append(kinds, ev.Kind)
		if ev.Kind == "DISCONNECTED" {
			break
		}
	}
	if n := len(kinds); n < 3 || strings.Join(kinds[n-3:], ",") != "CONNECTED,REFRESHED,DISCONNECTED" {
		t.Fatalf("watch: %v", kinds)
	}
	var nc *NotConnectedError
	if _, err := c.Resolve(uctx, user, e.upstream); !errors.As(keep(err), &nc) {
		t.Fatalf("after disconnect: %v", err)
	}
}

// A valid token of another user is refused with USER_MISMATCH on every user-scoped call.
func TestAnotherUsersTokenIsUserMismatch(t *testing.T) {
	e := testEnv(t)
	c := newClient(t, e.targetIdentity)
	bobs := WithUserTokenContext(ctx(t), e.otherToken)
	if _, err := c.ListConnections(bobs, e.otherUser); err != nil {
		t.Fatalf("the token is valid for its own user: %v", err)
	}
	var errs []error
	_, err := c.Resolve(bobs, e.identityUser, e.upstream)
	errs = append(errs, err)
	_, err = c.ListConnections(bobs, e.identityUser)
	errs = append(errs, err)
	_, err = c.BuildAuthorizationURL(bobs, e.identityUser, e.upstream, nil)
	errs = append(errs, err)
	_, err = c.Refresh(bobs, e.identityUser, e.upstream)
	errs = append(errs, err)
	_, err = c.Disconnect(bobs, e.identityUser, e.upstream)
	errs = append(errs, err)
	for i, err := range errs {
		var denied *PermissionDeniedError
		if !errors.As(err, &denied) || denied.Reason != "USER_MISMATCH" {
			t.Fatalf("call %d with another user's token: want *PermissionDeniedError USER_MISMATCH, got %v", i, err)
		}
	}
	noTokenIn(t, e.otherToken, errs...)
}

// Transport.UserToken goes with the Resolve calls of every request (and its 401 retry).
func TestTransportSendsItsUserToken(t *testing.T) {
	e := testEnv(t)
	c := newClient(t, e.targetIdentity)
	user, token := e.otherUser, e.otherToken
	connectWith(t, WithUserTokenContext(ctx(t), token), c, user, e.upstream)
	api := &upstreamAPI{}
	srv := httptest.NewServer(api)
	defer srv.Close()
	hc := &http.Client{Transport: &Transport{Client: c, UserID: user, Upstream: e.upstream, UserToken: token}}
	resp, err := hc.Post(srv.URL, "text/plain", strings.NewReader("payload"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || len(api.seen) != 2 || api.seen[0] == api.seen[1] {
		t.Fatalf("status %d after %d requests; want a retried 401 with a fresh token", resp.StatusCode, len(api.seen))
	}
	without := &http.Client{Transport: &Transport{Client: c, UserID: user, Upstream: e.upstream}}
	_, err = without.Get(srv.URL)
	wantUnauthenticated(t, "a Transport without UserToken", err)
	noTokenIn(t, token, err)
	if _, err := c.Disconnect(WithUserTokenContext(ctx(t), token), user, e.upstream); err != nil {
		t.Fatal(err)
	}
}

// recordingBroker keeps the metadata of every Resolve and ListConnections.
type recordingBroker struct {
	cbv1.UnimplementedCredentialBrokerServer
	mu  sync.Mutex
	mds []metadata.MD
}

func (b *recordingBroker) record(ctx context.Context) {
	md, _ := metadata.FromIncomingContext(ctx)
	b.mu.Lock()
	defer b.mu.Unlock()
	b.mds = append(b.mds, md)
}

func (b *recordingBroker) last() metadata.MD {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.mds[len(b.mds)-1]
}

func (b *recordingBroker) Resolve(ctx context.Context, _ *cbv1.ResolveRequest) (*cbv1.ResolveResponse, error) {
	b.record(ctx)
	return &cbv1.ResolveResponse{AccessToken: "t", TokenType: "Bearer", HeaderName: "Authorization", HeaderValue: "Bearer t"}, nil
}

func (b *recordingBroker) ListConnections(ctx context.Context, _ *cbv1.ListConnectionsRequest) (*cbv1.ListConnectionsResponse, error) {
	b.record(ctx)
	return &cbv1.ListConnectionsResponse{}, nil
}

// The user token is one more header: the request header and the caller token still go, only
// the calls made with it carry it, and "" takes it off again.
func TestUserTokenTravelsWithTheOtherMetadata(t *testing.T) {
	broker := &recordingBroker{}
	c := newClient(t, serve(t, broker), WithCallerToken("caller"))
	uctx := WithUserTokenContext(ctx(t), "user-token")
	want := func(what string, authorization ...string) {
		t.Helper()
		md := broker.last()
		if got := md.Get("authorization"); strings.Join(got, ",") != strings.Join(authorization, ",") {
			t.Fatalf("%s: authorization %q; want %q", what, got, authorization)
		}
		if strings.Join(md.Get(requestHeader), ",") != "true" || strings.Join(md.Get(callerHeader), ",") != "caller" {
			t.Fatalf("%s: the other metadata is gone: %v", what, md)
		}
	}
	if _, err := c.Resolve(uctx, "alice", "github"); err != nil {
		t.Fatal(err)
	}
	want("Resolve", "Bearer user-token")
	if _, err := c.ListConnections(uctx, "alice"); err != nil {
		t.Fatal(err)
	}
	want("ListConnections", "Bearer user-token")
	if _, err := c.ListConnections(ctx(t), "alice"); err != nil {
		t.Fatal(err)
	}
	want("ListConnections without a token")
	if _, err := c.Resolve(WithUserTokenContext(uctx, ""), "alice", "github"); err != nil {
		t.Fatal(err)
	}
	want("Resolve with the token taken off")
}

// An upstream that answers 401 with a body it never finishes (a stream, or a slow or huge
// body): the retry with the fresh token goes out at once, without reading that body to its end.
func TestRoundTripperDoesNotReadARefusedBodyToItsEnd(t *testing.T) {
	e := testEnv(t)
	c := newClient(t, e.targetA)
	user := uniqueUser("go-401-stream")
	connect(t, c, user, e.upstream)
	var mu sync.Mutex
	var seen []string
	stop := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body)
		mu.Lock()
		seen = append(seen, r.Header.Get("Authorization"))
		first := len(seen) == 1
		mu.Unlock()
		if !first {
			_, _ = w.Write([]byte(`{"ok":true}`))
			return
		}
		w.WriteHeader(http.StatusUnauthorized)
		for end := time.After(20 * time.Second); ; {
			if _, err := w.Write([]byte(`{"error":"invalid_token"}` + "\n")); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
				return
			case <-stop:
				return
			case <-end:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}))
	defer srv.Close()
	defer close(stop)
	rctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodPost, srv.URL, strings.NewReader("payload"))
	if err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Transport: &Transport{Client: c, UserID: user, Upstream: e.upstream}}
	start := time.Now()
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	took := time.Since(start)
	mu.Lock()
	defer mu.Unlock()
	if resp.StatusCode != http.StatusOK || len(seen) != 2 || seen[0] == seen[1] {
		t.Fatalf("status %d after %d requests; want the retry with a fresh token to succeed", resp.StatusCode, len(seen))
	}
	if took > 5*time.Second {
		t.Fatalf("the retry waited %s for the refused answer's body to end", took.Round(time.Millisecond))
	}
}

// Metadata the caller attached to the context (x-request-id for the broker's audit trail,
// traceparent for its spans) goes with the call, next to the client's own.
func TestCallsKeepTheCallersOwnMetadata(t *testing.T) {
	broker := &recordingBroker{}
	c := newClient(t, serve(t, broker), WithCallerToken("caller"))
	mctx := metadata.AppendToOutgoingContext(ctx(t), "x-request-id", "req-42", "traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	check := func(what string, authorization ...string) {
		t.Helper()
		md := broker.last()
		if strings.Join(md.Get("x-request-id"), ",") != "req-42" || len(md.Get("traceparent")) != 1 {
			t.Fatalf("%s: the caller's metadata was dropped: x-request-id %q, traceparent %q", what, md.Get("x-request-id"), md.Get("traceparent"))
		}
		if strings.Join(md.Get(requestHeader), ",") != "true" || strings.Join(md.Get(callerHeader), ",") != "caller" {
			t.Fatalf("%s: the client's own metadata is missing or doubled: %v", what, md)
		}
		if got := md.Get("authorization"); strings.Join(got, ",") != strings.Join(authorization, ",") {
			t.Fatalf("%s: authorization %q; want %q", what, got, authorization)
		}
	}
	if _, err := c.Resolve(mctx, "alice", "github"); err != nil {
		t.Fatal(err)
	}
	check("Resolve")
	if _, err := c.ListConnections(WithUserTokenContext(mctx, "user-token"), "alice"); err != nil {
		t.Fatal(err)
	}
	check("ListConnections with a user token", "Bearer user-token")
	// The caller's own copy of the client's headers does not double (or replace) them.
	spoofed := metadata.AppendToOutgoingContext(mctx, requestHeader, "true", callerHeader, "other")
	if _, err := c.Resolve(spoofed, "alice", "github"); err != nil {
		t.Fatal(err)
	}
	check("Resolve with the client's headers also in the context")
}

// A request made by hand, with no Header map (http.Transport takes it; http.Client fills one
// in, a direct caller of RoundTrip need not): the credential goes with it, and with its retry.
func TestRoundTripperTakesARequestWithoutAHeaderMap(t *testing.T) {
	e := testEnv(t)
	c := newClient(t, e.targetA)
	user := uniqueUser("go-no-header")
	connect(t, c, user, e.upstream)
	api := &upstreamAPI{}
	srv := httptest.NewServer(api)
	defer srv.Close()
	u, err := url.Parse(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	req := (&http.Request{Method: http.MethodGet, URL: u}).WithContext(ctx(t))
	tr := &Transport{Client: c, UserID: user, Upstream: e.upstream}
	var resp *http.Response
	func() {
		defer func() {
			if r := recover(); r != nil {
				t.Fatalf("RoundTrip panicked: %v", r)
			}
		}()
		resp, err = tr.RoundTrip(req)
	}()
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	api.mu.Lock()
	defer api.mu.Unlock()
	if resp.StatusCode != http.StatusOK || len(api.seen) != 2 || api.seen[0] == "" || api.seen[0] == api.seen[1] {
		t.Fatalf("status %d after %d requests; want a retried 401 with a fresh token", resp.StatusCode, len(api.seen))
	}
	if req.Header != nil {
		t.Fatal("RoundTrip modified the caller's request")
	}
}

// hangingBroker answers nothing until the call ends.
type hangingBroker struct {
	cbv1.UnimplementedCredentialBrokerServer
}

func (hangingBroker) Resolve(ctx context.Context, _ *cbv1.ResolveRequest) (*cbv1.ResolveResponse, error) {
	<-ctx.Done()
	return nil, status.Error(codes.Unavailable, "too late")
}

// A call that ends because its context did (a deadline, a cancel, also while backing off from
// an unreachable broker) says so the Go way: errors.Is(err, context.DeadlineExceeded or
// context.Canceled), while keeping its typed error.
func TestCallsEndedByTheirContextSaySo(t *testing.T) {
	c := newClient(t, serve(t, hangingBroker{}))
	dctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := c.Resolve(dctx, "alice", "github")
	var internal *InternalError
	if !errors.Is(err, context.DeadlineExceeded) || !errors.As(err, &internal) || internal.Reason != "DEADLINE_EXCEEDED" {
		t.Fatalf("past the deadline: want *InternalError DEADLINE_EXCEEDED matching context.DeadlineExceeded, got %v", err)
	}
	cctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	_, err = c.Resolve(cctx, "alice", "github")
	if !errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("cancelled: want an error matching context.Canceled, got %v", err)
	}
	closed := httptest.NewServer(http.NotFoundHandler())
	addr := strings.TrimPrefix(closed.URL, "http://")
	closed.Close() // nothing listens there now
	down := newClient(t, addr)
	bctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(300*time.Millisecond, cancel)
	_, err = down.Resolve(bctx, "alice", "github")
	var un *UnavailableError
	if !errors.Is(err, context.Canceled) || !errors.As(err, &un) {
		t.Fatalf("cancelled while retrying: want *UnavailableError matching context.Canceled, got %v", err)
	}
	// A broker that is merely unavailable is not mistaken for the caller's context ending.
	sctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err = down.Resolve(sctx, "alice", "github")
	if !errors.As(err, &un) {
		t.Fatalf("want *UnavailableError, got %v", err)
	}
}

// With the broker down, UNAVAILABLE is retried until the deadline, not given up a whole backoff
// step (up to 1 s) before it: the broker may be back in that time.
func TestUnavailableIsRetriedUntilTheDeadline(t *testing.T) {
	closed := httptest.NewServer(http.NotFoundHandler())
	addr := strings.TrimPrefix(closed.URL, "http://")
	closed.Close() // nothing listens there now
	down := newClient(t, addr)
	for i := 0; i < 3; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
		started := time.Now()
		_, err := down.Resolve(ctx, "alice", "github")
		took := time.Since(started)
		cancel()
		var un *UnavailableError
		if !errors.As(err, &un) {
			t.Fatalf("want *UnavailableError, got %v", err)
		}
		if took < 1400*time.Millisecond {
			t.Fatalf("gave up after %v of a 1.5 s deadline", took)
		}
	}
}
