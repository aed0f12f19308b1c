"""Federated DP synthetic data (common.synthesis, orchestrator.synthesis_tree): schema,
calibration, noise, combination, utility.

The utility tests run the whole protocol as it would run across processes: every request and
response goes through ``json.dumps``/``json.loads``, data is split unevenly over three
simulated sites, each measuring at ε=3, δ=1e-5, and only the orchestrator-side functions see
the combined noisy counts.
"""

from __future__ import annotations

import json
import math
import traceback
from itertools import pairwise
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from common.dp.accounting import compute_epsilon
from common.dp.calibrate import calibrate_noise_multiplier
from common.dp.events import DpEvent
from common.errors import InvalidSpecError, InvalidUpdateError
from common.synthesis.discretisation import ColumnSchema, MeasurementDict, Schema, infer_schema
from common.synthesis.marginals import (
    MeasurementPlan,
    default_marginals,
    marginal_plan,
    measure_site,
    planned_events,
)
from orchestrator.synthesis_tree import combine, fit_and_sample, fit_tree, measurement_events

DELTA = 1e-5
SITE_SHARES = (0.55, 0.30, 0.15)  # uneven split of the rows over three sites


def wire(obj: Any) -> Any:
    """What the other side of a gRPC call would see (strict JSON, no NaN or infinity)."""
    return json.loads(json.dumps(obj, allow_nan=False))


def split_sites(n: int, rng: np.random.Generator) -> list[npt.NDArray[np.int64]]:
    order = rng.permutation(n)
    cuts = np.cumsum([int(s * n) for s in SITE_SHARES[:-1]])
    return list(np.split(order, cuts))


def federated_synthetic(
    df: pd.DataFrame, schema: Schema, *, epsilon: float, rows: int, seed: int
) -> tuple[pd.DataFrame, MeasurementPlan, Any]:
    """Plan at the orchestrator, measure at three sites, combine, fit and sample."""
    rng = np.random.default_rng(seed)
    plan_wire = wire(marginal_plan(schema, target_epsilon=epsilon, delta=DELTA).to_dict())
    measurements = []
    for part in split_sites(len(df), rng):
        site_schema = Schema.from_dict(wire(schema.to_dict()))  # the site's own declaration
        plan = MeasurementPlan.from_dict(plan_wire)
        measurements.append(wire(measure_site(df.iloc[part], site_schema, plan, rng)))
    combined = wire(combine(measurements))
    model = fit_tree(combined, schema)
    return model.sample(rows, rng), plan, model


def tvd(real: pd.Series, synthetic: pd.Series, column: ColumnSchema) -> float:
    """Total variation distance between the two columns' distributions over the bins."""
    a = np.bincount(column.encode(real), minlength=column.bins) / len(real)
    b = np.bincount(column.encode(synthetic), minlength=column.bins) / len(synthetic)
    return float(0.5 * np.abs(a - b).sum())


class ZeroNoise(np.random.Generator):
    """A generator whose Gaussian draws are all zero: exposes the exact counts."""

    def normal(self, loc: Any = 0.0, scale: Any = 1.0, size: Any = None) -> Any:
        return np.zeros(size)


# --------------------------------------------------------------------------- schema


def mixed_schema() -> Schema:
    return Schema(
        (
            ColumnSchema.numeric("age", lo=18.0, hi=90.0, bins=6),
            ColumnSchema.categorical("region", ["north", "south", "east"]),
            ColumnSchema.categorical("label", [0, 1]),
            ColumnSchema.categorical("score", [0.5, 1.5]),
            ColumnSchema.categorical("member", [False, True]),
        )
    )


def test_schema_round_trips_through_json() -> None:
    schema = mixed_schema()
    back = Schema.from_dict(wire(schema.to_dict()))
    assert back == schema
    assert back.fingerprint() == schema.fingerprint()
    assert [c.bins for c in back.columns] == [6, 4, 3, 3, 3]  # categories + "other"
    assert back.column("label").categories == (0, 1)
    assert back.column("member").categories == (False, True)
    assert schema.fingerprint() != Schema(schema.columns[:-1]).fingerprint()


