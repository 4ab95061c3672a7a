package credentialbroker

import (
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
)

// Transport is an http.RoundTripper that sends the broker's credential for (UserID, Upstream)
// and, on one 401 from the upstream, resolves again with the refused token (the broker
// refreshes) and retries once. A request whose body cannot be replayed (no GetBody) is not
// retried: its 401 is returned, the refused token still reported. Redirect hops to another
// origin than the first request's get no credential. UserToken, when set, is the end user's
// own token sent with its Resolve calls (see WithUserTokenContext); without it a token in the
// request's context is sent. Printed (fmt, slog), a Transport never shows it.
type Transport struct {
	Client    *Client
	UserID    string
	Upstream  string
	Options   []ResolveOption
	Base      http.RoundTripper // nil: http.DefaultTransport
	UserToken string
}

// String names the user and upstream only: the user token is never printed.
func (t Transport) String() string {
	return "credentialbroker.Transport{" + t.UserID + " " + t.Upstream + "}"
}

// GoString keeps %#v from printing the user token.
func (t Transport) GoString() string { return t.String() }

// LogValue keeps slog (its JSON handler too) from printing the user token.
func (t Transport) LogValue() slog.Value { return slog.StringValue(t.String()) }

func (t *Transport) base() http.RoundTripper {
	if t.Base != nil {
		return t.Base
	}
	return http.DefaultTransport
}

// RoundTrip implements http.RoundTripper. A redirect hop to another origin (scheme, host and
// port) goes out as is, and its 401 rejects no token.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if origin(req.URL) != origin(firstRequest(req).URL) {
		return t.base().RoundTrip(req)
	}
	rctx := req.Context()
	if t.UserToken != "" {
		rctx = WithUserTokenContext(rctx, t.UserToken)
	}
	sent, err := t.Client.Resolve(rctx, t.UserID, t.Upstream, t.Options...)
	if err != nil {
		if req.Body != nil {
			_ = req.Body.Close()
		}
		return nil, err
	}
	first := clone(req)
	first.Header.Set(sent.HeaderName, sent.HeaderValue)
	resp, err := t.base().RoundTrip(first)
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}
	// Report the refused token even when the body cannot be replayed: the next request gets a fresh one.
	opts := append(append([]ResolveOption{}, t.Options...), RejectedAccessToken(sent.AccessToken))
	fresh, err := t.Client.Resolve(rctx, t.UserID, t.Upstream, opts...)
	replayable := req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
	if err != nil || !replayable {
		return resp, nil // the 401 stands; the caller sees the upstream's answer
	}
	discard(resp)
	again := clone(req)
	if req.GetBody != nil {
		body, err := req.GetBody()
		if err != nil {
			return nil, err
		}
		again.Body = body
	}
	if fresh.HeaderName != sent.HeaderName {
		again.Header.Del(sent.HeaderName)
	}
	again.Header.Set(fresh.HeaderName, fresh.HeaderValue)
	return t.base().RoundTrip(again)
}

// clone is a copy of req to send, with a Header map of its own even when req has none.
func clone(req *http.Request) *http.Request {
	out := req.Clone(req.Context())
	if out.Header == nil {
		out.Header = http.Header{}
	}
	return out
}

// maxDrain bounds how much of a refused answer's body is read to keep its connection.
const maxDrain = 4 << 10

// discard closes the body of a refused answer, first reading it when it is short and of known
// length (so the connection can be reused): a streamed, slow or huge body is not waited for.
func discard(resp *http.Response) {
	if resp.ContentLength >= 0 && resp.ContentLength <= maxDrain {
		_, _ = io.CopyN(io.Discard, resp.Body, maxDrain)
	}
	_ = resp.Body.Close()
}

// firstRequest is the request that started req's redirect chain (req itself if it is the first).
func firstRequest(req *http.Request) *http.Request {
	for req.Response != nil && req.Response.Request != nil {
		req = req.Response.Request
	}
	return req
}

// origin is u's scheme, host and port, the port filled in from the scheme when absent.
func origin(u *url.URL) string {
	port := u.Port()
	if port == "" {
		port = "80"
		if u.Scheme == "https" {
			port = "443"
		}
	}
	return u.Scheme + "://" + net.JoinHostPort(strings.ToLower(u.Hostname()), port)
}
