"""The Coordinator client: one method per RPC, typed requests and results,
failures as :class:`~freshd.errors.FreshdError`."""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import grpc

from ._pb import coordinator_pb2 as pb
from ._pb import coordinator_pb2_grpc as pb_grpc
from .errors import DeadlineExceeded, FreshdError, from_rpc_error
from .types import (
    Change,
    CheckBatchResult,
    CheckItem,
    CheckResult,
    FillResult,
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
    ResumeToken,
    Stats,
    WatchStarted,
)

#: Events a :class:`WatchStream` holds for :meth:`WatchStream.recv` before
#: its reader stops reading from the server.
DEFAULT_MAX_BUFFERED = 1024


__all__ = ["Client", "Pem", "WatchStream", "WatchEvent", "SyncResult", "StreamEnded"]

#: PEM given as its content (``bytes``, or a ``str`` that starts with
#: ``-----BEGIN``) or as the path of a file that holds it.
Pem = Union[bytes, str, "os.PathLike[str]"]

#: What a :class:`WatchStream` yields.
WatchEvent = Union[WatchStarted, NoticeBatch, Progress, Reset, Refused]

# Reconnect quickly after a server restart: the defaults wait up to minutes.
_CHANNEL_OPTIONS: List[Tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
]


def _normalise_target(target: str) -> str:
    for scheme in ("http://", "grpc://", "https://"):
        if target.startswith(scheme):
            return target[len(scheme) :].rstrip("/")
    return target


def _read_pem(value: Optional[Pem], what: str) -> Optional[bytes]:
    """PEM content from bytes, PEM text or a file path."""
    if value is None:
        return None
    if isinstance(value, bytes):
        pem = value
    elif isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        pem = value.encode()
    else:
        try:
            with open(value, "rb") as f:
                pem = f.read()
        except OSError as e:
            raise ValueError(f"{what}: cannot read {os.fspath(value)}: {e.strerror}") from None
    if b"-----BEGIN" not in pem:
        raise ValueError(f"{what}: holds no PEM block")
    return pem


def _bearer(token: str) -> str:
    """The ``authorization`` value for ``token``; refuses what cannot be sent."""
    token = token.strip()
    if not token:
        raise ValueError("token: the token is empty")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ValueError(
            "token: the token must be visible ASCII without spaces "
            "(as `freshd --new-token` prints it)"
        )
    return f"Bearer {token}"


