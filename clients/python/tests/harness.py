"""Real freshd servers for the tests: spawn the binary on a loopback port,
read its address from the JSON log, stop or restart it."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, TypeVar

REPO = Path(__file__).resolve().parents[3]
CONFORMANCE = REPO / "tests" / "conformance"

T = TypeVar("T")


def freshd_binary() -> Path:
    """``FRESHD_BIN``, else ``<repo>/target/debug/freshd`` (or under
    ``CARGO_TARGET_DIR``), built with ``cargo build --bin freshd`` when
    missing."""
    configured = os.environ.get("FRESHD_BIN")
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise RuntimeError(f"FRESHD_BIN={configured} does not exist")
        return path
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    path = (target if target.is_absolute() else REPO / target) / "debug" / "freshd"
    if not path.is_file():
        cargo = shutil.which("cargo")
        if cargo is None:
            raise RuntimeError(f"{path} is missing and cargo is not installed to build it")
        subprocess.run([cargo, "build", "--bin", "freshd"], cwd=REPO, check=True)
    return path


def setting_flags(settings: Mapping[str, object]) -> List[str]:
    """``{"lease_ttl": "200ms"}`` -> ``["--lease-ttl", "200ms"]``."""
    flags: List[str] = []
    for name, value in settings.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


class FreshdServer:
    """One freshd process on 127.0.0.1."""

    def __init__(self, settings: Optional[Mapping[str, object]] = None, port: int = 0) -> None:
        self.settings: Dict[str, object] = dict(settings or {})
        self.port = port
        self.addr = ""
        self.epoch = 0
        self.proc: Optional[subprocess.Popen[str]] = None
        self.log: List[str] = []

    def start(self, timeout: float = 20.0) -> "FreshdServer":
        args = [
            str(freshd_binary()),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--log-format",
            "json",
            *setting_flags(self.settings),
        ]
        if "admin_listen" not in self.settings:
            args += ["--admin-listen", "off"]
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        serving: "queue.Queue[Optional[dict]]" = queue.Queue()
        threading.Thread(target=self._read_log, args=(self.proc, serving), daemon=True).start()
        try:
            fields = serving.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise RuntimeError(
                f"freshd did not report serving within {timeout}s: {self.log}"
            ) from None
        if fields is None:
            code = self.proc.wait()
            raise RuntimeError(f"freshd exited with {code} before serving: {self.log}")
        self.addr = str(fields["addr"])
        self.port = int(self.addr.rsplit(":", 1)[1])
        self.epoch = int(fields.get("epoch", 0))
        return self

    def _read_log(
        self, proc: "subprocess.Popen[str]", serving: "queue.Queue[Optional[dict]]"
    ) -> None:
        told = False
        assert proc.stdout is not None
        for line in proc.stdout:
            self.log.append(line.rstrip("\n"))
            if told:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            fields = record.get("fields", record)
            if fields.get("message") == "freshd serving" and "addr" in fields:
                serving.put(fields)
                told = True
        if not told:
            serving.put(None)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (graceful drain), then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: a crash, nothing drained."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, kill: bool = True) -> "FreshdServer":
        """A new process on the same port: a new epoch, nothing remembered."""
        if kill:
            self.kill()
        else:
            self.stop()
        deadline = time.monotonic() + 10
        while True:
            try:
                return self.start()
            except RuntimeError:
                # The port may linger for a moment after the old process.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    condition: Callable[[], T], timeout: float = 5.0, interval: float = 0.01, what: str = ""
) -> T:
    """Polls ``condition`` until it returns something truthy, or fails."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


class TcpProxy:
    """A loopback TCP proxy in front of a server, to cut connections: while
    ``blocked`` it accepts and closes at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.blocked = False
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self.addr = f"127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._sockets: List[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            if self.blocked:
                downstream.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
                upstream.settimeout(None)
            except OSError:
                downstream.close()
                continue
            with self._lock:
                self._sockets += [downstream, upstream]
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Closes every proxied connection."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()
