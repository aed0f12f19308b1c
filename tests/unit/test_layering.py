"""The layers stay apart: read from every module's imports (``ast``, nothing is executed).

* ``site_agent`` never imports ``orchestrator`` (a site runs without the orchestrator's code),
  and ``common`` imports neither side.
* Everything in ``common`` but its edges (:data:`EDGES`: the gRPC layer, TLS, the CLI helpers)
  is the shared core: DP accounting and noise, clustering, synthesis, schema, specs, models,
  ... It imports no transport or CLI (grpc, generated protobuf code, typer, click, rich), and
  only the modules in :data:`IO_EXEMPT` (they load or save models, spec files, a pulled
  mixture, or read OS entropy) do file I/O. A new module in ``common`` is held to this by
  default.
* The generated protobuf code (``protos``, the ``dpfed.v1`` wire types) is imported only by
  the serde layer (``common/rpc/serde``), the servers (``orchestrator/server.py``,
  ``orchestrator/api/``) and the two gRPC clients (:data:`WIRE_CLIENTS`); everything else
  speaks the domain types. gRPC itself is imported only by those and the other transport
  modules (:data:`GRPC_MODULES`): the orchestrator's core, its job kinds and the site's
  pipeline run without it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("common", "site_agent", "orchestrator")

# Where the generated wire types may be imported: the serde layer and the servers ...
WIRE_LAYER = ("common/rpc/serde", "orchestrator/api", "orchestrator/server.py")
# ... and the gRPC clients, which build their requests and call the stubs.
WIRE_CLIENTS = ("orchestrator/client.py", "site_agent/agent.py")
WIRE_PACKAGES = ("protos",)
# Where grpc may be imported: the wire's own modules, the mTLS identities and the call limits
# read from a call's context (orchestrator/auth.py, orchestrator/api/), the health probe.
GRPC_MODULES = (
    *WIRE_LAYER,
    *WIRE_CLIENTS,
    "common/rpc",
    "orchestrator/auth.py",
    "orchestrator/healthcheck.py",
)
GRPC_PACKAGES = ("grpc", "grpc_health")
TRANSPORT_AND_CLI = ("grpc", "protos", "typer", "click", "rich")

# The shared core is every module of common/ but these edges (transport, TLS, CLI helpers).
EDGES = ("common/rpc", "common/rpc/tls", "common/cli_support.py")
# Core modules that load or save files (models, pipelines, job spec files, a pulled mixture,
# the site's private files) or read OS entropy (noise); the rest of the core does no I/O.
IO_EXEMPT = frozenset(
    {
        "common/clustering/released.py",
        "common/dp/noise.py",
        "common/training/models.py",
        "common/training/pipeline.py",
        "common/private_files.py",
        "common/specs.py",
    }
)
IO_MODULES = ("pathlib", "io", "os", "shutil", "tempfile", "glob", "sqlite3")
IO_CALLS = frozenset(
    {
        "read_text",
        "write_text",
        "read_bytes",
        "write_bytes",
        "read_csv",
        "read_parquet",
        "to_csv",
        "to_parquet",
        "savetxt",
        "loadtxt",
        "mkdir",
        "unlink",
        "open",
    }
)
# File I/O through a library's own readers and writers (np.save, torch.load, pickle.dump, ...).
_NUMPY_IO = frozenset(
    {"load", "save", "savez", "savez_compressed", "loadtxt", "savetxt", "fromfile"}
)
IO_MODULE_CALLS = {
    "np": _NUMPY_IO,
    "numpy": _NUMPY_IO,
    "torch": frozenset({"load", "save"}),
    "pickle": frozenset({"load", "dump"}),
    "joblib": frozenset({"load", "dump"}),
}


def _sources(*roots: str) -> Iterator[str]:
    for root in roots:
        path = ROOT / root
        files = [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))
        for f in files:
            if "_pb2" not in f.name:
                yield f.relative_to(ROOT).as_posix()


def _imports(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, module) of every import, lazy ones inside functions included, and of every
    ``importlib.import_module("…")`` / ``__import__("…")`` with a literal name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args:
            f, first = node.func, node.args[0]
            dynamic = (isinstance(f, ast.Name) and f.id == "__import__") or (
                isinstance(f, ast.Attribute) and f.attr == "import_module"
            )
            if dynamic and isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


def _under(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _within(path: str, entries: tuple[str, ...]) -> bool:
    """``path`` is one of ``entries`` or lies in one of them (a package folder)."""
    return any(path == e or path.startswith(e + "/") for e in entries)


def _file_io(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for line, module in _imports(tree):
        if _under(module, IO_MODULES):
            yield line, f"imports {module}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id == "open":
                yield node.lineno, "calls open()"
            elif isinstance(f, ast.Attribute) and f.attr in IO_CALLS:
                yield node.lineno, f"calls .{f.attr}()"
            elif (
                isinstance(f, ast.Attribute)
                and isinstance(f.value, ast.Name)
                and f.attr in IO_MODULE_CALLS.get(f.value.id, ())
            ):
                yield node.lineno, f"calls {f.value.id}.{f.attr}()"


def _violations(path: str, source: str) -> list[str]:
    tree = ast.parse(source, filename=path)
    found: list[str] = []
    imports = list(_imports(tree))
    if path.startswith("site_agent/"):
        found += [f"{path}:{n} imports {m}" for n, m in imports if _under(m, ("orchestrator",))]
    if path.startswith("common/"):
        sides = ("orchestrator", "site_agent")
        found += [f"{path}:{n} imports {m}" for n, m in imports if _under(m, sides)]
    if not _within(path, (*WIRE_LAYER, *WIRE_CLIENTS)):
        found += [
            f"{path}:{n} imports the wire types {m}" for n, m in imports if _under(m, WIRE_PACKAGES)
        ]
    if not path.startswith("common/") and not _within(path, GRPC_MODULES):
        found += [f"{path}:{n} imports {m}" for n, m in imports if _under(m, GRPC_PACKAGES)]
    if path.startswith("common/") and not _within(path, EDGES):
        found += [f"{path}:{n} imports {m}" for n, m in imports if _under(m, TRANSPORT_AND_CLI)]
        if path not in IO_EXEMPT:
            found += [f"{path}:{n} {what}" for n, what in _file_io(tree)]
    return found


def test_the_layers_hold() -> None:
    found: list[str] = []
    for path in _sources(*PRODUCT):
        found += _violations(path, (ROOT / path).read_text())
    assert not found, "Layering broken:\n" + "\n".join(found)


def test_every_listed_module_exists() -> None:
    listed = [*WIRE_LAYER, *WIRE_CLIENTS, *GRPC_MODULES, *EDGES, *IO_EXEMPT]
    missing = [p for p in listed if not (ROOT / p).exists()]
    assert not missing, f"The layering test names modules that do not exist: {missing}"


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("site_agent/x.py", "def f():\n    from orchestrator import store\n", "orchestrator"),
        ("common/x.py", "import site_agent.boundary.ledger\n", "site_agent"),
        ("orchestrator/x.py", "from protos.dpfed.v1 import dpfed_pb2\n", "wire types"),
        ("orchestrator/jobs/base.py", "from protos.dpfed.v1 import dpfed_pb2\n", "wire types"),
        ("site_agent/boundary/pipeline.py", "import protos.dpfed.v1.dpfed_pb2\n", "wire types"),
        ("common/rpc/tls/files.py", "from protos.dpfed.v1 import dpfed_pb2\n", "wire types"),
        ("orchestrator/core/broker.py", "import grpc\n", "grpc"),
        ("orchestrator/coordinator.py", "from grpc_health.v1 import health\n", "grpc_health"),
        ("site_agent/handlers/train.py", "def f():\n    import grpc\n", "grpc"),
        ("common/clustering/x.py", "import grpc\n", "grpc"),
        ("common/synthesis/x.py", "import typer\n", "typer"),
        ("common/schema/x.py", "from pathlib import Path\n", "pathlib"),
        ("common/dp/accounting.py", "def f(p):\n    return open(p).read()\n", "open()"),
        ("common/clustering/x.py", "def f(p):\n    return p.read_text()\n", ".read_text()"),
        ("common/dp/rdp.py", "import grpc\n", "grpc"),
        ("common/new_module.py", "import rich\n", "rich"),
        ("common/specs.py", "import click\n", "click"),
        ("common/x.py", "from orchestrator.core.store import Store\n", "orchestrator"),
        ("common/dp/prv.py", "def f(p):\n    return p.open()\n", ".open()"),
        ("common/dp/calibrate.py", "import sqlite3\n", "sqlite3"),
        ("common/clustering/x.py", "def f(p, a):\n    np.save(p, a)\n", "np.save()"),
        ("common/synthesis/x.py", "def f(p):\n    return torch.load(p)\n", "torch.load()"),
        (
            "site_agent/x.py",
            "import importlib\nimportlib.import_module('orchestrator.jobs')\n",
            "orchestrator",
        ),
        ("site_agent/x.py", "def f():\n    return __import__('orchestrator')\n", "orchestrator"),
    ],
)
def test_the_checker_sees_a_violation(path: str, source: str, expected: str) -> None:
    found = _violations(path, source)
    assert len(found) == 1 and expected in found[0], found


def test_the_checker_allows_the_layers() -> None:
    assert (
        _violations("common/rpc/serde/chunks.py", "from protos.dpfed.v1 import dpfed_pb2\n") == []
    )
    assert _violations("orchestrator/x.py", "import site_agent\n") == []
    wire = "import grpc\nfrom protos.dpfed.v1 import dpfed_pb2, dpfed_pb2_grpc\n"
    for endpoint in ("orchestrator/api/agent_service.py", "orchestrator/server.py", *WIRE_CLIENTS):
        assert _violations(endpoint, wire) == [], endpoint
    assert _violations("orchestrator/auth.py", "import grpc\n") == []
    assert _violations("common/clustering/released.py", "from pathlib import Path\n") == []
    assert _violations("common/rpc/transport.py", "import grpc\n") == []
    # Serialising to bytes in memory is not file I/O.
    assert _violations("common/training/x.py", "b = safetensors.torch.save(state)\n") == []
    assert _violations("site_agent/x.py", "import importlib\nimportlib.import_module(name)\n") == []
