"""End to end: orchestrator and 3 agents as real processes, driven through the CLIs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from examples.demo import bin_path, evaluate_pulled, free_port, prepare, running_cluster

pytestmark = pytest.mark.e2e


ENV: dict[str, str] = {}


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, check=check, timeout=600, env=ENV or None
    )


def test_demo_job_through_the_clis(tmp_path: Path) -> None:
    port = free_port()
    files = prepare(tmp_path, port=port, rounds=3, hidden=(32,))
    ENV.clear()
    ENV.update(files.cli_env("analyst"))
    orch = bin_path("orchestrator")
    with running_cluster(files, port) as cluster:
        sites = _cli(orch, "sites", "--server", cluster.server)
        for site in ("bank-a", "bank-b", "bank-c"):
            assert site in sites.stdout
        assert "digits" in sites.stdout

        # A bad spec names the bad field and exits 2, before anything reaches a site.
        bad = tmp_path / "bad.yaml"
        bad.write_text(files.job_file.read_text().replace("delta: 1.0e-05", "delta: 2.0"))
        res = _cli(orch, "launch", str(bad), "--server", cluster.server, check=False)
        assert res.returncode == 2 and "dp.delta" in res.stderr

        res = _cli(
            orch, "launch", str(files.job_file), "--server", cluster.server, "--wait", check=False
        )
        assert res.returncode == 0, res.stderr[-3000:]
        job_id = res.stdout.strip().splitlines()[-1]
        assert job_id.startswith("job-")

        assert job_id in _cli(orch, "jobs", "--server", cluster.server).stdout
        status = _cli(orch, "status", job_id, "--server", cluster.server, "--json")
        assert json.loads(status.stdout)["state"] == "completed"

        out = tmp_path / "model"
        _cli(orch, "pull", job_id, "--out", str(out), "--server", cluster.server)
        ledger = _cli(
            bin_path("site-agent"), "ledger", "--config", str(files.site_configs["bank-c"])
        )
        assert job_id in ledger.stdout
        orch_ledger = _cli(orch, "ledger", "--server", cluster.server)
        assert "bank-c" in orch_ledger.stdout

    card = json.loads((out / "model_card.json").read_text())
    assert card["job_id"] == job_id and card["accountant"] == "prv"
    assert 0 < card["epsilon"] < 10 and card["delta"] == 1e-5
    assert len(card["sites"]) == 3 and len(card["metrics"]) == 3
    acc = evaluate_pulled(out, files.test_x, files.test_y)
    assert acc > 0.4, f"released model barely beats chance (0.1): {acc:.3f}"


def test_unreachable_orchestrator_is_a_clear_error(tmp_path: Path) -> None:
    files = prepare(tmp_path, port=free_port())
    ENV.clear()
    ENV.update(files.cli_env("analyst"))
    res = _cli(
        bin_path("orchestrator"),
        "launch",
        str(files.job_file),
        "--server",
        f"127.0.0.1:{free_port()}",
        check=False,
    )
    assert res.returncode == 7
    assert "cannot reach the orchestrator" in res.stderr
