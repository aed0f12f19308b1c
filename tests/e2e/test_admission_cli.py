"""Issue 16.1 end to end: real processes, driven through the CLIs. One site's budget cannot
pay for the whole job: `launch` fails before round 1 (exit 4), names that site and its budget,
and no site's ledger gains a training or metrics event for the job."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from examples.demo import bin_path, free_port, prepare, running_cluster
from site_agent.boundary.budget import open_ledger
from site_agent.config import load_site_config

pytestmark = pytest.mark.e2e


def test_launch_fails_before_round_one_when_a_site_cannot_pay(tmp_path: Path) -> None:
    port = free_port()
    files = prepare(tmp_path, port=port, rounds=5, hidden=(16,))
    stingy = files.site_configs["bank-c"]
    cfg = yaml.safe_load(stingy.read_text())
    cfg["policy"]["max_epsilon"] = 0.3
    stingy.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = files.cli_env("analyst")
    orch = bin_path("orchestrator")
    with running_cluster(files, port) as cluster:
        res = subprocess.run(
            [orch, "launch", str(files.job_file), "--server", cluster.server],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert res.returncode == 4, res.stderr[-3000:]
        job_id = res.stdout.strip().splitlines()[-1]
        assert job_id.startswith("job-")
        err = " ".join(res.stderr.split())  # rich wraps long lines
        assert "bank-c" in err and "ε=0.3" in err, err
        assert "site bank-a" not in err and "site bank-b" not in err
        status = subprocess.run(
            [orch, "status", job_id, "--server", cluster.server, "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=True,
        )
        assert '"round": 0' in status.stdout
    for site_id, path in files.site_configs.items():
        with open_ledger(load_site_config(path)) as ledger:
            assert ledger.entries(job_id=job_id) == [], site_id
            assert ledger.reservations("digits") == [], site_id
