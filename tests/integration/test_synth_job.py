"""Federated DP synthetic data through gRPC: declared schemas, per-site charges, utility."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from common.dp.accounting import compute_epsilon
from orchestrator.client import ControlClient
from orchestrator.server import start_server
from site_agent.boundary.ledger import Ledger
from tests.integration.sites import start_agents, stop_agents, wait_online, write_site

COLS = ["mean radius", "mean texture", "mean smoothness", "worst area", "worst concavity"]


def test_synth_rows_follow_the_declared_schema_and_carry_signal(tmp_path: Path) -> None:
    data = load_breast_cancer(as_frame=True)
    frame = data.frame[[*COLS, "target"]].rename(columns={"target": "malignant"})
    train, test = train_test_split(
        frame, test_size=0.3, random_state=0, stratify=frame["malignant"]
    )
    columns = {
        c: {"type": "numeric", "min": float(frame[c].min()), "max": float(frame[c].max())}
        for c in COLS
    }
    columns["malignant"] = {"type": "categorical", "categories": ["0", "1"]}
    server = start_server(listen="127.0.0.1:0", state_dir=tmp_path / "orch", offline_after_s=5.0)
    shuffled = train.sample(frac=1, random_state=1)
    cut1, cut2 = int(0.5 * len(train)), int(0.8 * len(train))
    parts = [shuffled.iloc[:cut1], shuffled.iloc[cut1:cut2], shuffled.iloc[cut2:]]
    configs = {}
    for i, part in enumerate(parts):
        sid = f"s{i}"
        (tmp_path / sid).mkdir()
        part.to_csv(tmp_path / sid / "bc.csv", index=False)
        # the last site declares no bounds: it must refuse, not guess
        bc = {
            "name": "bc",
            "path": "bc.csv",
            "label": "malignant",
            "columns": columns if i < 2 else {},
        }
        configs[sid] = write_site(
            tmp_path,
            sid,
            orchestrator=f"127.0.0.1:{server.port}",
            datasets=[bc],
            policy={"max_epsilon": 10.0, "delta": 1e-5},
        )
    agents, threads = start_agents(configs)
    try:
        with ControlClient(server.address) as c:
            wait_online(c, 3)
            csv_text, info = c.synthesize("bc", epsilon=3.0, rows=2000, bins=6)
    finally:
        stop_agents(agents, threads)
        server.stop(0.5)
    synth = pd.read_csv(io.StringIO(csv_text))
    assert list(synth.columns) == [*COLS, "malignant"] and len(synth) == 2000
    assert info["sites"] == ["s0", "s1"] and "s2" in info["sites_missing"]
    assert "declared" in info["sites_missing"]["s2"]
    for c in COLS:  # decoded back into the declared bounds
        assert synth[c].min() >= frame[c].min() - 1e-9 and synth[c].max() <= frame[c].max() + 1e-9
    synth = synth.dropna()
    clf = LogisticRegression(max_iter=2000).fit(synth[COLS], synth["malignant"].astype(int))
    acc = clf.score(test[COLS], test["malignant"])
    majority = max(test["malignant"].mean(), 1 - test["malignant"].mean())
    assert acc > majority + 0.1, (acc, majority)
    with Ledger(tmp_path / "s0" / "state" / "ledger.sqlite") as led:
        synth_events = [e.event for e in led.entries(dataset="bc") if e.kind == "synth"]
    assert synth_events and compute_epsilon(synth_events, delta=1e-5).epsilon <= 3.0 * 1.001
    with Ledger(tmp_path / "s2" / "state" / "ledger.sqlite") as led:
        assert not [e for e in led.entries(dataset="bc") if e.kind == "synth"]


def test_synth_without_any_site_is_a_clear_error(tmp_path: Path, digits: Any) -> None:
    from common.errors import NotFoundError

    server = start_server(listen="127.0.0.1:0", state_dir=tmp_path / "orch")
    try:
        with (
            ControlClient(server.address) as c,
            pytest.raises(NotFoundError, match="no online site"),
        ):
            c.synthesize("nope", epsilon=1.0, rows=10)
    finally:
        server.stop(0.5)
