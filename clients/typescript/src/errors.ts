/**
 * Errors: every failed call rejects with a {@link FreshdError} carrying its
 * gRPC status code, as documented in `proto/freshd/v1/coordinator.proto`.
 *
 * @module
 */
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";

/** The name of a gRPC status code, such as `"ABORTED"`. */
export type StatusCodeName = keyof typeof status;

/** The name of a numeric gRPC status code (`"UNKNOWN"` for an unknown one). */
export function statusName(code: number): string {
  const name = (status as unknown as Record<number, string | undefined>)[code];
  return typeof name === "string" ? name : "UNKNOWN";
}

/**
 * A freshd call failed. `code` is the gRPC status code (see {@link status}),
 * `codeName` its name, `details` the server's message (for
 * INVALID_ARGUMENT it names the field and the limit), `method` the RPC.
 */
export class FreshdError extends Error {
  /** The gRPC status code, a value of `status` from `@grpc/grpc-js`. */
  readonly code: number;
  /** The server's message. */
  readonly details: string;
  /** The RPC that failed, such as `"Fill"` (empty when unknown). */
  readonly method: string;
  /** The trailing metadata of the failed call, when there was any. */
  readonly metadata: Metadata | undefined;

  /** An error of `code` with the server's `details`, for `method`. */
  constructor(
    code: number,
    details: string,
    method = "",
    metadata?: Metadata,
    options?: { cause?: unknown },
  ) {
    const where = method ? `${method}: ` : "";
    super(`${where}${statusName(code)}: ${details}`, options);
    this.name = new.target.name;
    this.code = code;
    this.details = details;
    this.method = method;
    this.metadata = metadata;
  }

  /** The status code's name, such as `"ABORTED"`. */
  get codeName(): string {
    return statusName(this.code);
  }
}

/** INVALID_ARGUMENT: a request broke a documented limit or rule; nothing was changed. */
export class InvalidArgument extends FreshdError {}

/**
 * ABORTED (Fill only): the key or one of its dependencies changed after the
 * observed seq, or the seq is from another epoch. The value read from the
 * origin may be stale: read it again and fill with a newer seq.
 */
export class FillRaced extends FreshdError {}

/**
 * FAILED_PRECONDITION: a purge above `max_purge_keys` without `confirm`, or a
 * fill with a lease token the caller does not hold.
 */
export class FailedPrecondition extends FreshdError {}

/**
 * FAILED_PRECONDITION on a Fill with a lease token the caller does not hold
 * (expired or already used): lease again.
 */
export class LeaseLost extends FailedPrecondition {}

/**
 * NOT_FOUND: freshd holds nothing for the key (Inspect), or the namespace has
 * no policy of its own (DeletePolicy).
 */
export class NotFound extends FreshdError {}

/**
 * RESOURCE_EXHAUSTED: a per-stream Watch limit, `purges_per_minute`, or one
 * of the principal's quotas (the details say `quota <name>`).
 */
export class ResourceExhausted extends FreshdError {}

/**
 * UNAUTHENTICATED: the server requires a token and the call carried none, one
 * it does not know, or one that expired. Pass `token` to the client.
 */
export class Unauthenticated extends FreshdError {}

/**
 * PERMISSION_DENIED: the token's principal lacks the scope the call needs in
 * a namespace it touches; the details name the principal, the scope and the
 * namespace.
 */
export class PermissionDenied extends FreshdError {}

/** OUT_OF_RANGE: the encoded request is larger than `max_message_bytes`. */
export class OutOfRange extends FreshdError {}

/**
 * UNAVAILABLE: the server is shutting down, not ready, unreachable (a failed
 * TLS handshake too), or did not apply a `min_seq` in time. Retry later or
 * elsewhere.
 */
export class Unavailable extends FreshdError {}

/** DEADLINE_EXCEEDED: the call did not finish within its timeout. */
export class DeadlineExceeded extends FreshdError {}

/** CANCELLED: the call was cancelled (by an `AbortSignal`, say). */
export class Cancelled extends FreshdError {}

/** INTERNAL: a bug or a failed log append; the request may not have been applied. */
export class InternalError extends FreshdError {}

type ErrorClass = new (
  code: number,
  details: string,
  method?: string,
  metadata?: Metadata,
  options?: { cause?: unknown },
) => FreshdError;

const BY_CODE: ReadonlyMap<number, ErrorClass> = new Map<number, ErrorClass>([
  [status.INVALID_ARGUMENT, InvalidArgument],
  [status.ABORTED, FillRaced],
  [status.FAILED_PRECONDITION, FailedPrecondition],
  [status.NOT_FOUND, NotFound],
  [status.RESOURCE_EXHAUSTED, ResourceExhausted],
  [status.UNAUTHENTICATED, Unauthenticated],
  [status.PERMISSION_DENIED, PermissionDenied],
  [status.OUT_OF_RANGE, OutOfRange],
  [status.UNAVAILABLE, Unavailable],
  [status.DEADLINE_EXCEEDED, DeadlineExceeded],
  [status.CANCELLED, Cancelled],
  [status.INTERNAL, InternalError],
]);

/** The {@link FreshdError} subclass for a status code, for `method`. */
export function errorFor(
  code: number,
  details: string,
  method = "",
  metadata?: Metadata,
  cause?: unknown,
): FreshdError {
  let cls = BY_CODE.get(code) ?? FreshdError;
  if (cls === FailedPrecondition && method === "Fill") {
    cls = LeaseLost;
  }
  return new cls(code, details, method, metadata, cause === undefined ? undefined : { cause });
}

function isServiceError(error: unknown): error is ServiceError {
  return (
    typeof error === "object" &&
    error !== null &&
    typeof (error as { code?: unknown }).code === "number" &&
    "details" in error
  );
}

/** The {@link FreshdError} for whatever a gRPC call failed with. */
export function fromGrpcError(error: unknown, method = ""): FreshdError {
  if (error instanceof FreshdError) {
    return error;
  }
  if (isServiceError(error)) {
    return errorFor(error.code, error.details ?? "", method, error.metadata, error);
  }
  const message = error instanceof Error ? error.message : String(error);
  return errorFor(status.UNKNOWN, message, method, undefined, error);
}