@pytest.mark.parametrize(
    "raw",
    [
        {"name": "x", "kind": "numeric", "bounds": [1.0, 1.0], "bins": 4},
        {"name": "x", "kind": "numeric", "bounds": [0.0, float("inf")], "bins": 4},
        {"name": "x", "kind": "numeric", "bounds": [0.0, 1.0], "bins": 1},
        {"name": "x", "kind": "numeric", "bounds": [0.0, 1.0], "bins": 4.0},
        {"name": "x", "kind": "numeric", "bounds": [0.0, 1.0], "bins": 4, "extra": 1},
        {"name": "x", "kind": "categorical", "categories": [1, 1.0]},
        {"name": "x", "kind": "categorical", "categories": []},
        {"name": "x", "kind": "categorical", "categories": ["a", "b"], "bins": 2},
        {"name": "x", "kind": "categorical", "categories": [["nested"]]},
        {"name": "x", "kind": "ordinal", "categories": ["a"]},
        {"name": "", "kind": "categorical", "categories": ["a"]},
    ],
)
def test_bad_column_declarations_are_refused(raw: dict[str, Any]) -> None:
    with pytest.raises(InvalidSpecError):
        ColumnSchema.from_dict(raw)


def test_schema_refuses_duplicate_names() -> None:
    col = ColumnSchema.categorical("x", ["a"])
    with pytest.raises(InvalidSpecError, match="unique"):
        Schema((col, col))


def test_numeric_values_outside_the_bounds_are_clipped_to_the_edge_bins() -> None:
    col = ColumnSchema.numeric("x", lo=0.0, hi=10.0, bins=5)
    values = [-1e12, -0.001, 0.0, 1.999, 2.0, 9.999, 10.0, 10.001, 1e12, math.inf, -math.inf]
    assert col.encode(values).tolist() == [0, 0, 0, 0, 1, 4, 4, 4, 4, 4, 0]
    decoded = col.decode(np.arange(5), np.random.default_rng(0))
    assert ((decoded >= np.arange(5) * 2.0) & (decoded <= np.arange(5) * 2.0 + 2.0)).all()


@given(st.floats(min_value=-5.0, max_value=5.0, allow_nan=False), st.integers(2, 50))
@settings(max_examples=200, deadline=None)
def test_decoding_stays_inside_the_bin(x: float, bins: int) -> None:
    col = ColumnSchema.numeric("x", lo=-3.0, hi=3.0, bins=bins)
    code = col.encode([x])
    back = col.decode(code, np.random.default_rng(1))
    assert -3.0 <= back.iloc[0] <= 3.0
    assert col.encode(back).tolist() == code.tolist()


def test_unknown_and_missing_categories_go_to_the_reserved_other_bin() -> None:
    col = ColumnSchema.categorical("region", ["north", "south"])
    codes = col.encode(["south", "north", "mars", None, math.nan, 3, ["unhashable"]])
    assert codes.tolist() == [1, 0, 2, 2, 2, 2, 2]
    decoded = col.decode(codes, np.random.default_rng(0))
    assert decoded[:2].tolist() == ["south", "north"]
    assert decoded[2:].isna().all()  # "other" is published as a missing value, never a value
    label = ColumnSchema.categorical("label", [0, 1])
    assert label.encode(np.array([1.0, 0.0, 2.0])).tolist() == [1, 0, 2]  # 1.0 == 1
    assert label.decode(np.array([0, 1, 1]), np.random.default_rng(0)).dtype == np.int64


SECRET_TEXT = "Jane Doe 4711-0815"
SECRET_NUMBER = 987654.3219


def _no_secret(text: str) -> None:
    for token in ("Jane", "4711", "0815", "987654", "3219"):
        assert token not in text


