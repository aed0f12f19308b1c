"""Mixture jobs (kind: gmm) through gRPC: federated DP EM, K by distributed BIC, pull."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.optimize import linear_sum_assignment

from common.gmm import load_mixture
from orchestrator.client import ControlClient
from orchestrator.server import start_server
from site_agent.agent import SiteAgent
from site_agent.config import load_site_config
from site_agent.ledger import Ledger

MEANS = np.array([[-3.0, -3.0], [0.0, 3.0], [3.0, -2.0]])


BIC_SPEC = {
    "kind": "gmm",
    "dataset": "pts",
    "k_range": [2, 4],
    "covariance_type": "full",
    "max_rounds": 10,
    "dp": {"target_epsilon": 3.0, "delta": 1e-5},
    "min_sites": 3,
    "seed": 1,
}
ONE_SHOT_SPEC = {
    "kind": "gmm",
    "dataset": "pts",
    "k": 3,
    "method": "one_shot",
    "covariance_type": "full",
    "max_rounds": 10,
    "dp": {"target_epsilon": 3.0, "delta": 1e-5},
    "min_sites": 3,
    "seed": 1,
}


@pytest.mark.parametrize("spec", [BIC_SPEC, ONE_SHOT_SPEC], ids=["federated-em-bic", "one-shot"])
def test_federated_dp_em_recovers_the_components_and_bic_picks_k(
    tmp_path: Path, spec: dict[str, object]
) -> None:
    rng = np.random.default_rng(0)
    n = 30000
    comp = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    x = MEANS[comp] + rng.normal(0, 0.6, size=(n, 2))
    server = start_server(listen="127.0.0.1:0", state_dir=tmp_path / "orch", offline_after_s=5.0)
    agents, threads = {}, {}
    try:
        # uneven split, and sites see the clusters in different proportions
        order = np.argsort(comp + rng.random(n) * 1.5)
        for sid, idx in zip(("a", "b", "c"), np.split(order, [15000, 24000]), strict=True):
            d = tmp_path / sid
            d.mkdir()
            rows = np.column_stack([x[idx], np.zeros(len(idx))])
            np.savetxt(
                d / "pts.csv", rows, delimiter=",", header="x1,x2,y", comments="", fmt="%.5f"
            )
            cfg = {
                "site_id": sid,
                "orchestrator": f"127.0.0.1:{server.port}",
                "state_dir": "state",
                "insecure": True,
                "poll_seconds": 1.0,
                "heartbeat_seconds": 0.5,
                "datasets": [
                    {
                        "name": "pts",
                        "path": "pts.csv",
                        "label": "y",
                        "chunk_rows": 1000,
                        "columns": {"x1": {"min": -6, "max": 6}, "x2": {"min": -6, "max": 6}},
                    }
                ],
                "policy": {"max_epsilon": 20.0, "delta": 1e-5},
            }
            (d / "site.yaml").write_text(yaml.safe_dump(cfg))
            agents[sid] = SiteAgent(load_site_config(d / "site.yaml"))
            threads[sid] = threading.Thread(target=agents[sid].run, daemon=True)
            threads[sid].start()
        with ControlClient(server.address) as c:
            deadline = time.time() + 30
            while len([s for s in c.sites() if s.state != "offline"]) < 3:
                assert time.time() < deadline
                time.sleep(0.1)
            job_id = c.submit(json.dumps(spec))
            last = None
            for st in c.watch(job_id):
                last = st
            assert last is not None and last.state == "completed", last and last.error
            card_json, weights = c.download(job_id)
    finally:
        for sid, a in agents.items():
            a.stop()
            threads[sid].join(timeout=30)
        server.stop(0.5)
    card = json.loads(card_json)
    assert card["kind"] == "gmm" and card["model"]["K"] == 3
    if "k_range" in spec:
        assert card["model_selection"]["chosen_k"] == 3
        assert set(card["model_selection"]["bic"]) == {"2", "3", "4"}
    else:
        assert card["method"].startswith("one-shot")
    assert card["epsilon"] <= 3.0 * 1.01
    out = tmp_path / "pulled"
    out.mkdir()
    (out / "mixture.json").write_bytes(weights)
    mix = load_mixture(out)
    cost = np.linalg.norm(MEANS[:, None, :] - np.asarray(mix.means)[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(cost)
    assert cost[rows, cols].max() < 0.5, np.asarray(mix.means)
    pred = mix.predict(MEANS + 0.01)
    assert len(set(pred.tolist())) == 3
    # every site charged the releases to its ledger; the card's ε is what one site composed
    with Ledger(tmp_path / "a" / "state" / "ledger.sqlite") as led:
        kinds = [e.kind for e in led.entries(dataset="pts", job_id=job_id)]
    assert kinds and set(kinds) == {"gmm"}
