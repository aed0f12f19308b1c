"""Issue 16.1 over the real wire: admission before any spend, reservations end with the job,
and `plan` shows the sites' own verdicts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from orchestrator.admission import ADMISSION_REFUSED
from orchestrator.client import ControlClient
from site_agent.boundary.budget import open_ledger
from site_agent.boundary.ledger import Ledger
from site_agent.config import load_site_config
from tests.integration.test_grpc_job import _job, _wait, net_factory

__all__ = ["net_factory"]  # fixtures used here


def _ledger(tmp_path: Path, site_id: str) -> Ledger:
    return open_ledger(load_site_config(tmp_path / site_id / "site.yaml"))


def _wait_no_reservations(tmp_path: Path, sites: list[str], timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while True:
        held = {}
        for sid in sites:
            with _ledger(tmp_path, sid) as led:
                held[sid] = led.reservations("digits")
        if not any(held.values()):
            return
        assert time.time() < deadline, f"reservations not released: {held}"
        time.sleep(0.2)


def test_a_refusing_site_fails_the_job_before_any_site_spends(
    net_factory: Any, tmp_path: Path
) -> None:
    # One round fits stingy's budget; the whole job does not.
    net = net_factory({"a": {}, "b": {}, "stingy": {"max_epsilon": 5.0}})
    with ControlClient(net.address) as c:
        st = _wait(c, c.submit(_job(min_sites=3, rounds=5)))
    assert st.state == "failed" and st.round == 0 and not st.history
    assert st.error.startswith(ADMISSION_REFUSED)
    assert "site stingy" in st.error and "5 rounds" in st.error and "budget of ε=5" in st.error
    assert "site a" not in st.error and "site b" not in st.error
    for sid in ("a", "b", "stingy"):
        with _ledger(tmp_path, sid) as led:
            kinds = {e.kind for e in led.entries(job_id=st.job_id)}
        assert not kinds, (sid, kinds)  # no training, no metrics charge
    _wait_no_reservations(tmp_path, ["a", "b", "stingy"])


def test_an_admitted_job_holds_its_cost_until_it_ends(net_factory: Any, tmp_path: Path) -> None:
    net = net_factory({"a": {}, "b": {}})
    with ControlClient(net.address) as c:
        job_id = c.submit(_job(min_sites=2, rounds=200, local_steps=1))
        deadline = time.time() + 60
        while c.job(job_id).state == "pending":
            assert time.time() < deadline
            time.sleep(0.1)
        for sid in ("a", "b"):
            with _ledger(tmp_path, sid) as led:
                (res,) = led.reservations("digits")
            assert res.job_id == job_id and res.rounds == 200
        st = c.cancel(job_id)
        assert st.state == "failed"
    _wait_no_reservations(tmp_path, ["a", "b"])


def test_plan_shows_each_sites_own_verdict(net_factory: Any, tmp_path: Path) -> None:
    net = net_factory({"a": {}, "stingy": {"max_epsilon": 0.5}})
    with ControlClient(net.address) as c:
        plan = c.plan(_job(min_sites=1, rounds=3))
    rows = {r.site_id: r for r in plan.sites}
    assert not rows["a"].would_refuse and plan.feasible
    assert rows["stingy"].would_refuse and "ε=0.5" in rows["stingy"].reason
    # The site's own projection: RDP over its ledger at its δ, not a sum of ε values.
    with _ledger(tmp_path, "a") as led:
        assert led.reservations("digits") == []  # a plan reserves nothing
    assert rows["a"].dataset_epsilon_after > rows["a"].dataset_epsilon_before
