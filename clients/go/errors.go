package credentialbroker

import (
	"context"
	"errors"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Domain is the ErrorInfo domain of the broker's errors.
const Domain = "credentialbroker"

// BrokerError is what every failed call returns, wrapped in a typed error for its family:
// read the family with errors.As into *NotConnectedError, *ReconnectRequiredError,
// *InsufficientScopeError, *UnavailableError, *PermissionDeniedError, *InvalidArgumentError,
// *UnauthenticatedError, *UnknownUpstreamError, *FlowNotFoundError, *TokenRequestRejectedError,
// *ResourceExhaustedError or *InternalError, and the exact reason from Reason.
// Messages are the broker's, which never carry a token.
type BrokerError struct {
	Code     codes.Code
	Reason   string // the ErrorInfo reason, e.g. "NOT_CONNECTED"; the code name when none was sent
	Message  string
	Metadata map[string]string
	cause    error // context.DeadlineExceeded or context.Canceled when the call's context ended
}

func (e *BrokerError) Error() string { return e.Reason + ": " + e.Message }

// Unwrap is context.DeadlineExceeded or context.Canceled when the call ended because its
// context did (errors.Is(err, context.Canceled) holds), else nil.
func (e *BrokerError) Unwrap() error { return e.cause }

// ConnectRequired is shared by the errors that send the user to an authorization URL.
type ConnectRequired struct {
	*BrokerError
	Upstream         string
	AuthorizationURL string
}

// NotConnectedError: the user never connected this upstream (reason NOT_CONNECTED).
type NotConnectedError struct{ ConnectRequired }

// ReconnectRequiredError: the stored grant is dead; the user connects again (RECONNECT_REQUIRED).
type ReconnectRequiredError struct{ ConnectRequired }

// InsufficientScopeError: the grant lacks MissingScopes; AuthorizationURL asks for the union.
type InsufficientScopeError struct {
	ConnectRequired
	MissingScopes []string
}

// UnavailableError: UNAVAILABLE (the broker unreachable, or its upstream, identity provider or
// store); already retried within the call's deadline.
type UnavailableError struct{ *BrokerError }

// PermissionDeniedError: PERMISSION_DENIED (USER_MISMATCH, POLICY_DENIED, CALLER_NOT_PERMITTED...).
type PermissionDeniedError struct{ *BrokerError }

// InvalidArgumentError: INVALID_ARGUMENT (and ISSUER_MISMATCH).
type InvalidArgumentError struct{ *BrokerError }

// UnauthenticatedError: UNAUTHENTICATED (SUBJECT_TOKEN_REQUIRED, USER_TOKEN_INVALID,
// MISSING_REQUEST_HEADER, CALLER_UNAUTHENTICATED).
type UnauthenticatedError struct{ *BrokerError }

// UnknownUpstreamError: no upstream of that name is configured (UPSTREAM_NOT_FOUND).
type UnknownUpstreamError struct{ *BrokerError }

// FlowNotFoundError: the state is unknown, expired or used (FLOW_NOT_FOUND).
type FlowNotFoundError struct{ *BrokerError }

// TokenRequestRejectedError: the token endpoint refused (TOKEN_REQUEST_REJECTED).
type TokenRequestRejectedError struct{ *BrokerError }

// ResourceExhaustedError: TOO_MANY_PENDING_FLOWS, WATCH_TOO_SLOW.
type ResourceExhaustedError struct{ *BrokerError }

// ResyncRequiredError: a watch resumed after a sequence the broker no longer keeps
// (WATCH_RESYNC_REQUIRED, OUT_OF_RANGE): read the state again and watch from now on.
type ResyncRequiredError struct{ *BrokerError }

// InternalError: INTERNAL, DECRYPTION_FAILED, UNIMPLEMENTED, a passed deadline and anything
// this version does not recognise.
type InternalError struct{ *BrokerError }

func (e *ConnectRequired) Unwrap() error           { return e.BrokerError }
func (e *UnavailableError) Unwrap() error          { return e.BrokerError }
func (e *PermissionDeniedError) Unwrap() error     { return e.BrokerError }
func (e *InvalidArgumentError) Unwrap() error      { return e.BrokerError }
func (e *UnauthenticatedError) Unwrap() error      { return e.BrokerError }
func (e *UnknownUpstreamError) Unwrap() error      { return e.BrokerError }
func (e *FlowNotFoundError) Unwrap() error         { return e.BrokerError }
func (e *TokenRequestRejectedError) Unwrap() error { return e.BrokerError }
func (e *ResourceExhaustedError) Unwrap() error    { return e.BrokerError }
func (e *InternalError) Unwrap() error             { return e.BrokerError }
func (e *ResyncRequiredError) Unwrap() error       { return e.BrokerError }

// fromStatus turns a failed gRPC call into the typed error for its ErrorInfo reason.
func fromStatus(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return &InternalError{&BrokerError{Code: codes.DeadlineExceeded, Reason: "DEADLINE_EXCEEDED", Message: err.Error(), cause: context.DeadlineExceeded}}
	}
	if errors.Is(err, context.Canceled) {
		return &InternalError{&BrokerError{Code: codes.Canceled, Reason: "CANCELLED", Message: err.Error(), cause: context.Canceled}}
	}
	st, ok := status.FromError(err)
	if !ok {
		return &InternalError{&BrokerError{Code: codes.Unknown, Reason: "UNKNOWN", Message: err.Error()}}
	}
	base := &BrokerError{Code: st.Code(), Reason: CodeName(st.Code()), Message: st.Message(), Metadata: map[string]string{}}
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok && info.GetDomain() == Domain {
			base.Reason = info.GetReason()
			for k, v := range info.GetMetadata() {
				base.Metadata[k] = v
			}
			break
		}
	}
	connect := ConnectRequired{base, base.Metadata["upstream"], base.Metadata["authorization_url"]}
	switch base.Reason {
	case "NOT_CONNECTED":
		return &NotConnectedError{connect}
	case "RECONNECT_REQUIRED":
		return &ReconnectRequiredError{connect}
	case "INSUFFICIENT_SCOPE":
		return &InsufficientScopeError{connect, strings.Fields(strings.ReplaceAll(base.Metadata["missing_scopes"], ",", " "))}
	case "UPSTREAM_NOT_FOUND":
		return &UnknownUpstreamError{base}
	case "FLOW_NOT_FOUND":
		return &FlowNotFoundError{base}
	case "TOKEN_REQUEST_REJECTED":
		return &TokenRequestRejectedError{base}
	}
	switch base.Code {
	case codes.Unavailable:
		return &UnavailableError{base}
	case codes.PermissionDenied:
		return &PermissionDeniedError{base}
	case codes.InvalidArgument:
		return &InvalidArgumentError{base}
	case codes.Unauthenticated:
		return &UnauthenticatedError{base}
	case codes.NotFound:
		return &UnknownUpstreamError{base}
	case codes.ResourceExhausted:
		return &ResourceExhaustedError{base}
	case codes.OutOfRange:
		return &ResyncRequiredError{base}
	}
	return &InternalError{base}
}

// endedWith marks err as caused by the end of ctx when ctx is done, so that errors.Is(err,
// context.DeadlineExceeded) or errors.Is(err, context.Canceled) holds; err keeps its type.
func endedWith(ctx context.Context, err error) error {
	var base *BrokerError
	if cause := ctx.Err(); cause != nil && errors.As(err, &base) && base.cause == nil {
		base.cause = cause
	}
	return err
}

// CodeName is the canonical gRPC name of a status code (FAILED_PRECONDITION), which
// codes.Code.String() spells differently (FailedPrecondition).
func CodeName(c codes.Code) string {
	names := [...]string{"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
		"NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
		"FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
		"UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}
	if int(c) < len(names) {
		return names[c]
	}
	return "UNKNOWN"
}
