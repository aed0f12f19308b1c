"""Utility of federated DP synthetic data (:mod:`common.synthesis.marginals`) against the
privacy budget ε.

For each dataset the training rows are split unevenly over three simulated sites (55%, 30%,
15%). Each site measures every one-way and two-way marginal at the same per-site ε (δ = 1e-5;
sites hold disjoint rows, so that is also each row's guarantee); the orchestrator combines the
measurements, fits the tree model and samples synthetic rows. Every request and response goes
through JSON, as on the wire. The synthetic table is compared with the real training rows and
a classifier trained on it is scored on the real held-out test rows:

* ``tvd``: total variation distance of each column's one-way distribution over the schema's
  bins (mean over columns, and the worst column);
* ``corr``: mean absolute error of the Pearson correlations of all pairs of numeric columns,
  and of the strongly correlated pairs (real |ρ| ≥ 0.7) only;
* ``acc``: accuracy on the real test split of a logistic regression trained on synthetic rows
  (rows with a missing label, from the reserved "other" bin, are dropped), next to the same
  model trained on the real training rows and the majority-class rate.

ε = 1000 is listed as a reference: with almost no noise it shows the loss due to the method
itself (binning, uniform decoding within a bin, the tree's conditional independences).

Datasets: scikit-learn's breast cancer data (569 rows; 7 features and the label, 398 training
rows) and a Gaussian Markov chain (6 features with neighbour correlation 0.9 in a shuffled
column order, plus a binary label driven by one of them; 10,000 training and 3,000 test rows).

Run: ``.venv/bin/python bench/bench_synth.py`` (about a minute on 2 CPU cores); it prints a
table and writes ``bench/results/synth.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.synthesis.discretisation import ColumnSchema, Schema, infer_schema
from common.synthesis.marginals import MeasurementPlan, marginal_plan, measure_site
from orchestrator.synthesis_tree import combine, fit_tree

DELTA = 1e-5
EPSILONS = (0.5, 1.0, 3.0, 10.0)
REFERENCE_EPSILON = 1000.0
SITE_SHARES = (0.55, 0.30, 0.15)
STRONG = 0.7
RESULTS = Path(__file__).resolve().parent / "results" / "synth.json"


@dataclass(frozen=True)
class Dataset:
    name: str
    train: pd.DataFrame
    test: pd.DataFrame
    schema: Schema
    label: str

    @property
    def features(self) -> list[str]:
        return [c for c in self.schema.names if c != self.label]


def breast_cancer() -> Dataset:
    columns = [
        "mean radius",
        "mean texture",
        "mean smoothness",
        "mean concavity",
        "mean concave points",
        "worst radius",
        "worst perimeter",
        "target",
    ]
    frame = load_breast_cancer(as_frame=True).frame[columns]
    train, test = train_test_split(frame, test_size=0.3, random_state=0, stratify=frame["target"])
    # As a site config would declare it: drafted from the site's own rows, then reviewed.
    schema = infer_schema(train, bins=5, clip_quantile=0.01)
    return Dataset("breast_cancer", train, test, schema, "target")


def gaussian_chain() -> Dataset:
    rng = np.random.default_rng(2024)
    d, rho, n = 6, 0.9, 13_000
    chain = ["x0", "x3", "x1", "x5", "x2", "x4"]
    cov = rho ** np.abs(np.subtract.outer(np.arange(d), np.arange(d)))
    draws = rng.multivariate_normal(np.zeros(d), cov, size=n)
    frame = pd.DataFrame({name: draws[:, k] for k, name in enumerate(chain)})[sorted(chain)]
    frame["y"] = (frame["x4"] + rng.normal(0, 0.5, n) > 0).astype(int)
    schema = Schema(
        (
            *(ColumnSchema.numeric(c, lo=-4.0, hi=4.0, bins=10) for c in sorted(chain)),
            ColumnSchema.categorical("y", [0, 1]),
        )
    )
    return Dataset("gaussian_chain", frame.iloc[:10_000], frame.iloc[10_000:], schema, "y")


def wire(obj: Any) -> Any:
    return json.loads(json.dumps(obj, allow_nan=False))


def synthesize(data: Dataset, epsilon: float, seed: int) -> tuple[pd.DataFrame, MeasurementPlan]:
    rng = np.random.default_rng(seed)
    plan_wire = wire(marginal_plan(data.schema, target_epsilon=epsilon, delta=DELTA).to_dict())
    order = rng.permutation(len(data.train))
    parts = np.split(order, np.cumsum([int(s * len(order)) for s in SITE_SHARES[:-1]]))
    plan = MeasurementPlan.from_dict(plan_wire)
    measurements = [
        wire(measure_site(data.train.iloc[part], data.schema, plan, rng)) for part in parts
    ]
    model = fit_tree(wire(combine(measurements)), data.schema)
    rows = min(20_000, 10 * len(data.train))
    return model.sample(rows, rng), plan


def tvd(data: Dataset, synthetic: pd.DataFrame) -> list[float]:
    out = []
    for col in data.schema.columns:
        a = np.bincount(col.encode(data.train[col.name]), minlength=col.bins) / len(data.train)
        b = np.bincount(col.encode(synthetic[col.name]), minlength=col.bins) / len(synthetic)
        out.append(float(0.5 * np.abs(a - b).sum()))
    return out


def correlation_errors(data: Dataset, synthetic: pd.DataFrame) -> tuple[float, float]:
    numeric = [c.name for c in data.schema.columns if c.kind == "numeric"]
    real, syn = data.train[numeric].corr(), synthetic[numeric].corr()
    pairs = [(a, b) for i, a in enumerate(numeric) for b in numeric[i + 1 :]]
    errors = [abs(real.loc[a, b] - syn.loc[a, b]) for a, b in pairs]
    strong = [e for e, (a, b) in zip(errors, pairs, strict=True) if abs(real.loc[a, b]) >= STRONG]
    return float(np.mean(errors)), float(np.mean(strong))


def accuracy(data: Dataset, train: pd.DataFrame) -> float:
    labelled = train.dropna(subset=[data.label])
    clf = LogisticRegression(max_iter=5000)
    clf.fit(labelled[data.features], labelled[data.label].astype(int))
    return float(clf.score(data.test[data.features], data.test[data.label].astype(int)))


def run(data: Dataset, epsilons: tuple[float, ...], seeds: int) -> dict[str, Any]:
    real_acc = accuracy(data, data.train)
    majority = float(data.test[data.label].value_counts(normalize=True).max())
    rows = []
    for eps in epsilons:
        runs: list[dict[str, float]] = []
        plan = None
        start = time.perf_counter()
        for seed in range(seeds):
            synthetic, plan = synthesize(data, eps, seed)
            tv = tvd(data, synthetic)
            corr_all, corr_strong = correlation_errors(data, synthetic)
            runs.append(
                {
                    "tvd_mean": float(np.mean(tv)),
                    "tvd_max": max(tv),
                    "corr_mae": corr_all,
                    "corr_mae_strong": corr_strong,
                    "acc_synthetic": accuracy(data, synthetic),
                    "missing_label": float(synthetic[data.label].isna().mean()),
                }
            )
        assert plan is not None
        summary: dict[str, Any] = {
            key: statistics.mean(r[key] for r in runs) for key in runs[0] if key != "tvd_max"
        }
        summary["tvd_max"] = max(r["tvd_max"] for r in runs)
        summary["acc_synthetic_sd"] = statistics.stdev(r["acc_synthetic"] for r in runs)
        rows.append(
            {
                "epsilon": eps,
                "reference": eps == REFERENCE_EPSILON,
                "plan_epsilon": plan.epsilon,
                "noise_std": plan.marginals[0].noise_std,
                "marginals": len(plan.marginals),
                "seconds_per_run": (time.perf_counter() - start) / seeds,
                **summary,
                "runs": runs,
            }
        )
    return {
        "dataset": data.name,
        "train_rows": len(data.train),
        "test_rows": len(data.test),
        "columns": list(data.schema.names),
        "schema": data.schema.to_dict(),
        "acc_real": real_acc,
        "majority": majority,
        "results": rows,
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\n{report['dataset']}: {report['train_rows']} training rows over 3 sites "
        f"{SITE_SHARES}, {report['test_rows']} real test rows; real-trained accuracy "
        f"{report['acc_real']:.3f}, majority class {report['majority']:.3f}"
    )
    header = (
        f"{'ε/site':>7} {'σ/cell':>7} {'TVD mean':>8} {'TVD max':>7} {'|Δρ| all':>8} "
        f"{'|Δρ| strong':>11} {'acc synth':>12} {'acc real':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        eps = f"{r['epsilon']:g}" + ("*" if r["reference"] else "")
        print(
            f"{eps:>7} {r['noise_std']:7.2f} {r['tvd_mean']:8.3f} {r['tvd_max']:7.3f} "
            f"{r['corr_mae']:8.3f} {r['corr_mae_strong']:11.3f} "
            f"{r['acc_synthetic']:6.3f}±{r['acc_synthetic_sd']:.3f} {report['acc_real']:8.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="runs per (dataset, ε)")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write results")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2")

    start = time.perf_counter()
    loaders: tuple[Callable[[], Dataset], ...] = (breast_cancer, gaussian_chain)
    reports = [run(load(), (*EPSILONS, REFERENCE_EPSILON), args.seeds) for load in loaders]
    wall = time.perf_counter() - start
    print(
        f"federated DP synthetic data: δ = {DELTA:g}, {args.seeds} seeds per row, "
        f"python {platform.python_version()} on {platform.machine()}; "
        "all one- and two-way marginals measured with one σ"
    )
    for report in reports:
        print_table(report)
    print(f"\n* ε = {REFERENCE_EPSILON:g}: almost no noise, the method's own loss.  ({wall:.0f} s)")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "environment": {
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                    "wall_s": round(wall, 1),
                },
                "delta": DELTA,
                "site_shares": list(SITE_SHARES),
                "seeds": args.seeds,
                "datasets": reports,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
