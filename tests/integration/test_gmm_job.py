"""Mixture jobs (kind: gmm) through gRPC: federated DP EM, K by distributed BIC, pull, and
bootstrap standard errors."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy.optimize import linear_sum_assignment

from common.accounting import DpEvent, compute_epsilon
from common.gmm import load_mixture
from orchestrator.client import ControlClient
from orchestrator.server import start_server
from site_agent.agent import SiteAgent
from site_agent.config import load_site_config
from site_agent.ledger import Ledger

MEANS = np.array([[-3.0, -3.0], [0.0, 3.0], [3.0, -2.0]])
SD = 0.6


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


def _data(n: int = 30000) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Rows, component labels, and an uneven split over three sites that see the clusters
    in different proportions."""
    rng = np.random.default_rng(0)
    comp = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    x = MEANS[comp] + rng.normal(0, SD, size=(n, 2))
    order = np.argsort(comp + rng.random(n) * 1.5)
    return x, comp, np.split(order, [n // 2, n * 8 // 10])


@contextmanager
def _federation(tmp_path: Path, policy: dict[str, Any]) -> Iterator[ControlClient]:
    """An orchestrator and three agents on loopback, each holding a CSV share of ``_data``."""
    x, _, parts = _data()
    server = start_server(listen="127.0.0.1:0", state_dir=tmp_path / "orch", offline_after_s=5.0)
    agents, threads = {}, {}
    try:
        for sid, idx in zip(("a", "b", "c"), parts, strict=True):
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
                "policy": policy,
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
            yield c
    finally:
        for sid, a in agents.items():
            a.stop()
            threads[sid].join(timeout=30)
        server.stop(0.5)


def _run_job(c: ControlClient, spec: dict[str, Any]) -> tuple[str, dict[str, Any], bytes]:
    job_id = c.submit(json.dumps(spec))
    last = None
    for st in c.watch(job_id):
        last = st
    assert last is not None and last.state == "completed", last and last.error
    card_json, weights = c.download(job_id)
    return job_id, json.loads(card_json), weights


def _pull(tmp_path: Path, name: str, weights: bytes) -> Any:
    out = tmp_path / name
    out.mkdir()
    (out / "mixture.json").write_bytes(weights)
    return load_mixture(out)


@pytest.mark.parametrize("spec", [BIC_SPEC, ONE_SHOT_SPEC], ids=["federated-em-bic", "one-shot"])
def test_federated_dp_em_recovers_the_components_and_bic_picks_k(
    tmp_path: Path, spec: dict[str, object]
) -> None:
    with _federation(tmp_path, {"max_epsilon": 20.0, "delta": 1e-5}) as c:
        job_id, card, weights = _run_job(c, spec)
    assert card["kind"] == "gmm" and card["model"]["K"] == 3
    if "k_range" in spec:
        assert card["model_selection"]["chosen_k"] == 3
        assert set(card["model_selection"]["bic"]) == {"2", "3", "4"}
    else:
        assert card["method"].startswith("one-shot")
    assert card["epsilon"] <= 3.0 * 1.01
    assert "uncertainty" not in card
    mix = _pull(tmp_path, "pulled", weights)
    assert mix.standard_errors is None
    cost = np.linalg.norm(MEANS[:, None, :] - np.asarray(mix.means)[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(cost)
    assert cost[rows, cols].max() < 0.5, np.asarray(mix.means)
    pred = mix.predict(MEANS + 0.01)
    assert len(set(pred.tolist())) == 3
    # every site charged the releases to its ledger; the card's ε is what one site composed
    with Ledger(tmp_path / "a" / "state" / "ledger.sqlite") as led:
        kinds = [e.kind for e in led.entries(dataset="pts", job_id=job_id)]
    assert kinds and set(kinds) == {"gmm"}


def test_bootstrap_standard_errors_match_the_sampling_error_and_are_charged(
    tmp_path: Path,
) -> None:
    """At high ε (tiny bootstrap noise) the standard error of each component mean is the
    analytic σ_k/√n_k within a factor 2; the bootstrap release is on every site's ledger and
    in the card's ε (larger than without it); one-shot jobs get standard errors too."""
    em_spec = {
        "kind": "gmm",
        "dataset": "pts",
        "k": 3,
        "max_rounds": 8,
        "dp": {"noise_multiplier": 0.5, "delta": 1e-5},
        "bootstrap": {"replicates": 30, "weight_cap": 4, "noise_multiplier": 0.05},
        "min_sites": 3,
        "seed": 2,
    }
    one_shot = {**ONE_SHOT_SPEC, "dp": {"noise_multiplier": 2.0}, "bootstrap": {"replicates": 10}}
    policy = {"max_epsilon": 1000.0, "delta": 1e-5, "min_noise_multiplier": 0.01}
    with _federation(tmp_path, policy) as c:
        job_id, card, weights = _run_job(c, em_spec)
        os_id, os_card, os_weights = _run_job(c, one_shot)

    # --- standard errors against the sampling error of a component mean
    mix = _pull(tmp_path, "em", weights)
    se = mix.standard_errors
    assert se is not None and se.replicates == 30 and se.weight_cap == 4
    assert se.to_dict()["includes_dp_noise"] is True and "noise" in se.note
    _, comp, _ = _data()
    order = [int(np.argmin(np.linalg.norm(np.asarray(mix.means) - m, axis=1))) for m in MEANS]
    assert sorted(order) == [0, 1, 2]
    analytic = SD / np.sqrt(np.bincount(comp, minlength=3))
    ratio = np.asarray(se.means)[order] / analytic[:, None]
    assert np.all((ratio > 0.5) & (ratio < 2.0)), ratio
    assert np.asarray(se.weights).shape == (3,) and np.asarray(se.variances).shape == (3, 2)

    # --- the card: ε includes the bootstrap release, and says what the numbers mean
    boot = DpEvent(0.05, 1.0, 1)
    events = [DpEvent(**e) for e in card["sites"][0]["events"]]
    assert events[-1] == boot
    assert card["epsilon"] == pytest.approx(compute_epsilon(events, delta=1e-5).epsilon)
    unc = card["uncertainty"]
    assert unc["replicates"] == 30 and unc["noise_multiplier"] == 0.05
    assert card["epsilon"] > 2 * unc["epsilon_without_bootstrap"]
    assert unc["epsilon_without_bootstrap"] == pytest.approx(
        compute_epsilon(events[:-1], delta=1e-5).epsilon
    )
    assert "bootstrap" in card["guarantee"]
    for sid in ("a", "b", "c"):  # charged at every site, write-ahead, like every release
        with Ledger(tmp_path / sid / "state" / "ledger.sqlite") as led:
            charged = [e.event for e in led.entries(dataset="pts", job_id=job_id)]
        assert boot in charged
        assert compute_epsilon(charged, delta=1e-5).epsilon == pytest.approx(
            card["epsilon"], rel=1e-6
        )

    # --- one-shot: the merged model is bootstrapped the same way, at the job's σ
    os_mix = _pull(tmp_path, "one_shot", os_weights)
    assert os_mix.standard_errors is not None and os_mix.standard_errors.replicates == 10
    assert os_card["uncertainty"]["noise_multiplier"] == 2.0
    assert os_card["epsilon"] > os_card["uncertainty"]["epsilon_without_bootstrap"]
    os_events = [DpEvent(**e) for e in os_card["sites"][0]["events"]]
    assert os_events[-1] == DpEvent(2.0, 1.0, 1)
    with Ledger(tmp_path / "a" / "state" / "ledger.sqlite") as led:
        os_charged = [e.event for e in led.entries(dataset="pts", job_id=os_id)]
    assert DpEvent(2.0, 1.0, 1) in os_charged
