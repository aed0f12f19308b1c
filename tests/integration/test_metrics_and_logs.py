"""Operations: Prometheus metrics on an opt-in port, structured JSON logs."""

from __future__ import annotations

import json
import logging
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from common.cli_support import JsonFormatter
from orchestrator.client import ControlClient
from tests.integration.test_grpc_job import _job, _start, _wait


def test_metrics_endpoint_reports_rounds_bytes_and_epsilon(
    tmp_path: Path, digits: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import orchestrator.server as server_mod

    real_start = server_mod.start_server

    def with_metrics(**kw: Any) -> Any:
        return real_start(**kw, metrics_listen="127.0.0.1:0")

    monkeypatch.setattr("tests.integration.test_grpc_job.start_server", with_metrics)
    net = _start(tmp_path, digits, {"a": {}, "b": {}})
    try:
        with ControlClient(net.address) as c:
            st = _wait(c, c.submit(_job(rounds=2, min_sites=2)))
            assert st.state == "completed", st.error
        assert net.server.metrics is not None
        url = f"http://127.0.0.1:{net.server.metrics.port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        net.stop()
    samples = {
        line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples["dpfed_rounds_total"] == 2
    assert samples["dpfed_round_seconds_count"] == 2
    assert samples['dpfed_jobs{state="completed"}'] == 1
    assert samples['dpfed_bytes_received_total{kind="update"}'] > 0
    assert samples['dpfed_bytes_sent_total{kind="global_model"}'] > 0
    eps = [v for k, v in samples.items() if k.startswith("dpfed_job_epsilon{")]
    assert eps == [pytest.approx(st.epsilon)]
    assert any(k.startswith('dpfed_rpcs_total{method="PushUpdate"') for k in samples)
    assert any(k.startswith("dpfed_dataset_epsilon_spent{") and v > 0 for k, v in samples.items())


def test_json_logs_carry_job_round_and_site_ids() -> None:
    rec = logging.LogRecord(
        "dpfed.site_agent",
        logging.INFO,
        __file__,
        1,
        "site=%s job=%s round=%d/%d update sent",
        ("bank-a", "job-1", 3, 5),
        None,
    )
    out = json.loads(JsonFormatter().format(rec))
    assert out["site"] == "bank-a" and out["job"] == "job-1" and out["round"] == 3
    assert out["level"] == "info" and out["logger"] == "dpfed.site_agent"
