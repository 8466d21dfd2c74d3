"""Exceptions: every failed call raises a :class:`FreshdError` carrying its
gRPC status code, as documented in ``proto/freshd/v1/coordinator.proto``."""

from __future__ import annotations

from typing import Dict, Optional, Type

import grpc


class FreshdError(Exception):
    """A freshd call failed. ``code`` is the gRPC status code, ``details`` the
    server's message (it names the field and the limit for INVALID_ARGUMENT).
    """

    def __init__(self, code: grpc.StatusCode, details: str, method: str = "") -> None:
        self.code = code
        self.details = details
        self.method = method
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{code.name}: {details}")

    @property
    def code_name(self) -> str:
        """The status code's name, such as ``"ABORTED"``."""
        return str(self.code.name)


class InvalidArgument(FreshdError):
    """INVALID_ARGUMENT: a request broke a documented limit or rule; nothing
    was changed."""


class FillRaced(FreshdError):
    """ABORTED (Fill only): the key or one of its dependencies changed after
    the observed seq, or the seq is from another epoch. The value read from
    the origin may be stale: read it again and fill with a newer seq."""


class FailedPrecondition(FreshdError):
    """FAILED_PRECONDITION: a purge above ``max_purge_keys`` without
    ``confirm``, or a fill with a lease token the caller does not hold."""


class LeaseLost(FailedPrecondition):
    """FAILED_PRECONDITION on a Fill with a lease token the caller does not
    hold (expired or already used): lease again."""


class NotFound(FreshdError):
    """NOT_FOUND: freshd holds nothing for the key (Inspect), or the namespace
    has no policy of its own (DeletePolicy)."""


class ResourceExhausted(FreshdError):
    """RESOURCE_EXHAUSTED: a per-stream Watch limit, ``purges_per_minute``,
    or one of the principal's quotas (the details say ``quota <name>`` and,
    for rates, when to retry)."""


class Unauthenticated(FreshdError):
    """UNAUTHENTICATED: the server requires a token and the call carried
    none, or one it does not know, or one that expired. Pass ``token=`` to
    :class:`~freshd.Client`."""


class PermissionDenied(FreshdError):
    """PERMISSION_DENIED: the token's principal lacks the scope the call needs
    in the key's namespace; the details name the principal, the scope and the
    namespace. Nothing was changed."""


class OutOfRange(FreshdError):
    """OUT_OF_RANGE: the encoded request is larger than
    ``max_message_bytes``."""


class Unavailable(FreshdError):
    """UNAVAILABLE: the server is shutting down, not ready, unreachable, or did
    not apply a ``min_seq`` in time. Retry later or elsewhere."""


class DeadlineExceeded(FreshdError):
    """DEADLINE_EXCEEDED: the call did not finish within its timeout."""


class InternalError(FreshdError):
    """INTERNAL: a bug or a failed log append; the request may not have been
    applied."""


_BY_CODE: Dict[grpc.StatusCode, Type[FreshdError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.ABORTED: FillRaced,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: InternalError,
}


def from_rpc_error(error: grpc.RpcError, method: str = "") -> FreshdError:
    """The :class:`FreshdError` subclass for a failed gRPC call."""
    code: Optional[grpc.StatusCode] = None
    details = ""
    if isinstance(error, grpc.Call):
        code = error.code()
        details = error.details() or ""
    if code is None:
        code = grpc.StatusCode.UNKNOWN
        details = details or str(error)
    cls = _BY_CODE.get(code, FreshdError)
    if cls is FailedPrecondition and method == "Fill":
        cls = LeaseLost
    return cls(code, details, method)
