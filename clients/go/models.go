package credentialbroker

import (
	"fmt"
	"log/slog"
	"time"

	cbv1 "credentialbroker/internal/gen/credentialbroker/v1"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Credential is a Resolve answer: send HeaderName: HeaderValue upstream. Printed (fmt, slog),
// as a value or a pointer, it never shows the token.
type Credential struct {
	AccessToken      string
	TokenType        string
	HeaderName       string
	HeaderValue      string
	ExpiresAt        time.Time // zero when unknown
	Scopes           []string
	ObtainedVia      string
	ConnectionFields map[string]string
}

func (c Credential) String() string {
	return fmt.Sprintf("Credential{%s %s expires %s scopes %v}", c.HeaderName, c.TokenType, c.ExpiresAt.Format(time.RFC3339), c.Scopes)
}

// GoString keeps %#v from printing the token.
func (c Credential) GoString() string { return c.String() }

// LogValue keeps slog (its JSON handler too) from printing the token.
func (c Credential) LogValue() slog.Value { return slog.StringValue(c.String()) }

// AuthorizationRequest is a started connect flow. AuthorizationURL and State are secrets of
// the flow, never printed.
type AuthorizationRequest struct {
	AuthorizationURL string
	State            string
	ExpiresAt        time.Time
}

func (a AuthorizationRequest) String() string {
	return "AuthorizationRequest{expires " + a.ExpiresAt.Format(time.RFC3339) + "}"
}

// GoString keeps %#v from printing the state.
func (a AuthorizationRequest) GoString() string { return a.String() }

// LogValue keeps slog (its JSON handler too) from printing the state.
func (a AuthorizationRequest) LogValue() slog.Value { return slog.StringValue(a.String()) }

// CredentialInfo describes a stored credential (never a token).
type CredentialInfo struct {
	UserID, Upstream, TokenType string
	Scopes                      []string
	ExpiresAt                   time.Time
	ObtainedVia                 string
	UpdatedAt                   time.Time
}

// Connection is one user's connection to one upstream (never a token).
type Connection struct {
	Upstream, Status, Mode string
	Scopes                 []string
	ExpiresAt              time.Time
	ObtainedVia            string
	UpdatedAt              time.Time
	LastError              string
	ConnectionFields       map[string]string
	RefreshTokenExpiresAt  time.Time
	LastRefreshedAt        time.Time
	LastUsedAt             time.Time
	ConsecutiveFailures    uint32
	NextRetryAt            time.Time
}

// TokenRevocation is the outcome of revoking one token (RFC 7009).
type TokenRevocation struct{ TokenTypeHint, Outcome, Reason string }

// Disconnection is a Disconnect answer.
type Disconnection struct {
	Deleted     bool
	Revocations []TokenRevocation
}

// UpstreamDisconnection is one upstream's outcome in DisconnectAll.
type UpstreamDisconnection struct {
	Upstream    string
	Deleted     bool
	Revocations []TokenRevocation
}

// ConnectionEvent is one committed change to a connection; Kind is e.g. "REFRESHED".
type ConnectionEvent struct {
	Sequence               uint64
	UserID, Upstream, Kind string
	Status, LastError      string
	At                     time.Time
}

var eventKinds = map[cbv1.ConnectionEventKind]string{
	cbv1.ConnectionEventKind_CONNECTION_EVENT_KIND_CONNECTED:      "CONNECTED",
	cbv1.ConnectionEventKind_CONNECTION_EVENT_KIND_REFRESHED:      "REFRESHED",
	cbv1.ConnectionEventKind_CONNECTION_EVENT_KIND_REFRESH_FAILED: "REFRESH_FAILED",
	cbv1.ConnectionEventKind_CONNECTION_EVENT_KIND_NEEDS_REAUTH:   "NEEDS_REAUTH",
	cbv1.ConnectionEventKind_CONNECTION_EVENT_KIND_RECOVERED:      "RECOVERED",
	cbv1.ConnectionEventKind_CONNECTION_EVENT_KIND_DISCONNECTED:   "DISCONNECTED",
	cbv1.ConnectionEventKind_CONNECTION_EVENT_KIND_SCOPES_CHANGED: "SCOPES_CHANGED",
}

func when(ts *timestamppb.Timestamp) time.Time {
	if ts == nil {
		return time.Time{}
	}
	return ts.AsTime()
}

func credentialFrom(r *cbv1.ResolveResponse) *Credential {
	return &Credential{
		AccessToken: r.GetAccessToken(), TokenType: r.GetTokenType(), HeaderName: r.GetHeaderName(),
		HeaderValue: r.GetHeaderValue(), ExpiresAt: when(r.GetExpiresAt()), Scopes: r.GetScopes(),
		ObtainedVia: r.GetObtainedVia(), ConnectionFields: r.GetConnectionFields(),
	}
}

func infoFrom(c *cbv1.CredentialInfo) *CredentialInfo {
	return &CredentialInfo{
		UserID: c.GetUserId(), Upstream: c.GetUpstream(), TokenType: c.GetTokenType(), Scopes: c.GetScopes(),
		ExpiresAt: when(c.GetExpiresAt()), ObtainedVia: c.GetObtainedVia(), UpdatedAt: when(c.GetUpdatedAt()),
	}
}

func connectionFrom(c *cbv1.Connection) Connection {
	return Connection{
		Upstream: c.GetUpstream(), Status: c.GetStatus(), Mode: c.GetMode(), Scopes: c.GetScopes(),
		ExpiresAt: when(c.GetExpiresAt()), ObtainedVia: c.GetObtainedVia(), UpdatedAt: when(c.GetUpdatedAt()),
		LastError: c.GetLastError(), ConnectionFields: c.GetConnectionFields(),
		RefreshTokenExpiresAt: when(c.GetRefreshTokenExpiresAt()), LastRefreshedAt: when(c.GetLastRefreshedAt()),
		LastUsedAt: when(c.GetLastUsedAt()), ConsecutiveFailures: c.GetConsecutiveFailures(),
		NextRetryAt: when(c.GetNextRetryAt()),
	}
}

func revocationsFrom(items []*cbv1.TokenRevocation) []TokenRevocation {
	out := make([]TokenRevocation, 0, len(items))
	for _, r := range items {
		out = append(out, TokenRevocation{r.GetTokenTypeHint(), r.GetOutcome(), r.GetReason()})
	}
	return out
}

func eventFrom(e *cbv1.ConnectionEvent) ConnectionEvent {
	kind, ok := eventKinds[e.GetKind()]
	if !ok {
		kind = "UNSPECIFIED"
	}
	return ConnectionEvent{
		Sequence: e.GetSequence(), UserID: e.GetUserId(), Upstream: e.GetUpstream(), Kind: kind,
		Status: e.GetStatus(), LastError: e.GetLastError(), At: when(e.GetAt()),
	}
}
