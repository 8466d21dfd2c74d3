"""Python client of freshd, the cache-coordination server.

* :class:`Client`: one typed method per RPC of ``freshd.v1.Coordinator``.
* :class:`NearCache`: an in-process cache kept right by version checks and
  the Watch stream.
* :class:`FreshdError` and its subclasses: failures, with the gRPC code.

The generated messages and stub are at hand as ``freshd.pb`` and
``freshd.pb_grpc``.
"""

from ._pb import coordinator_pb2 as pb
from ._pb import coordinator_pb2_grpc as pb_grpc
from .client import Client, Pem, StreamEnded, SyncResult, WatchEvent, WatchStream
from .errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FillRaced,
    FreshdError,
    InternalError,
    InvalidArgument,
    LeaseLost,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .nearcache import Loader, NearCache, NearCacheStats
from .types import (
    Change,
    ChangeResult,
    CheckBatchResult,
    CheckItem,
    CheckItemResult,
    CheckResult,
    Decision,
    FillResult,
    Freshness,
    KeyInfo,
    LeaseResult,
    NamespacePolicy,
    Notice,
    NoticeBatch,
    Policy,
    Progress,
    PublishResult,
    PurgeResult,
    Refused,
    Reset,
    ResetReason,
    ResumeOutcome,
    ResumeToken,
    Stats,
    SubscriberStats,
    WatchStarted,
)

__version__ = "0.1.0"

__all__ = [
    "Change",
    "ChangeResult",
    "CheckBatchResult",
    "CheckItem",
    "CheckItemResult",
    "CheckResult",
    "Client",
    "DeadlineExceeded",
    "Decision",
    "FailedPrecondition",
    "FillRaced",
    "FillResult",
    "Freshness",
    "FreshdError",
    "InternalError",
    "InvalidArgument",
    "KeyInfo",
    "LeaseLost",
    "LeaseResult",
    "Loader",
    "NamespacePolicy",
    "NearCache",
    "NearCacheStats",
    "NotFound",
    "Notice",
    "NoticeBatch",
    "OutOfRange",
    "Pem",
    "PermissionDenied",
    "Policy",
    "Progress",
    "PublishResult",
    "PurgeResult",
    "Refused",
    "Reset",
    "ResetReason",
    "ResourceExhausted",
    "ResumeOutcome",
    "ResumeToken",
    "Stats",
    "StreamEnded",
    "SubscriberStats",
    "SyncResult",
    "Unauthenticated",
    "Unavailable",
    "WatchEvent",
    "WatchStarted",
    "WatchStream",
    "pb",
    "pb_grpc",
]
