"""Held-out accuracy of federated DP training at ε ≈ 1, 3, 8 against non-private baselines.

Two datasets from scikit-learn: **digits** (1,797 × 64, 10 classes, pixels / 16) and **breast
cancer** (569 × 30, 2 classes, features scaled to [0, 1] by the training pool's range, which
each site declares as its features' bounds; test rows clipped to it). For each of 3 seeds, 20% of the rows (stratified) are held out as a test
set no site sees, and the rest is split 50 / 30 / 20% across three sites, as in
``examples/demo.py``. The same model is trained four ways:

* **federated DP** — a real dpfed job, in process (``start_server`` and three ``SiteAgent``
  threads over gRPC on 127.0.0.1), with ``dp.target_epsilon`` ∈ {1, 3, 8} at δ = 1e-5: each
  site's σ is calibrated by the orchestrator to its own sample rate (PRV accountant) so that no
  site passes the target; the released ε is the model card's. Validation metrics are switched
  off (``metrics.enabled: false``) so the whole budget goes to training.
* **federated, no DP** — the same rounds, the same local DP-SGD code
  (``site_agent.trainer.train_local``: Poisson sampling, per-example clipping at C = 1) with
  σ = 1e-6, i.e. *no meaningful privacy* (ε ≈ 1e14), and the orchestrator's aggregation
  (``RunningWeightedMean`` weighted by site size, ``apply_delta``). It runs in this process
  without gRPC, because a dpfed site refuses such a task: the site policy caps ε at 1,000.
* **central, no DP** — plain minibatch SGD (no clipping, no noise) on the pooled training
  rows, same model, batch size, learning rate and number of epochs.

Model and schedule (same for every variant): MLP with one hidden layer of 64 (digits) or 32
(breast cancer) ReLU units; 8 rounds of 1 local epoch, expected batch 32, SGD with lr 0.5.
Reported: test accuracy, mean ± standard deviation over the 3 seeds.

Writes ``bench/results/utility.json`` and ``utility.png``.
Run: ``.venv/bin/python bench/bench_utility.py`` (about 4-5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

SITES = (("bank-a", 0.5), ("bank-b", 0.3), ("bank-c", 0.2))
EPSILONS = (1.0, 3.0, 8.0)
ROUNDS, LOCAL_EPOCHS, BATCH, LR = 8, 1.0, 32, 0.5
NO_DP_SIGMA = 1e-6


def load(name: str) -> tuple[np.ndarray, np.ndarray, int]:
    from sklearn.datasets import load_breast_cancer, load_digits

    if name == "digits":
        x, y = load_digits(return_X_y=True)
        return (x / 16.0).astype(np.float32), y.astype(np.int64), 64
    x, y = load_breast_cancer(return_X_y=True)
    return x.astype(np.float32), y.astype(np.int64), 32


def split(
    name: str, seed: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray, int]:
    from sklearn.model_selection import train_test_split

    x, y, hidden = load(name)
    x_pool, x_test, y_pool, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    if name != "digits":  # scale to [0, 1] by the training pool's range (the declared bounds)
        lo, hi = x_pool.min(axis=0), x_pool.max(axis=0)
        x_pool, x_test = (x_pool - lo) / (hi - lo), np.clip((x_test - lo) / (hi - lo), 0, 1)
    order = np.random.default_rng(seed).permutation(len(y_pool))
    cuts = np.cumsum([round(f * len(order)) for _, f in SITES])[:-1]
    parts = [(x_pool[i].astype(np.float32), y_pool[i]) for i in np.split(order, cuts)]
    return parts, x_test.astype(np.float32), y_test, hidden


def model_spec(x: np.ndarray, y: np.ndarray, hidden: int) -> dict[str, Any]:
    return {
        "kind": "mlp",
        "input_dim": int(x.shape[1]),
        "num_classes": int(y.max()) + 1,
        "hidden": [hidden],
        "activation": "relu",
    }


def accuracy(spec: dict[str, Any], state: dict[str, Any], x: np.ndarray, y: np.ndarray) -> float:
    import torch

    from common.training.models import build_model, load_weights, parse_model_spec

    net = build_model(parse_model_spec(spec))
    load_weights(net, state)
    net.eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


def central(spec: dict[str, Any], parts: Any, x_test: Any, y_test: Any, seed: int) -> float:
    import torch
    from torch import nn

    from common.training.models import build_model, parse_model_spec

    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    net = build_model(parse_model_spec(spec), seed=seed)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    loss = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    for _ in range(int(ROUNDS * LOCAL_EPOCHS)):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), BATCH):
            idx = perm[i : i + BATCH]
            opt.zero_grad()
            loss(net(x[idx]), y[idx]).backward()
            opt.step()
    return accuracy(spec, net.state_dict(), x_test, y_test)


def federated_no_dp(spec: dict[str, Any], parts: Any, x_test: Any, y_test: Any, seed: int) -> float:
    from common.specs import OptimizerSpec
    from common.training.models import build_model, parse_model_spec
    from orchestrator.training.aggregation import RunningWeightedMean, apply_delta
    from site_agent.trainer import TrainParams, train_local

    ms = parse_model_spec(spec)
    state = {k: v.detach().clone() for k, v in build_model(ms, seed=seed).state_dict().items()}
    params = TrainParams(
        noise_multiplier=NO_DP_SIGMA,
        max_grad_norm=1.0,
        batch_size=BATCH,
        local_epochs=LOCAL_EPOCHS,
        local_steps=None,
        optimizer=OptimizerSpec(name="sgd", lr=LR),
        seed=seed,
    )
    for _ in range(ROUNDS):
        agg = RunningWeightedMean(state)
        for x, y in parts:
            res = train_local(
                model_spec=ms, global_state=state, features=x, labels=y, params=params
            )
            agg.add(res.delta, res.num_examples)
        state = apply_delta(state, agg.mean())
    return accuracy(spec, state, x_test, y_test)


def job(dataset: str, spec: dict[str, Any], eps: float, seed: int) -> dict[str, Any]:
    return {
        "name": f"utility-{dataset}-eps{eps:g}-s{seed}",
        "dataset": dataset,
        "model": spec,
        "rounds": ROUNDS,
        "local_epochs": LOCAL_EPOCHS,
        "batch_size": BATCH,
        "optimizer": {"name": "sgd", "lr": LR, "momentum": 0.0},
        "dp": {"target_epsilon": eps, "max_grad_norm": 1.0, "delta": 1e-5},
        "metrics": {"enabled": False},
        "min_sites": len(SITES),
        "round_timeout_s": 300,
        "seed": seed,
    }


def _summary(vals: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.mean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "values": vals,  # type: ignore[dict-item]
    }


def _plot(table: dict[str, dict[str, Any]], path: Path) -> None:
    plt = h.pyplot()
    fig, axes = plt.subplots(1, len(table), figsize=(5.5 * len(table), 4))
    for ax, (ds, rows) in zip(np.atleast_1d(axes), table.items(), strict=True):
        eps = [e for e in EPSILONS if f"federated DP eps={e:g}" in rows]
        m = [rows[f"federated DP eps={e:g}"]["mean"] for e in eps]
        s = [rows[f"federated DP eps={e:g}"]["std"] for e in eps]
        ax.errorbar(eps, m, yerr=s, fmt="o-", capsize=4, label="federated, DP (dpfed)")
        styles = {
            "federated no DP (sigma=1e-6)": ("--", "federated, σ=1e-6 (no DP)"),
            "central no DP": (":", "central, no DP"),
        }
        for key, (ls, label) in styles.items():
            if key in rows:
                r = rows[key]
                ax.axhline(r["mean"], ls=ls, color="grey" if ls == ":" else "black", label=label)
                ax.axhspan(r["mean"] - r["std"], r["mean"] + r["std"], alpha=0.1, color="grey")
        ax.set_xscale("log")
        ax.set_xticks(list(EPSILONS), [f"{e:g}" for e in EPSILONS])
        ax.set_xlabel("target ε (δ = 1e-5)")
        ax.set_ylabel("held-out test accuracy (mean ± sd, 3 seeds)")
        ax.set_title(ds, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="*", default=["digits", "breast_cancer"])
    ap.add_argument("--epsilons", type=float, nargs="*", default=list(EPSILONS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="dpfed-utility-"))
    splits = {(ds, s): split(ds, s) for ds in args.datasets for s in args.seeds}
    results: list[dict[str, Any]] = []
    try:
        with h.federation(tmp / "fed") as fed:
            fed.start()
            configs = []
            for k, (site_id, _) in enumerate(SITES):
                data = {
                    f"{ds}-s{s}": splits[(ds, s)][0][k] for ds in args.datasets for s in args.seeds
                }
                configs.append(
                    h.write_site_datasets(
                        fed.root,
                        site_id,
                        data,
                        address=fed.address,
                        poll_s=5.0,
                        feature_bounds=(0.0, 1.0),  # features are scaled to [0, 1] in split()
                        num_classes={
                            f"{ds}-s{s}": 10 if ds == "digits" else 2
                            for ds in args.datasets
                            for s in args.seeds
                        },
                    )
                )
            fed.add_thread_agents(configs)
            fed.wait_sites(len(SITES))
            with fed.client() as c:
                for ds in args.datasets:
                    for s in args.seeds:
                        parts, x_test, y_test, hidden = splits[(ds, s)]
                        spec = model_spec(x_test, np.concatenate([p[1] for p in parts]), hidden)
                        t0 = time.time()
                        acc = central(spec, parts, x_test, y_test, s)
                        results.append(
                            {
                                "dataset": ds,
                                "seed": s,
                                "variant": "central no DP",
                                "acc": acc,
                                "seconds": time.time() - t0,
                            }
                        )
                        t0 = time.time()
                        acc = federated_no_dp(spec, parts, x_test, y_test, s)
                        results.append(
                            {
                                "dataset": ds,
                                "seed": s,
                                "variant": "federated no DP (sigma=1e-6)",
                                "acc": acc,
                                "seconds": time.time() - t0,
                            }
                        )
                        for eps in args.epsilons:
                            t0 = time.time()
                            st = h.run_job(c, job(f"{ds}-s{s}", spec, eps, s))
                            card_json, weights = c.download(st.job_id)
                            from common.training.tensors import state_from_bytes

                            acc = accuracy(spec, state_from_bytes(weights), x_test, y_test)
                            card = json.loads(card_json)
                            results.append(
                                {
                                    "dataset": ds,
                                    "seed": s,
                                    "variant": f"federated DP eps={eps:g}",
                                    "acc": acc,
                                    "epsilon": card["epsilon"],
                                    "sigmas": {
                                        x["site_id"]: x["noise_multiplier"] for x in card["sites"]
                                    },
                                    "seconds": time.time() - t0,
                                }
                            )
                        done = [r for r in results if r["dataset"] == ds and r["seed"] == s]
                        print(
                            f"{ds:<14} seed {s}: "
                            + ", ".join(f"{r['variant']} {r['acc']:.3f}" for r in done),
                            flush=True,
                        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    table: dict[str, dict[str, Any]] = {}
    for ds in args.datasets:
        variants: dict[str, list[float]] = {}
        eps_real: dict[str, list[float]] = {}
        for r in results:
            if r["dataset"] == ds:
                variants.setdefault(r["variant"], []).append(r["acc"])
                if "epsilon" in r:
                    eps_real.setdefault(r["variant"], []).append(r["epsilon"])
        table[ds] = {}
        for v, accs in variants.items():
            table[ds][v] = _summary(accs)
            if v in eps_real:
                table[ds][v]["released_epsilon_max"] = max(eps_real[v])
    print(f"\ntest accuracy, mean ± sd over seeds {args.seeds} (held-out 20%):")
    for ds, rows in table.items():
        print(f"  {ds}")
        for v, r in rows.items():
            extra = (
                f"   (released ε ≤ {r['released_epsilon_max']:.3f})"
                if "released_epsilon_max" in r
                else ""
            )
            print(f"    {v:<32} {r['mean']:.3f} ± {r['std']:.3f}{extra}")
    payload = {
        "benchmark": "utility",
        "command": ".venv/bin/python bench/bench_utility.py",
        "environment": h.environment(),
        "wall_s": time.time() - started,
        "setup": {
            "sites": dict(SITES),
            "rounds": ROUNDS,
            "local_epochs": LOCAL_EPOCHS,
            "batch_size": BATCH,
            "lr": LR,
            "max_grad_norm": 1.0,
            "delta": 1e-5,
            "no_dp_sigma": NO_DP_SIGMA,
            "test_fraction": 0.2,
            "seeds": args.seeds,
        },
        "table": table,
        "runs": results,
    }
    path = h.write_json("utility.json", payload)
    _plot(table, h.RESULTS / "utility.png")
    print(f"wrote {path} and utility.png in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
