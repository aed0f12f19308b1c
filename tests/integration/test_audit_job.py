"""A job with the privacy audit: canaries at the sites, the audit on the card, and a loud
failure (model withheld) when the empirical lower bound contradicts the claimed ε."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.dp.audit import AuditResult
from common.errors import NotFoundError
from orchestrator.client import ControlClient
from tests.integration.test_grpc_job import _job, _start, _wait


def _stop(net: Any) -> None:
    net.stop()


def test_audited_job_records_the_audit_and_canaries_stay_at_the_sites(
    tmp_path: Path, digits: Any
) -> None:
    net = _start(tmp_path, digits, {"a": {}, "b": {}})
    try:
        with ControlClient(net.address) as c:
            st = _wait(c, c.submit(_job(rounds=2, min_sites=2, audit={"canaries": 60})))
            assert st.state == "completed", st.error
            card = json.loads(c.download(st.job_id)[0])
    finally:
        _stop(net)
    audit = card["audit"]
    assert audit["num_canaries"] == 120 and audit["sites"] == ["a", "b"]
    assert audit["verdict"] == "consistent"
    assert 0 <= audit["epsilon_lower_bound"] <= card["epsilon"]
    assert set(audit["membership_inference"]["tpr_at_fpr"]) == {"0.01", "0.1"}
    for sid in ("a", "b"):
        with np.load(tmp_path / sid / "state" / "audit" / f"{st.job_id}.npz") as z:
            assert z["x"].shape == (60, 64) and z["included"].dtype == bool


def test_an_audit_above_the_claimed_epsilon_withholds_the_model(
    tmp_path: Path, digits: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(losses: Any, included: Any, *, delta: float) -> AuditResult:
        # What a leaking implementation looks like to the audit.
        return AuditResult(
            num_canaries=len(losses),
            num_included=int(np.sum(included)),
            epsilon_lower_bound=50.0,
            guesses=20,
            correct=20,
            significance=0.05,
            tpr_at_fpr={"0.01": 1.0, "0.1": 1.0},
            auc=1.0,
        )

    monkeypatch.setattr("orchestrator.training.auditing.audit", broken)
    net = _start(tmp_path, digits, {"a": {}})
    try:
        with ControlClient(net.address) as c:
            st = _wait(c, c.submit(_job(rounds=1, min_sites=1, audit={"canaries": 20})))
            assert st.state == "failed" and not st.model_released
            assert "PRIVACY AUDIT FAILED" in st.error and "withheld" in st.error
            with pytest.raises(NotFoundError):
                c.download(st.job_id)
    finally:
        _stop(net)