@pytest.mark.parametrize("as_array", [False, True])
def test_errors_never_quote_data_values(as_array: bool) -> None:
    schema = Schema(
        (ColumnSchema.numeric("income", lo=0, hi=1e5), ColumnSchema.categorical("c", ["a"]))
    )
    df = pd.DataFrame({"income": [10.0, SECRET_TEXT, 20.0], "c": ["a", "a", "a"]})
    data: Any = df.to_numpy() if as_array else df
    plan = marginal_plan(schema, target_epsilon=1.0, delta=DELTA)
    with pytest.raises(InvalidSpecError) as info:
        measure_site(data, schema, plan, np.random.default_rng(0))
    assert "income" in str(info.value)
    _no_secret("".join(traceback.format_exception(info.value)))
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_out_of_bounds_and_unknown_values_are_measured_without_being_quoted() -> None:
    schema = Schema(
        (ColumnSchema.numeric("income", lo=0, hi=1e5), ColumnSchema.categorical("c", ["a"]))
    )
    df = pd.DataFrame({"income": [10.0, SECRET_NUMBER * 1e3], "c": ["a", SECRET_TEXT]})
    plan = marginal_plan(schema, target_epsilon=1.0, delta=DELTA)
    exact = measure_site(df, schema, plan, ZeroNoise(np.random.PCG64(0)))
    _no_secret(json.dumps(exact))
    income, c = exact["marginals"][0]["counts"], exact["marginals"][1]["counts"]
    assert income[0] == 1 and income[-1] == 1  # the huge value is clipped to the last bin
    assert c == [1.0, 1.0]  # the unknown category is counted in "other"


def test_missing_columns_are_named_and_array_shapes_checked() -> None:
    schema = mixed_schema()
    plan = marginal_plan(schema, target_epsilon=1.0, delta=DELTA)
    with pytest.raises(InvalidSpecError, match="region"):
        measure_site(pd.DataFrame({"age": [20]}), schema, plan, np.random.default_rng(0))
    with pytest.raises(InvalidSpecError, match="5 columns"):
        measure_site(np.zeros((3, 2)), schema, plan, np.random.default_rng(0))


# --------------------------------------------------------------------------- the DP analysis


@pytest.mark.parametrize("epsilon", [0.5, 3.0, 10.0])
@pytest.mark.parametrize("share", [None, 1 / 3, 0.0])
def test_calibrated_noise_keeps_each_sites_epsilon_within_the_target(
    epsilon: float, share: float | None
) -> None:
    schema = mixed_schema()
    plan = marginal_plan(schema, target_epsilon=epsilon, delta=DELTA, one_way_share=share)
    recomputed = compute_epsilon(plan.events, delta=DELTA, accountant="prv").epsilon
    assert recomputed == plan.epsilon
    assert 0.97 * epsilon <= recomputed <= epsilon  # within budget, and not wastefully so
    d, p = 5, 10
    one_way = [m for m in plan.marginals if len(m.columns) == 1]
    two_way = [m for m in plan.marginals if len(m.columns) == 2]
    assert len(one_way) == (0 if share == 0.0 else d) and len(two_way) == p
    # The events are exactly the marginals grouped by σ, each a sensitivity-1 Gaussian.
    assert sum(e.steps for e in plan.events) == len(plan.marginals)
    assert all(e.sample_rate == 1.0 for e in plan.events)
    for e in plan.events:
        assert sum(m.noise_std == e.noise_multiplier for m in plan.marginals) == e.steps
    if share is None or share == 0.0:
        (event,) = plan.events
        expected = calibrate_noise_multiplier(
            target_epsilon=epsilon, sample_rate=1.0, steps=len(plan.marginals), delta=DELTA
        )
        assert event == DpEvent(expected, 1.0, len(plan.marginals))
    else:
        # Precision 1/σ² is split as declared: the one-way marginals hold `share` of it.
        s1, s2 = one_way[0].noise_std, two_way[0].noise_std
        precision_1, precision_2 = d / s1**2, p / s2**2
        assert precision_1 / (precision_1 + precision_2) == pytest.approx(share, rel=1e-9)


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_the_orchestrators_planned_events_are_the_sites_plan(d: int) -> None:
    """What the orchestrator charges a site for synthetic data (from the column count the
    request and the catalog fix) is exactly what the site's own plan charges, whatever the
    columns' kinds and bins."""
    schema = Schema(mixed_schema().columns[:d])
    plan = marginal_plan(schema, target_epsilon=2.0, delta=DELTA)
    assert planned_events(d, target_epsilon=2.0, delta=DELTA) == plan.events
    assert default_marginals(schema) == [m.columns for m in plan.marginals]
    with pytest.raises(InvalidSpecError, match="at least one column"):
        planned_events(0, target_epsilon=2.0, delta=DELTA)


