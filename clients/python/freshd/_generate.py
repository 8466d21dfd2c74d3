"""Generates the gRPC stubs of freshd into ``freshd/_pb/``.

The stubs come from ``proto/freshd/v1/coordinator.proto`` at the root of the
repository, the single source of truth, and are never edited by hand nor
committed. The package build runs this (see ``setup.py``), and so does the
test suite's ``conftest.py``, which regenerates them whenever the proto file
changed. By hand, from ``clients/python``::

    python freshd/_generate.py           # only when the proto changed
    python freshd/_generate.py --force

This module uses the standard library only (``grpc_tools`` is imported when
it runs), so it can be loaded by file path before the package is importable.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

PACKAGE_DIR = Path(__file__).resolve().parent
OUT_DIR = PACKAGE_DIR / "_pb"
PROTO_FILE = "freshd/v1/coordinator.proto"
GENERATED = ("coordinator_pb2.py", "coordinator_pb2.pyi", "coordinator_pb2_grpc.py")
STAMP = ".generated-from"


class GenerateError(RuntimeError):
    """The stubs could not be generated."""


def proto_root() -> Optional[Path]:
    """The directory holding ``freshd/v1/coordinator.proto``.

    ``FRESHD_PROTO_ROOT`` overrides the default, ``<repository>/proto``
    (three levels above this package). ``None`` when it does not exist, as in
    an installed copy of the package.
    """
    override = os.environ.get("FRESHD_PROTO_ROOT")
    root = Path(override) if override else PACKAGE_DIR.parent.parent.parent / "proto"
    return root if (root / PROTO_FILE).is_file() else None


def _tools_version() -> Optional[str]:
    """The installed grpcio-tools version; None when it is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version("grpcio-tools")
    except PackageNotFoundError:
        return None


def _stamp_for(proto: Path) -> str:
    digest = hashlib.sha256(proto.read_bytes()).hexdigest()
    return f"{digest} grpcio-tools {_tools_version() or 'unknown'}\n"


def up_to_date() -> bool:
    """Whether the generated stubs exist and match the proto file and the
    installed grpcio-tools (whose generated code wants a protobuf and grpcio
    runtime at least as new as itself)."""
    if not all((OUT_DIR / name).is_file() for name in GENERATED):
        return False
    root = proto_root()
    if root is None:
        return True  # an installed copy: nothing to regenerate from
    stamp = OUT_DIR / STAMP
    if not stamp.is_file():
        return False
    recorded = stamp.read_text().split()
    current = _stamp_for(root / PROTO_FILE).split()
    if _tools_version() is None:
        # Nothing to generate with: keep the stubs if the proto is the same.
        return recorded[:1] == current[:1]
    return recorded == current


def gencode_versions() -> "tuple[str, str]":
    """``(grpcio, protobuf)``: the oldest runtime versions the generated
    stubs accept, as they state them."""
    grpc_text = (OUT_DIR / "coordinator_pb2_grpc.py").read_text(encoding="utf-8")
    pb_text = (OUT_DIR / "coordinator_pb2.py").read_text(encoding="utf-8")
    grpc_match = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", grpc_text, re.MULTILINE)
    pb_match = re.search(r"^# Protobuf Python Version: (\S+)", pb_text, re.MULTILINE)
    if grpc_match is None or pb_match is None:
        raise GenerateError("cannot read the gencode versions of the generated stubs")
    return grpc_match.group(1), pb_match.group(1)


def _relative_imports(source: str) -> str:
    # protoc names the messages module by its proto path (freshd.v1), which
    # inside this package lives at freshd._pb: import it relatively.
    return re.sub(
        r"^from freshd\.v1 import (coordinator_pb2 as \w+)$",
        r"from . import \1",
        source,
        flags=re.MULTILINE,
    )


def generate(force: bool = False, quiet: bool = False) -> bool:
    """Generates the stubs unless they are up to date. Returns whether it did.

    Raises :class:`GenerateError` when the proto file or ``grpc_tools`` is
    missing and there are no stubs to fall back on.
    """
    if not force and up_to_date():
        return False
    root = proto_root()
    if root is None:
        raise GenerateError(
            f"cannot find {PROTO_FILE}: set FRESHD_PROTO_ROOT to the repository's proto/ directory"
        )
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise GenerateError(
            "grpcio-tools is needed to generate the stubs: pip install grpcio-tools"
        ) from e
    import importlib.resources

    # The well-known types (google/protobuf/*.proto) ship with grpc_tools.
    include = str(importlib.resources.files("grpc_tools") / "_proto")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="freshd-stubs-") as tmp:
        args: List[str] = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(root / PROTO_FILE),
        ]
        code = protoc.main(args)
        if code != 0:
            raise GenerateError(f"protoc failed with exit code {code} on {root / PROTO_FILE}")
        produced = Path(tmp) / "freshd" / "v1"
        for name in GENERATED:
            text = (produced / name).read_text(encoding="utf-8")
            if name.endswith("_grpc.py"):
                text = _relative_imports(text)
            target = OUT_DIR / name
            partial = target.with_suffix(target.suffix + ".tmp")
            partial.write_text(text, encoding="utf-8")
            os.replace(partial, target)
    (OUT_DIR / STAMP).write_text(_stamp_for(root / PROTO_FILE))
    cache = OUT_DIR / "__pycache__"
    if cache.is_dir():
        shutil.rmtree(cache, ignore_errors=True)
    if not quiet:
        print(f"freshd: generated stubs in {OUT_DIR} from {root / PROTO_FILE}", file=sys.stderr)
    return True


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    force = "--force" in argv
    try:
        generate(force=force)
    except GenerateError as e:
        print(f"freshd: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
