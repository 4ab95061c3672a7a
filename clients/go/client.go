// Package credentialbroker is the Go client of the credential-broker sidecar.
//
//	client, err := credentialbroker.New("", credentialbroker.WithCache(0))
//	cred, err := client.Resolve(ctx, "alice", "github")
//	var nc *credentialbroker.NotConnectedError
//	if errors.As(err, &nc) { redirect(nc.AuthorizationURL) }
//
// The target defaults to $CREDENTIAL_BROKER_SOCKET, then 127.0.0.1:50051 (a bare absolute
// path is a unix socket). Every call carries x-credential-broker-request: true and, when set,
// the caller token; a call whose context comes from WithUserTokenContext also carries the end
// user's token as authorization: Bearer (needed when the broker verifies user tokens).
// UNAVAILABLE is retried with jittered backoff within the context's deadline (DefaultTimeout
// when it has none); nothing else is retried. With WithCache, Resolve answers
// from memory while the credential stays valid at least max(MinValidSeconds, min valid) more
// seconds and holds the required scopes; one WatchConnections stream drops an entry on
// REFRESHED, RECOVERED, NEEDS_REAUTH, DISCONNECTED, SCOPES_CHANGED or CONNECTED, and the whole
// cache when the stream breaks (it resubscribes with after_sequence).
package credentialbroker

import (
	"context"
	"errors"
	"iter"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"time"

	cbv1 "credentialbroker/internal/gen/credentialbroker/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const (
	// TargetEnv names the environment variable with the broker's address.
	TargetEnv = "CREDENTIAL_BROKER_SOCKET"
	// DefaultTarget is used when neither the argument nor TargetEnv gives one.
	DefaultTarget = "127.0.0.1:50051"
	// DefaultTimeout bounds a call whose context has no deadline.
	DefaultTimeout = 10 * time.Second
	requestHeader  = "x-credential-broker-request"
	callerHeader   = "x-credential-broker-caller-token"
	userHeader     = "authorization"
)

// Option configures a Client.
type Option func(*options)

type options struct {
	callerToken  string
	cache        bool
	cacheEntries int
	timeout      time.Duration
}

// WithCallerToken sends the token as x-credential-broker-caller-token on every call.
func WithCallerToken(token string) Option { return func(o *options) { o.callerToken = token } }

// WithCache turns on the push-invalidated cache with at most maxEntries entries (0: 10,000).
func WithCache(maxEntries int) Option {
	return func(o *options) { o.cache, o.cacheEntries = true, maxEntries }
}

// WithTimeout sets the deadline of calls whose context has none.
func WithTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// userToken is kept behind a pointer in a context, so printing the context (%v, %+v, %#v)
// shows neither its value nor its address's contents.
type userToken struct{ value string }

func (u *userToken) String() string   { return "credentialbroker.userToken(redacted)" }
func (u *userToken) GoString() string { return u.String() }

type userTokenKey struct{}

// WithUserTokenContext returns a copy of ctx whose calls send token, the end user's own token,
// as authorization: Bearer <token> alongside the client's other metadata. A broker with an
// identity: config needs it on every call that acts for a user (Resolve unless SubjectToken is
// given, BuildAuthorizationURL, Complete, Refresh, ListConnections, Disconnect, DisconnectAll,
// Watch with a UserID) and answers *UnauthenticatedError without it, *PermissionDeniedError
// (USER_MISMATCH) when it names another user. "" takes a token set earlier off. Resolve calls
// with a user token neither read nor fill the cache: only the broker can verify the token.
// The token is never printed, and never part of an error.
func WithUserTokenContext(ctx context.Context, token string) context.Context {
	return context.WithValue(ctx, userTokenKey{}, &userToken{token})
}

func userTokenFrom(ctx context.Context) string {
	if u, ok := ctx.Value(userTokenKey{}).(*userToken); ok {
		return u.value
	}
	return ""
}

