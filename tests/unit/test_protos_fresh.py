"""The committed generated protobuf/gRPC code is what ``protos/dpfed/v1/dpfed.proto`` generates.

Regenerates into a temporary folder with ``scripts/gen_protos.sh`` and compares byte for byte,
so a ``.proto`` edited without ``make protos`` (or a hand edit of generated code) fails here.
"""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GEN_DIR = Path("protos/dpfed/v1")
GENERATED = ["dpfed_pb2.py", "dpfed_pb2_grpc.py", "dpfed_pb2.pyi", "dpfed_pb2_grpc.pyi"]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("protos")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(out)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, (
        f"scripts/gen_protos.sh failed (exit {proc.returncode}); are the dev extras "
        f"(grpcio-tools, mypy-protobuf) installed?\n{proc.stdout}\n{proc.stderr}"
    )
    return out


@pytest.mark.parametrize("name", GENERATED)
def test_generated_code_is_up_to_date(regenerated: Path, name: str) -> None:
    committed = ROOT / GEN_DIR / name
    fresh = regenerated / GEN_DIR / name
    assert fresh.is_file(), f"gen_protos.sh did not produce {GEN_DIR / name}"
    assert committed.is_file(), f"{GEN_DIR / name} is not committed; run `make protos`"
    old, new = committed.read_bytes(), fresh.read_bytes()
    if old != new:
        diff = "".join(
            difflib.unified_diff(
                old.decode(errors="replace").splitlines(keepends=True),
                new.decode(errors="replace").splitlines(keepends=True),
                fromfile=f"committed/{name}",
                tofile=f"regenerated/{name}",
                n=1,
            )
        )
        pytest.fail(
            f"{GEN_DIR / name} is stale: it differs from what {GEN_DIR}/dpfed.proto generates. "
            f"Run `make protos` and commit the result.\n{diff[:4000]}"
        )


def test_nothing_else_is_generated(regenerated: Path) -> None:
    """A new generated file (e.g. a second .proto) must be added to the check above."""
    produced = sorted(p.relative_to(regenerated).as_posix() for p in regenerated.rglob("*.py*"))
    assert produced == sorted((GEN_DIR / n).as_posix() for n in GENERATED)
