"""Typed requests and results of the Coordinator API.

Each result keeps the response message it came from in ``raw`` (left out of
``repr`` and equality), for fields added to the proto after this module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import grpc
from typing import Any, Optional, Tuple, Type, TypeVar

from ._pb import coordinator_pb2 as pb


class Freshness(enum.IntEnum):
    """Whether a cached copy is the current version: a fact."""

    UNSPECIFIED = pb.FRESHNESS_UNSPECIFIED
    #: The cached version is the current one.
    FRESH = pb.FRESHNESS_FRESH
    #: The key changed since the cached version.
    STALE = pb.FRESHNESS_STALE
    #: No live registration (never filled, expired, or another epoch): a miss.
    UNKNOWN = pb.FRESHNESS_UNKNOWN


class Decision(enum.IntEnum):
    """What to do with a cached copy, from the namespace's freshness policy."""

    UNSPECIFIED = pb.DECISION_UNSPECIFIED
    #: Serve it.
    FRESH = pb.DECISION_FRESH
    #: Serve it, and refresh it from the origin in the background.
    REVALIDATE = pb.DECISION_REVALIDATE
    #: Go to the origin now.
    REFETCH = pb.DECISION_REFETCH
    #: No live registration: treat it as a miss.
    UNKNOWN = pb.DECISION_UNKNOWN


class ResetReason(enum.IntEnum):
    UNSPECIFIED = pb.RESET_REASON_UNSPECIFIED
    HISTORY_COMPACTED = pb.RESET_REASON_HISTORY_COMPACTED
    NEW_EPOCH = pb.RESET_REASON_NEW_EPOCH
    SLOW_CONSUMER = pb.RESET_REASON_SLOW_CONSUMER


class ResumeOutcome(enum.IntEnum):
    UNSPECIFIED = pb.RESUME_OUTCOME_UNSPECIFIED
    NEW = pb.RESUME_OUTCOME_NEW
    FROM_HISTORY = pb.RESUME_OUTCOME_FROM_HISTORY
    REPAIRED = pb.RESUME_OUTCOME_REPAIRED


_E = TypeVar("_E", bound=enum.IntEnum)


def _enum(cls: Type[_E], value: int) -> _E:
    # A value added to the proto after this client maps to UNSPECIFIED.
    try:
        return cls(value)
    except ValueError:
        return cls(0)


def _raw() -> Any:
    return field(default=None, repr=False, compare=False)


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class Change:
    """One change to publish."""

    key: str
    #: A monotonic number from the source (a database LSN, say); a change not
    #: above the last one seen for the key is a duplicate.
    external_version: Optional[int] = None
    #: Caches must not serve a copy from before it.
    critical: bool = False
    #: When the producer saw the change (Unix ms); 0: the server's receive time.
    event_time_unix_ms: int = 0

    def to_pb(self) -> pb.Change:
        message = pb.Change(
            key=self.key, critical=self.critical, event_time_unix_ms=self.event_time_unix_ms
        )
        if self.external_version is not None:
            message.external_version = self.external_version
        return message


@dataclass(frozen=True)
class CheckItem:
    """One cached copy to check in a :meth:`Client.check_batch`."""

    key: str
    version: int
    age_ms: int = 0
    served: bool = False

    def to_pb(self) -> pb.CheckItem:
        return pb.CheckItem(
            key=self.key, version=self.version, age_ms=self.age_ms, served=self.served
        )


@dataclass(frozen=True)
class ResumeToken:
    """Where a Watch stream stands: every matching notice up to ``seq`` of
    ``epoch`` was received."""

    epoch: int
    seq: int

    def to_pb(self) -> pb.ResumeToken:
        return pb.ResumeToken(epoch=self.epoch, seq=self.seq)


