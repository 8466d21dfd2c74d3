"""Build hook: generates the gRPC stubs from ../../proto, and derives the
runtime dependencies from them. Everything else is in pyproject.toml.

Generated code needs a grpcio and a protobuf runtime at least as new as the
grpcio-tools that generated it (and protobuf of the same major version), so
the versions the stubs state become the package's lower bounds.
"""

import importlib.util
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _load_generator():
    # Loaded by path: the package itself cannot be imported before its stubs
    # exist.
    spec = importlib.util.spec_from_file_location(
        "freshd_generate", HERE / "freshd" / "_generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = _load_generator()
generator.generate()
grpc_version, protobuf_version = generator.gencode_versions()
protobuf_major = int(protobuf_version.split(".")[0])

setup(
    install_requires=[
        f"grpcio>={grpc_version}",
        f"protobuf>={protobuf_version},<{protobuf_major + 1}",
    ]
)
