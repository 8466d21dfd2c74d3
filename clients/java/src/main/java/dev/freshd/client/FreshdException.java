package dev.freshd.client;

import io.grpc.Status;
import io.grpc.StatusException;
import io.grpc.StatusRuntimeException;
import java.util.Objects;

/**
 * A freshd call failed. {@link #code()} is the gRPC status code, {@link #description()} the
 * server's message (it names the field and the limit for INVALID_ARGUMENT). The nested subclasses
 * name the codes that {@code proto/freshd/v1/coordinator.proto} documents; any other code is a
 * plain {@code FreshdException}.
 */
public class FreshdException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    private final Status.Code code;
    private final String description;
    private final String method;

    /**
     * A failure.
     *
     * @param code the status code
     * @param description the status message (may be empty)
     * @param method the RPC that failed (may be empty)
     * @param cause the underlying exception, or null
     */
    public FreshdException(Status.Code code, String description, String method, Throwable cause) {
        super((method.isEmpty() ? "" : method + ": ") + code + ": " + description, cause);
        this.code = Objects.requireNonNull(code, "code");
        this.description = description;
        this.method = method;
    }

    /**
     * The gRPC status code.
     *
     * @return the code
     */
    public Status.Code code() {
        return code;
    }

    /**
     * The status code's name, such as {@code "ABORTED"}.
     *
     * @return the name
     */
    public String codeName() {
        return code.name();
    }

    /**
     * The server's message.
     *
     * @return the status description, empty when there was none
     */
    public String description() {
        return description;
    }

    /**
     * The RPC that failed, such as {@code "Fill"}.
     *
     * @return the method name, empty when unknown
     */
    public String method() {
        return method;
    }

    /**
     * The exception for a failed call: the subclass that names its code.
     *
     * @param error a gRPC failure ({@link StatusRuntimeException}, {@link StatusException}) or any
     *     other throwable (then UNKNOWN)
     * @param method the RPC
     * @return the exception to throw
     */
    public static FreshdException from(Throwable error, String method) {
        if (error instanceof FreshdException e) {
            return e;
        }
        Status status = Status.fromThrowable(error);
        String description = status.getDescription() == null ? "" : status.getDescription();
        if (status.getCode() == Status.Code.UNKNOWN && description.isEmpty() && status.getCause() != null) {
            description = String.valueOf(status.getCause());
        }
        return of(status.getCode(), description, method, error);
    }

    /**
     * The exception for a status code.
     *
     * @param code the status code
     * @param description the message
     * @param method the RPC
     * @param cause the underlying exception, or null
     * @return the subclass that names the code
     */
    public static FreshdException of(Status.Code code, String description, String method, Throwable cause) {
        switch (code) {
            case INVALID_ARGUMENT: return new InvalidArgument(code, description, method, cause);
            case ABORTED: return new FillRaced(code, description, method, cause);
            case FAILED_PRECONDITION:
                return "Fill".equals(method)
                        ? new LeaseLost(code, description, method, cause)
                        : new FailedPrecondition(code, description, method, cause);
            case NOT_FOUND: return new NotFound(code, description, method, cause);
            case RESOURCE_EXHAUSTED: return new ResourceExhausted(code, description, method, cause);
            case UNAUTHENTICATED: return new Unauthenticated(code, description, method, cause);
            case PERMISSION_DENIED: return new PermissionDenied(code, description, method, cause);
            case OUT_OF_RANGE: return new OutOfRange(code, description, method, cause);
            case UNAVAILABLE: return new Unavailable(code, description, method, cause);
            case DEADLINE_EXCEEDED: return new DeadlineExceeded(code, description, method, cause);
            case INTERNAL: return new Internal(code, description, method, cause);
            default: return new FreshdException(code, description, method, cause);
        }
    }

    /** INVALID_ARGUMENT: a request broke a documented limit or rule; nothing was changed. */
    public static class InvalidArgument extends FreshdException {
        private static final long serialVersionUID = 1L;

        InvalidArgument(Status.Code code, String description, String method, Throwable cause) {
            super(code, description, method, cause);
        }
    }

    /**
     * ABORTED (Fill only): the key or a dependency changed after the observed seq, or the seq is
     * from another epoch. The value read from the origin may be stale: read it again and fill with a
     * newer seq.
     */
    public static class FillRaced extends FreshdException {
        private static final long serialVersionUID = 1L;

        FillRaced(Status.Code code, String description, String method, Throwable cause) {
            super(code, description, method, cause);
        }
    }

    /**
     * FAILED_PRECONDITION: a purge above {@code max_purge_keys} without {@code confirm}, or a fill
     * with a lease token the caller does not hold.
     */
    public static class FailedPrecondition extends FreshdException {
        private static final long serialVersionUID = 1L;

        FailedPrecondition(Status.Code code, String description, String method, Throwable cause) {
            super(code, description, method, cause);
        }
    }

    /** FAILED_PRECONDITION on a Fill with a lease token the caller does not hold: lease again. */
    public static class LeaseLost extends FailedPrecondition {
        private static final long serialVersionUID = 1L;

        LeaseLost(Status.Code code, String description, String method, Throwable cause) {
            super(code, description, method, cause);
        }
    }

    /** NOT_FOUND: freshd holds nothing for the key (Inspect), or the namespace has no policy of its own. */
    public static class NotFound extends FreshdException {
        private static final long serialVersionUID = 1L;

        NotFound(Status.Code code, String description, String method, Throwable cause) {
            super(code, description, method, cause);
        }
    }

    /**
     * RESOURCE_EXHAUSTED: a per-stream Watch limit, {@code purges_per_minute}, or one of the
     * principal's quotas (the message says {@code quota <name>}).
     */
    public static class ResourceExhausted extends FreshdException {
        private static final long serialVersionUID = 1L;

        ResourceExhausted(Status.Code code, String description, String method, Throwable cause) {
            super(code, description, method, cause);
        }
    }

    /** UNAUTHENTICATED: no token, a malformed one, an unknown or an expired one. */
    public static class Unauthenticated extends FreshdException {
        private static final long serialVersionUID = 1L;

        Unauthenticated(Status.Code code, String description, String method, Throwable cause) {
            super(code, description, method, cause);
        }
    }

    /**
     * PERMISSION_DENIED: the token's principal lacks the scope the call needs in a namespace it
     * touches; the message names the principal, the scope and the namespace.
     */
    public static class PermissionDenied extends FreshdException {
        private static final long serialVersionUID = 1L;

        PermissionDenied(Status.Code code, String description, String method, Throwable cause) {
            super(code, description, method, cause);
        }
    }

    /** OUT_OF_RANGE: the encoded request is larger than {@code max_message_bytes}. */
    public static class OutOfRange extends FreshdException {
        private static final long serialVersionUID = 1L;

        OutOfRange(Status.Code code, String description, String method, Throwable cause) {
            super(code, description, method, cause);
        }
    }

    /**
     * UNAVAILABLE: the server is unreachable, replaying, shutting down, or did not apply a
     * {@code min_seq} in time; also a failed TLS handshake. Retry later or elsewhere.
     */
    public static class Unavailable extends FreshdException {
        private static final long serialVersionUID = 1L;

        Unavailable(Status.Code code, String description, String method, Throwable cause) {
            super(code, description, method, cause);
        }
    }

    /** DEADLINE_EXCEEDED: the call did not finish within its timeout. */
    public static class DeadlineExceeded extends FreshdException {
        private static final long serialVersionUID = 1L;

        DeadlineExceeded(Status.Code code, String description, String method, Throwable cause) {
            super(code, description, method, cause);
        }
    }

    /** INTERNAL: a bug or a failed log append; the request may not have been applied. */
    public static class Internal extends FreshdException {
        private static final long serialVersionUID = 1L;

        Internal(Status.Code code, String description, String method, Throwable cause) {
            super(code, description, method, cause);
        }
    }
}
