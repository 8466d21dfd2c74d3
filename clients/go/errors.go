package freshd

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Error is a failed freshd call: the gRPC status code and the server's
// message (for INVALID_ARGUMENT it names the field and the limit).
//
// Compare it with [errors.Is] against the sentinels ([ErrInvalidArgument],
// [ErrFillRaced], [ErrLeaseLost], ...), or take it with [errors.As] to read
// the code and message. It also carries a GRPCStatus method, so
// [status.FromError] and [status.Code] understand it.
type Error struct {
	// Code is the gRPC status code.
	Code codes.Code
	// Message is the status message.
	Message string
	// Method is the RPC that failed, such as "Fill" (empty for a sentinel).
	Method string
}

// Error formats the error as "Method: CODE: message".
func (e *Error) Error() string {
	where := ""
	if e.Method != "" {
		where = e.Method + ": "
	}
	if e.Message == "" {
		return where + CodeName(e.Code)
	}
	return fmt.Sprintf("%s%s: %s", where, CodeName(e.Code), e.Message)
}

// GRPCStatus returns the error as a gRPC status.
func (e *Error) GRPCStatus() *status.Status {
	return status.New(e.Code, e.Message)
}

// Is reports whether target is a sentinel of this error's kind: a sentinel
// matches every error with its code ([ErrLeaseLost] only FAILED_PRECONDITION
// answers to Fill). It also matches [context.DeadlineExceeded] and
// [context.Canceled] for those codes.
func (e *Error) Is(target error) bool {
	if target == ErrLeaseLost {
		return e.Code == codes.FailedPrecondition && e.Method == "Fill"
	}
	switch target {
	case context.DeadlineExceeded:
		return e.Code == codes.DeadlineExceeded
	case context.Canceled:
		return e.Code == codes.Canceled
	}
	t, ok := target.(*Error)
	return ok && t.Message == "" && t.Method == "" && t.Code == e.Code
}

// Sentinels for [errors.Is], one per status code the Coordinator documents.
var (
	// ErrInvalidArgument: a request broke a documented limit or rule;
	// nothing was changed.
	ErrInvalidArgument = &Error{Code: codes.InvalidArgument}
	// ErrFillRaced (ABORTED, Fill only): the key or one of its dependencies
	// changed after the observed seq, or the seq is from another epoch. Read
	// the origin again and fill with a newer seq.
	ErrFillRaced = &Error{Code: codes.Aborted}
	// ErrFailedPrecondition: a purge over max_purge_keys without confirm, or
	// a fill with a lease token the caller does not hold.
	ErrFailedPrecondition = &Error{Code: codes.FailedPrecondition}
	// ErrLeaseLost (FAILED_PRECONDITION on a Fill): the lease token is not
	// held (expired or already used); lease again.
	ErrLeaseLost = &Error{Code: codes.FailedPrecondition, Method: "Fill"}
	// ErrNotFound: freshd holds nothing for the key (Inspect), or the
	// namespace has no policy of its own (DeletePolicy).
	ErrNotFound = &Error{Code: codes.NotFound}
	// ErrResourceExhausted: a per-stream Watch limit, purges_per_minute, or
	// one of the principal's quotas (the message says "quota <name>").
	ErrResourceExhausted = &Error{Code: codes.ResourceExhausted}
	// ErrUnauthenticated: the server requires a token and the call carried
	// none, an unknown one or an expired one. See [WithToken].
	ErrUnauthenticated = &Error{Code: codes.Unauthenticated}
	// ErrPermissionDenied: the token's principal lacks the scope the call
	// needs; the message names the principal, the scope and the namespace.
	ErrPermissionDenied = &Error{Code: codes.PermissionDenied}
	// ErrOutOfRange: the encoded request is larger than max_message_bytes.
	ErrOutOfRange = &Error{Code: codes.OutOfRange}
	// ErrUnavailable: the server is shutting down, replaying, unreachable, or
	// did not apply a min_seq in time. Retry later or elsewhere.
	ErrUnavailable = &Error{Code: codes.Unavailable}
	// ErrDeadlineExceeded: the call did not finish before its deadline.
	ErrDeadlineExceeded = &Error{Code: codes.DeadlineExceeded}
	// ErrInternal: a bug or a failed log append; the request may not have
	// been applied.
	ErrInternal = &Error{Code: codes.Internal}
)

// Code returns the gRPC status code of err: its [*Error]'s code, the code of
// a gRPC status error, codes.OK for nil and codes.Unknown otherwise.
func Code(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return status.Code(err)
}

// CodeName returns a status code's name as the proto and the conformance
// suite write it, such as "INVALID_ARGUMENT".
func CodeName(c codes.Code) string {
	if name, ok := codeNames[c]; ok {
		return name
	}
	return fmt.Sprintf("CODE(%d)", uint32(c))
}

var codeNames = map[codes.Code]string{
	codes.OK:                 "OK",
	codes.Canceled:           "CANCELLED",
	codes.Unknown:            "UNKNOWN",
	codes.InvalidArgument:    "INVALID_ARGUMENT",
	codes.DeadlineExceeded:   "DEADLINE_EXCEEDED",
	codes.NotFound:           "NOT_FOUND",
	codes.AlreadyExists:      "ALREADY_EXISTS",
	codes.PermissionDenied:   "PERMISSION_DENIED",
	codes.ResourceExhausted:  "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION",
	codes.Aborted:            "ABORTED",
	codes.OutOfRange:         "OUT_OF_RANGE",
	codes.Unimplemented:      "UNIMPLEMENTED",
	codes.Internal:           "INTERNAL",
	codes.Unavailable:        "UNAVAILABLE",
	codes.DataLoss:           "DATA_LOSS",
	codes.Unauthenticated:    "UNAUTHENTICATED",
}

// fromRPC turns a gRPC error into an [*Error] (nil stays nil).
func fromRPC(err error, method string) error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return err
	}
	st, ok := status.FromError(err)
	if !ok {
		switch {
		case errors.Is(err, context.DeadlineExceeded):
			return &Error{Code: codes.DeadlineExceeded, Message: err.Error(), Method: method}
		case errors.Is(err, context.Canceled):
			return &Error{Code: codes.Canceled, Message: err.Error(), Method: method}
		}
		return &Error{Code: codes.Unknown, Message: err.Error(), Method: method}
	}
	return &Error{Code: st.Code(), Message: st.Message(), Method: method}
}
