"""End to end: orchestrator and 3 agents as real processes over mutual TLS, driven through the
CLIs (the session's federation, ``tests/e2e/conftest.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from examples.demo import bin_path, evaluate_pulled, free_port
from tests.e2e.conftest import Federation, FederationFiles

pytestmark = pytest.mark.e2e


def _ok(res: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_demo_job_through_the_clis(federation: Federation, tmp_path: Path) -> None:
    fed = federation
    server = ("--server", fed.server)
    job_file = fed.write_job(tmp_path / "job.yaml", rounds=3, model={"hidden": [32]})
    sites = _ok(fed.run("orchestrator", "sites", *server))
    for site in ("bank-a", "bank-b", "bank-c"):
        assert site in sites.stdout
    assert "digits" in sites.stdout

    # A bad spec names the bad field and exits 2, before anything reaches a site.
    bad = tmp_path / "bad.yaml"
    bad.write_text(job_file.read_text().replace("delta: 1.0e-05", "delta: 2.0"))
    res = fed.run("orchestrator", "launch", str(bad), *server)
    assert res.returncode == 2 and "dp.delta" in res.stderr

    res = _ok(fed.run("orchestrator", "launch", str(job_file), *server, "--wait"))
    job_id = res.stdout.strip().splitlines()[-1]
    assert job_id.startswith("job-")

    assert job_id in _ok(fed.run("orchestrator", "jobs", *server)).stdout
    status = _ok(fed.run("orchestrator", "status", job_id, *server, "--json"))
    assert json.loads(status.stdout)["state"] == "completed"

    out = tmp_path / "model"
    _ok(fed.run("orchestrator", "pull", job_id, "--out", str(out), *server))
    ledger = _ok(fed.run("site-agent", "ledger", "--config", str(fed.files.site_configs["bank-c"])))
    assert job_id in ledger.stdout
    assert "bank-c" in _ok(fed.run("orchestrator", "ledger", *server)).stdout

    card = json.loads((out / "model_card.json").read_text())
    assert card["job_id"] == job_id and card["accountant"] == "prv"
    assert 0 < card["epsilon"] < 10 and card["delta"] == 1e-5
    assert len(card["sites"]) == 3 and len(card["metrics"]) == 3
    acc = evaluate_pulled(out, fed.files.test_x, fed.files.test_y)
    assert acc > 0.4, f"released model barely beats chance (0.1): {acc:.3f}"


def test_unreachable_orchestrator_is_a_clear_error(federation_files: FederationFiles) -> None:
    files = federation_files.files
    nobody = f"127.0.0.1:{free_port()}"
    res = subprocess.run(
        [bin_path("orchestrator"), "launch", str(files.job_file), "--server", nobody],
        capture_output=True,
        text=True,
        timeout=600,
        env=files.cli_env("analyst"),
    )
    assert res.returncode == 7
    assert "cannot reach the orchestrator" in res.stderr


def test_the_orchestrator_cli_starts_without_the_training_stack() -> None:
    """Every `orchestrator` command is a process: importing torch/Opacus (seconds of CPU) at
    start-up would make each one slow, for users and for these tests alike."""
    probe = "import sys, orchestrator.cli; print(sorted({'torch', 'opacus'} & set(sys.modules)))"
    res = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert res.stdout.strip() == "[]", res.stdout