// outgoing is ctx with the client's metadata and, when ctx carries one, the user token, added
// to the metadata the caller attached (x-request-id, traceparent...); the client's own keys win.
func (c *Client) outgoing(ctx context.Context) context.Context {
	md := c.md
	token := userTokenFrom(ctx)
	if own, ok := metadata.FromOutgoingContext(ctx); ok || token != "" {
		if own == nil {
			own = metadata.MD{}
		}
		for k, v := range c.md {
			own[k] = v
		}
		if token != "" {
			own.Set(userHeader, "Bearer "+token)
		}
		md = own
	}
	return metadata.NewOutgoingContext(ctx, md)
}

// Client is safe for concurrent use. Close it when done.
type Client struct {
	Target string
	conn   *grpc.ClientConn
	stub   cbv1.CredentialBrokerClient
	md     metadata.MD
	opts   options
	cache  *credentialCache

	stop         context.CancelFunc
	watchDone    chan struct{}
	seqMu        sync.Mutex
	lastSequence uint64
	haveSequence bool
}

// ResolveTarget is the address New dials: target, else $CREDENTIAL_BROKER_SOCKET, else
// DefaultTarget; a bare absolute path becomes unix://path.
func ResolveTarget(target string) string {
	if target == "" {
		target = os.Getenv(TargetEnv)
	}
	if target == "" {
		target = DefaultTarget
	}
	if strings.HasPrefix(target, "/") {
		target = "unix://" + target
	}
	return target
}

// New makes a client of the broker at target ("" for the default).
func New(target string, opts ...Option) (*Client, error) {
	o := options{timeout: DefaultTimeout}
	for _, opt := range opts {
		opt(&o)
	}
	target = ResolveTarget(target)
	// Reconnect quickly after the broker restarts (gRPC's default first backoff is a second).
	bo := backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second}
	conn, err := grpc.NewClient(target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo, MinConnectTimeout: time.Second}))
	if err != nil {
		return nil, err
	}
	md := metadata.Pairs(requestHeader, "true")
	if o.callerToken != "" {
		md.Set(callerHeader, o.callerToken)
	}
	c := &Client{Target: target, conn: conn, stub: cbv1.NewCredentialBrokerClient(conn), md: md, opts: o}
	if o.cache {
		c.cache = newCache(o.cacheEntries)
		ctx, cancel := context.WithCancel(context.Background())
		c.stop, c.watchDone = cancel, make(chan struct{})
		go c.follow(ctx)
	}
	return c, nil
}

// String names the target only: the caller token is never printed.
func (c *Client) String() string { return "credentialbroker.Client{" + c.Target + "}" }

// GoString keeps %#v from printing the caller token.
func (c *Client) GoString() string { return c.String() }

// Close stops the watch stream and closes the connection.
func (c *Client) Close() error {
	if c.stop != nil {
		c.stop()
		<-c.watchDone
	}
	return c.conn.Close()
}

// CacheStats reports the cache (the zero value without WithCache).
func (c *Client) CacheStats() CacheStats {
	if c.cache == nil {
		return CacheStats{}
	}
	return c.cache.stats()
}

// LastSequence is the sequence of the last event the cache's watch stream received.
func (c *Client) LastSequence() (uint64, bool) {
	c.seqMu.Lock()
	defer c.seqMu.Unlock()
	return c.lastSequence, c.haveSequence
}

// ResolveOption adjusts one Resolve.
type ResolveOption func(*cbv1.ResolveRequest)

// MinValidSeconds asks for a token valid at least that long.
func MinValid(seconds uint32) ResolveOption {
	return func(r *cbv1.ResolveRequest) { r.MinValidSeconds = seconds }
}

// RequiredScopes asks for a grant holding these scopes (else *InsufficientScopeError).
func RequiredScopes(scopes ...string) ResolveOption {
	return func(r *cbv1.ResolveRequest) { r.RequiredScopes = append(r.RequiredScopes, scopes...) }
}

