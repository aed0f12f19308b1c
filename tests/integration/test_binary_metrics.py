"""Binary labels: each round's pooled metrics and ``orchestrator evaluate`` carry a DP ROC AUC
from the sites' noised score histograms, with its standard error (issue 15.7)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from common.training.models import load_model
from orchestrator.client import ControlClient
from orchestrator.metric_pooling import auc_from_histograms
from site_agent.trainer import score_bins
from tests.integration.test_grpc_job import _job, _start, _wait


def test_rounds_and_evaluate_report_a_dp_auc_for_binary_labels(tmp_path: Path, digits: Any) -> None:
    x, y = digits
    binary = (y >= 5).astype(np.int64)
    net = _start(tmp_path, (x, binary), {"a": {}, "b": {}}, num_classes=2)
    model = {"kind": "mlp", "input_dim": 64, "num_classes": 2, "hidden": [16]}
    try:
        with ControlClient(net.address) as c:
            # The rounds' metrics come from the sites' validation rows only (~10% of 450 each:
            # ~45 per class pooled). Their AUC's delta-method SE is honest and blows up as a
            # noised class total nears 1 (undefined below), so σ is set for the `se < 1` below
            # to hold: at σ = 2 (class totals ± 12.6) it failed with probability 1.7e-2, at
            # σ = 1 (± 6.3) 1.0e-5 (4·10⁶ simulated releases over binomial validation counts,
            # captured bin shapes and the sites' Gaussian noise).
            spec = _job(
                model=model, rounds=2, min_sites=2, metrics={"noise_multiplier": 1.0, "auc_bins": 5}
            )
            st = _wait(c, c.submit(spec))
            assert st.state == "completed", st.error
            ev = c.evaluate(st.job_id, dataset="digits", noise_multiplier=2.0, timeout_s=60)
            card_json, weights = c.download(st.job_id)
    finally:
        net.stop()
    last = st.history[-1].metrics
    assert last is not None and last.auc is not None and 0 < last.auc.se < 1
    assert st.history[0].metrics is None  # only the last round releases metrics by default
    # The released model scored on the sites' rows (all 900, as evaluate does): the DP AUC is
    # sklearn's within the histogram's resolution and a few standard errors of the noise
    # (simulated at σ = 2 on captured histograms: beyond 5 SE with probability ≤ 4e-6; the
    # SE ~0.03, never ≥ 0.05 in 10⁷ draws).
    assert ev.metrics is not None and ev.metrics.auc is not None
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(weights)
    (out / "model_card.json").write_text(card_json)
    rows = np.random.default_rng(0).permutation(len(y))[:900]
    with torch.no_grad():
        scores = torch.softmax(load_model(out)(torch.from_numpy(x[rows])).double(), 1)[:, 1]
    labels = binary[rows]
    cells = score_bins(scores, 10).numpy()
    neg = np.bincount(cells[labels == 0], minlength=10).astype(float)
    pos = np.bincount(cells[labels == 1], minlength=10).astype(float)
    tied = 0.5 * float((neg * pos).sum()) / (neg.sum() * pos.sum())
    exact = roc_auc_score(labels, scores.numpy())
    assert abs(auc_from_histograms(neg, pos) - exact) <= tied + 1e-9
    assert abs(ev.metrics.auc.value - exact) <= tied + 5 * ev.metrics.auc.se
    assert ev.metrics.auc.se < 0.05 and exact > 0.7
