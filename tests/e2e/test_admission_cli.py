"""Issue 16.1 end to end: real processes, driven through the CLIs. One site's budget cannot
pay for the whole job: `launch` fails before round 1 (exit 4), names that site and its budget,
and no site's ledger gains a training or metrics event for the job."""

from __future__ import annotations

from pathlib import Path

import pytest

from site_agent.boundary.budget import open_ledger
from site_agent.config import load_site_config
from tests.e2e.conftest import SCARCE_EPSILON, SCARCE_SITE, Federation

pytestmark = pytest.mark.e2e


def test_launch_fails_before_round_one_when_a_site_cannot_pay(
    federation: Federation, tmp_path: Path
) -> None:
    fed = federation
    # ``scarce``: every site's own budget, bank-c's is ε=0.3 (the others can pay for the job).
    job = fed.write_job(tmp_path / "job.yaml", dataset="scarce", rounds=5, model={"hidden": [16]})
    res = fed.run("orchestrator", "launch", str(job), "--server", fed.server)
    assert res.returncode == 4, res.stderr[-3000:]
    job_id = res.stdout.strip().splitlines()[-1]
    assert job_id.startswith("job-")
    err = " ".join(res.stderr.split())  # rich wraps long lines
    assert SCARCE_SITE in err and f"ε={SCARCE_EPSILON:g}" in err, err
    assert "site bank-a" not in err and "site bank-b" not in err
    status = fed.run("orchestrator", "status", job_id, "--server", fed.server, "--json")
    assert status.returncode == 0, status.stderr[-2000:]
    assert '"round": 0' in status.stdout
    for site_id, path in fed.files.site_configs.items():
        with open_ledger(load_site_config(path)) as ledger:
            assert ledger.entries(job_id=job_id) == [], site_id
            assert ledger.reservations("scarce") == [], site_id