// SubjectToken passes the user's own token (exchange upstreams); such calls bypass the cache.
func SubjectToken(token string) ResolveOption {
	return func(r *cbv1.ResolveRequest) { r.SubjectToken = token }
}

// RejectedAccessToken passes the token the upstream just refused with 401: the broker
// refreshes once when it is the stored one.
func RejectedAccessToken(token string) ResolveOption {
	return func(r *cbv1.ResolveRequest) { r.RejectedAccessToken = token }
}

// Resolve returns a credential for (user, upstream).
func (c *Client) Resolve(ctx context.Context, user, upstream string, opts ...ResolveOption) (*Credential, error) {
	req := &cbv1.ResolveRequest{UserId: user, Upstream: upstream}
	for _, opt := range opts {
		opt(req)
	}
	key := cacheKey{user, upstream}
	// A call with the user's own token is the broker's to verify: no cache hit may answer it.
	uncached := req.SubjectToken != "" || userTokenFrom(ctx) != ""
	var t ticket
	if c.cache != nil {
		if !uncached && req.RejectedAccessToken == "" {
			if hit := c.cache.get(key, int(req.MinValidSeconds), req.RequiredScopes); hit != nil {
				return hit, nil
			}
		} else if req.RejectedAccessToken != "" {
			c.cache.invalidate(key, false, false)
		}
		t = c.cache.ticket(key)
	}
	resp, err := call(ctx, c, "Resolve", func(ctx context.Context) (*cbv1.ResolveResponse, error) {
		return c.stub.Resolve(ctx, req)
	})
	if err != nil {
		return nil, err
	}
	cred := credentialFrom(resp)
	if c.cache != nil && !uncached {
		c.cache.put(key, cred, t)
	}
	return cred, nil
}

// BuildAuthorizationURL starts a connect flow; params are the upstream's connection params.
func (c *Client) BuildAuthorizationURL(ctx context.Context, user, upstream string, params map[string]string) (*AuthorizationRequest, error) {
	resp, err := call(ctx, c, "BuildAuthorizationURL", func(ctx context.Context) (*cbv1.BuildAuthorizationURLResponse, error) {
		return c.stub.BuildAuthorizationURL(ctx, &cbv1.BuildAuthorizationURLRequest{UserId: user, Upstream: upstream, ConnectionParams: params})
	})
	if err != nil {
		return nil, err
	}
	return &AuthorizationRequest{resp.GetAuthorizationUrl(), resp.GetState(), when(resp.GetExpiresAt())}, nil
}

// CompleteRequest is what the connect callback hands back.
type CompleteRequest struct {
	State, Code, UserID, Iss string
	CallbackParams           map[string]string
}

// Complete finishes a connect flow.
func (c *Client) Complete(ctx context.Context, r CompleteRequest) (*CredentialInfo, error) {
	resp, err := call(ctx, c, "Complete", func(ctx context.Context) (*cbv1.CompleteResponse, error) {
		return c.stub.Complete(ctx, &cbv1.CompleteRequest{State: r.State, Code: r.Code, UserId: r.UserID, Iss: r.Iss, CallbackParams: r.CallbackParams})
	})
	if err != nil {
		return nil, err
	}
	info := infoFrom(resp.GetCredential())
	c.forget(info.UserID, info.Upstream)
	return info, nil
}

// Deny ends a connect flow the user or the authorization server refused.
func (c *Client) Deny(ctx context.Context, state, oauthError, description string) error {
	_, err := call(ctx, c, "Deny", func(ctx context.Context) (*cbv1.DenyResponse, error) {
		return c.stub.Deny(ctx, &cbv1.DenyRequest{State: state, Error: oauthError, ErrorDescription: description})
	})
	return err
}