@dataclass(frozen=True)
class Policy:
    """A namespace's freshness policy. Durations in ms; 0 means none."""

    max_age_ms: int = 0
    revalidate_after_ms: int = 0
    stale_while_revalidate_ms: int = 0
    allow_stale_on_critical: bool = False
    #: The share of cache hits clients should check; ``None``: 1.
    check_sample_rate: Optional[float] = None

    def to_pb(self) -> pb.FreshnessPolicy:
        message = pb.FreshnessPolicy(
            max_age_ms=self.max_age_ms,
            revalidate_after_ms=self.revalidate_after_ms,
            stale_while_revalidate_ms=self.stale_while_revalidate_ms,
            allow_stale_on_critical=self.allow_stale_on_critical,
        )
        if self.check_sample_rate is not None:
            message.check_sample_rate = self.check_sample_rate
        return message

    @classmethod
    def from_pb(cls, m: pb.FreshnessPolicy) -> "Policy":
        return cls(
            max_age_ms=m.max_age_ms,
            revalidate_after_ms=m.revalidate_after_ms,
            stale_while_revalidate_ms=m.stale_while_revalidate_ms,
            allow_stale_on_critical=m.allow_stale_on_critical,
            check_sample_rate=m.check_sample_rate if m.HasField("check_sample_rate") else None,
        )


# ----------------------------------------------------------------- results


@dataclass(frozen=True)
class ChangeResult:
    #: Keys this change bumped that no earlier change of the call had bumped.
    invalidated: int
    #: The change's external version was not above the last one: no effect.
    duplicate: bool
    #: The key's version after the call.
    version: int


@dataclass(frozen=True)
class PublishResult:
    seq: int
    epoch: int
    results: Tuple[ChangeResult, ...]
    raw: pb.PublishResponse = _raw()

    @classmethod
    def from_pb(cls, m: pb.PublishResponse) -> "PublishResult":
        return cls(
            seq=m.seq,
            epoch=m.epoch,
            results=tuple(
                ChangeResult(invalidated=r.invalidated, duplicate=r.duplicate, version=r.version)
                for r in m.results
            ),
            raw=m,
        )


@dataclass(frozen=True)
class FillResult:
    #: The version to store beside the cached value.
    version: int
    seq: int
    epoch: int
    #: The TTL granted, after defaults and caps.
    ttl_ms: int
    raw: pb.FillResponse = _raw()

    @classmethod
    def from_pb(cls, m: pb.FillResponse) -> "FillResult":
        return cls(version=m.version, seq=m.seq, epoch=m.epoch, ttl_ms=m.ttl_ms, raw=m)


@dataclass(frozen=True)
class CheckResult:
    freshness: Freshness
    #: The key's current version (0 when UNKNOWN).
    version: int
    #: The critical bit of the key's last change.
    critical: bool
    #: The seq the answer reflects; usable as a fill's ``observed_seq``.
    seq: int
    epoch: int
    decision: Decision
    #: The share of cache hits the namespace's policy asks clients to check.
    check_sample_rate: float
    raw: pb.CheckResponse = _raw()

    @classmethod
    def from_pb(cls, m: pb.CheckResponse) -> "CheckResult":
        return cls(
            freshness=_enum(Freshness, m.freshness),
            version=m.version,
            critical=m.critical,
            seq=m.seq,
            epoch=m.epoch,
            decision=_enum(Decision, m.decision),
            check_sample_rate=m.check_sample_rate,
            raw=m,
        )


@dataclass(frozen=True)
class CheckItemResult:
    freshness: Freshness
    version: int
    critical: bool
    decision: Decision


@dataclass(frozen=True)
class CheckBatchResult:
    #: One result per item, in request order.
    results: Tuple[CheckItemResult, ...]
    seq: int
    epoch: int
    raw: pb.CheckBatchResponse = _raw()

    @classmethod
    def from_pb(cls, m: pb.CheckBatchResponse) -> "CheckBatchResult":
        return cls(
            results=tuple(
                CheckItemResult(
                    freshness=_enum(Freshness, r.freshness),
                    version=r.version,
                    critical=r.critical,
                    decision=_enum(Decision, r.decision),
                )
                for r in m.results
            ),
            seq=m.seq,
            epoch=m.epoch,
            raw=m,
        )


