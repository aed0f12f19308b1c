"""A DP-SGLD job in process: the sites run Langevin steps, the orchestrator keeps the
post-burn-in global models, the released model is their ensemble, and the accounting is
DP-SGD's for the same steps (issue 20)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer

from common.dp.accounting import compute_epsilon
from common.dp.events import DpEvent
from common.specs import parse_job_spec
from common.training.models import load_model
from common.training.sgld import PosteriorEnsemble
from orchestrator.client import ControlClient
from orchestrator.server import start_server
from site_agent.agent import SiteAgent
from site_agent.config import load_site_config
from tests.integration.sites import features_dataset, stop_agents, write_features_csv, write_site


def _write_site(root: Path, site_id: str, x: np.ndarray, y: np.ndarray, port: int) -> Path:
    write_features_csv(root / site_id / "data.csv", x, y)
    return write_site(
        root,
        site_id,
        orchestrator=f"127.0.0.1:{port}",
        datasets=[features_dataset("bc", num_classes=2)],
        poll_seconds=0.3,
    )


def _job(optimizer: dict[str, object]) -> str:
    return parse_job_spec(
        {
            "dataset": "bc",
            "model": {"kind": "linear"},
            "rounds": 4,
            "local_steps": 8,
            "batch_size": 64,
            "optimizer": optimizer,
            "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
            "metrics": {"enabled": False},
            "min_sites": 2,
            "round_timeout_s": 60,
            "start_timeout_s": 20,
            "seed": 0,
        }
    ).model_dump_json()


def test_sgld_job_releases_the_ensemble_of_post_burn_in_rounds(tmp_path: Path) -> None:
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.min(0)) / (x.max(0) - x.min(0))
    server = start_server(listen="127.0.0.1:0", state_dir=tmp_path / "orch", offline_after_s=5.0)
    agents, threads = [], []
    try:
        for k, idx in enumerate(np.array_split(np.arange(len(y)), 2)):
            cfg = load_site_config(_write_site(tmp_path, f"s{k}", x[idx], y[idx], server.port))
            agents.append(SiteAgent(cfg))
            threads.append(threading.Thread(target=agents[-1].run, daemon=True))
            threads[-1].start()
        with ControlClient(server.address) as c:
            deadline = time.time() + 30
            while len([s for s in c.sites() if s.state != "offline"]) < 2:
                assert time.time() < deadline, "agents did not register"
                time.sleep(0.1)
            sgld = _job({"name": "sgld", "lr": 2.0, "burn_in": 1, "samples": 3})
            sgd = _job({"name": "sgd", "lr": 2.0})
            # the accounting is DP-SGD's: the same σ, q, steps and ε for every site
            p_sgld, p_sgd = c.plan(sgld), c.plan(sgd)
            assert p_sgld.epsilon == p_sgd.epsilon
            assert [(s.noise_multiplier, s.sample_rate, s.steps) for s in p_sgld.sites] == [
                (s.noise_multiplier, s.sample_rate, s.steps) for s in p_sgd.sites
            ]
            job_id = c.submit(sgld)
            last = None
            for st in c.watch(job_id):
                last = st
            assert last is not None and last.state == "completed", last and last.error
            card_text, weights = c.download(job_id)
    finally:
        stop_agents(agents, threads)
        server.stop(0.5)

    card = json.loads(card_text)
    assert card["posterior_samples"] == [
        {"index": 0, "round": 2},
        {"index": 1, "round": 3},
        {"index": 2, "round": 4},
    ]
    assert card["posterior"]["burn_in_rounds"] == 1
    assert card["epsilon"] == pytest.approx(p_sgld.epsilon, rel=1e-6)
    for s in card["sites"]:
        evs = [DpEvent(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in s["events"]]
        assert evs == [DpEvent(1.0, evs[0].sample_rate, 8)] * 4
        assert compute_epsilon(evs, delta=1e-5).epsilon == pytest.approx(s["epsilon"], rel=1e-3)

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model_card.json").write_text(card_text)
    (model_dir / "model.safetensors").write_bytes(weights)
    ens = load_model(model_dir)
    assert isinstance(ens, PosteriorEnsemble) and len(ens.members) == 3
    # the samples are the checkpointed global models of rounds 2, 3 and 4, and differ
    from common.training.tensors import state_from_bytes

    ckpt = tmp_path / "orch" / "checkpoints" / job_id
    for member, r in zip(ens.members, (2, 3, 4), strict=True):
        saved = state_from_bytes((ckpt / f"round-{r:05d}.safetensors").read_bytes())
        for k, v in member.state_dict().items():
            torch.testing.assert_close(v, saved[k])
    w = [m.state_dict()["logits.weight"] for m in ens.members]
    assert not torch.equal(w[0], w[1])
    with torch.no_grad():
        proba = torch.softmax(ens(torch.from_numpy(x).float()), 1)
    acc = float((proba.argmax(1).numpy() == y).mean())
    assert acc > 0.7, acc
    # load_pipeline (raw rows) gives the same average of the samples' probabilities
    import pandas as pd

    from common.training.models import load_pipeline

    pipe = load_pipeline(model_dir)
    raw = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    with torch.no_grad():
        xt = torch.from_numpy(pipe.transform(raw))
        want = torch.stack([torch.softmax(m(xt).double(), 1) for m in ens.members]).mean(0)
    np.testing.assert_allclose(pipe.predict_proba(raw), want.numpy(), rtol=1e-5, atol=1e-6)