// Refresh renews the stored credential now.
func (c *Client) Refresh(ctx context.Context, user, upstream string) (*CredentialInfo, error) {
	c.forget(user, upstream)
	resp, err := call(ctx, c, "Refresh", func(ctx context.Context) (*cbv1.RefreshResponse, error) {
		return c.stub.Refresh(ctx, &cbv1.RefreshRequest{UserId: user, Upstream: upstream})
	})
	c.forget(user, upstream)
	if err != nil {
		return nil, err
	}
	return infoFrom(resp.GetCredential()), nil
}

// ListConnections describes the user's connection to every configured upstream.
func (c *Client) ListConnections(ctx context.Context, user string) ([]Connection, error) {
	resp, err := call(ctx, c, "ListConnections", func(ctx context.Context) (*cbv1.ListConnectionsResponse, error) {
		return c.stub.ListConnections(ctx, &cbv1.ListConnectionsRequest{UserId: user})
	})
	if err != nil {
		return nil, err
	}
	out := make([]Connection, 0, len(resp.GetConnections()))
	for _, conn := range resp.GetConnections() {
		out = append(out, connectionFrom(conn))
	}
	return out, nil
}

// Disconnect revokes the user's tokens at the upstream and deletes the credential.
func (c *Client) Disconnect(ctx context.Context, user, upstream string) (*Disconnection, error) {
	c.forget(user, upstream)
	resp, err := call(ctx, c, "Disconnect", func(ctx context.Context) (*cbv1.DisconnectResponse, error) {
		return c.stub.Disconnect(ctx, &cbv1.DisconnectRequest{UserId: user, Upstream: upstream})
	})
	c.forget(user, upstream)
	if err != nil {
		return nil, err
	}
	return &Disconnection{resp.GetDeleted(), revocationsFrom(resp.GetRevocations())}, nil
}

// DisconnectAll disconnects every upstream of the user (offboarding).
func (c *Client) DisconnectAll(ctx context.Context, user string) ([]UpstreamDisconnection, error) {
	resp, err := call(ctx, c, "DisconnectAll", func(ctx context.Context) (*cbv1.DisconnectAllResponse, error) {
		return c.stub.DisconnectAll(ctx, &cbv1.DisconnectAllRequest{UserId: user})
	})
	if err != nil {
		return nil, err
	}
	out := make([]UpstreamDisconnection, 0, len(resp.GetResults()))
	for _, r := range resp.GetResults() {
		c.forget(user, r.GetUpstream())
		out = append(out, UpstreamDisconnection{r.GetUpstream(), r.GetDeleted(), revocationsFrom(r.GetRevocations())})
	}
	return out, nil
}

// WatchRequest selects the events Watch streams.
type WatchRequest struct {
	UserID        string   // "": every user's
	Upstreams     []string // none: every upstream the caller may use
	AfterSequence *uint64  // replay the events after this one first
}

// Watch streams connection events until ctx ends or the stream fails (the error is yielded
// last, typed; *ResourceExhaustedError with Reason WATCH_TOO_SLOW: resume after the last Sequence).
// With a UserID and a broker that verifies user tokens, ctx carries that user's token.
func (c *Client) Watch(ctx context.Context, w WatchRequest) iter.Seq2[ConnectionEvent, error] {
	return func(yield func(ConnectionEvent, error) bool) {
		ctx, cancel := context.WithCancel(c.outgoing(ctx))
		defer cancel()
		req := &cbv1.WatchConnectionsRequest{UserId: w.UserID, Upstreams: w.Upstreams, AfterSequence: w.AfterSequence}
		stream, err := c.stub.WatchConnections(ctx, req)
		if err != nil {
			yield(ConnectionEvent{}, fromStatus(err))
			return
		}
		for {
			resp, err := stream.Recv()
			if err != nil {
				if ctx.Err() == nil {
					yield(ConnectionEvent{}, fromStatus(err))
				}
				return
			}
			if !yield(eventFrom(resp.GetEvent()), nil) {
				return
			}
		}
	}
}

func (c *Client) forget(user, upstream string) {
	if c.cache != nil {
		c.cache.invalidate(cacheKey{user, upstream}, false, false)
	}
}

