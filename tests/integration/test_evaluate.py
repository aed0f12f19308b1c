"""Federated evaluation of a released model: noised per-site sums, charged to each ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.errors import NotFoundError
from orchestrator.client import ControlClient
from site_agent.boundary.ledger import Ledger
from tests.integration.test_grpc_job import _job, _start, _wait


def test_evaluate_pools_noised_metrics_and_charges_each_site(tmp_path: Path, digits: Any) -> None:
    net = _start(tmp_path, digits, {"a": {}, "b": {}, "c": {"min_noise_multiplier": 50.0}})
    try:
        with ControlClient(net.address) as c:
            st = _wait(c, c.submit(_job(rounds=3, min_sites=2, local_steps=15)))
            assert st.state == "completed", st.error
            with pytest.raises(NotFoundError, match="no online site exposes"):
                c.evaluate(st.job_id, dataset="nope", noise_multiplier=5.0)
            ev = c.evaluate(st.job_id, dataset="digits", noise_multiplier=5.0, timeout_s=60)
    finally:
        net.stop()
    by_site = {s.site_id: s for s in ev.sites}
    # c's policy wants σ ≥ 50: it refuses, says why, and is left out of the pool
    assert by_site["c"].metrics is None and "minimum" in by_site["c"].error
    assert by_site["a"].metrics is not None and by_site["b"].metrics is not None
    # a and b hold 300 rows each (train + validation): only a noised count leaves them.
    assert ev.num_examples == 0 and ev.metrics is not None
    rows = ev.metrics.num_examples
    assert abs(rows.value - 600) < 5 * rows.se and rows.se == pytest.approx(
        (2 * 3) ** 0.5 * 5
    )  # 2 sites, σΔ = 5√3
    assert 0.3 < ev.accuracy < 1.2  # well above chance (0.1) even with σ=5 noise
    assert ev.metrics.accuracy.value == ev.accuracy and 0 < ev.metrics.accuracy.se < 0.05
    assert ev.metrics.auc is None  # ten classes: no ROC AUC
    assert ev.epsilon > 0 and ev.epsilon == pytest.approx(by_site["a"].epsilon)
    for sid in ("a", "b"):
        with Ledger(tmp_path / sid / "state" / "ledger.sqlite") as led:
            kinds = [e.kind for e in led.entries(dataset="digits")]
        assert kinds.count("evaluate") == 1
    with Ledger(tmp_path / "c" / "state" / "ledger.sqlite") as led:
        assert "evaluate" not in [e.kind for e in led.entries(dataset="digits")]