def test_selected_pairs_and_bad_plans() -> None:
    schema = mixed_schema()
    plan = marginal_plan(schema, target_epsilon=1.0, delta=DELTA, pairs=[("label", "age")])
    assert [m.columns for m in plan.marginals][-1] == ("age", "label")  # schema order
    assert len(plan.marginals) == 6
    for pairs in ([("age", "age")], [("age", "nope")], [("age", "label"), ("label", "age")]):
        with pytest.raises(InvalidSpecError):
            marginal_plan(schema, target_epsilon=1.0, delta=DELTA, pairs=pairs)
    with pytest.raises(InvalidSpecError, match="no marginal of column"):
        marginal_plan(
            schema, target_epsilon=1.0, delta=DELTA, pairs=[("age", "label")], one_way_share=0.0
        )
    with pytest.raises(InvalidSpecError, match="one_way_share"):
        marginal_plan(schema, target_epsilon=1.0, delta=DELTA, one_way_share=1.0)


def test_a_plan_from_the_wire_is_re_accounted_not_trusted() -> None:
    schema = mixed_schema()
    plan = marginal_plan(schema, target_epsilon=2.0, delta=DELTA)
    assert MeasurementPlan.from_dict(wire(plan.to_dict())) == plan
    tampered = wire(plan.to_dict())
    tampered["epsilon"] = 0.01  # a false claim is ignored: ε is recomputed
    assert MeasurementPlan.from_dict(tampered).epsilon == plan.epsilon
    for m in tampered["marginals"]:
        m["noise_std"] /= 2  # less noise than the target allows
    with pytest.raises(InvalidSpecError, match="above its target"):
        MeasurementPlan.from_dict(tampered)
    tampered = wire(plan.to_dict())
    tampered["marginals"].append(tampered["marginals"][0])  # the same marginal twice
    with pytest.raises(InvalidSpecError, match="twice"):
        MeasurementPlan.from_dict(tampered)
    with pytest.raises(InvalidSpecError, match="unknown field"):
        MeasurementPlan.from_dict({**wire(plan.to_dict()), "sensitivity": 0.1})


def test_a_site_refuses_a_plan_for_another_schema() -> None:
    schema = mixed_schema()
    other = Schema((*schema.columns[:-1], ColumnSchema.categorical("member", [0, 1, 2])))
    plan = marginal_plan(other, target_epsilon=1.0, delta=DELTA)
    df = pd.DataFrame({"age": [30], "region": ["north"], "label": [1], "score": [0.5]})
    df["member"] = True
    with pytest.raises(InvalidSpecError, match="different schema"):
        measure_site(df, schema, plan, np.random.default_rng(0))


