"""Issue 16.7/16.8 over the real wire: a rejected update counts in the job's ε, and
evaluation and mixture jobs' charges are in the job ledger `status` and `ledger` read."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.client import ControlClient
from tests.integration.test_gmm_job import ONE_SHOT_SPEC, _federation, _run_job
from tests.integration.test_grpc_job import _job, _start, _wait
from tests.integration.test_security import (
    Federation,
    Pki,
    Tamper,
    _claimed_sigma,
    _huge_norm,
    _spec,
    _wait_job,
    federation,
    pki,
)

__all__ = ["federation", "pki"]  # fixtures used here


@pytest.mark.parametrize("tamper", [_huge_norm, _claimed_sigma(lambda s: s / 2)])
def test_a_rejected_update_counts_in_the_jobs_epsilon(
    pki: Pki, federation: Callable[[Tamper], Federation], tamper: Tamper
) -> None:
    fed = federation(tamper)
    with fed.client(pki) as c:
        st = _wait_job(c, c.submit(json.dumps(_spec(rounds=2, min_sites=2))))
        card = json.loads(c.download(st.job_id)[0])
    assert st.state == "completed", st.error
    assert all("evil" not in r.site_ids for r in st.history)  # not in the model
    spend = {s.site_id: s for s in st.sites}
    assert "evil" in spend and spend["evil"].epsilon > 0  # but in its ε
    assert st.epsilon >= spend["evil"].epsilon
    assert "evil" in {s["site_id"] for s in card["sites"]}
    assert card["rejected_updates"].startswith("counted")
    assert card["accountant"] == st.accountant == "prv"


def test_evaluation_and_mixture_charges_are_in_the_job_ledger(tmp_path: Path, digits: Any) -> None:
    net = _start(tmp_path / "fl", digits, {"a": {}, "b": {}})
    try:
        with ControlClient(net.address) as c:
            st = _wait(c, c.submit(_job(rounds=1, min_sites=2, local_steps=5)))
            assert st.state == "completed", st.error
            c.evaluate(st.job_id, dataset="digits", noise_multiplier=5.0, timeout_s=60)
            rows, _ = c.ledger()
            evals = [j for j in c.jobs() if j.job_id.startswith(f"eval-{st.job_id}")]
            assert len(evals) == 1 and evals[0].state == "completed"
            ev = c.job(evals[0].job_id)
            assert {s.site_id for s in ev.sites} == {"a", "b"} and ev.epsilon > 0
    finally:
        net.stop()
    assert {(r.site_id, r.job_id) for r in rows} >= {("a", ev.job_id), ("b", ev.job_id)}

    with _federation(tmp_path / "gmm", {"max_epsilon": 20.0, "delta": 1e-5}) as c:
        job_id, card, _ = _run_job(c, ONE_SHOT_SPEC)
        st = c.job(job_id)
        rows, _ = c.ledger()
    assert {s.site_id for s in st.sites} == {"a", "b", "c"}
    assert {r.site_id for r in rows if r.job_id == job_id} == {"a", "b", "c"}
    by_site = {s.site_id: s.epsilon for s in st.sites}
    for s in card["sites"]:
        assert by_site[s["site_id"]] == pytest.approx(s["epsilon"], rel=1e-6)
