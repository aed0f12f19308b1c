"""The layers stay apart: read from every module's imports (``ast``, nothing is executed).

* ``site_agent`` never imports ``orchestrator`` (a site runs without the orchestrator's code),
  and ``common`` imports neither side.
* The pure maths (DP accounting, clustering, synthesis, schema, models, ...) imports no
  transport or CLI (grpc, generated protobuf code, typer, click, rich); the modules among them
  that say they are pure also do no file I/O.
* The generated protobuf code is imported only by the serde layer and the transport modules
  (the gRPC client and servicers); everything else speaks the domain types.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("common", "site_agent", "orchestrator")

# Where the generated wire types may be imported (the translation layer and the transport).
WIRE_MODULES = frozenset(
    {
        "orchestrator/client.py",
        "orchestrator/server.py",
        "orchestrator/servicers.py",
        "site_agent/agent.py",
    }
)
# ... and every module of these packages.
WIRE_LAYER = ("common/rpc/serde",)
WIRE_PACKAGES = ("protos",)
TRANSPORT_AND_CLI = ("grpc", "protos", "typer", "click", "rich")

# The maths: no transport, no CLI. Every module of these packages, and these modules.
MATHS_PACKAGES = ("common/clustering", "common/synthesis", "common/schema")
MATHS_MODULES = (
    "common/dp/accounting.py",
    "common/dp/audit.py",
    "common/domain.py",
    "common/errors.py",
    "common/models.py",
    "common/dp/noise.py",
    "common/pipeline.py",
    "common/schedule.py",
    "common/sgld.py",
    "common/tensors.py",
)
# Among them, the ones whose docstrings say they are pure: no file I/O either.
# (common/clustering/released.py reads a pulled mixture; models.py, pipeline.py and
# tensors.py save and load models; noise.py reads OS entropy.)
IO_EXEMPT = frozenset(
    {
        "common/clustering/released.py",
        "common/models.py",
        "common/dp/noise.py",
        "common/pipeline.py",
        "common/tensors.py",
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
    }
)


def _sources(*roots: str) -> Iterator[str]:
    for root in roots:
        path = ROOT / root
        files = [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))
        for f in files:
            if "_pb2" not in f.name:
                yield f.relative_to(ROOT).as_posix()


def _imports(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, module) of every import, lazy ones inside functions included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def _under(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


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


def _violations(path: str, source: str) -> list[str]:
    tree = ast.parse(source, filename=path)
    found: list[str] = []
    imports = list(_imports(tree))
    if path.startswith("site_agent/"):
        found += [f"{path}:{n} imports {m}" for n, m in imports if _under(m, ("orchestrator",))]
    if path.startswith("common/"):
        sides = ("orchestrator", "site_agent")
        found += [f"{path}:{n} imports {m}" for n, m in imports if _under(m, sides)]
    if path not in WIRE_MODULES and not any(path.startswith(p + "/") for p in WIRE_LAYER):
        found += [
            f"{path}:{n} imports the wire types {m}" for n, m in imports if _under(m, WIRE_PACKAGES)
        ]
    maths = path in MATHS_MODULES or any(path.startswith(p + "/") for p in MATHS_PACKAGES)
    if maths:
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
    listed = [*WIRE_MODULES, *WIRE_LAYER, *MATHS_MODULES, *IO_EXEMPT, *MATHS_PACKAGES]
    missing = [p for p in listed if not (ROOT / p).exists()]
    assert not missing, f"The layering test names modules that do not exist: {missing}"


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("site_agent/x.py", "def f():\n    from orchestrator import store\n", "orchestrator"),
        ("common/x.py", "import site_agent.ledger\n", "site_agent"),
        ("orchestrator/x.py", "from protos.dpfed.v1 import dpfed_pb2\n", "wire types"),
        ("common/clustering/x.py", "import grpc\n", "grpc"),
        ("common/synthesis/x.py", "import typer\n", "typer"),
        ("common/schema/x.py", "from pathlib import Path\n", "pathlib"),
        ("common/dp/accounting.py", "def f(p):\n    return open(p).read()\n", "open()"),
        ("common/clustering/x.py", "def f(p):\n    return p.read_text()\n", ".read_text()"),
    ],
)
def test_the_checker_sees_a_violation(path: str, source: str, expected: str) -> None:
    found = _violations(path, source)
    assert len(found) == 1 and expected in found[0], found


def test_the_checker_allows_the_layers() -> None:
    assert (
        _violations("common/rpc/serde/chunks.py", "from protos.dpfed.v1 import dpfed_pb2\n") == []
    )
    assert _violations("orchestrator/x.py", "import grpc\nimport site_agent\n") == []
    assert _violations("common/clustering/released.py", "from pathlib import Path\n") == []