// call runs one RPC, retrying UNAVAILABLE with jittered backoff within the deadline. Complete
// and Deny are retried only when the broker never answered (no ErrorInfo).
func call[R any](ctx context.Context, c *Client, method string, rpc func(context.Context) (R, error)) (R, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.opts.timeout)
		defer cancel()
	}
	ctx = c.outgoing(ctx)
	for attempt := 0; ; attempt++ {
		resp, err := rpc(ctx)
		if err == nil {
			return resp, nil
		}
		typed := fromStatus(err)
		st, _ := status.FromError(err)
		retry := st.Code() == codes.Unavailable && ctx.Err() == nil
		if retry && (method == "Complete" || method == "Deny") {
			var be *BrokerError
			retry = errors.As(typed, &be) && be.Reason == "UNAVAILABLE"
		}
		if !retry {
			return resp, endedWith(ctx, typed)
		}
		// A pause that would end past the deadline is cut short to leave one last try.
		pause := jitter(attempt)
		deadline, _ := ctx.Deadline()
		left := time.Until(deadline) - lastTry
		if left <= 0 {
			return resp, typed
		}
		pause = min(pause, left)
		select {
		case <-time.After(pause):
		case <-ctx.Done():
			return resp, endedWith(ctx, typed)
		}
	}
}

// lastTry is what a retry's pause leaves before the deadline for one last try.
const lastTry = 20 * time.Millisecond

// jitter is uniform in [c/4, c], c = min(1 s, 50 ms * 2^attempt).
func jitter(attempt int) time.Duration {
	ceiling := 50 * time.Millisecond << min(attempt, 5)
	if ceiling > time.Second {
		ceiling = time.Second
	}
	return ceiling/4 + time.Duration(rand.Int64N(int64(ceiling*3/4)+1))
}

// follow keeps the cache's WatchConnections stream, resubscribing with after_sequence.
func (c *Client) follow(ctx context.Context) {
	defer close(c.watchDone)
	for attempt := 0; ctx.Err() == nil; attempt++ {
		c.watchOnce(ctx, &attempt)
		c.cache.setLive(false)
		select {
		case <-ctx.Done():
			return
		case <-time.After(min(5*time.Second, jitter(attempt))):
		}
	}
}

func (c *Client) watchOnce(ctx context.Context, attempt *int) {
	ctx, cancel := context.WithCancel(metadata.NewOutgoingContext(ctx, c.md))
	defer cancel()
	req := &cbv1.WatchConnectionsRequest{}
	if seq, ok := c.LastSequence(); ok {
		req.AfterSequence = &seq
	}
	stream, err := c.stub.WatchConnections(ctx, req)
	if err != nil {
		return
	}
	// The broker sends headers once the watcher is registered; a refused stream has none
	// (grpc-go then returns nil, nil) and Recv gives its status.
	if header, err := stream.Header(); header == nil {
		if err == nil {
			_, err = stream.Recv()
		}
		c.resyncIfAsked(err)
		return
	}
	c.cache.setLive(true)
	up := time.Now()
	for {
		resp, err := stream.Recv()
		if err != nil {
			c.resyncIfAsked(err)
			if time.Since(up) >= time.Second {
				*attempt = 0 // a stream that stayed up: the next break starts the backoff over
			}
			return
		}
		*attempt = 0 // a stream that delivers is healthy
		event := eventFrom(resp.GetEvent())
		c.seqMu.Lock()
		c.lastSequence, c.haveSequence = event.Sequence, true
		c.seqMu.Unlock()
		c.cache.apply(event)
	}
}

// resyncIfAsked forgets the resume point when the broker no longer keeps it (the cache was
// dropped with the stream anyway): the next subscription watches from now on.
func (c *Client) resyncIfAsked(err error) {
	var resync *ResyncRequiredError
	if errors.As(fromStatus(err), &resync) {
		c.seqMu.Lock()
		c.haveSequence = false
		c.seqMu.Unlock()
	}
}