class _CallDetails(NamedTuple):
    method: str
    timeout: Optional[float]
    metadata: Optional[Sequence[Tuple[str, Union[str, bytes]]]]
    credentials: Optional[grpc.CallCredentials]
    wait_for_ready: Optional[bool]
    compression: Any


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds ``authorization: Bearer <token>`` to every call, Watch streams
    included, over TLS and plaintext alike."""

    def __init__(self, token: str) -> None:
        self._value = _bearer(token)

    def __repr__(self) -> str:
        return "_BearerToken(<redacted>)"

    def _details(self, details: Any) -> _CallDetails:
        metadata = [(k, v) for k, v in (details.metadata or ()) if k.lower() != "authorization"]
        metadata.append(("authorization", self._value))
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return continuation(self._details(details), requests)


class Client:
    """A connection to one freshd server.

    ``target`` is ``host:port`` (``http://host:port`` is accepted too;
    ``https://host:port`` means TLS). ``client_id`` is sent with publishes,
    fills, checks and purges that do not name one, for no-loop and the
    freshness metrics. ``timeout`` bounds every unary call, in seconds.

    Security:

    * ``token``: sent as ``authorization: Bearer <token>`` with every call,
      Watch streams included (``freshd --new-token`` makes one).
    * ``root_certificates``: the CA certificates (PEM) that the server's
      certificate must chain to; without it, TLS trusts the system's roots.
    * ``certificate_chain`` and ``private_key``: a client certificate (PEM),
      for a server that requires mutual TLS.
    * ``server_name``: the name the server's certificate must carry, when it
      is not the target's host.
    * ``tls``: TLS with none of the above (the system's roots).

    Each PEM argument is ``bytes``, a ``str`` holding PEM, or a file path.
    Any of them, or an ``https://`` target, makes the connection TLS.
    ``credentials`` (a :func:`grpc.ssl_channel_credentials`, say) and
    ``channel`` remain for full control; ``token`` applies to them too.

    Use it as a context manager, or call :meth:`close`::

        with freshd.Client("127.0.0.1:50051") as client:
            client.publish(["posts:author:77"])

        with freshd.Client("freshd.internal:50051", token=os.environ["FRESHD_TOKEN"],
                           root_certificates="/etc/freshd/ca.pem") as client:
            client.check("feed:user:4821")
    """

    def __init__(
        self,
        target: str,
        *,
        client_id: str = "",
        timeout: Optional[float] = 10.0,
        token: Optional[str] = None,
        root_certificates: Optional[Pem] = None,
        certificate_chain: Optional[Pem] = None,
        private_key: Optional[Pem] = None,
        server_name: Optional[str] = None,
        tls: bool = False,
        credentials: Optional[grpc.ChannelCredentials] = None,
        options: Sequence[Tuple[str, Any]] = (),
        channel: Optional[grpc.Channel] = None,
    ) -> None:
        self.target = _normalise_target(target)
        self.client_id = client_id
        self.timeout = timeout
        if (certificate_chain is None) != (private_key is None):
            raise ValueError("certificate_chain and private_key go together: give both or neither")
        tls_settings = (root_certificates, certificate_chain, private_key, server_name)
        use_tls = tls or target.startswith("https://") or any(v is not None for v in tls_settings)
        if target.startswith(("http://", "grpc://")) and use_tls:
            raise ValueError(
                f"TLS settings are given for {target}, a plaintext target: "
                "write https:// or host:port"
            )
        if use_tls and (credentials is not None or channel is not None):
            raise ValueError("give either TLS settings or credentials/channel, not both")
        interceptor = _BearerToken(token) if token is not None else None
        merged = dict(_CHANNEL_OPTIONS)
        if server_name is not None:
            merged["grpc.ssl_target_name_override"] = server_name
        merged.update(dict(options))
        if use_tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(root_certificates, "root_certificates"),
                private_key=_read_pem(private_key, "private_key"),
                certificate_chain=_read_pem(certificate_chain, "certificate_chain"),
            )
        #: Whether the connection uses TLS (``None``: a channel given).
        self.tls: Optional[bool] = None if channel is not None else credentials is not None
        if channel is not None:
            self._owns_channel = False
        elif credentials is not None:
            channel = grpc.secure_channel(self.target, credentials, list(merged.items()))
            self._owns_channel = True
        else:
            channel = grpc.insecure_channel(self.target, list(merged.items()))
            self._owns_channel = True
        if interceptor is not None:
            channel = grpc.intercept_channel(channel, interceptor)
        self._channel: grpc.Channel = channel
        self.stub = pb_grpc.CoordinatorStub(self._channel)
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Closes the channel (when this client created it)."""
        if not self._closed:
            self._closed = True
            if self._owns_channel:
                self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 5.0) -> None:
        """Waits until the channel is connected; raises
        :class:`~freshd.errors.Unavailable`-like errors otherwise."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise DeadlineExceeded(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no connection to {self.target} within {timeout}s",
            ) from None

    def _unary(self, method: str, request: Any) -> Any:
        fn = getattr(self.stub, method)
        try:
            return fn(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e, method) from None

    def _id(self, client_id: Optional[str]) -> str:
        return self.client_id if client_id is None else client_id

    # ----------------------------------------------------------------- RPCs

    def publish(
        self,
        changes: Iterable[Union[Change, str]],
        *,
        client_id: Optional[str] = None,
    ) -> PublishResult:
        """Publishes changes: each key and every transitive dependent is
        bumped once. A plain string is a change of that key."""
        request = pb.PublishRequest(
            changes=[(Change(c) if isinstance(c, str) else c).to_pb() for c in changes],
            client_id=self._id(client_id),
        )
        return PublishResult.from_pb(self._unary("Publish", request))

    def fill(
        self,
        key: str,
        dependencies: Iterable[str] = (),
        *,
        ttl_ms: int = 0,
        observed_seq: int = 0,
        epoch: int = 0,
        lease_token: int = 0,
        client_id: Optional[str] = None,
    ) -> FillResult:
        """Registers a cached key with its dependencies. Raises
        :class:`~freshd.errors.FillRaced` when the key or a dependency changed
        after ``observed_seq`` (or the lease's seq)."""
        request = pb.FillRequest(
            key=key,
            dependencies=list(dependencies),
            ttl_ms=ttl_ms,
            observed_seq=observed_seq,
            epoch=epoch,
            lease_token=lease_token,
            client_id=self._id(client_id),
        )
        return FillResult.from_pb(self._unary("Fill", request))

    def check(
        self,
        key: str,
        version: int = 0,
        *,
        age_ms: int = 0,
        epoch: int = 0,
        min_seq: int = 0,
        endpoint: str = "",
        served: bool = False,
        client_id: Optional[str] = None,
    ) -> CheckResult:
        """Is a cached copy still right? The fact and the policy's decision."""
        request = pb.CheckRequest(
            key=key,
            version=version,
            age_ms=age_ms,
            epoch=epoch,
            min_seq=min_seq,
            endpoint=endpoint,
            served=served,
            client_id=self._id(client_id),
        )
        return CheckResult.from_pb(self._unary("Check", request))

    def check_batch(
        self,
        items: Iterable[Union[CheckItem, Tuple[str, int]]],
        *,
        epoch: int = 0,
        min_seq: int = 0,
        endpoint: str = "",
        client_id: Optional[str] = None,
    ) -> CheckBatchResult:
        """Checks many copies, answered from one consistent state. An item is
        a :class:`CheckItem` or a ``(key, version)`` pair."""
        pb_items = [
            (item if isinstance(item, CheckItem) else CheckItem(item[0], item[1])).to_pb()
            for item in items
        ]
        request = pb.CheckBatchRequest(
            items=pb_items,
            epoch=epoch,
            min_seq=min_seq,
            endpoint=endpoint,
            client_id=self._id(client_id),
        )
        return CheckBatchResult.from_pb(self._unary("CheckBatch", request))

    def inspect(self, key: str) -> KeyInfo:
        """Everything freshd holds for one key; raises
        :class:`~freshd.errors.NotFound` when it holds nothing."""
        return KeyInfo.from_pb(self._unary("Inspect", pb.InspectRequest(key=key)))

    def stats(self) -> Stats:
        """Server-wide counters."""
        return Stats.from_pb(self._unary("Stats", pb.StatsRequest()))

    def lease(self, key: str, *, min_seq: int = 0) -> LeaseResult:
        """Asks for the fill lease of a key before reading the origin."""
        return LeaseResult.from_pb(self._unary("Lease", pb.LeaseRequest(key=key, min_seq=min_seq)))

    def purge(
        self,
        prefix: str,
        *,
        dry_run: bool = False,
        hard: bool = False,
        confirm: bool = False,
        jitter_ms: int = 0,
        client_id: Optional[str] = None,
    ) -> PurgeResult:
        """Invalidates every key under a prefix (soft by default)."""
        request = pb.PurgeRequest(
            prefix=prefix,
            dry_run=dry_run,
            hard=hard,
            confirm=confirm,
            jitter_ms=jitter_ms,
            client_id=self._id(client_id),
        )
        return PurgeResult.from_pb(self._unary("Purge", request))

    def get_policy(self, namespace: str = "") -> NamespacePolicy:
        """The policy in force for a namespace (the empty one is the default)."""
        return NamespacePolicy.from_pb(
            self._unary("GetPolicy", pb.GetPolicyRequest(namespace=namespace))
        )

    def set_policy(self, namespace: str, policy: Policy) -> NamespacePolicy:
        """Sets a namespace's policy (the empty namespace: the default)."""
        request = pb.SetPolicyRequest(namespace=namespace, policy=policy.to_pb())
        return NamespacePolicy.from_pb(self._unary("SetPolicy", request))

    def list_policies(self) -> List[NamespacePolicy]:
        """The default first, then namespaces in order."""
        response = self._unary("ListPolicies", pb.ListPoliciesRequest())
        return [NamespacePolicy.from_pb(p) for p in response.policies]

    def delete_policy(self, namespace: str) -> None:
        """Removes a namespace's policy; it falls back to the default."""
        self._unary("DeletePolicy", pb.DeletePolicyRequest(namespace=namespace))

    def watch(
        self,
        *,
        client_id: Optional[str] = None,
        no_loop: bool = False,
        resume: Optional[ResumeToken] = None,
        track: Iterable[str] = (),
        subscribe: Iterable[str] = (),
        start_timeout: Optional[float] = None,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        refusals_in_band: bool = False,
    ) -> "WatchStream":
        """Opens the invalidation stream and waits for its ``started``
        message. Raises :class:`~freshd.errors.FreshdError` when the server
        refuses the start (a bad key, a limit). ``max_buffered`` bounds the
        events read from the server and not yet taken with
        :meth:`WatchStream.recv` (see there). With ``refusals_in_band``, a
        later ``track`` or ``subscribe`` the server refuses arrives as a
        :class:`~freshd.Refused` event and the stream goes on; without it,
        such a request ends the stream with the error."""
        return WatchStream(
            self.stub,
            client_id=self._id(client_id),
            no_loop=no_loop,
            resume=resume,
            track=track,
            subscribe=subscribe,
            start_timeout=self.timeout if start_timeout is None else start_timeout,
            max_buffered=max_buffered,
            refusals_in_band=refusals_in_band,
        )


class StreamEnded(Exception):
    """The Watch stream ended without an error (the client closed its side)."""


@dataclass(frozen=True)
class SyncResult:
    """What :meth:`WatchStream.sync` collected up to the progress watermark."""

    notices: Tuple[Notice, ...]
    resets: Tuple[Reset, ...]
    progress: Progress
    #: Requests refused before the watermark (``refusals_in_band`` only).
    refused: Tuple[Refused, ...] = ()


_END = object()


class WatchStream:
    """One Watch stream: send filter changes, acks and progress requests;
    read notice batches, progress and resets.

    A reader thread moves responses into a queue, so :meth:`recv` can wait
    with a timeout. The queue holds at most ``max_buffered`` events (1,024
    by default): when the application does not keep up, the reader stops
    reading, the call's flow-control windows fill, and the server treats
    the stream as a slow consumer (it conflates, then catches the stream up
    from its history or resets what it cannot), rather than this process
    buffering without bound. Once the stream is closed the bound no longer
    holds back the reader. Use it as a context manager, or call
    :meth:`cancel` or :meth:`close`.
    """

    def __init__(
        self,
        stub: pb_grpc.CoordinatorStub,
        *,
        client_id: str = "",
        no_loop: bool = False,
        resume: Optional[ResumeToken] = None,
        track: Iterable[str] = (),
        subscribe: Iterable[str] = (),
        start_timeout: Optional[float] = 10.0,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        refusals_in_band: bool = False,
    ) -> None:
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be at least 1, got {max_buffered}")
        self._requests: "queue.Queue[Optional[pb.WatchRequest]]" = queue.Queue()
        self._events: "queue.Queue[Any]" = queue.Queue()
        # Room for events not yet taken by recv(): the reader takes one
        # before it queues an event, recv() gives one back.
        self._room = threading.Semaphore(max_buffered)
        self._closed = False
        self._ended: Optional[BaseException] = None
        # Requests queued so far (the start is the first), numbered under
        # the lock in the order the server reads them.
        self._sending = threading.Lock()
        self._sent = 1
        start = pb.WatchStart(
            client_id=client_id,
            no_loop=no_loop,
            track=list(track),
            subscribe=list(subscribe),
            refusals_in_band=refusals_in_band,
        )
        if resume is not None:
            start.resume.CopyFrom(resume.to_pb())
        self._requests.put(pb.WatchRequest(start=start))
        self._call = stub.Watch(self._outbound())
        self._reader = threading.Thread(target=self._read, name="freshd-watch-reader", daemon=True)
        self._reader.start()
        try:
            first = self.recv(timeout=start_timeout)
        except TimeoutError:
            self.cancel()
            raise DeadlineExceeded(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no `started` within {start_timeout}s",
                "Watch",
            ) from None
        except StreamEnded:
            raise FreshdError(
                grpc.StatusCode.UNKNOWN, "the stream ended before `started`", "Watch"
            ) from None
        except FreshdError:
            self.close()  # the server refused the start
            raise
        if not isinstance(first, WatchStarted):
            self.cancel()
            raise FreshdError(
                grpc.StatusCode.UNKNOWN, f"expected `started`, got {first!r}", "Watch"
            )
        #: The epoch, the seq the stream starts from and the resume outcome.
        self.started: WatchStarted = first

    # ------------------------------------------------------------ plumbing

    def _outbound(self) -> Iterator[pb.WatchRequest]:
        while True:
            request = self._requests.get()
            if request is None:
                return
            yield request

    def _queue(self, event: Any) -> None:
        """Queues an event once there is room for it (or the stream is
        closed); meanwhile nothing more is read from the server."""
        while not self._room.acquire(timeout=0.1):
            if self._closed:
                break
        self._events.put(event)

    def _read(self) -> None:
        try:
            for response in self._call:
                kind = response.WhichOneof("response")
                if kind == "started":
                    self._queue(WatchStarted.from_pb(response.started))
                elif kind == "notices":
                    self._queue(NoticeBatch.from_pb(response.notices))
                elif kind == "progress":
                    self._queue(Progress.from_pb(response.progress))
                elif kind == "reset":
                    self._queue(Reset.from_pb(response.reset))
                elif kind == "refused":
                    self._queue(Refused.from_pb(response.refused))
            # The end and a failure are queued at once: each is the last.
            self._events.put(_END)
        except grpc.RpcError as e:
            self._events.put(from_rpc_error(e, "Watch"))
        except BaseException as e:  # pragma: no cover - defensive
            self._events.put(e)
        finally:
            # The call is over: let the request iterator end too.
            self._requests.put(None)

    def _send(self, request: pb.WatchRequest) -> int:
        with self._sending:
            if self._closed:
                raise StreamEnded("the Watch stream is closed")
            self._requests.put(request)
            self._sent += 1
            return self._sent

    # --------------------------------------------------------------- sends
    #
    # Each returns the request's number on the stream (the start was 1), the
    # number a :class:`~freshd.Refused` names.

    def track(self, keys: Iterable[str]) -> int:
        """Tracks exact keys (do it before reading them from the origin)."""
        return self._send(pb.WatchRequest(track=pb.KeyList(keys=list(keys))))

    def untrack(self, keys: Iterable[str]) -> int:
        return self._send(pb.WatchRequest(untrack=pb.KeyList(keys=list(keys))))

    def subscribe(self, prefixes: Iterable[str]) -> int:
        """Watches prefixes (every notice under them; "" is every key)."""
        return self._send(pb.WatchRequest(subscribe=pb.KeyList(keys=list(prefixes))))

    def unsubscribe(self, prefixes: Iterable[str]) -> int:
        return self._send(pb.WatchRequest(unsubscribe=pb.KeyList(keys=list(prefixes))))

    def ack(self, seq: int) -> int:
        """Acknowledges every notice up to ``seq`` as applied."""
        return self._send(pb.WatchRequest(ack=pb.Ack(seq=seq)))

    def request_progress(self) -> int:
        """Asks for a watermark: what is queued, then a :class:`Progress`."""
        return self._send(pb.WatchRequest(progress=pb.ProgressRequest()))

    # ------------------------------------------------------------- receive

    def recv(self, timeout: Optional[float] = None) -> WatchEvent:
        """The next event. Raises :class:`TimeoutError` after ``timeout``
        seconds, :class:`~freshd.errors.FreshdError` when the stream failed
        and :class:`StreamEnded` when it ended."""
        if self._ended is not None:
            raise self._ended
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no Watch event within {timeout}s") from None
        self._room.release()
        if event is _END:
            self._ended = StreamEnded("the Watch stream ended")
            raise self._ended
        if isinstance(event, BaseException):
            self._ended = event
            raise event
        return event  # type: ignore[no-any-return]

    @property
    def buffered(self) -> int:
        """Events read from the server and not yet taken by :meth:`recv`
        (at most ``max_buffered``, and one more for the end)."""
        return self._events.qsize()

    def __iter__(self) -> Iterator[WatchEvent]:
        while True:
            try:
                yield self.recv()
            except StreamEnded:
                return

    def sync(self, timeout: Optional[float] = 10.0) -> SyncResult:
        """Requests progress and collects every notice, reset and refusal up
        to it. Not for use while another thread reads the stream."""
        self.request_progress()
        notices: List[Notice] = []
        resets: List[Reset] = []
        refused: List[Refused] = []
        while True:
            event = self.recv(timeout=timeout)
            if isinstance(event, NoticeBatch):
                notices.extend(event.notices)
            elif isinstance(event, Reset):
                resets.append(event)
            elif isinstance(event, Refused):
                refused.append(event)
            elif isinstance(event, Progress):
                return SyncResult(tuple(notices), tuple(resets), event, tuple(refused))

    # ------------------------------------------------------------- closing

    def close(self) -> None:
        """Closes the client side: the server ends the stream."""
        if not self._closed:
            self._closed = True
            self._requests.put(None)

    def cancel(self) -> None:
        """Cancels the call at once."""
        self.close()
        self._call.cancel()

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        """Waits for the reader to see the end of the stream."""
        self._reader.join(timeout)
        return not self._reader.is_alive()

    def __enter__(self) -> "WatchStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