@dataclass(frozen=True)
class KeyInfo:
    """Everything freshd holds for one key (Inspect)."""

    key: str
    version: int
    last_change_seq: int
    last_change_unix_ms: int
    event_time_unix_ms: int
    critical: bool
    dependencies: Tuple[str, ...]
    dependents: int
    registered: bool
    ttl_left_ms: int
    external_version: Optional[int]
    raw: pb.InspectResponse = _raw()

    @classmethod
    def from_pb(cls, m: pb.InspectResponse) -> "KeyInfo":
        return cls(
            key=m.key,
            version=m.version,
            last_change_seq=m.last_change_seq,
            last_change_unix_ms=m.last_change_unix_ms,
            event_time_unix_ms=m.event_time_unix_ms,
            critical=m.critical,
            dependencies=tuple(m.dependencies),
            dependents=m.dependents,
            registered=m.registered,
            ttl_left_ms=m.ttl_left_ms,
            external_version=m.external_version if m.HasField("external_version") else None,
            raw=m,
        )


@dataclass(frozen=True)
class SubscriberStats:
    client_id: str
    acked_seq: int
    lag: int
    queued: int
    tracked_keys: int
    prefixes: int
    overflows: int
    ack_delay_ms: int


@dataclass(frozen=True)
class Stats:
    keys: int
    edges: int
    shards: int
    seq: int
    epoch: int
    uptime_ms: int
    expired: int
    oversized_publishes: int
    subscribers: Tuple[SubscriberStats, ...]
    history_notices: int
    history_floor_seq: int
    leases_granted: int
    leases_contended: int
    leases_held: int
    purges: int
    purged_keys: int
    raw: pb.StatsResponse = _raw()

    @classmethod
    def from_pb(cls, m: pb.StatsResponse) -> "Stats":
        return cls(
            keys=m.keys,
            edges=m.edges,
            shards=m.shards,
            seq=m.seq,
            epoch=m.epoch,
            uptime_ms=m.uptime_ms,
            expired=m.expired,
            oversized_publishes=m.oversized_publishes,
            subscribers=tuple(
                SubscriberStats(
                    client_id=s.client_id,
                    acked_seq=s.acked_seq,
                    lag=s.lag,
                    queued=s.queued,
                    tracked_keys=s.tracked_keys,
                    prefixes=s.prefixes,
                    overflows=s.overflows,
                    ack_delay_ms=s.ack_delay_ms,
                )
                for s in m.subscribers
            ),
            history_notices=m.history_notices,
            history_floor_seq=m.history_floor_seq,
            leases_granted=m.leases_granted,
            leases_contended=m.leases_contended,
            leases_held=m.leases_held,
            purges=m.purges,
            purged_keys=m.purged_keys,
            raw=m,
        )


@dataclass(frozen=True)
class LeaseResult:
    #: Whether the caller is the filler.
    granted: bool
    #: When granted: pass it to :meth:`Client.fill` as ``lease_token``.
    token: int
    #: When granted: the seq the lease observed.
    seq: int
    #: When granted: how long the lease lasts; otherwise until the other
    #: filler's lease expires.
    ttl_ms: int
    #: When not granted: the key's current version (0 when unknown).
    version: int
    #: When not granted: a suggested wait before checking again.
    retry_after_ms: int
    epoch: int
    raw: pb.LeaseResponse = _raw()

    @classmethod
    def from_pb(cls, m: pb.LeaseResponse) -> "LeaseResult":
        return cls(
            granted=m.granted,
            token=m.token,
            seq=m.seq,
            ttl_ms=m.ttl_ms,
            version=m.version,
            retry_after_ms=m.retry_after_ms,
            epoch=m.epoch,
            raw=m,
        )


@dataclass(frozen=True)
class PurgeResult:
    #: Keys under the prefix.
    matched: int
    #: Those and their transitive dependents: the blast radius.
    affected: int
    #: Watch streams that get at least one notice (hard purges only).
    subscribers: int
    #: Notices delivered (hard purges only).
    notices: int
    seq: int
    #: Whether anything changed (false for a dry run or an empty match).
    applied: bool
    epoch: int
    raw: pb.PurgeResponse = _raw()

    @classmethod
    def from_pb(cls, m: pb.PurgeResponse) -> "PurgeResult":
        return cls(
            matched=m.matched,
            affected=m.affected,
            subscribers=m.subscribers,
            notices=m.notices,
            seq=m.seq,
            applied=m.applied,
            epoch=m.epoch,
            raw=m,
        )