def test_adding_one_row_changes_every_marginal_by_one_in_one_cell() -> None:
    schema = mixed_schema()
    plan = marginal_plan(schema, target_epsilon=1.0, delta=DELTA)
    rng = np.random.default_rng(0)
    base = pd.DataFrame(
        {
            "age": rng.uniform(0, 120, 200),
            "region": rng.choice(["north", "south", "east", "west"], 200),
            "label": rng.integers(0, 2, 200),
            "score": rng.choice([0.5, 1.5], 200),
            "member": rng.random(200) < 0.5,
        }
    )
    extra = pd.DataFrame(
        {"age": [1e9], "region": [SECRET_TEXT], "label": [7], "score": [None], "member": [None]}
    )
    zero = ZeroNoise(np.random.PCG64(0))
    a = measure_site(base, schema, plan, zero)
    b = measure_site(pd.concat([base, extra], ignore_index=True), schema, plan, zero)
    for ma, mb in zip(a["marginals"], b["marginals"], strict=True):
        diff = np.asarray(mb["counts"]) - np.asarray(ma["counts"])
        assert sorted(diff.tolist()) == [0.0] * (len(diff) - 1) + [1.0]


def _exact_counts(df: pd.DataFrame, schema: Schema, columns: list[str]) -> npt.NDArray[Any]:
    codes = schema.encode(df)
    shape = tuple(schema.column(c).bins for c in columns)
    idx = tuple(codes[:, schema.names.index(c)] for c in columns)
    return np.bincount(np.ravel_multi_index(idx, shape), minlength=math.prod(shape))


def test_the_noise_has_the_stated_standard_deviation() -> None:
    schema = Schema(
        (
            ColumnSchema.categorical("c", list(range(60))),
            ColumnSchema.numeric("x", lo=0.0, hi=1.0, bins=40),
        )
    )
    rng = np.random.default_rng(7)
    df = pd.DataFrame({"c": rng.integers(0, 60, 3000), "x": rng.random(3000)})
    plan = marginal_plan(schema, target_epsilon=1.0, delta=DELTA, one_way_share=1 / 3)
    residuals: dict[float, list[float]] = {}
    for _ in range(8):
        result = measure_site(df, schema, plan, rng)
        for planned, got in zip(plan.marginals, result["marginals"], strict=True):
            assert got["variance"] == pytest.approx(planned.noise_std**2)
            noise = np.asarray(got["counts"]) - _exact_counts(df, schema, got["columns"])
            residuals.setdefault(planned.noise_std, []).extend(noise.tolist())
    assert len(residuals) == 2  # the one- and two-way marginals have their own σ
    for sigma, values in residuals.items():
        z = np.asarray(values)
        n = z.size
        assert n >= 800
        assert abs(z.mean()) <= 4 * sigma / math.sqrt(n)
        # (n-1)s²/σ² ~ χ²(n-1) under N(0, σ²): a two-sided test at 1e-4.
        chi2 = (n - 1) * z.var(ddof=1) / sigma**2
        p_chi2 = 2 * min(stats.chi2.cdf(chi2, n - 1), stats.chi2.sf(chi2, n - 1))
        assert p_chi2 > 1e-4, (sigma, z.std(ddof=1))
        assert stats.kstest(z / sigma, "norm").pvalue > 1e-4


# --------------------------------------------------------------------------- combination


def _site_measurements(epsilons: list[float]) -> tuple[Schema, list[MeasurementDict]]:
    schema = mixed_schema()
    rng = np.random.default_rng(3)
    df = pd.DataFrame(
        {
            "age": rng.uniform(18, 90, 300),
            "region": rng.choice(["north", "south", "east"], 300),
            "label": rng.integers(0, 2, 300),
            "score": rng.choice([0.5, 1.5], 300),
            "member": rng.random(300) < 0.3,
        }
    )
    out = []
    for eps, part in zip(epsilons, np.array_split(np.arange(300), len(epsilons)), strict=True):
        plan = marginal_plan(schema, target_epsilon=eps, delta=DELTA)
        out.append(wire(measure_site(df.iloc[part], schema, plan, rng)))
    return schema, out


