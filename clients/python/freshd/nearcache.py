"""NearCache: an in-process cache kept right by freshd.

Values live in this process (a bounded LRU with a TTL); freshd holds their
versions and dependencies. A miss takes the key's fill lease, reads the
origin and fills; a hit checks its version as the namespace's policy says and
acts on the decision; one Watch stream drops copies as soon as they change.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, fields
from typing import (
    Any,
    Callable,
    Dict,
    Generic,
    Iterable,
    List,
    Optional,
    Set,
    Tuple,
    TypeVar,
    Union,
)

import grpc

from ._pb import coordinator_pb2 as pb
from .client import Client
from .errors import DeadlineExceeded, FailedPrecondition, FillRaced, FreshdError
from .types import (
    CheckItem,
    CheckItemResult,
    Decision,
    Freshness,
    Notice,
    NoticeBatch,
    Progress,
    Reset,
    ResetReason,
    ResumeToken,
    WatchStarted,
)

__all__ = ["NearCache", "NearCacheStats", "Loader"]

log = logging.getLogger("freshd.nearcache")

V = TypeVar("V")

#: Reads a value from the origin: returns the value and the keys it depends on.
Loader = Callable[[], Tuple[V, Iterable[str]]]

_INVALID = 1 << 64  # a notice version above every real one


_OUTAGE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)


def _is_outage(error: FreshdError) -> bool:
    """freshd could not answer (as opposed to refusing a bad request)."""
    return error.code in _OUTAGE_CODES


def namespace(key: str) -> str:
    """The part of a key before its first ``:`` (the whole key without one)."""
    return key.split(":", 1)[0]


@dataclass
class NearCacheStats:
    """Counters of a :class:`NearCache`, since it was created."""

    #: Gets served from the local copy (checked or not).
    hits: int = 0
    #: Gets that found no local copy.
    misses: int = 0
    #: Copies served although known to be behind: a stale copy with a
    #: REVALIDATE decision, or a copy served while another caller held the
    #: key's lease.
    stale_serves: int = 0
    #: Background refreshes started by a REVALIDATE decision.
    revalidations: int = 0
    #: Hits whose check said REFETCH or UNKNOWN: read from the origin at once.
    refetches: int = 0
    #: Notices received on the Watch stream and applied.
    notices_applied: int = 0
    #: Resets applied (a prefix dropped) and new epochs seen (all dropped).
    resets: int = 0
    #: Repair notices applied: changes the stream had missed (a resume older
    #: than the server's history, or a queue overflow).
    repairs: int = 0
    #: Version checks sent (single or in a batch).
    checks: int = 0
    #: Hits served without a check (``check_sample_rate`` below 1).
    unchecked_hits: int = 0
    #: Origin reads (loader calls).
    loads: int = 0
    #: Fills refused because the key or a dependency changed during the
    #: read, or because the lease ran out: read again.
    fill_races: int = 0
    #: Lease requests that found another filler, and waits for it.
    lease_waits: int = 0
    #: Copies dropped because a notice, reset or new epoch said so.
    invalidations: int = 0
    #: Copies dropped for room (LRU) or age (local TTL).
    evictions: int = 0
    #: Watch stream (re)connections.
    watch_connects: int = 0
    #: Gets answered from the origin, uncached, because freshd failed.
    bypasses: int = 0

    def as_dict(self) -> Dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class _Entry:
    value: Any
    version: int
    epoch: int
    #: time.monotonic() when the origin read began: the copy's age starts there.
    loaded_at: float
    expires_at: float


@dataclass
class _Outcome:
    """What one load produced, shared with every caller waiting on it."""

    ok: bool
    value: Any = None


def _default_client_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class NearCache(Generic[V]):
    """An in-process cache whose copies freshd keeps right.

    ``client`` is a :class:`~freshd.Client` or a target (``host:port``);
    a client made from a target is closed with the cache. ``endpoint`` names
    what serves the copies (the API route, say) in the server's hit-age
    metric. ``ttl`` (seconds) bounds a copy's local life and is the fill's
    TTL; ``max_entries`` bounds the LRU (keep it at or below the server's
    ``max_tracked_keys``).

    ``get(key, loader)`` returns a value: ``loader()`` reads the origin and
    returns ``(value, dependencies)``.

    * A miss tracks the key on the Watch stream, takes the key's fill lease,
      reads the origin, fills with the lease token and the dependencies, and
      keeps ``(value, version, epoch, load time)``. When another caller holds
      the lease it serves its own copy if that copy is not behind the key's
      current version, else waits ``retry_after_ms`` and tries again (at most
      ``lease_retries`` times; then it reads the origin without the lease).
      Concurrent misses of one key in this process read the origin once.
    * A hit checks the copy's version (with ``age_ms``, ``endpoint``,
      ``served`` and ``client_id``), sampled at the ``check_sample_rate``
      the server returns for the namespace. FRESH: serve. REVALIDATE: serve,
      and refresh in the background (one refresh per key at a time).
      REFETCH or UNKNOWN: read the origin now. Concurrent checks go out as
      one CheckBatch when ``batch_checks``. With ``serve_before_check`` a
      hit is served at once and checked in the background (``served=True``),
      and the decision applies to the next get.
    * One Watch stream tracks the cached keys: a notice drops the copy it
      names, a reset drops every copy under its prefix, a new epoch drops
      everything. It acknowledges what it applied, requests progress every
      ``progress_interval`` seconds, and resumes after a disconnect with its
      token, backing off with jitter.

    When freshd fails (``on_error="origin"``, the default) a get reads the
    origin and returns the value uncached; ``on_error="raise"`` raises the
    :class:`~freshd.FreshdError` instead.
    """

    def __init__(
        self,
        client: Union[Client, str],
        *,
        endpoint: str = "",
        client_id: Optional[str] = None,
        max_entries: int = 10_000,
        ttl: float = 300.0,
        watch: bool = True,
        batch_checks: bool = True,
        serve_before_check: bool = False,
        lease_retries: int = 10,
        max_lease_wait: float = 0.5,
        fill_attempts: int = 3,
        refresh_workers: int = 2,
        progress_interval: float = 5.0,
        reconnect_backoff: Tuple[float, float] = (0.05, 5.0),
        sample_rate_refresh: float = 10.0,
        on_error: str = "origin",
    ) -> None:
        if on_error not in ("origin", "raise"):
            raise ValueError("on_error must be 'origin' or 'raise'")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._owns_client = isinstance(client, str)
        self.client: Client = Client(client) if isinstance(client, str) else client
        self.endpoint = endpoint
        self.client_id = client_id or self.client.client_id or _default_client_id()
        self.max_entries = max_entries
        self.ttl = ttl
        self.serve_before_check = serve_before_check
        self.lease_retries = lease_retries
        self.max_lease_wait = max_lease_wait
        self.fill_attempts = max(1, fill_attempts)
        self.on_error = on_error
        self.sample_rate_refresh = sample_rate_refresh

        self._lock = threading.RLock()
        self._entries: "OrderedDict[str, _Entry]" = OrderedDict()
        self._inflight: Dict[str, "Future[_Outcome]"] = {}
        #: Keys being read from the origin -> the highest version a notice
        #: named meanwhile (a fill at a lower version must not be kept).
        self._loading: Dict[str, int] = {}
        self._tracked: Set[str] = set()
        #: namespace -> (check_sample_rate, time.monotonic() when learned)
        self._sample_rates: Dict[str, Tuple[float, float]] = {}
        self._stats = NearCacheStats()
        self._random = random.Random()
        self._closed = False

        self._refresher = ThreadPoolExecutor(
            max_workers=max(1, refresh_workers), thread_name_prefix="freshd-refresh"
        )
        self._batcher: Optional[_CheckBatcher] = _CheckBatcher(self) if batch_checks else None
        self._watcher: Optional[_Watcher] = (
            _Watcher(self, progress_interval, reconnect_backoff) if watch else None
        )
        if self._batcher is not None:
            self._batcher.start()
        if self._watcher is not None:
            self._watcher.start()

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stops the Watch stream and the background threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._watcher is not None:
            self._watcher.stop()
        if self._batcher is not None:
            self._batcher.stop()
        self._refresher.shutdown(wait=True)
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> "NearCache[V]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------- reading

    @property
    def stats(self) -> NearCacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return NearCacheStats(**self._stats.as_dict())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.expires_at > time.monotonic()

    def peek(self, key: str) -> Optional[V]:
        """The local copy, if any, without checking or counting anything."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.value

    def version_of(self, key: str) -> Optional[Tuple[int, int]]:
        """``(version, epoch)`` of the local copy, if any."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else (entry.version, entry.epoch)

    @property
    def watching(self) -> bool:
        """Whether the Watch stream is connected."""
        return self._watcher is not None and self._watcher.connected

    @property
    def watch_epoch(self) -> Optional[int]:
        """The epoch the Watch stream last started in."""
        return None if self._watcher is None else self._watcher.epoch

    def wait_watching(self, timeout: float = 5.0) -> bool:
        """Waits until the Watch stream is connected."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.watching:
                return True
            time.sleep(0.01)
        return self.watching

    def invalidate(self, key: str) -> None:
        """Drops the local copy of a key."""
        with self._lock:
            if self._entries.pop(key, None) is not None:
                self._untrack_if_unused(key)

    def clear(self) -> None:
        """Drops every local copy."""
        with self._lock:
            keys = list(self._entries)
            self._entries.clear()
            for key in keys:
                self._untrack_if_unused(key)

    # ----------------------------------------------------------------- get

    def get(self, key: str, loader: Loader[V]) -> V:
        """The value of ``key``: the local copy when freshd says it may be
        served, else ``loader()``'s value (see the class documentation)."""
        if self._closed:
            raise RuntimeError("the NearCache is closed")
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.expires_at <= now:
                self._drop(key, evicted=True)
                entry = None
            if entry is not None:
                self._entries.move_to_end(key)
            else:
                self._stats.misses += 1
        if entry is None:
            return self._load(key, loader, previous=None)

        if not self._should_check(key):
            with self._lock:
                self._stats.hits += 1
                self._stats.unchecked_hits += 1
            return entry.value  # type: ignore[no-any-return]

        if self.serve_before_check:
            with self._lock:
                self._stats.hits += 1
            self._submit(self._check_after_serve, key, entry, loader)
            return entry.value  # type: ignore[no-any-return]

        try:
            result = self._check(key, entry, served=False)
        except FreshdError as e:
            return self._bypass(key, loader, e)
        return self._act(key, entry, result, loader)

    def _act(self, key: str, entry: _Entry, result: CheckItemResult, loader: Loader[V]) -> V:
        decision = result.decision
        if decision == Decision.FRESH:
            with self._lock:
                self._stats.hits += 1
            return entry.value  # type: ignore[no-any-return]
        if decision == Decision.REVALIDATE:
            with self._lock:
                self._stats.hits += 1
                if result.freshness == Freshness.STALE:
                    self._stats.stale_serves += 1
            self._refresh_in_background(key, loader)
            return entry.value  # type: ignore[no-any-return]
        # REFETCH, UNKNOWN (or a decision this client does not know). The
        # key stays tracked: it is read again at once.
        with self._lock:
            self._stats.refetches += 1
            if self._entries.get(key) is entry:
                self._drop(key, evicted=False, untrack=False)
        return self._load(key, loader, previous=entry)

    def _check_after_serve(self, key: str, entry: _Entry, loader: Loader[V]) -> None:
        try:
            result = self._check(key, entry, served=True)
        except FreshdError as e:
            log.warning("freshd check of %r failed: %s", key, e)
            return
        if result.decision == Decision.FRESH:
            return
        if result.decision == Decision.REVALIDATE:
            with self._lock:
                if result.freshness == Freshness.STALE:
                    self._stats.stale_serves += 1
            self._refresh_in_background(key, loader)
            return
        with self._lock:
            self._stats.refetches += 1
            if result.freshness == Freshness.STALE:
                self._stats.stale_serves += 1
            if self._entries.get(key) is entry:
                self._drop(key, evicted=False)

    def _should_check(self, key: str) -> bool:
        with self._lock:
            known = self._sample_rates.get(namespace(key))
            rate = 1.0 if known is None else known[0]
            return rate >= 1.0 or self._random.random() < rate

    def _bypass(self, key: str, loader: Loader[V], error: FreshdError) -> V:
        if self.on_error == "raise" or not _is_outage(error):
            raise error
        log.warning("freshd failed (%s); reading %r from the origin uncached", error, key)
        with self._lock:
            self._stats.bypasses += 1
            self._stats.loads += 1
        value, _ = loader()
        return value

    # --------------------------------------------------------------- checks

    def _check(self, key: str, entry: _Entry, served: bool) -> CheckItemResult:
        age_ms = max(0, int((time.monotonic() - entry.loaded_at) * 1000))
        with self._lock:
            self._stats.checks += 1
        if self._batcher is not None:
            return self._batcher.check(key, entry.version, age_ms, entry.epoch, served)
        return self._check_one(key, entry.version, age_ms, entry.epoch, served)

    def _check_one(
        self, key: str, version: int, age_ms: int, epoch: int, served: bool
    ) -> CheckItemResult:
        r = self.client.check(
            key,
            version,
            age_ms=age_ms,
            epoch=epoch,
            endpoint=self.endpoint,
            served=served,
            client_id=self.client_id,
        )
        self._learn_sample_rate(key, r.check_sample_rate)
        return CheckItemResult(
            freshness=r.freshness, version=r.version, critical=r.critical, decision=r.decision
        )

    def _learn_sample_rate(self, key: str, rate: float) -> None:
        with self._lock:
            self._sample_rates[namespace(key)] = (rate, time.monotonic())

    def _sample_rate_stale(self, key: str) -> bool:
        with self._lock:
            known = self._sample_rates.get(namespace(key))
            return known is None or time.monotonic() - known[1] > self.sample_rate_refresh

    # ---------------------------------------------------------------- loads

    def _refresh_in_background(self, key: str, loader: Loader[V]) -> None:
        with self._lock:
            if key in self._inflight or self._closed:
                return
            future: "Future[_Outcome]" = Future()
            self._inflight[key] = future
            self._stats.revalidations += 1
        try:
            self._refresher.submit(self._run_load, key, loader, None, True, future)
        except RuntimeError:  # shut down meanwhile
            with self._lock:
                self._inflight.pop(key, None)
            future.set_result(_Outcome(ok=False))

    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._refresher.submit(fn, *args)
        except RuntimeError:
            pass  # closed

    def _load(self, key: str, loader: Loader[V], previous: Optional[_Entry]) -> V:
        while True:
            with self._lock:
                future = self._inflight.get(key)
                owner = future is None
                if owner:
                    future = Future()
                    self._inflight[key] = future
            assert future is not None
            if owner:
                self._run_load(key, loader, previous, False, future)
            outcome = future.result()  # re-raises the loader's exception
            if outcome.ok:
                return outcome.value  # type: ignore[no-any-return]
            # A background refresh gave up (another caller holds the lease):
            # read the origin ourselves.

    def _run_load(
        self,
        key: str,
        loader: Loader[V],
        previous: Optional[_Entry],
        background: bool,
        future: "Future[_Outcome]",
    ) -> None:
        try:
            outcome = self._fetch(key, loader, previous, background)
        except BaseException as e:
            with self._lock:
                self._inflight.pop(key, None)
                self._untrack_if_unused(key)
            if background:
                log.warning("background refresh of %r failed: %s", key, e)
                future.set_result(_Outcome(ok=False))
            else:
                future.set_exception(e)
            return
        with self._lock:
            self._inflight.pop(key, None)
            self._untrack_if_unused(key)
        future.set_result(outcome)

    def _fetch(
        self, key: str, loader: Loader[V], previous: Optional[_Entry], background: bool
    ) -> _Outcome:
        with self._lock:
            self._track(key)
        if self._watcher is not None:
            # Make sure the track is in force before the origin read: a
            # change after it is then either refused at fill time or noticed.
            self._watcher.sync(timeout=1.0)

        value: Any = None
        for _attempt in range(self.fill_attempts):
            try:
                grant = self._acquire(key, previous, background)
            except FreshdError as e:
                if background:
                    raise
                return _Outcome(ok=True, value=self._bypass(key, loader, e))
            if grant is None:  # background, and another caller is filling
                return _Outcome(ok=False)
            if isinstance(grant, _Entry):  # serve our own copy meanwhile
                with self._lock:
                    self._stats.stale_serves += 1
                return _Outcome(ok=True, value=grant.value)
            token, observed_seq, epoch = grant

            with self._lock:
                self._loading[key] = 0
            try:
                loaded_at = time.monotonic()
                with self._lock:
                    self._stats.loads += 1
                value, dependencies = loader()
                try:
                    fill = self.client.fill(
                        key,
                        list(dependencies),
                        ttl_ms=int(self.ttl * 1000),
                        observed_seq=observed_seq,
                        epoch=epoch,
                        lease_token=token,
                        client_id=self.client_id,
                    )
                except (FillRaced, FailedPrecondition):
                    # Changed during the read, or the lease ran out: read
                    # again under a new lease.
                    with self._lock:
                        self._stats.fill_races += 1
                    previous = None
                    continue
                except FreshdError as e:
                    if background or self.on_error == "raise" or not _is_outage(e):
                        raise
                    log.warning("freshd fill of %r failed: %s; serving it uncached", key, e)
                    with self._lock:
                        self._stats.bypasses += 1
                    return _Outcome(ok=True, value=value)
                with self._lock:
                    noticed = self._loading.get(key, 0)
                    if noticed <= fill.version and not self._closed:
                        ttl = self.ttl if fill.ttl_ms == 0 else min(self.ttl, fill.ttl_ms / 1000)
                        self._store(
                            key,
                            _Entry(
                                value=value,
                                version=fill.version,
                                epoch=fill.epoch,
                                loaded_at=loaded_at,
                                expires_at=loaded_at + ttl,
                            ),
                        )
                return _Outcome(ok=True, value=value)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
        # Every attempt raced with a change: return the last read uncached.
        return _Outcome(ok=True, value=value)

    def _acquire(
        self, key: str, previous: Optional[_Entry], background: bool
    ) -> Union[None, _Entry, Tuple[int, int, int]]:
        """The key's lease: ``(token, observed_seq, epoch)`` to fill with;
        a copy to serve meanwhile; or ``None`` (background: give up)."""
        for _ in range(self.lease_retries + 1):
            lease = self.client.lease(key)
            if lease.granted:
                return (lease.token, 0, lease.epoch)
            with self._lock:
                self._stats.lease_waits += 1
            if background:
                return None
            if (
                previous is not None
                and previous.epoch == lease.epoch
                and lease.version != 0
                and previous.version >= lease.version
            ):
                return previous
            wait = lease.retry_after_ms / 1000 if lease.retry_after_ms else 0.05
            time.sleep(min(wait, self.max_lease_wait) * self._random.uniform(0.8, 1.2))
        # The other filler takes too long: read without the lease, with a seq
        # observed before the read. (No client id: this asks for a seq, it
        # checks no copy.)
        check = self.client.check(key, 0, client_id="")
        return (0, check.seq, check.epoch)

    # ---------------------------------------------------- the local copies
    # Everything below runs under self._lock.

    def _store(self, key: str, entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        self._track(key)
        while len(self._entries) > self.max_entries:
            old, _ = self._entries.popitem(last=False)
            self._stats.evictions += 1
            self._untrack_if_unused(old)

    def _drop(self, key: str, evicted: bool, untrack: bool = True) -> None:
        if self._entries.pop(key, None) is not None:
            if evicted:
                self._stats.evictions += 1
            else:
                self._stats.invalidations += 1
            if untrack:
                self._untrack_if_unused(key)

    def _track(self, key: str) -> None:
        if key not in self._tracked:
            self._tracked.add(key)
            if self._watcher is not None:
                self._watcher.send_track([key])

    def _untrack_if_unused(self, key: str) -> None:
        if key in self._tracked and key not in self._entries and key not in self._inflight:
            self._tracked.discard(key)
            if self._watcher is not None:
                self._watcher.send_untrack([key])

    # Called by the watcher, under the lock.

    def _apply_notice(self, notice: Notice, epoch: int) -> None:
        self._stats.notices_applied += 1
        if notice.is_repair:
            self._stats.repairs += 1
        if notice.key in self._loading:
            self._loading[notice.key] = max(self._loading[notice.key], notice.version)
        entry = self._entries.get(notice.key)
        if entry is not None and (entry.epoch != epoch or notice.version > entry.version):
            self._drop(notice.key, evicted=False)

    def _apply_reset(self, prefix: str) -> None:
        self._stats.resets += 1
        for key in [k for k in self._entries if k.startswith(prefix)]:
            self._drop(key, evicted=False)
        for key in self._loading:
            if key.startswith(prefix):
                self._loading[key] = _INVALID

    def _apply_new_epoch(self) -> None:
        self._apply_reset("")


#: A check waiting for the batcher: key, version, age_ms, epoch, served, answer.
_Pending = Tuple[str, int, int, int, bool, "Future[CheckItemResult]"]


class _CheckBatcher(threading.Thread):
    """Sends the checks of concurrent gets together: while one call is in
    flight the next ones queue, and go out as one CheckBatch. A namespace
    whose sample rate is unknown or old gets a single Check, which carries
    it."""

    MAX_BATCH = 1000

    def __init__(self, cache: NearCache[Any]) -> None:
        super().__init__(name="freshd-checks", daemon=True)
        self.cache = cache
        self._cond = threading.Condition()
        self._pending: List[_Pending] = []
        self._stopped = False

    def check(
        self, key: str, version: int, age_ms: int, epoch: int, served: bool
    ) -> CheckItemResult:
        future: "Future[CheckItemResult]" = Future()
        with self._cond:
            if self._stopped:
                raise RuntimeError("the NearCache is closed")
            self._pending.append((key, version, age_ms, epoch, served, future))
            self._cond.notify()
        timeout = self.cache.client.timeout
        try:
            return future.result(timeout=None if timeout is None else timeout * 2)
        except FuturesTimeout:
            raise DeadlineExceeded(
                grpc.StatusCode.DEADLINE_EXCEEDED, "no check answer in time", "Check"
            ) from None

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self.join()
        for *_, future in self._pending:
            future.set_exception(RuntimeError("the NearCache is closed"))

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                taken = self._pending[: self.MAX_BATCH]
                del self._pending[: self.MAX_BATCH]
            self._send(taken)

    def _send(self, taken: List[_Pending]) -> None:
        cache = self.cache
        singles: List[_Pending] = []
        by_epoch: Dict[int, List[_Pending]] = {}
        learning: Set[str] = set()
        for item in taken:
            ns = namespace(item[0])
            if len(taken) == 1 or (ns not in learning and cache._sample_rate_stale(item[0])):
                learning.add(ns)
                singles.append(item)
            else:
                by_epoch.setdefault(item[3], []).append(item)
        for key, version, age_ms, epoch, served, future in singles:
            try:
                future.set_result(cache._check_one(key, version, age_ms, epoch, served))
            except BaseException as e:
                future.set_exception(e)
        for epoch, items in by_epoch.items():
            try:
                answer = cache.client.check_batch(
                    [CheckItem(k, v, age_ms=a, served=s) for k, v, a, _, s, _ in items],
                    epoch=epoch,
                    endpoint=cache.endpoint,
                    client_id=cache.client_id,
                )
            except BaseException as e:
                for *_, future in items:
                    future.set_exception(e)
                continue
            for item, result in zip(items, answer.results):
                item[5].set_result(result)


class _Watcher:
    """The Watch stream of a NearCache: a reader thread that (re)connects and
    applies what arrives, and a ticker that requests progress."""

    def __init__(
        self,
        cache: NearCache[Any],
        progress_interval: float,
        backoff: Tuple[float, float],
    ) -> None:
        self.cache = cache
        self.progress_interval = progress_interval
        self.backoff = backoff
        self._lock = cache._lock
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._requests: Optional["_RequestQueue"] = None
        self._call: Optional[Any] = None
        self.connected = False
        self.epoch: Optional[int] = None
        self.token: Optional[ResumeToken] = None
        self._acked = 0
        self._epoch_reset_pending = False
        self._generation = 0
        self._progress_asked = 0
        self._progress_seen = 0
        self._reader = threading.Thread(target=self._run, name="freshd-watch", daemon=True)
        self._ticker = threading.Thread(target=self._tick, name="freshd-watch-tick", daemon=True)

    def start(self) -> None:
        self._reader.start()
        self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            call = self._call
            requests = self._requests
            self._cond.notify_all()
        if requests is not None:
            requests.close()
        if call is not None:
            call.cancel()
        self._reader.join(5)
        self._ticker.join(5)

    # ------------------------------------------------------ sends (locked)

    def _send(self, request: pb.WatchRequest) -> None:
        if self._requests is not None:
            self._requests.put(request)

    def send_track(self, keys: List[str]) -> None:
        self._send(pb.WatchRequest(track=pb.KeyList(keys=keys)))

    def send_untrack(self, keys: List[str]) -> None:
        self._send(pb.WatchRequest(untrack=pb.KeyList(keys=keys)))

    def sync(self, timeout: float) -> bool:
        """Asks for progress and waits for it: every filter change sent before
        is then in force. False when not connected or on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if not self.connected or self._requests is None:
                return False
            generation = self._generation
            self._progress_asked += 1
            wanted = self._progress_asked
            self._send(pb.WatchRequest(progress=pb.ProgressRequest()))
            while self._generation == generation and self._progress_seen < wanted:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                self._cond.wait(left)
            return self._generation == generation

    # ------------------------------------------------------------- threads

    def _tick(self) -> None:
        while not self._stop.wait(self.progress_interval):
            with self._lock:
                if self.connected and self._requests is not None:
                    self._progress_asked += 1
                    self._send(pb.WatchRequest(progress=pb.ProgressRequest()))

    def _run(self) -> None:
        failures = 0
        rng = random.Random()
        while not self._stop.is_set():
            try:
                if self._connect_and_read():
                    failures = 0
            except Exception as e:  # pragma: no cover - defensive
                log.exception("Watch stream: unexpected error: %s", e)
            if self._stop.is_set():
                return
            failures += 1
            low, high = self.backoff
            delay = min(high, low * (2 ** min(failures - 1, 16)))
            self._stop.wait(delay * rng.uniform(0.5, 1.0))

    def _connect_and_read(self) -> bool:
        """One stream, until it ends. True when it got as far as `started`."""
        cache = self.cache
        requests = _RequestQueue()
        with self._lock:
            start = pb.WatchStart(client_id=cache.client_id, track=sorted(cache._tracked))
            if self.token is not None:
                start.resume.CopyFrom(self.token.to_pb())
            requests.put(pb.WatchRequest(start=start))
            self._requests = requests
            self._progress_asked = 0
            self._progress_seen = 0
            self._acked = 0
        started = False
        try:
            call = cache.client.stub.Watch(iter(requests))
            with self._lock:
                self._call = call
            if self._stop.is_set():
                call.cancel()
            for response in call:
                kind = response.WhichOneof("response")
                if kind == "started":
                    self._on_started(WatchStarted.from_pb(response.started))
                    started = True
                elif kind == "notices":
                    self._on_notices(NoticeBatch.from_pb(response.notices))
                elif kind == "progress":
                    self._on_progress(Progress.from_pb(response.progress))
                elif kind == "reset":
                    self._on_reset(Reset.from_pb(response.reset))
        except grpc.RpcError as e:
            if not self._stop.is_set():
                code = e.code() if isinstance(e, grpc.Call) else None
                log.info("Watch stream ended (%s); resuming with %s", code, self.token)
        finally:
            requests.close()
            with self._cond:
                self.connected = False
                self._requests = None
                self._call = None
                self._generation += 1
                self._cond.notify_all()
        return started

    def _ack(self, seq: int) -> None:
        if seq > self._acked:
            self._acked = seq
            self._send(pb.WatchRequest(ack=pb.Ack(seq=seq)))

    def _on_started(self, started: WatchStarted) -> None:
        with self._cond:
            if self.epoch is not None and started.epoch != self.epoch:
                # The server lost its history: versions from the old one
                # mean nothing. (Its NEW_EPOCH reset follows; it finds
                # nothing left to drop and is not counted again.)
                self.cache._apply_new_epoch()
                self.token = None
                self._epoch_reset_pending = True
            self.epoch = started.epoch
            if self.token is None or self.token.epoch != started.epoch:
                self.token = ResumeToken(started.epoch, started.seq)
            self.connected = True
            self.cache._stats.watch_connects += 1
            self._cond.notify_all()

    def _on_notices(self, batch: NoticeBatch) -> None:
        if not batch.notices:
            return
        with self._lock:
            self._epoch_reset_pending = False
            epoch = self.epoch or 0
            for notice in batch.notices:
                self.cache._apply_notice(notice, epoch)
            last = batch.notices[-1].seq
            self.token = ResumeToken(epoch, last)
            self._ack(last)

    def _on_progress(self, progress: Progress) -> None:
        with self._cond:
            self._epoch_reset_pending = False
            self.token = ResumeToken(progress.epoch, progress.seq)
            self._ack(progress.seq)
            self._progress_seen += 1
            self._cond.notify_all()

    def _on_reset(self, reset: Reset) -> None:
        with self._lock:
            if (
                self._epoch_reset_pending
                and reset.prefix == ""
                and reset.reason == ResetReason.NEW_EPOCH
            ):
                self._epoch_reset_pending = False
                return
            self.cache._apply_reset(reset.prefix)


class _RequestQueue:
    """The outbound side of one Watch call: an iterator over queued requests
    that ends when closed."""

    _END = object()

    def __init__(self) -> None:
        import queue

        self._queue: "queue.Queue[Any]" = queue.Queue()

    def put(self, request: pb.WatchRequest) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(self._END)

    def __iter__(self) -> "_RequestQueue":
        return self

    def __next__(self) -> pb.WatchRequest:
        item = self._queue.get()
        if item is self._END:
            # Keep answering END: the iterator may be asked again.
            self._queue.put(self._END)
            raise StopIteration
        return item  # type: ignore[no-any-return]
