package credentialbroker

import (
	"io"
	"net/http"
)

// Transport is an http.RoundTripper that sends the broker's credential for (UserID, Upstream)
// and, on one 401 from the upstream, resolves again with the refused token (the broker
// refreshes) and retries once. A request whose body cannot be replayed (no GetBody) is not retried.
type Transport struct {
	Client   *Client
	UserID   string
	Upstream string
	Options  []ResolveOption
	Base     http.RoundTripper // nil: http.DefaultTransport
}

func (t *Transport) base() http.RoundTripper {
	if t.Base != nil {
		return t.Base
	}
	return http.DefaultTransport
}

// RoundTrip implements http.RoundTripper.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	sent, err := t.Client.Resolve(req.Context(), t.UserID, t.Upstream, t.Options...)
	if err != nil {
		return nil, err
	}
	first := req.Clone(req.Context())
	first.Header.Set(sent.HeaderName, sent.HeaderValue)
	resp, err := t.base().RoundTrip(first)
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}
	if req.Body != nil && req.Body != http.NoBody && req.GetBody == nil {
		return resp, nil
	}
	opts := append(append([]ResolveOption{}, t.Options...), RejectedAccessToken(sent.AccessToken))
	fresh, err := t.Client.Resolve(req.Context(), t.UserID, t.Upstream, opts...)
	if err != nil {
		return resp, nil // the 401 stands; the caller sees the upstream's answer
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	again := req.Clone(req.Context())
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