def test_combine_sums_counts_and_adds_noise_variances() -> None:
    schema, (a, b, c) = _site_measurements([1.0, 4.0, 2.0])  # each site its own budget
    combined = combine([a, b, c])
    assert combined["sites"] == 3 and "events" not in combined
    for k, m in enumerate(combined["marginals"]):
        parts = [a["marginals"][k], b["marginals"][k], c["marginals"][k]]
        assert m["counts"] == pytest.approx(np.sum([p["counts"] for p in parts], axis=0))
        assert m["variance"] == pytest.approx(sum(p["variance"] for p in parts))
    nested = combine([combine([a, b]), c])
    assert nested["sites"] == 3
    assert nested["marginals"][3]["counts"] == pytest.approx(combined["marginals"][3]["counts"])
    assert measurement_events(a) == tuple(
        marginal_plan(schema, target_epsilon=1.0, delta=DELTA).events
    )


def test_combine_refuses_malformed_or_mismatched_measurements() -> None:
    _, (a, b) = _site_measurements([1.0, 1.0])
    bad_schema = {**b, "schema_fingerprint": "0" * 64}
    fewer = {**b, "marginals": b["marginals"][:-1]}
    short = wire(b)
    short["marginals"][0]["counts"] = short["marginals"][0]["counts"][:-1]
    nan = wire(b)
    nan["marginals"][0]["counts"][0] = float("nan")
    zero_var = wire(b)
    zero_var["marginals"][0]["variance"] = 0.0
    extra = {**b, "raw_rows": []}
    for bad in (bad_schema, fewer, short, nan, zero_var, extra):
        with pytest.raises(InvalidUpdateError):
            combine([a, bad])
    with pytest.raises(InvalidUpdateError):
        combine([])


def test_fit_refuses_measurements_for_another_schema() -> None:
    _, (a,) = _site_measurements([1.0])
    other = Schema((ColumnSchema.categorical("z", ["a"]),))
    with pytest.raises(InvalidUpdateError, match="different schema"):
        fit_and_sample(a, other, rows=10, rng=np.random.default_rng(0))


def test_samples_follow_the_schema() -> None:
    schema, measurements = _site_measurements([2.0, 2.0, 2.0])
    synthetic = fit_and_sample(
        combine(measurements), schema, rows=500, rng=np.random.default_rng(1)
    )
    assert list(synthetic.columns) == list(schema.names) and len(synthetic) == 500
    assert synthetic["age"].between(18.0, 90.0).all()
    assert set(synthetic["region"].dropna()) <= {"north", "south", "east"}
    assert set(synthetic["label"].dropna()) <= {0, 1}
    with pytest.raises(ValueError, match="rows"):
        fit_and_sample(combine(measurements), schema, rows=0, rng=np.random.default_rng(1))


def test_infer_schema_is_a_site_side_draft() -> None:
    df = pd.DataFrame(
        {
            "x": np.linspace(-2.0, 3.0, 50),
            "k": np.arange(50) % 3,
            "s": ["a", "b"] * 25,
            "b": [True, False] * 25,
        }
    )
    schema = infer_schema(df, bins=7, categorical_max=5)
    assert schema.column("x") == ColumnSchema.numeric("x", lo=-2.0, hi=3.0, bins=7)
    assert schema.column("k").categories == (0, 1, 2)
    assert schema.column("s").categories == ("a", "b")
    assert schema.column("b").categories == (False, True)


# --------------------------------------------------------------------------- utility


BREAST_CANCER_COLUMNS = [
    "mean radius",
    "mean texture",
    "mean smoothness",
    "mean concavity",
    "mean concave points",
    "worst radius",
    "worst perimeter",
    "target",
]


