"""In-process gRPC: a site with ``policy.disclose_row_counts: false`` takes part in a job.

It registers sizes derived from its DP count only; the orchestrator assigns q and steps from
them, accepts its reports (``update_bounds.match_report``) and the job completes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.dp.events import DpEvent
from orchestrator.client import ControlClient
from site_agent.boundary.ledger import Ledger
from tests.integration.test_grpc_job import _job, _wait, net_factory

__all__ = ["net_factory"]  # the fixture, imported for pytest


def test_a_site_keeping_its_size_private_completes_a_job(net_factory: Any, tmp_path: Path) -> None:
    net = net_factory({"a": {}, "b": {}, "quiet": {"disclose_row_counts": False}})
    with ControlClient(net.address) as c:
        infos = {s.site_id: s.datasets[0] for s in c.sites()}
        quiet = infos["quiet"]
        # 300 rows, 10% held out by a keyed hash: exact sizes by default, DP-derived here.
        assert infos["a"].num_rows + infos["a"].num_validation_rows == 300
        assert quiet.num_rows + quiet.num_validation_rows == round(quiet.dp_num_rows)
        assert quiet.num_validation_rows == round(quiet.dp_num_rows * 0.1)
        st = _wait(c, c.submit(_job()))
        assert st.state == "completed", st.error
        assert {s.site_id for s in st.sites} == {"a", "b", "quiet"}
        job_id = st.job_id
        card_sites = {s.site_id: s for s in c.job(job_id).sites}
    with Ledger(tmp_path / "quiet" / "state" / "ledger.sqlite") as led:
        trains = [
            e.event for e in led.entries(dataset="digits", job_id=job_id) if e.kind == "train"
        ]
    # The site charged (and sampled at) q from its public size; the orchestrator assigned
    # the same q and accepted both rounds' reports, which count the public size.
    assert trains == [DpEvent(noise_multiplier=1.0, sample_rate=32 / quiet.num_rows, steps=6)] * 2
    spend = card_sites["quiet"]
    assert spend.num_examples == quiet.num_rows
    assert spend.sample_rate == trains[0].sample_rate
