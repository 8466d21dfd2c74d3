"""Fixtures: real freshd servers on loopback ports.

The binary is ``FRESHD_BIN``, else ``<repo>/target/debug/freshd`` (built
with ``cargo build --bin freshd`` when missing). The gRPC stubs are
regenerated first when ``proto/freshd/v1/coordinator.proto`` changed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Iterator, List, Mapping, Optional

import pytest

_GENERATE = Path(__file__).resolve().parents[1] / "freshd" / "_generate.py"
_spec = importlib.util.spec_from_file_location("freshd_generate", _GENERATE)
assert _spec is not None and _spec.loader is not None
_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_generate)
_generate.generate(quiet=True)

from harness import FreshdServer, freshd_binary  # noqa: E402

import freshd  # noqa: E402  (after the stubs exist)

ServerFactory = Callable[..., FreshdServer]


@pytest.fixture(scope="session", autouse=True)
def _binary() -> Path:
    return freshd_binary()


@pytest.fixture
def start_server() -> Iterator[ServerFactory]:
    """Starts fresh servers (``start_server({"lease_ttl": "200ms"})``) and
    stops them after the test."""
    servers: List[FreshdServer] = []

    def start(settings: Optional[Mapping[str, object]] = None, port: int = 0) -> FreshdServer:
        server = FreshdServer(settings, port).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def server(start_server: ServerFactory) -> FreshdServer:
    return start_server()


@pytest.fixture
def client(server: FreshdServer) -> Iterator[freshd.Client]:
    with freshd.Client(server.addr, timeout=5.0) as c:
        yield c