def test_breast_cancer_synthetic_data_keeps_marginals_correlations_and_a_classifier() -> None:
    frame = load_breast_cancer(as_frame=True).frame[BREAST_CANCER_COLUMNS]
    train, test = train_test_split(frame, test_size=0.3, random_state=0, stratify=frame["target"])
    # The declaration a site config would hold (drafted from the site's data, then reviewed).
    schema = infer_schema(train, bins=5, clip_quantile=0.01)
    assert schema.column("target").categories == (0, 1)
    synthetic, plan, _ = federated_synthetic(train, schema, epsilon=3.0, rows=4000, seed=11)
    assert plan.epsilon <= 3.0 and len(plan.marginals) == 8 + 28

    for col in schema.columns:
        assert tvd(train[col.name], synthetic[col.name], col) < 0.15, col.name

    features = [c for c in BREAST_CANCER_COLUMNS if c != "target"]
    real_corr, syn_corr = train[features].corr(), synthetic[features].corr()
    strong = [
        (a, b)
        for i, a in enumerate(features)
        for b in features[i + 1 :]
        if abs(real_corr.loc[a, b]) >= 0.8
    ]
    assert len(strong) >= 5
    errors = [abs(real_corr.loc[a, b] - syn_corr.loc[a, b]) for a, b in strong]
    # At 398 rows, 36 marginals and ε=3 the noise is large; independent columns would miss
    # by ~0.85. The tree keeps every strong pair positive and most of the correlation.
    assert all(syn_corr.loc[a, b] > 0.2 for a, b in strong)
    assert float(np.mean(errors)) < 0.5

    labelled = synthetic.dropna(subset=["target"])
    assert len(labelled) >= 0.95 * len(synthetic)  # little mass in the "other" label bin
    clf = LogisticRegression(max_iter=5000).fit(labelled[features], labelled["target"].astype(int))
    accuracy = clf.score(test[features], test["target"])
    majority = max(test["target"].mean(), 1 - test["target"].mean())
    assert accuracy >= 0.80 and accuracy >= majority + 0.15, accuracy


def test_correlated_gaussian_recovers_the_chain_and_its_correlations() -> None:
    rng = np.random.default_rng(2024)
    d, rho, n = 6, 0.9, 10_000
    chain = ["x0", "x3", "x1", "x5", "x2", "x4"]  # a Markov chain in a hidden column order
    cov = rho ** np.abs(np.subtract.outer(np.arange(d), np.arange(d)))
    draws = rng.multivariate_normal(np.zeros(d), cov, size=n)
    df = pd.DataFrame({name: draws[:, k] for k, name in enumerate(chain)})[sorted(chain)]
    df["y"] = (df["x4"] + rng.normal(0, 0.5, n) > 0).astype(int)
    schema = Schema(
        (
            *(ColumnSchema.numeric(c, lo=-4.0, hi=4.0, bins=10) for c in sorted(chain)),
            ColumnSchema.categorical("y", [0, 1]),
        )
    )
    synthetic, _, model = federated_synthetic(df, schema, epsilon=3.0, rows=20_000, seed=5)

    true_edges = {frozenset(p) for p in pairwise(chain)} | {frozenset(("x4", "y"))}
    assert {frozenset(e) for e in model.edges} == true_edges

    for col in schema.columns:
        assert tvd(df[col.name], synthetic[col.name], col) < 0.05, col.name
    # Binning alone (10 bins of width 0.8, uniform within a bin) lowers a 0.9 correlation to
    # about 0.81: compare with the real data both as is and at the schema's resolution.
    binned = schema.decode(schema.encode(df), rng)
    real, at_resolution, syn = (x[chain].corr() for x in (df, binned, synthetic))
    for a, b in pairwise(chain):
        assert abs(real.loc[a, b] - syn.loc[a, b]) < 0.25, (a, b)
        assert abs(at_resolution.loc[a, b] - syn.loc[a, b]) < 0.15, (a, b)
    strong = [(a, b) for a in chain for b in chain if a < b and abs(real.loc[a, b]) >= 0.7]
    assert len(strong) >= 9
    for a, b in strong:
        assert abs(real.loc[a, b] - syn.loc[a, b]) < 0.3, (a, b)
