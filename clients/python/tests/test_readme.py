"""The README's quick start runs as written, against a real server."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from harness import FreshdServer

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start(server: FreshdServer) -> None:
    section = README.read_text().split("## Quick start", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    assert "127.0.0.1:50051" in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace("127.0.0.1:50051", server.addr), str(README), "exec"), {})
    assert out.getvalue().splitlines() == ["['hello']", "['hello']", "['edited']"]