@dataclass(frozen=True)
class NamespacePolicy:
    #: Empty: the default policy.
    namespace: str
    policy: Policy
    #: The namespace has no policy of its own; this is the default.
    is_default: bool
    raw: pb.NamespacePolicy = _raw()

    @classmethod
    def from_pb(cls, m: pb.NamespacePolicy) -> "NamespacePolicy":
        return cls(
            namespace=m.namespace,
            policy=Policy.from_pb(m.policy),
            is_default=m.is_default,
            raw=m,
        )


# ------------------------------------------------------------ watch events


@dataclass(frozen=True)
class Notice:
    """One key changed."""

    seq: int
    key: str
    #: The key's version after the change.
    version: int
    #: The published key whose change reached this one; empty in a repair,
    #: and when it lies outside the stream's watch scope.
    cause: str
    critical: bool
    event_time_unix_ms: int
    #: Sent by a repair after a resume or an overflow older than the
    #: history, where the change itself is no longer known.
    repair: bool = False
    raw: pb.Notice = _raw()

    @property
    def is_repair(self) -> bool:
        """Sent by a repair (the ``repair`` flag)."""
        return self.repair

    @classmethod
    def from_pb(cls, m: pb.Notice) -> "Notice":
        return cls(
            seq=m.seq,
            key=m.key,
            version=m.version,
            cause=m.cause,
            critical=m.critical,
            event_time_unix_ms=m.event_time_unix_ms,
            repair=m.repair,
            raw=m,
        )


@dataclass(frozen=True)
class WatchStarted:
    epoch: int
    #: The seq the stream starts from.
    seq: int
    outcome: ResumeOutcome
    raw: pb.WatchStarted = _raw()

    @classmethod
    def from_pb(cls, m: pb.WatchStarted) -> "WatchStarted":
        return cls(epoch=m.epoch, seq=m.seq, outcome=_enum(ResumeOutcome, m.outcome), raw=m)


@dataclass(frozen=True)
class NoticeBatch:
    #: In seq order; a batch never splits a seq.
    notices: Tuple[Notice, ...]
    raw: pb.NoticeBatch = _raw()

    @classmethod
    def from_pb(cls, m: pb.NoticeBatch) -> "NoticeBatch":
        return cls(notices=tuple(Notice.from_pb(n) for n in m.notices), raw=m)


@dataclass(frozen=True)
class Progress:
    """Every matching notice up to ``seq`` has been sent: a resume token."""

    epoch: int
    seq: int
    raw: pb.Progress = _raw()

    @classmethod
    def from_pb(cls, m: pb.Progress) -> "Progress":
        return cls(epoch=m.epoch, seq=m.seq, raw=m)


@dataclass(frozen=True)
class Reset:
    """Revalidate everything held under ``prefix`` (empty: everything) that was
    got before ``since``."""

    prefix: str
    since: int
    reason: ResetReason
    raw: pb.Reset = _raw()

    @classmethod
    def from_pb(cls, m: pb.Reset) -> "Reset":
        return cls(prefix=m.prefix, since=m.since, reason=_enum(ResetReason, m.reason), raw=m)


@dataclass(frozen=True)
class Refused:
    """A ``track`` or ``subscribe`` the server refused, on a stream opened with
    ``refusals_in_band=True``: nothing of the request was applied, and the
    stream goes on."""

    #: Which request: 1 is the stream's start, 2 the request after it.
    request: int
    #: What the request would have ended the stream with: INVALID_ARGUMENT,
    #: PERMISSION_DENIED or RESOURCE_EXHAUSTED.
    code: grpc.StatusCode
    #: What was wrong, naming the field and the limit.
    message: str
    raw: pb.Refused = _raw()

    @classmethod
    def from_pb(cls, m: pb.Refused) -> "Refused":
        code = next((c for c in grpc.StatusCode if c.value[0] == m.code), grpc.StatusCode.UNKNOWN)
        return cls(request=m.request, code=code, message=m.message, raw=m)
